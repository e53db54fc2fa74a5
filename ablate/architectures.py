"""Find, in a loaded model, the parts of the residual stream that the attacks touch.

`get_adapter(model)` returns an `Adapter`: the decoder layers, the token embedding (and GPT-2's
position embedding), the output head, and per layer the two modules whose outputs are added into the
residual stream (attention out, MLP out) together with every weight tensor that writes through them.

The parts are found from the model's structure, not from a per-family code path:

- the token embedding and head are `get_input_embeddings()` / `get_output_embeddings()`;
- the decoder layers are the `nn.ModuleList` that sits beside the token embedding (`model.layers`,
  `transformer.h`, Gemma-3's `model.language_model.layers`);
- in each layer the attention block (`self_attn`, `attn`, ...) ends in an output projection
  (`o_proj`, `c_proj`, ...) and the MLP block (`mlp`, ...) ends in a down projection (`down_proj`,
  `c_proj`, ...) — or, in a mixture-of-experts block, in its experts' down projections, stored either
  as a `ModuleList` of experts or (transformers 5) as one fused 3-D parameter `experts.down_proj` of
  shape [E, d_model, ffn] (or [E, ffn, d_model] where the experts module says `is_transposed`), plus
  any shared expert's down projection. The router (`gate`, `router`) reads the residual; it is left alone.

A family needs one entry in `FAMILIES` (its `model_type`), with names only where the defaults miss them;
docs/models.md says how to add one. A model whose family is missing, or whose structure is not where the
entry says, gets one line naming the architecture and what was not found where.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ablate import AblateError


@dataclass(frozen=True)
class Family:
    """Where one family keeps its parts: candidate child names, tried in order (the defaults fit most)."""

    attention: tuple[str, ...] = ("self_attn", "attn", "attention", "self_attention")
    attention_out: tuple[str, ...] = ("o_proj", "out_proj", "c_proj", "dense", "wo")
    mlp: tuple[str, ...] = ("mlp", "feed_forward", "block_sparse_moe", "ffn")
    mlp_out: tuple[str, ...] = ("down_proj", "c_proj", "fc2", "w2", "dense_4h_to_h", "wo")
    experts: tuple[str, ...] = ("experts",)
    shared_experts: tuple[str, ...] = ("shared_expert", "shared_experts")
    # A norm on a writer's output, before the residual add (Gemma-2/3, OLMo-2): weight orthogonalisation
    # can then only approximate hook ablation, since the norm's per-channel gain rotates r̂ back in.
    post_norms: tuple[str, ...] = ("post_feedforward_layernorm",)


# config.model_type -> Family. Each entry is tested on a tiny random model (tests/test_architectures.py).
FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(),
    "mixtral": Family(),
    "qwen2": Family(),
    "qwen2_moe": Family(),
    "qwen3": Family(),
    "qwen3_moe": Family(),
    "gemma": Family(),
    "gemma2": Family(),
    "gemma3": Family(),  # Gemma3ForConditionalGeneration: its text model is found beside the token embedding
    "gemma3_text": Family(),
    "phi3": Family(),
    "olmo2": Family(),
    "granite": Family(),
    "gpt2": Family(),
    "gpt_oss": Family(),
}


@dataclass(frozen=True)
class WriterPart:
    """One tensor that writes into the residual stream: `getattr(module, name)`, d_model on `axis`.

    nn.Linear weight (d_model, in): axis 0. GPT-2 Conv1D weight (in, d_model): axis 1. Fused experts
    [E, d_model, ffn]: axis 1, transposed [E, ffn, d_model]: axis 2. Biases: their last axis.
    """

    module: nn.Module
    name: str
    axis: int

    @property
    def tensor(self):
        return getattr(self.module, self.name)


@dataclass
class Adapter:
    """Where the residual stream lives in one model.

    - `layers`: the decoder blocks, in order; block i reads the residual stream at its input.
    - `embedding`: the token embedding (writes the first residual stream).
    - `extra_embeddings`: other modules that write the initial residual (GPT-2's position embedding).
    - `writers`: per layer, the two modules whose outputs are added into the residual stream (attention
      output projection; MLP down projection, or the whole mixture-of-experts block), hooked by ablation.
    - `writer_parts`: per layer and writer, the tensors that orthogonalisation projects (for an MoE
      block every expert's down projection and the shared expert's; never the router).
    - `lm_head`: the output head (may share its weight with `embedding`).
    - `exact_orthogonalization`: False where a norm sits between a writer and the residual add
      (Gemma-2/3, OLMo-2), so weight orthogonalisation can only approximate hook ablation.
    """

    family: str
    layers: nn.ModuleList
    embedding: nn.Embedding
    lm_head: nn.Module
    writers: list[list[nn.Module]]
    writer_parts: list[list[list[WriterPart]]] = field(default_factory=list)
    extra_embeddings: list[nn.Module] = field(default_factory=list)
    exact_orthogonalization: bool = True
    moe: bool = False

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return self.embedding.weight.shape[1]

    def all_writers(self) -> list[nn.Module]:
        return [module for layer in self.writers for module in layer]

    def all_writer_parts(self) -> list[WriterPart]:
        return [part for layer in self.writer_parts for writer in layer for part in writer]


def _unwrap(module: nn.Module) -> nn.Module:
    """The layer a peft LoRA wrapper (or a stack of them, as on fused experts) wraps."""
    while isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    return module


def writer_output_axis(module: nn.Module) -> int:
    """Which axis of `module.weight` indexes the residual stream (d_model).

    `nn.Linear` (and bitsandbytes' subclasses) store (out, in): axis 0. GPT-2's `Conv1D` stores
    (in, out): axis 1. A peft LoRA layer is judged by the layer it wraps.
    """
    return 0 if isinstance(_unwrap(module), nn.Linear) else 1


def _is_projection(module: nn.Module | None) -> bool:
    """A linear map with a 2-D weight: nn.Linear (bitsandbytes' too), GPT-2's Conv1D, a peft LoRA layer."""
    if module is None:
        return False
    base = _unwrap(module)
    weight = getattr(base, "weight", None)
    return weight is not None and (isinstance(base, nn.Linear) or weight.dim() == 2)


def _child(module: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Module] | tuple[None, None]:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module):
            return name, child
    return None, None


def _projection_parts(module: nn.Module) -> list[WriterPart]:
    base = _unwrap(module)
    parts = [WriterPart(base, "weight", writer_output_axis(base))]
    if getattr(base, "bias", None) is not None:
        parts.append(WriterPart(base, "bias", 0))
    return parts


class _NotFound(Exception):
    """What was not found, and where (turned into the one-line AblateError by get_adapter)."""


def _expert_parts(experts: nn.Module, family: Family, where: str, d_model: int) -> list[WriterPart]:
    """Every expert's down projection: a ModuleList of expert MLPs, or one fused 3-D parameter."""
    experts = _unwrap(experts)
    if isinstance(experts, nn.ModuleList):
        parts = []
        for index, expert in enumerate(experts):
            _, out = _child(expert, family.mlp_out)
            if not _is_projection(out):
                raise _NotFound(f"no expert down projection ({', '.join(family.mlp_out)}) in {where}.{index}")
            parts += _projection_parts(out)
        return parts
    for name in family.mlp_out:
        fused = getattr(experts, name, None)
        if isinstance(fused, nn.Parameter) and fused.dim() == 3:
            axis = 2 if getattr(experts, "is_transposed", False) else 1
            if fused.shape[axis] != d_model:
                raise _NotFound(f"fused experts {where}.{name} has shape {tuple(fused.shape)}, no d_model={d_model} on axis {axis}")
            parts = [WriterPart(experts, name, axis)]
            bias = getattr(experts, f"{name}_bias", None)
            if isinstance(bias, nn.Parameter):
                parts.append(WriterPart(experts, f"{name}_bias", bias.dim() - 1))
            return parts
    raise _NotFound(f"no expert down projection ({', '.join(family.mlp_out)}: a ModuleList or a 3-D parameter) in {where}")


def _mlp_writer(mlp: nn.Module, family: Family, where: str, d_model: int) -> tuple[nn.Module, list[WriterPart], bool]:
    """(hooked module, its writing tensors, is-MoE) for one layer's MLP block."""
    out_name, out = _child(mlp, family.mlp_out)
    if _is_projection(out):
        return out, _projection_parts(out), False
    experts_name, experts = _child(mlp, family.experts)
    if experts is None:
        raise _NotFound(f"no MLP down projection ({', '.join(family.mlp_out)}) nor experts ({', '.join(family.experts)}) in {where}")
    parts = _expert_parts(experts, family, f"{where}.{experts_name}", d_model)
    shared_name, shared = _child(mlp, family.shared_experts)
    if shared is not None:
        _, shared_out = _child(shared, family.mlp_out)
        if not _is_projection(shared_out):
            raise _NotFound(f"no shared-expert down projection ({', '.join(family.mlp_out)}) in {where}.{shared_name}")
        parts += _projection_parts(shared_out)
    return mlp, parts, True


def _decoder_layers(base: nn.Module, embedding: nn.Module, n_layers: int | None) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder layers: a sibling of the token embedding."""
    names = {id(module): name for name, module in base.named_modules()}
    embedding_name = names.get(id(embedding), "")
    body_name = embedding_name.rpartition(".")[0]
    body = base.get_submodule(body_name) if body_name else base
    lists = [(name, child) for name, child in body.named_children() if isinstance(child, nn.ModuleList) and len(child)]
    if n_layers is not None and len(lists) > 1:
        lists = [(name, child) for name, child in lists if len(child) == n_layers] or lists
    if not lists:
        raise _NotFound(f"no decoder layer list (nn.ModuleList) beside the token embedding in '{body_name or '<model>'}'")
    name, layers = lists[0]
    return f"{body_name}.{name}" if body_name else name, layers


def _config_value(config, *keys):
    for source in (config, getattr(config, "text_config", None)):
        for key in keys:
            value = getattr(source, key, None) if source is not None else None
            if value is not None:
                return value
    return None


def get_adapter(model: nn.Module) -> Adapter:
    """Find the residual-stream parts of a supported model, or fail in one line naming what is missing where."""
    # A peft wrapper (PeftModel) hides the transformers model behind get_base_model().
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    architecture = type(base).__name__
    family = FAMILIES.get(model_type)
    if family is None:
        supported = ", ".join(sorted(FAMILIES))
        raise AblateError(f"unsupported architecture {architecture} (model_type '{model_type}'): no entry in "
                          f"ablate.architectures.FAMILIES (see docs/models.md to add one); supported: {supported}")
    try:
        return _find_parts(base, model_type, family, config)
    except _NotFound as missing:
        raise AblateError(f"unsupported architecture {architecture} (model_type '{model_type}'): {missing}") from None


def _find_parts(base: nn.Module, model_type: str, family: Family, config) -> Adapter:
    embedding = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    if not isinstance(embedding, nn.Embedding):
        raise _NotFound("no token embedding (get_input_embeddings() is not an nn.Embedding)")
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None or getattr(head, "weight", None) is None:
        raise _NotFound("no output head (get_output_embeddings() returned nothing)")
    d_model = embedding.weight.shape[1]
    layers_name, layers = _decoder_layers(base, embedding, _config_value(config, "num_hidden_layers", "n_layer"))
    writers, writer_parts = [], []
    exact, moe = True, False
    for index, layer in enumerate(layers):
        where = f"{layers_name}.{index}"
        attention_name, attention = _child(layer, family.attention)
        if attention is None:
            raise _NotFound(f"no attention block ({', '.join(family.attention)}) in {where}")
        _, attention_out = _child(attention, family.attention_out)
        if not _is_projection(attention_out):
            raise _NotFound(f"no attention output projection ({', '.join(family.attention_out)}) in {where}.{attention_name}")
        mlp_name, mlp = _child(layer, family.mlp)
        if mlp is None:
            raise _NotFound(f"no MLP block ({', '.join(family.mlp)}) in {where}")
        mlp_module, mlp_parts, layer_moe = _mlp_writer(mlp, family, f"{where}.{mlp_name}", d_model)
        moe = moe or layer_moe
        exact = exact and _child(layer, family.post_norms)[1] is None
        writers.append([attention_out, mlp_module])
        writer_parts.append([_projection_parts(attention_out), mlp_parts])
    body = base.get_submodule(layers_name.rpartition(".")[0]) if "." in layers_name else base
    # Other embeddings beside the token embedding that write d_model vectors (GPT-2's wpe).
    extra = [child for child in body.children()
             if isinstance(child, nn.Embedding) and child is not embedding and child.weight.shape[1] == d_model]
    return Adapter(model_type, layers, embedding, head, writers, writer_parts, extra, exact_orthogonalization=exact, moe=moe)
