"""Abliterate a model shard by shard, without loading it: peak memory is about one safetensors shard.

For a model too large for memory, or one loaded quantised (whose 4-bit weights cannot be edited),
`abliterate_shards` reads the original safetensors files one at a time, projects the refusal direction
out of every residual writer they hold,

    W_out ← W_out − w r̂ r̂ᵀ W_out          (per tensor, d_model on its residual axis)

and writes new shards with the same names, a new index, the config (head untied where it was tied) and
the tokenizer files. The result equals in-memory `orthogonalize_weights` (tests/test_streaming.py).

Which checkpoint tensors write into the residual stream is read from their names, with the same
`Family` name candidates the in-memory adapter uses, inside the layer list that sits beside the token
embedding (so Gemma-3's vision tower is left alone). Checkpoints keep names that transformers 5 may
convert on load (Mixtral's `block_sparse_moe.experts.N.w2`), so names are matched as stored.

`ShardWriter` is the shard-by-shard writer both this module and the merged QLoRA export use.

    ablate abliterate MODEL --direction runs/x/directions --out runs/x/abliterated --stream
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from ablate import AblateError
from ablate.architectures import FAMILIES, Family, get_adapter, writer_output_axis

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class ShardWriter:
    """Collect tensors and write them as safetensors shards of at most `max_bytes` each, plus an index."""

    def __init__(self, folder: Path, max_bytes: int = 5 << 30, metadata: dict | None = None):
        self.folder, self.max_bytes, self.metadata = Path(folder), max_bytes, metadata or {"format": "pt"}
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes, self.files, self.weight_map, self.total = 0, [], {}, 0
        self.folder.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.detach().to("cpu", copy=True).contiguous()  # a copy: tied weights share storage
        self.pending_bytes += size
        self.total += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        name = f"part-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, str(self.folder / name), metadata=self.metadata)
        self.files.append(name)
        self.weight_map.update({key: name for key in self.pending})
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard and name the files as transformers does (a single file, or N shards + index)."""
        self.flush()
        if len(self.files) == 1:
            os.replace(self.folder / self.files[0], self.folder / SINGLE)
            return [SINGLE]
        count = len(self.files)
        renamed = {old: f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i, old in enumerate(self.files)}
        for old, new in renamed.items():
            os.replace(self.folder / old, self.folder / new)
        index = {"metadata": {"total_size": self.total},
                 "weight_map": {key: renamed[file] for key, file in sorted(self.weight_map.items())}}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return list(renamed.values())


def checkpoint_shards(folder: Path) -> list[Path]:
    """The safetensors files of a model folder, in order; one line when the index names a missing file."""
    folder = Path(folder)
    if (folder / INDEX).exists():
        try:
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        except (ValueError, KeyError) as error:
            raise AblateError(f"{folder / INDEX}: not a safetensors index ({error})") from None
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (folder / name).is_file():
                raise AblateError(f"{folder / INDEX}: names shard '{name}', which is missing from {folder}")
        return [folder / name for name in files]
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    raise AblateError(f"{folder}: no safetensors weights ({SINGLE} or {INDEX}); streaming needs the original safetensors")


def _skeleton(folder: Path, trust_remote_code: bool):
    """The model built on the meta device from its config: names and module types, no memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return config, model


def writer_plan(folder: Path, trust_remote_code: bool = False) -> dict:
    """What streaming needs from the model's structure: the patterns of residual-writing checkpoint names."""
    config, model = _skeleton(folder, trust_remote_code)
    adapter = get_adapter(model)  # one line if the architecture is unsupported
    names = {id(module): name for name, module in model.named_modules()}
    family: Family = FAMILIES[adapter.family]
    embedding_local = names[id(adapter.embedding)].rpartition(".")[2]
    layers_local = names[id(adapter.layers)].rpartition(".")[2]
    fused_axes = {f"{names[id(part.module)]}.{part.name}": part.axis for part in adapter.all_writer_parts()
                  if part.tensor.dim() == 3}
    alternatives = lambda options: "|".join(re.escape(option) for option in options)  # noqa: E731
    attention = rf"(?:{alternatives(family.attention)})\.(?:{alternatives(family.attention_out)})\.(?:weight|bias)"
    out = alternatives(family.mlp_out)
    mlp = (rf"(?:{alternatives(family.mlp)})\.(?:(?:{out})\.(?:weight|bias)"
           rf"|(?:{alternatives(family.experts)})\.\d+\.(?:{out})\.(?:weight|bias)"
           rf"|(?:{alternatives(family.experts)})\.(?:{out})(?:_bias)?"
           rf"|(?:{alternatives(family.shared_experts)})\.(?:{out})\.(?:weight|bias))")
    tied = any(getattr(c, "tie_word_embeddings", False) for c in (config, getattr(config, "text_config", None)) if c)
    return {
        "family": adapter.family, "d_model": adapter.d_model, "n_layers": adapter.n_layers,
        "linear_axis": writer_output_axis(adapter.writers[0][0]),
        "embeddings": [embedding_local] + [names[id(m)].rpartition(".")[2] for m in adapter.extra_embeddings],
        "layers": layers_local, "attention": re.compile(attention), "mlp": re.compile(mlp),
        "fused_axes": fused_axes, "tied": tied, "head_name": names[id(adapter.lm_head)] + ".weight",
        "exact": adapter.exact_orthogonalization,
    }


