"""A model variant as the eval stage sees it: a model, optionally with a refusal direction ablated or a LoRA adapter
attached (an `EvalRun`). Its identity (for stage fingerprints and the eval cache), its loading, and the residual
stream's projection on a direction (does a LoRA attack remove what ablation removes?)."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from ablate.artifacts import file_sha256, fingerprint, read_json
from ablate.config import EvalRun, ModelConfig, Quantization


def model_fingerprint(spec: str) -> str:
    """Identity of a model spec (weights and config files; a hub id by id and revision): one definition,
    shared with the fine-tuning stage's cache keys."""
    from ablate.finetune import model_fingerprint as fingerprint_model

    return fingerprint_model(spec)


def direction_info(direction_dir: str | Path) -> dict:
    """The pick of a finished direction folder (its selected.json): layer, position, strength, scores."""
    return read_json(Path(direction_dir) / "selected.json")


def variant_fingerprint(run: EvalRun) -> str:
    """Identity of a variant's weights: its model files, plus the direction or adapter applied on top."""
    if run.direction:
        return fingerprint([model_fingerprint(run.model.spec), direction_info(run.direction)])
    if run.adapter:
        adapter = Path(run.adapter)
        return fingerprint([model_fingerprint(run.model.spec)] + [file_sha256(f) for f in sorted(adapter.glob("*.safetensors"))])
    return model_fingerprint(run.model.spec)


def variant_content_fingerprint(run: EvalRun) -> str:
    """`variant_fingerprint` by content alone, the same in every run directory: a direction variant by its
    direction file's bytes and strength (its selected.json also holds this run's paths and timings)."""
    if run.direction:
        direction_file = Path(run.direction) / "direction.pt"
        return fingerprint([model_fingerprint(run.model.spec), file_sha256(direction_file),
                            direction_info(run.direction).get("strength")])
    return variant_fingerprint(run)


def qlora_base(model: ModelConfig) -> ModelConfig:
    """The 4-bit base a QLoRA adapter was trained on (the model itself when it is already quantised)."""
    if model.quantization is Quantization.none:
        return model.model_copy(update={"quantization": Quantization.nf4})
    return model


def load_variant(run: EvalRun):
    """(model, tokenizer) of a variant: with `direction`, r̂ projected out of the weights (a quantised model is
    ablated by hooks instead, `variant_hooks`); with `adapter`, the LoRA adapter attached."""
    from ablate.models import load_model
    from ablate.placement import is_quantized

    model, tokenizer = load_model(run.model)
    if run.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, run.adapter).eval()
    if run.direction and not is_quantized(model):
        from ablate.abliterate import orthogonalize_from

        orthogonalize_from(model, Path(run.direction))  # at the strength the stage recorded
    return model, tokenizer


def variant_hooks(model, run: EvalRun):
    """The hooks a variant is evaluated under: directional ablation for the direction variant of a quantised
    model (whose weights cannot be orthogonalised), nothing otherwise."""
    from ablate.placement import is_quantized

    if not run.direction or not is_quantized(model):
        return nullcontext()
    from ablate.directions import load_direction
    from ablate.interventions import directional_ablation, weights_for

    direction, selected = load_direction(Path(run.direction))
    return directional_ablation(model, direction, weights_for(model, selected))


@torch.inference_mode()
def measure_projections(model, tokenizer, direction: torch.Tensor, layer: int, prompts: list[str],
                        batch_size: int = 32) -> list[float]:
    """Projection (x·r̂) of the residual stream entering `layer`, at each prompt's last token.

    Used to ask whether the LoRA attack removes the same direction that ablation removes: after such
    an attack, refusal-eliciting prompts would project on r̂ like harmless ones. The template prefix
    every prompt shares runs once per batch, as in the direction stage (`run_prefix_and_batch`).
    """
    from ablate.directions import prepare_batches, run_prefix_and_batch
    from ablate.hooks import StopForward, hidden_from, hooks
    from ablate.models import get_adapter

    adapter = get_adapter(model)
    device = next(model.parameters()).device
    r_hat = (direction / direction.norm()).to(device=device, dtype=torch.float32)
    state: dict[str, Any] = {"prefix": False, "last": None, "captured": None}

    def hook(_module, args, kwargs):
        if state["prefix"]:  # the shared template prefix runs first, on its own
            return None
        hidden = hidden_from(args, kwargs)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), state["last"]]
        state["captured"] = last.float() @ r_hat
        raise StopForward  # nothing after this layer's input is needed

    prepared = prepare_batches(tokenizer, prompts, batch_size, None, device)
    values: list[float | None] = [None] * len(prompts)
    with hooks(pre=[(adapter.layers[layer], hook)]):
        for batch, inputs in prepared.batches:
            state["last"] = inputs["last"]
            try:
                run_prefix_and_batch(model, prepared.prefix, inputs, logits=False,
                                     on_prefix=lambda flag: state.__setitem__("prefix", flag))
            except StopForward:
                pass
            for index, value in zip(batch, state["captured"].tolist()):
                values[index] = value
    return values  # type: ignore[return-value]
