"""What a study will load, at what precision, how much memory each stage needs, and on which devices.

`ablate study STUDY --plan` prints one line per stage; `run_study` checks the same plan before any work
and stops with one line naming the stage and the shortfall when a stage cannot fit the visible hardware.

The estimates are arithmetic on the model's shape (read from its config.json, or its hub config, or —
offline — a small table of the shipped studies' models), not measurements:

    weights    parameters × bytes per parameter: 4 (float32), 2 (bfloat16), 1 (8bit), 0.5 + 0.016 (4bit NF4
               with double quantisation); quantised models keep the embedding and head at the compute dtype
    KV cache   2 · layers · kv_heads · head_dim · 2 bytes per token, for a generation batch
    logits     batch · tokens · vocab · 4 bytes (first-token and KL passes)
    training   LoRA parameters × 16 bytes (weight, gradient, two Adam moments in float32), plus activations:
               per token and layer ≈ 2·d_model·2 bytes with gradient checkpointing, ≈ (16·d_model + 4·ffn)·2 without;
               full fine-tuning: every parameter × 16 bytes
    margin     +3% of the weights (allocator fragmentation) and 1 GiB (CUDA context)

The hardware is read from torch (each CUDA device's total memory, the machine's RAM), or injected:
`--hardware "cuda:0=80GiB"` or `ABLATE_HARDWARE`, which tests use.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from ablate import AblateError
from ablate.config import DType, ModelConfig, Quantization

GIB = 1 << 30
PROMPT_TOKENS = 512  # prompt length assumed for generation and scoring passes

# Shapes of the shipped studies' models (the Llama 3 paper, Table 3), used when their config cannot be read offline.
KNOWN_SHAPES = {
    "meta-llama/Llama-3.1-8B-Instruct": dict(layers=32, d_model=4096, ffn=14336, heads=32, kv_heads=8, vocab=128256),
    "meta-llama/Llama-3.1-70B-Instruct": dict(layers=80, d_model=8192, ffn=28672, heads=64, kv_heads=8, vocab=128256),
}


@dataclass
class Shape:
    """What the estimates need of a model."""

    parameters: int
    embedding_parameters: int  # token embedding + untied head (kept unquantised by bitsandbytes)
    layers: int
    d_model: int
    ffn: int
    kv_dim: int  # kv_heads × head_dim
    vocab: int
    source: str  # where the shape came from


@dataclass
class Hardware:
    """Devices and their memory in bytes, e.g. {'cuda:0': 85e9, 'cpu': 128e9}."""

    memory: dict[str, int]

    @property
    def gpus(self) -> list[str]:
        return [name for name in self.memory if name.startswith("cuda")]

    def describe(self, devices: list[str]) -> str:
        return ", ".join(f"{name} ({self.memory[name] / GIB:.1f} GiB)" for name in devices)


@dataclass
class StagePlan:
    stage: str
    loads: str
    precision: str
    peak_bytes: int
    devices: list[str]
    capacity_bytes: int
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.capacity_bytes


def parse_size(text: str) -> int:
    """'80GiB' / '80GB' / '512MiB' / a number of bytes → bytes."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise AblateError(f"memory size '{text}': expected a number with a unit such as 80GiB or 512MB")
    number, unit, binary = float(match.group(1)), match.group(2).upper(), match.group(3)
    base = 1024 if binary or not unit else 1000
    return int(number * base ** " KMGT".index(unit or " "))


def parse_hardware(text: str) -> Hardware:
    """'cuda:0=80GiB,cpu=64GiB' → Hardware (a CPU entry is added from this machine when absent)."""
    memory = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, size = item.partition("=")
        if not re.fullmatch(r"cpu|cuda:\d+", name.strip()) or not size:
            raise AblateError(f"hardware '{item}': expected DEVICE=SIZE with DEVICE cpu or cuda:N, e.g. cuda:0=80GiB")
        memory[name.strip()] = parse_size(size)
    memory.setdefault("cpu", _ram())
    return Hardware(memory)


def _ram() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def visible_hardware(text: str | None = None) -> Hardware:
    """The hardware named by `text` or $ABLATE_HARDWARE, else what torch sees here."""
    text = text or os.environ.get("ABLATE_HARDWARE")
    if text:
        return parse_hardware(text)
    import torch

    memory = {}
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            memory[f"cuda:{index}"] = torch.cuda.get_device_properties(index).total_memory
    memory["cpu"] = _ram()
    return Hardware(memory)


