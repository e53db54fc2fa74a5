"""Interventions on the refusal direction: hook contexts, weight orthogonalisation, saved models.

Directional ablation (Arditi et al. 2024) removes the component of the residual stream along a unit
direction r̂ everywhere it could enter:

    x ← x − (x·r̂) r̂        at every decoder layer's input and at every residual-writing output

Activation addition steers instead: x ← x + c·r at one layer's input, at every position.

Weight orthogonalisation makes ablation permanent: every matrix that writes into the residual stream
(the token embedding, GPT-2's position embedding, each attention output projection and MLP down
projection, and their biases) is replaced by its projection onto the orthogonal complement of r̂,

    W_out ← W_out − r̂ r̂ᵀ W_out        (nn.Linear, d_model on axis 0)
    W_out ← W_out − W_out r̂ r̂ᵀ        (GPT-2 Conv1D and embeddings, d_model on axis 1)

so the residual stream never holds an r̂ component and the model's logits equal the hooked model's.
Where the output head shares its weight with the embedding (SmolLM2, Llama-3.2, Gemma) the head is
untied first: projecting the shared matrix would also project the *readout*, which hooks never do.
Gemma-2 puts a norm between each writer and the residual add, so there the weights can only
approximate hook ablation (the adapter says `exact_orthogonalization=False`; we warn).

Optional strength control (heretic's parameterisation): a global coefficient and a per-layer kernel
that is `max_weight` at layer `max_weight_position`, falls linearly to `min_weight` at
`min_weight_distance` layers away, and is 0 beyond. With weights w_ℓ only the writers of layer ℓ
are (partially) projected, o ← o − w_ℓ (o·r̂) r̂, and hooks and weights do exactly the same thing.
Weights may also be given per writer (attention out and MLP out of each layer), as the direction
stage's `strength_learning` learns them.

    with directional_ablation(model, r):
        logits = model(**inputs).logits
    orthogonalize_weights(model, r)          # in place; now equals the hooked model

Loading a finished direction stage and saving the orthogonalised model is `ablate.abliterate`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ablate import AblateError
from ablate.hooks import hooks, project_out, replace_hidden, replace_output
from ablate.models import get_adapter


def unit(direction: torch.Tensor) -> torch.Tensor:
    """r̂ = r / ‖r‖ (float32); refuses a zero or non-finite direction."""
    direction = torch.as_tensor(direction).detach().float().flatten()
    norm = direction.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise AblateError("refusal direction is zero or not finite; cannot ablate it")
    return direction / norm


def _check_size(model: nn.Module, direction: torch.Tensor) -> None:
    d_model = get_adapter(model).d_model
    if direction.numel() != d_model:
        raise AblateError(f"direction has {direction.numel()} entries but the model's d_model is {d_model}")


def layer_weights(
    n_layers: int,
    coefficient: float = 1.0,
    kernel: dict | None = None,
    writer_weights: Sequence[Sequence[float]] | None = None,
) -> list[float] | list[list[float]] | None:
    """Per-layer ablation weights w_ℓ, or None for full ablation (coefficient 1, no kernel).

    kernel = {max_weight, max_weight_position (layer index), min_weight, min_weight_distance}:
    w_ℓ = max_weight − (max_weight − min_weight)·|ℓ − position| / distance for |ℓ − position| ≤ distance,
    else 0; every weight is then multiplied by `coefficient`.
    writer_weights (one row per layer, one weight per residual writer of that layer) are returned as
    rows, times `coefficient`.
    """
    if writer_weights is not None:
        if len(writer_weights) != n_layers:
            raise AblateError(f"strength.writer_weights: {len(writer_weights)} rows for a model of {n_layers} layers")
        return [[coefficient * float(w) for w in row] for row in writer_weights]
    if kernel is None:
        if coefficient == 1.0:
            return None
        return [float(coefficient)] * n_layers
    peak, position = float(kernel["max_weight"]), float(kernel["max_weight_position"])
    low, distance = float(kernel["min_weight"]), float(kernel["min_weight_distance"])
    weights = []
    for layer in range(n_layers):
        gap = abs(layer - position)
        if gap > distance:
            weights.append(0.0)
        else:
            weights.append(coefficient * (peak - (peak - low) * gap / max(distance, 1e-9)))
    return weights


def writer_strengths(model: nn.Module, weights: Sequence) -> list[list[float]]:
    """Per layer, one weight per residual writer: a layer's single weight applies to all its writers."""
    adapter = get_adapter(model)
    if len(weights) != adapter.n_layers:
        raise AblateError(f"ablation weights: got {len(weights)} values for {adapter.n_layers} layers")
    rows = []
    for layer, (weight, writers) in enumerate(zip(weights, adapter.writers)):
        if isinstance(weight, (list, tuple)):
            if len(weight) != len(writers):
                raise AblateError(f"ablation weights: layer {layer} has {len(writers)} residual writers, got {len(weight)} weights")
            rows.append([float(w) for w in weight])
        else:
            rows.append([float(weight)] * len(writers))
    return rows


