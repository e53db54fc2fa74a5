"""Abliteration: a model with a finished direction stage's refusal direction orthogonalised out of its
weights, at the strength the stage recorded, saved as a plain transformers model.

    ablate abliterate MODEL --direction runs/x/directions --out runs/x/models/abliterated [--stream]
    abliterate("embedded", Path("runs/x/directions"), Path("runs/x/models/abliterated"))
    orthogonalize_from(model, Path("runs/x/directions"))     # in memory, in place
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from ablate.artifacts import file_sha256, fingerprint, is_done, mark_done, write_json
from ablate.config import ModelConfig, Quantization
from ablate.directions.output import load_direction
from ablate.interventions import layer_weights, orthogonalize_weights, weights_for
from ablate.models import load_model


def orthogonalize_from(model: nn.Module, direction_dir: Path) -> dict:
    """Orthogonalise `model` in place against a finished direction stage, at its recorded strength.

    Returns the stage's selected metadata.
    """
    direction, selected = load_direction(Path(direction_dir))
    orthogonalize_weights(model, direction, weights_for(model, selected))
    return selected


def abliterate(model, direction_dir: Path, out_dir: Path, progress: bool = True, loaded: tuple | None = None,
               stream: bool | None = None) -> Path:
    """Load `model` (spec or ModelConfig), orthogonalise it against a saved direction, save it.

    The saved folder (safetensors + config + tokenizer + abliteration.json) loads with plain
    `AutoModelForCausalLM.from_pretrained(out_dir)`. Written to `<out_dir>.partial` and renamed, so an
    error leaves nothing half-written. Skips when `out_dir/done.json` records the same inputs. `loaded`:
    (model, tokenizer) already loaded from `model`, orthogonalised in place instead of loading it again.
    `stream`: read the original safetensors shard by shard instead of loading the model (ablate.streaming);
    None = stream when the model config quantises it (quantised weights cannot be edited in place).
    """
    out_dir = Path(out_dir)
    config = model if isinstance(model, ModelConfig) else ModelConfig(spec=str(model))
    stream = config.quantization is not Quantization.none if stream is None else stream
    direction, selected = load_direction(Path(direction_dir))
    direction_file = Path(direction_dir) / "direction.pt"
    inputs = {"model": config.model_dump(mode="json"), "direction_sha256": file_sha256(direction_file),
              "strength": selected.get("strength")}
    key = fingerprint(inputs)
    if is_done(out_dir, key):
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if stream:
            method = _abliterate_streaming(config, direction, selected, tmp)
        else:
            method = _abliterate_in_memory(config, direction, selected, tmp, loaded)
        write_json(tmp / "abliteration.json", {**inputs, "direction_dir": str(direction_dir), "method": method,
                                               "layer": selected.get("layer"), "position": selected.get("position")})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out_dir)
    mark_done(out_dir, key, direction_dir=str(direction_dir))
    return out_dir


def _abliterate_in_memory(config: ModelConfig, direction: torch.Tensor, selected: dict, tmp: Path,
                          loaded: tuple | None) -> dict:
    loaded, tokenizer = loaded if loaded is not None else load_model(config)
    orthogonalize_weights(loaded, direction, weights_for(loaded, selected))
    loaded.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return {"kind": "in-memory"}


def _abliterate_streaming(config: ModelConfig, direction: torch.Tensor, selected: dict, tmp: Path) -> dict:
    from ablate.streaming import abliterate_shards, checkpoint_shards, local_folder, writer_plan

    source = local_folder(config.spec, config.revision)
    checkpoint_shards(source)  # a shard index naming a missing file is one line, before any other work
    plan = writer_plan(source, config.trust_remote_code)
    strength = selected.get("strength") or {}
    weights = layer_weights(plan["n_layers"], strength.get("coefficient", 1.0), strength.get("kernel"),
                            strength.get("writer_weights"))
    if not plan["exact"]:
        warnings.warn(f"{plan['family']}: a norm sits between each residual writer and the residual add, so weight "
                      "orthogonalisation only approximates hook ablation (logits will differ)", stacklevel=3)
    summary = abliterate_shards(source, direction, tmp, weights, trust_remote_code=config.trust_remote_code)
    return {"kind": "streaming", "source": str(source), **summary}