def _shape_from_config(config, source: str) -> Shape:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    parameters = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", 1)
    d_model = getattr(text, "hidden_size", None) or getattr(text, "n_embd")
    head_dim = getattr(text, "head_dim", None) or d_model // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return Shape(parameters, embedding + (0 if tied or head is None else head.weight.numel()),
                 getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer"), d_model,
                 getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * d_model,
                 kv_heads * head_dim, getattr(text, "vocab_size"), source)


def _shape_from_table(spec: str) -> Shape | None:
    known = KNOWN_SHAPES.get(spec)
    if known is None:
        return None
    d, f, layers, vocab = known["d_model"], known["ffn"], known["layers"], known["vocab"]
    kv = known["kv_heads"] * d // known["heads"]
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d
    return Shape(layers * per_layer + 2 * vocab * d + d, 2 * vocab * d, layers, d, f, kv, vocab,
                 "shape table (config not readable offline)")


def model_shape(model: ModelConfig) -> Shape | None:
    """The model's shape from its config (local, embedded, hub or hub cache), else the table; None if unknown."""
    from ablate.models import resolve_spec

    try:
        kind, location = resolve_spec(model.spec)
    except AblateError:
        return _shape_from_table(model.spec)
    if kind == "gguf":
        return None
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(location, trust_remote_code=model.trust_remote_code,
                                            **({"revision": model.revision} if kind == "hub" and model.revision else {}))
        return _shape_from_config(config, f"{location}/config.json" if kind != "hub" else f"hub config of {location}")
    except Exception:  # offline hub, private model, unknown architecture: fall back to the table
        return _shape_from_table(model.spec)


def weight_bytes(shape: Shape, quantization: Quantization, dtype_bytes: int) -> int:
    body = shape.parameters - shape.embedding_parameters
    per_parameter = {Quantization.none: dtype_bytes, Quantization.int8: 1.0, Quantization.nf4: 0.5 + 0.016}[quantization]
    return int(body * per_parameter + shape.embedding_parameters * dtype_bytes)


def _dtype_bytes(dtype: DType, device_type: str) -> int:
    if dtype is DType.auto:
        return 2 if device_type == "cuda" else 4
    return 4 if dtype is DType.float32 else 2


def _precision(quantization: Quantization, dtype_bytes: int) -> str:
    compute = "bfloat16" if dtype_bytes == 2 else "float32"
    return compute if quantization is Quantization.none else f"{quantization.value} ({compute} compute)"


def _devices(model: ModelConfig, hardware: Hardware, device: str = "auto") -> tuple[list[str], int]:
    """The devices a load will use and the memory it may take there."""
    caps = {str(k) if not str(k).isdigit() else f"cuda:{k}": parse_size(v) for k, v in (model.max_memory or {}).items()}
    if model.device_map in ("auto", "balanced", "balanced_low_0", "sequential") and hardware.gpus:
        devices = hardware.gpus
    elif isinstance(model.device_map, dict):
        devices = sorted({f"cuda:{d}" if str(d).isdigit() else str(d) for d in model.device_map.values()})
    else:
        chosen = model.device_map if isinstance(model.device_map, str) and model.device_map not in (
            "auto", "balanced", "balanced_low_0", "sequential") else (device if device != "auto" else model.device)
        if chosen in ("auto", "cuda"):
            chosen = hardware.gpus[0] if hardware.gpus else "cpu"
        devices = [str(chosen)]
    capacity = sum(min(hardware.memory.get(name, 0), caps.get(name, hardware.memory.get(name, 0))) for name in devices)
    return devices, capacity


def _margin(weights: int) -> int:
    return int(0.03 * weights) + GIB


