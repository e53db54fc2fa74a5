"""Step 4 of the direction stage: a first-order estimate of every candidate's ablation and steering effect
from one forward+backward pass (see the package docstring)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ablate.directions.batches import PromptBatches, model_device, refusal_log_odds, run_prefix_and_batch
from ablate.hooks import frozen, hidden_from, hooks
from ablate.models import get_adapter


@contextmanager
def gradient_attention(model: nn.Module, implementation: str):
    """The model runs with this attention implementation while the context is open, and gets its own back after.

    'model' changes nothing; 'auto' is eager on a CPU — its backward is ~2.5× faster than the sdpa flash kernel's
    on short prompts (SmolLM2, batch 8, ~50 tokens) — and the model's own elsewhere.
    """
    if implementation == "auto":
        implementation = "eager" if model_device(model).type == "cpu" else "model"
    config = getattr(model, "config", None)
    own = getattr(config, "_attn_implementation", None)
    if implementation == "model" or own is None or own == implementation or not hasattr(model, "set_attn_implementation"):
        yield
        return
    model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        model.set_attn_implementation(own)


def mean_refusal_metric(model, prompts: PromptBatches, inputs, token_ids, n_total: int) -> torch.Tensor:
    logprobs = torch.log_softmax(run_prefix_and_batch(model, prompts.prefix, inputs), dim=-1)
    return refusal_log_odds(logprobs, token_ids).sum() / n_total


def ablation_sensitivity(model: nn.Module, prompts: PromptBatches, token_ids: list[int], n_prompts: int) -> torch.Tensor:
    """A = Σ (∂M/∂o) oᵀ over every residual source o, position and prompt: (d_model, d_model) float64.

    M is the mean refusal log-odds; to first order, ablating r̂ changes M by −r̂ᵀ A r̂.
    """
    adapter = get_adapter(model)
    d_model = adapter.d_model
    matrix = torch.zeros(d_model, d_model, dtype=torch.float64)
    captured: list[torch.Tensor] = []

    def leaf_hook(module, inputs, output):
        # The embedding output is made a leaf that requires grad, so the graph exists with frozen weights.
        output = output.detach().requires_grad_(True)
        captured.append(output)
        return output

    def writer_hook(module, inputs, output):
        tensor = output[0] if isinstance(output, tuple) else output
        tensor.retain_grad()
        captured.append(tensor)

    embeddings = [adapter.embedding, *adapter.extra_embeddings]
    with frozen(model), torch.enable_grad(), hooks(forward=[(module, leaf_hook) for module in embeddings]
                                                  + [(module, writer_hook) for module in adapter.all_writers()]):
        for _, inputs in prompts.batches:
            captured.clear()
            mean_refusal_metric(model, prompts, inputs, token_ids, n_prompts).backward()
            for tensor in captured:
                if tensor.grad is None:
                    continue
                o = tensor.detach().reshape(-1, d_model).double().cpu()
                g = tensor.grad.reshape(-1, d_model).double().cpu()
                matrix += g.T @ o
            captured.clear()
    return matrix


def steering_sensitivity(model: nn.Module, prompts: PromptBatches, token_ids: list[int], n_prompts: int) -> torch.Tensor:
    """G[ℓ] = Σ_positions ∂M/∂x_ℓ (mean over prompts): (n_layers, d_model) float64.

    To first order, adding c·r at layer ℓ's input raises the refusal log-odds M by c·G[ℓ]·r.
    """
    adapter = get_adapter(model)
    gradients = torch.zeros(adapter.n_layers, adapter.d_model, dtype=torch.float64)
    captured: list[tuple[int, torch.Tensor]] = []

    def leaf_hook(module, inputs, output):
        return output.detach().requires_grad_(True)

    def make_hook(index: int):
        def hook(module, args, kwargs):
            hidden = hidden_from(args, kwargs)
            hidden.retain_grad()
            captured.append((index, hidden))

        return hook

    with frozen(model), torch.enable_grad(), hooks(forward=[(adapter.embedding, leaf_hook)],
                                                  pre=[(layer, make_hook(index)) for index, layer in enumerate(adapter.layers)]):
        for _, inputs in prompts.batches:
            captured.clear()
            mean_refusal_metric(model, prompts, inputs, token_ids, n_prompts).backward()
            for index, hidden in captured:
                if hidden.grad is not None:
                    gradients[index] += hidden.grad.double().sum((0, 1)).cpu()
            captured.clear()
    return gradients