def _classify(name: str, tensor_dim: int, plan: dict, body: str | None) -> tuple[str, int, int | None] | None:
    """(kind, writer index 0/1 or -1 for an embedding, layer) when checkpoint tensor `name` writes into the residual."""
    prefix = "" if not body else body + "."
    for local in plan["embeddings"]:
        if name == f"{prefix}{local}.weight":
            return "embedding", -1, None
    match = re.fullmatch(rf"{re.escape(prefix)}{re.escape(plan['layers'])}\.(\d+)\.(.+)", name)
    if match is None:
        return None
    layer, rest = int(match.group(1)), match.group(2)
    if plan["attention"].fullmatch(rest):
        return "attention", 0, layer
    if plan["mlp"].fullmatch(rest):
        return "mlp", 1, layer
    return None


def _axis(name: str, kind: str, tensor: torch.Tensor, plan: dict) -> int:
    """The residual (d_model) axis of a writer tensor as stored in the checkpoint."""
    d_model = plan["d_model"]
    if kind == "embedding":  # (vocab or positions, d_model)
        axis = 1
    elif tensor.dim() == 1:
        axis = 0
    elif tensor.dim() == 2 and name.endswith("_bias"):  # fused experts' biases [E, d_model]
        axis = 1
    elif tensor.dim() == 2:
        axis = plan["linear_axis"]
    else:  # fused experts [E, d_model, ffn] or transposed [E, ffn, d_model]
        axis = next((a for key, a in plan["fused_axes"].items() if name.endswith(key.split(".", 1)[-1])), None)
        if axis is None:
            fits = [a for a in (1, 2) if tensor.shape[a] == d_model]
            if len(fits) != 1:
                raise AblateError(f"{name}: cannot tell the d_model axis of fused experts of shape {tuple(tensor.shape)}")
            axis = fits[0]
    if tensor.shape[axis] != d_model:
        raise AblateError(f"{name}: shape {tuple(tensor.shape)} has no d_model={d_model} on axis {axis}; "
                          "the checkpoint does not match its config")
    return axis


def _find_body(keys: list[str], plan: dict) -> str | None:
    """The checkpoint prefix that holds the token embedding (and so the text layers), e.g. 'model'."""
    suffix = f"{plan['embeddings'][0]}.weight"
    candidates = [key[: -len(suffix)].rstrip(".") for key in keys if key == suffix or key.endswith("." + suffix)]
    if not candidates:
        raise AblateError(f"no token embedding '*{suffix}' among the checkpoint's tensors")
    return min(candidates, key=len)


def abliterate_shards(source: Path, direction: torch.Tensor, out_dir: Path, weights=None,
                      trust_remote_code: bool = False, max_shard_bytes: int | None = None) -> dict:
    """Write into `out_dir` (which must not hold a model yet) the orthogonalised copy of the safetensors model in
    `source`, one shard in memory at a time. `weights`: per-layer (or per-layer-per-writer) strengths as from
    `interventions.layer_weights`; None = full ablation, embeddings included. Returns a summary."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ablate.interventions import project_weight, unit

    source, out_dir = Path(source), Path(out_dir)
    shards = checkpoint_shards(source)  # before any work: a missing shard is one line
    plan = writer_plan(source, trust_remote_code)
    if direction.numel() != plan["d_model"]:
        raise AblateError(f"direction has {direction.numel()} entries but the model's d_model is {plan['d_model']}")
    r_hat = unit(direction)
    keys = []
    for shard in shards:
        with safe_open(str(shard), "pt") as handle:
            keys += list(handle.keys())
    body = _find_body(keys, plan)
    embedding_key = f"{body + '.' if body else ''}{plan['embeddings'][0]}.weight"
    untie = weights is None and plan["tied"] and plan["head_name"] not in keys
    largest = max(shard.stat().st_size for shard in shards)
    writer = ShardWriter(out_dir, max_shard_bytes or max(largest, 1 << 20))
    projected, layers_seen = 0, set()
    for shard in shards:
        tensors = load_file(str(shard))  # one shard in memory
        for name in list(tensors):
            found = _classify(name, tensors[name].dim(), plan, body)
            tensor = tensors.pop(name)
            if found is not None:
                kind, writer_index, layer = found
                if untie and name == embedding_key:  # the head keeps reading the original embedding
                    writer.add(plan["head_name"], tensor.clone())
                strength = _strength(weights, layer, writer_index)
                if strength:
                    tensor = tensor.clone()
                    project_weight(tensor, r_hat, _axis(name, kind, tensor, plan), strength)
                    projected += 1
                    if layer is not None:
                        layers_seen.add(layer)
            writer.add(name, tensor)
        del tensors
    if weights is None and len(layers_seen) != plan["n_layers"]:
        raise AblateError(f"found residual writers in {len(layers_seen)} of {plan['n_layers']} layers of {source}; "
                          "the checkpoint's names do not match its family")
    files = writer.close()
    _copy_side_files(source, out_dir, untie)
    return {"shards": files, "projected_tensors": projected, "untied_head": untie, "family": plan["family"],
            "exact": plan["exact"], "largest_input_shard_bytes": largest}


def _strength(weights, layer: int | None, writer_index: int) -> float:
    if weights is None:
        return 1.0
    if layer is None:  # partial ablation leaves the embeddings alone (as in-memory orthogonalisation does)
        return 0.0
    row = weights[layer]
    return float(row[writer_index]) if isinstance(row, (list, tuple)) else float(row)


def _copy_side_files(source: Path, out_dir: Path, untie: bool) -> None:
    """Config, generation config and tokenizer files; the head untied in the config where we untied it."""
    for path in source.iterdir():
        if path.is_file() and not path.name.endswith(".safetensors") and path.name != INDEX:
            shutil.copy2(path, out_dir / path.name)
    if untie:
        config = json.loads((out_dir / "config.json").read_text())
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict):
            config["text_config"]["tie_word_embeddings"] = False
        (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def local_folder(spec: str, revision: str | None = None) -> Path:
    """The folder of a model's original safetensors: a local directory, the embedded cache, or a hub snapshot."""
    from ablate.models import resolve_spec

    kind, location = resolve_spec(spec)
    if kind == "gguf":
        raise AblateError(f"model spec '{spec}': streaming abliteration reads safetensors, not a GGUF file; "
                          "convert it first (ablate models) or abliterate it in memory")
    if kind == "hub":
        from huggingface_hub import snapshot_download

        location = snapshot_download(spec, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.txt",
                                                                              "*.model", "*.jinja"])
    return Path(location)