def plan_study(resolved, hardware: Hardware) -> tuple[Shape | None, list[StagePlan]]:
    """One StagePlan per stage the study runs (harden, direction, finetune, eval)."""
    config = resolved.config
    model = config.model
    shape = model_shape(model)
    if shape is None:
        return None, []
    devices, capacity = _devices(model, hardware)
    device_type = "cuda" if devices[0].startswith("cuda") else "cpu"
    dtype_bytes = _dtype_bytes(model.dtype, device_type)
    weights = weight_bytes(shape, model.quantization, dtype_bytes)
    kv_token = 2 * shape.layers * shape.kv_dim * 2
    precision = _precision(model.quantization, dtype_bytes)
    plans = []
    if resolved.harden is not None:
        plans.append(_training_plan("harden", resolved.harden, model, shape, hardware, dtype_bytes))
    if resolved.direction is not None:
        settings = resolved.direction
        batch = settings.batch_size
        copies = 2 if (settings.compute_dtype not in ("model",) and model.quantization is Quantization.none
                       and dtype_bytes == 4 and device_type == "cuda") else 1
        working = batch * PROMPT_TOKENS * (kv_token + 4 * shape.d_model * shape.layers) + batch * shape.vocab * 4 * 2
        plans.append(StagePlan("direction", "target" + (" + a bfloat16 copy" if copies == 2 else "")
                               + (" (ablated by hooks)" if model.quantization is not Quantization.none else ""),
                               precision, copies * weights + working + _margin(weights), devices, capacity))
    if resolved.finetune is not None:
        plans.append(_training_plan("finetune", resolved.finetune, model, shape, hardware, dtype_bytes))
    suite = resolved.suite
    generation = suite.generation
    kv = generation.batch_size * (PROMPT_TOKENS + generation.max_new_tokens) * kv_token
    logits = suite.kl.batch_size * (PROMPT_TOKENS + suite.kl.continuation_tokens) * shape.vocab * 4
    variants = 2 if suite.kl.enabled else 1
    plans.append(StagePlan("eval", "variant + KL reference" if variants == 2 else "variant", precision,
                           variants * weights + kv + logits + _margin(weights), devices, capacity))
    return shape, plans


def _training_plan(stage: str, recipe, model: ModelConfig, shape: Shape, hardware: Hardware, dtype_bytes: int) -> StagePlan:
    training = recipe.training
    quantization = Quantization.nf4 if training.qlora and model.quantization is Quantization.none else model.quantization
    devices, capacity = _devices(model, hardware, training.device)
    device_type = "cuda" if devices[0].startswith("cuda") else "cpu"
    dtype_bytes = _dtype_bytes(training.dtype, device_type)
    weights = weight_bytes(shape, quantization, dtype_bytes)
    tokens = training.batch_size * training.max_length
    if training.full_finetune:
        trainable = shape.parameters * 16
        loads = "target, every weight trained"
    else:
        d, f, kv, rank = shape.d_model, shape.ffn, shape.kv_dim, recipe.lora.rank
        per_layer = rank * ((d + d) * 2 + (d + kv) * 2 + 3 * (d + f))  # q, o, k, v, gate, up, down
        trainable = shape.layers * per_layer * 16
        loads = f"target + LoRA r{rank}"
    per_token = 2 * shape.d_model * 2 if training.gradient_checkpointing else (16 * shape.d_model + 4 * shape.ffn) * 2
    activations = tokens * (per_token * shape.layers + shape.vocab * 4 * 2)
    return StagePlan(stage, loads, _precision(quantization, dtype_bytes),
                     weights + trainable + activations + _margin(weights), devices, capacity,
                     notes=["data generation loads the donor on its own before training"] if recipe.donor_writes_answers else [])


def format_plan(shape: Shape | None, plans: list[StagePlan], hardware: Hardware) -> list[str]:
    if shape is None:
        return ["plan: the model's shape is unknown here (no readable config); memory not estimated"]
    count = f"{shape.parameters / 1e9:.2f}B" if shape.parameters >= 1e8 else f"{shape.parameters / 1e6:.2f}M"
    lines = [f"model: {count} parameters, {shape.layers} layers, d_model {shape.d_model} "
             f"(from {shape.source})"]
    for plan in plans:
        verdict = "fits" if plan.fits else f"DOES NOT FIT (short by {(plan.peak_bytes - plan.capacity_bytes) / GIB:.1f} GiB)"
        lines.append(f"{plan.stage:<10} loads {plan.loads}; precision {plan.precision}; estimated peak "
                     f"{plan.peak_bytes / GIB:.1f} GiB on {hardware.describe(plan.devices)}: {verdict}")
        lines += [f"{'':<10} note: {note}" for note in plan.notes]
    return lines


def check_fits(plans: list[StagePlan], hardware: Hardware) -> None:
    """One line naming the first stage that cannot fit, and by how much."""
    for plan in plans:
        if not plan.fits:
            raise AblateError(f"stage '{plan.stage}' does not fit: it needs an estimated {plan.peak_bytes / GIB:.1f} GiB "
                              f"({plan.loads}, {plan.precision}) on {hardware.describe(plan.devices)}; short by "
                              f"{(plan.peak_bytes - plan.capacity_bytes) / GIB:.1f} GiB (see `ablate study STUDY --plan`)")