@contextmanager
def directional_ablation(
    model: nn.Module,
    direction: torch.Tensor,
    weights: Sequence[float] | Sequence[Sequence[float]] | None = None,
) -> Iterator[None]:
    """Ablate `direction` from the residual stream while the context is open.

    Full ablation (weights None): x ← x − (x·r̂) r̂ at every decoder layer's input and every writer's
    output (and the embeddings'), at every position — the residual never holds an r̂ component.
    With per-layer `weights` w_ℓ (see `layer_weights`): o ← o − w_ℓ (o·r̂) r̂ on the writers of layer ℓ
    only, which is what `orthogonalize_weights(model, r, weights)` bakes in; a layer's entry may also be
    a list with one weight per writer (attention out, MLP out).
    Hooks are removed in `finally`, also when the body raises.
    """
    _check_size(model, direction)
    adapter = get_adapter(model)
    r_hat = unit(direction)

    def output_hook(weight: float):
        def hook(module, inputs, output):
            return replace_output(output, lambda x: project_out(x, r_hat, weight))

        return hook

    def input_hook(module, args, kwargs):
        return replace_hidden(args, kwargs, lambda x: project_out(x, r_hat))

    if weights is None:
        pre = [(layer, input_hook) for layer in adapter.layers]
        forward = [(module, output_hook(1.0)) for module in [adapter.embedding, *adapter.extra_embeddings, *adapter.all_writers()]]
    else:
        pre = []
        forward = [(module, output_hook(weight)) for row, writers in zip(writer_strengths(model, weights), adapter.writers)
                   for weight, module in zip(row, writers) if weight != 0]
    with hooks(forward=forward, pre=pre):
        yield


@contextmanager
def activation_addition(
    model: nn.Module, direction: torch.Tensor, layer: int, coefficient: float = 1.0
) -> Iterator[None]:
    """Add `coefficient · direction` (not normalised) to the input of decoder layer `layer`, every position."""
    _check_size(model, direction)
    adapter = get_adapter(model)
    if not 0 <= layer < adapter.n_layers:
        raise AblateError(f"activation addition: layer {layer} out of range 0..{adapter.n_layers - 1}")
    vector = torch.as_tensor(direction).detach().float().flatten() * coefficient

    def hook(module, args, kwargs):
        return replace_hidden(args, kwargs, lambda x: x + vector.to(device=x.device, dtype=x.dtype))

    with hooks(pre=[(adapter.layers[layer], hook)]):
        yield


def untie_output_head(model: nn.Module) -> bool:
    """Give the output head its own copy of a weight it shares with the token embedding.

    Returns True when it was tied. The config is updated so that a saved model loads untied.
    """
    adapter = get_adapter(model)
    head, embedding = adapter.lm_head, adapter.embedding
    if head.weight.data_ptr() != embedding.weight.data_ptr():
        return False
    head.weight = nn.Parameter(embedding.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for config in (base.config, getattr(base.config, "text_config", None)):
        if config is not None and hasattr(config, "tie_word_embeddings"):
            config.tie_word_embeddings = False
    return True


@torch.no_grad()
def project_weight(weight: torch.Tensor, r_hat: torch.Tensor, axis: int, strength: float) -> None:
    """In place: remove w·r̂ from the d_model axis of `weight` (computed in float32).

    With d_model moved last, every row v of the tensor becomes v − w (v·r̂) r̂ — for an nn.Linear
    (d_model on axis 0) that is W ← W − w r̂ (r̂ᵀ W), for a Conv1D or embedding W ← W − w (W r̂) r̂ᵀ,
    and for fused experts [E, d_model, ffn] each expert's matrix the same way.
    """
    w = weight.float().movedim(axis, -1)
    r = r_hat.to(w.device)
    w = w - strength * (w @ r).unsqueeze(-1) * r
    weight.copy_(w.movedim(-1, axis).to(weight.dtype))


@torch.no_grad()
def orthogonalize_weights(
    model: nn.Module,
    direction: torch.Tensor,
    weights: Sequence[float] | Sequence[Sequence[float]] | None = None,
) -> None:
    """Project `direction` out of every residual-writing matrix and bias, in place.

    Full (weights None): the embeddings and every writer; the output head is untied first where it
    shares the embedding's weight. With per-layer weights: only layer ℓ's writers, scaled by w_ℓ
    (or by one weight per writer), the embeddings left alone, matching `directional_ablation(model, r, weights)`.
    Warns when the architecture makes this only an approximation of hook ablation (Gemma-2).
    """
    _check_size(model, direction)
    adapter = get_adapter(model)
    r_hat = unit(direction)
    if not adapter.exact_orthogonalization:
        warnings.warn(
            f"{adapter.family}: a norm sits between each residual writer and the residual add, so weight "
            "orthogonalisation only approximates hook ablation (logits will differ)",
            stacklevel=2,
        )
    if weights is None:
        untie_output_head(model)
        for embedding in [adapter.embedding, *adapter.extra_embeddings]:
            project_weight(embedding.weight, r_hat, axis=1, strength=1.0)
        strengths = writer_strengths(model, [1.0] * adapter.n_layers)
    else:
        strengths = writer_strengths(model, weights)
    for row, writers in zip(strengths, adapter.writer_parts):
        for strength, parts in zip(row, writers):
            if strength == 0:
                continue
            for part in parts:  # weight and bias; for an MoE block every expert's and the shared expert's
                _check_writable(part)
                project_weight(part.tensor, r_hat, part.axis, strength)
    model.ablate_weights_changed = True  # the weights differ from any folder the model was loaded from


def _check_writable(part) -> None:
    """Quantised (bitsandbytes) weights cannot be edited in place: say what to use instead."""
    tensor = part.tensor
    if not tensor.is_floating_point() or type(tensor).__name__ in ("Params4bit", "Int8Params"):
        raise AblateError(f"cannot orthogonalise the quantised weight {type(part.module).__name__}.{part.name} in "
                          "place; use hooks (directional_ablation), or stream the original shards "
                          "(ablate abliterate --stream, ablate.streaming.abliterate_shards)")


def weights_for(model: nn.Module, selected: dict) -> list[float] | list[list[float]] | None:
    """The ablation weights a direction stage's `selected.json` asks for (None = full ablation)."""
    strength = selected.get("strength") or {}
    return layer_weights(get_adapter(model).n_layers, strength.get("coefficient", 1.0), strength.get("kernel"),
                         strength.get("writer_weights"))