def too_large_for_memory(spec: str, fraction: float = 0.8) -> bool:
    """Whether a local model's safetensors exceed `fraction` of this machine's free memory (False when unknown)."""
    from ablate.models import resolve_spec

    try:
        kind, location = resolve_spec(spec)
        if kind not in ("local", "embedded"):
            return False
        size = sum(path.stat().st_size for path in checkpoint_shards(Path(location)))
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AblateError, OSError, ValueError, AttributeError):
        return False
    return size > fraction * free


def _dense_weight(module: torch.nn.Module) -> torch.Tensor:
    """A layer's weight as float32: bitsandbytes 4-bit (NF4/FP4) and 8-bit weights de-quantised."""
    weight = module.weight
    if type(weight).__name__ in ("Params4bit", "Int8Params"):
        from transformers.integrations.bitsandbytes import dequantize_bnb_weight

        weight = dequantize_bnb_weight(weight, getattr(module, "state", None))
    return weight.detach().float()


@torch.no_grad()
def export_dequantized_merge(model, tokenizer, out_dir: Path, dtype: torch.dtype = torch.bfloat16,
                             max_shard_bytes: int = 5 << 30) -> dict:
    """Save a LoRA model trained on a quantised base as one plain model: every quantised weight de-quantised
    to float32, the LoRA update W += (α/r)·B·A added, the result cast to `dtype`, written shard by shard
    (CPU memory about one shard). Returns (and writes as dequantization.json) how it was de-quantised."""
    from ablate.artifacts import write_json
    from ablate.placement import describe_quantization

    out_dir = Path(out_dir)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    method = {"base_quantization": describe_quantization(model), "dequantized_with": "bitsandbytes "
              "(transformers.integrations.bitsandbytes.dequantize_bnb_weight) to float32",
              "lora": "merged in float32 (W + scale·B·A)", "saved_dtype": str(dtype).replace("torch.", "")}
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        writer = ShardWriter(tmp, max_shard_bytes)
        done: set[str] = set()
        for name, module in base.named_modules():
            if any(name.startswith(prefix) for prefix in done):
                continue
            if hasattr(module, "base_layer") and hasattr(module, "lora_A"):  # a peft LoRA layer
                inner = module.base_layer
                weight = _dense_weight(inner)
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        weight += module.get_delta_weight(adapter).float()
                writer.add(f"{name}.weight", weight.to(dtype))
                if getattr(inner, "bias", None) is not None:
                    writer.add(f"{name}.bias", inner.bias.to(dtype))
                done.add(name + ".")
                continue
            for key, parameter in module.named_parameters(recurse=False):
                tensor = _dense_weight(module) if key == "weight" else parameter.detach()
                writer.add(f"{name}.{key}" if name else key, tensor.to(dtype) if tensor.is_floating_point() else tensor)
        writer.close()
        config = base.config.to_dict()
        config.pop("quantization_config", None)
        config["dtype"] = str(dtype).replace("torch.", "")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "dequantization.json", method)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return method
