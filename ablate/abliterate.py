"""Abliteration: a model with a finished direction stage's refusal direction orthogonalised out of its
weights, at the strength the stage recorded, saved as a plain transformers model.

    ablate abliterate MODEL --direction runs/x/directions --out runs/x/models/abliterated
    abliterate("embedded", Path("runs/x/directions"), Path("runs/x/models/abliterated"))
    orthogonalize_from(model, Path("runs/x/directions"))     # in memory, in place
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from torch import nn

from ablate.artifacts import file_sha256, fingerprint, is_done, mark_done, write_json
from ablate.config import ModelConfig
from ablate.directions.output import load_direction
from ablate.interventions import orthogonalize_weights, weights_for
from ablate.models import load_model


def orthogonalize_from(model: nn.Module, direction_dir: Path) -> dict:
    """Orthogonalise `model` in place against a finished direction stage, at its recorded strength.

    Returns the stage's selected metadata.
    """
    direction, selected = load_direction(Path(direction_dir))
    orthogonalize_weights(model, direction, weights_for(model, selected))
    return selected


def abliterate(model, direction_dir: Path, out_dir: Path, progress: bool = True, loaded: tuple | None = None) -> Path:
    """Load `model` (spec or ModelConfig), orthogonalise it against a saved direction, save it.

    The saved folder (safetensors + config + tokenizer + abliteration.json) loads with plain
    `AutoModelForCausalLM.from_pretrained(out_dir)`. Written to `<out_dir>.partial` and renamed.
    Skips when `out_dir/done.json` records the same inputs. `loaded`: (model, tokenizer) already loaded
    from `model`, orthogonalised in place instead of loading it again.
    """
    out_dir = Path(out_dir)
    config = model if isinstance(model, ModelConfig) else ModelConfig(spec=str(model))
    direction, selected = load_direction(Path(direction_dir))
    direction_file = Path(direction_dir) / "direction.pt"
    inputs = {"model": config.model_dump(mode="json"), "direction_sha256": file_sha256(direction_file),
              "strength": selected.get("strength")}
    key = fingerprint(inputs)
    if is_done(out_dir, key):
        return out_dir
    loaded, tokenizer = loaded if loaded is not None else load_model(config)
    orthogonalize_weights(loaded, direction, weights_for(loaded, selected))
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    loaded.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_json(tmp / "abliteration.json", {**inputs, "direction_dir": str(direction_dir),
                                           "layer": selected.get("layer"), "position": selected.get("position")})
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out_dir)
    mark_done(out_dir, key, direction_dir=str(direction_dir))
    return out_dir
