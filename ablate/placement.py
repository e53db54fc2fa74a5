"""Where a model's weights go and at what precision: bitsandbytes quantisation, device maps, memory caps.

`model.quantization` (none | 8bit | 4bit), `model.device_map` and `model.max_memory` are fields of
`ModelConfig`; every stage loads through `ablate.models.load_model`, which asks this module for the
`from_pretrained` arguments. Everything a user can get wrong here is checked before any weight is read,
with one line naming the key and the value:

    check_placement(config)          # unknown device, quantisation this device cannot run
    loading_arguments(config, dtype) # {"quantization_config": ..., "device_map": ..., "max_memory": ...}

bitsandbytes 0.50 runs 4-bit (NF4) and 8-bit layers on a CPU as well as on CUDA, so quantised paths are
tested on a CPU with tiny models; it has no Apple-MPS backend.
"""

from __future__ import annotations

import importlib.metadata
import re

import torch

from ablate import AblateError
from ablate.config import ModelConfig, Quantization

# The oldest bitsandbytes the suite runs quantised layers with on a CPU (ci/lowest.txt).
BITSANDBYTES_CPU_MINIMUM = (0, 50)
_DEVICE = re.compile(r"^(cpu|disk|meta|mps|cuda|cuda:\d+|\d+)$")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def device_exists(device: str | int) -> bool:
    """Whether a device named in a config is visible here ('cpu', 'disk', 'cuda:1', 1, 'mps')."""
    name = str(device)
    if name in ("cpu", "disk", "meta"):
        return True
    if name == "mps":
        return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    index = 0 if name == "cuda" else int(name.split(":")[-1])
    return torch.cuda.is_available() and index < torch.cuda.device_count()


def visible_devices() -> str:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ", ".join(["cpu"] + [f"cuda:{index}" for index in range(count)])


def check_device(device: str | int, key: str) -> None:
    """One line when `device` (under config key `key`) is malformed or not on this machine."""
    if not _DEVICE.match(str(device)):
        raise AblateError(f"{key}: '{device}' is not a device; expected cpu, cuda, cuda:N, N or mps")
    if not device_exists(device):
        raise AblateError(f"{key}: device '{device}' is not on this machine (visible: {visible_devices()})")


def check_quantization(quantization: Quantization, device_type: str) -> None:
    """One line when bitsandbytes cannot run `quantization` on this kind of device."""
    if quantization is Quantization.none:
        return
    key = f"model.quantization: {quantization.value}"
    try:
        installed = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        raise AblateError(f"{key} needs the package bitsandbytes: pip install bitsandbytes") from None
    if device_type not in ("cuda", "cpu"):
        raise AblateError(f"{key}: bitsandbytes cannot quantise on a '{device_type}' device (it runs on CUDA and CPU); "
                          "set model.quantization: none")
    if device_type == "cpu" and _version(installed) < BITSANDBYTES_CPU_MINIMUM:
        minimum = ".".join(map(str, BITSANDBYTES_CPU_MINIMUM))
        raise AblateError(f"{key}: bitsandbytes {installed} has no CPU backend for quantised layers; "
                          f"bitsandbytes>={minimum} has one (or use a CUDA GPU)")


def _map_devices(device_map) -> list[str | int]:
    if device_map is None:
        return []
    if isinstance(device_map, dict):
        return list(device_map.values())
    if device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        return []
    return [device_map]


def check_placement(config: ModelConfig, device: torch.device) -> None:
    """Every device the config names exists; the quantisation runs on the devices the weights go to."""
    if config.device != "auto":
        check_device(config.device, "model.device")
    for target in _map_devices(config.device_map):
        check_device(target, "model.device_map")
    for target in (config.max_memory or {}):
        check_device(target, "model.max_memory")
    targets = {str(t) for t in _map_devices(config.device_map)} or {device.type}
    kinds = {"cpu" if t in ("cpu", "disk") else ("mps" if t == "mps" else "cuda") for t in targets}
    if config.device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        kinds = {"cuda"} if torch.cuda.is_available() else {"cpu"}
    for kind in sorted(kinds):
        check_quantization(config.quantization, kind)


def quantization_config(quantization: Quantization, compute_dtype: torch.dtype):
    """bitsandbytes settings: NF4 with double quantisation (the QLoRA recipe), or LLM.int8."""
    if quantization is Quantization.none:
        return None
    from transformers import BitsAndBytesConfig

    if quantization is Quantization.nf4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def loading_arguments(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> dict:
    """The `from_pretrained` keyword arguments for quantisation and placement (empty when neither is asked)."""
    arguments: dict = {}
    if config.quantization is not Quantization.none:
        arguments["quantization_config"] = quantization_config(config.quantization, dtype)
    if config.device_map is not None:
        arguments["device_map"] = config.device_map
    elif arguments:  # bitsandbytes quantises while placing: the whole model on the one chosen device
        arguments["device_map"] = {"": str(device)}
    if config.max_memory:
        arguments["max_memory"] = {int(k) if str(k).isdigit() else k: v for k, v in config.max_memory.items()}
    return arguments


def is_quantized(model) -> bool:
    """Whether the model's weights are bitsandbytes-quantised (so they can only be ablated by hooks)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_quantized", False) or getattr(base, "hf_quantizer", None) is not None)


def describe_quantization(model) -> str:
    """'4bit nf4 (double quantisation), compute float32' / '8bit' / 'none', from the model's own config."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    settings = getattr(base.config, "quantization_config", None)
    if settings is None:
        return "none"
    settings = settings if isinstance(settings, dict) else settings.to_dict()
    if settings.get("load_in_4bit"):
        double = ", double quantisation" if settings.get("bnb_4bit_use_double_quant") else ""
        return f"4bit {settings.get('bnb_4bit_quant_type')}{double}, compute {settings.get('bnb_4bit_compute_dtype')}"
    if settings.get("load_in_8bit"):
        return "8bit LLM.int8"
    return str(settings.get("quant_method", "unknown"))
