"""Everything about a fine-tuning config that can be checked before a model is loaded or an answer generated."""

from __future__ import annotations

from pathlib import Path

import torch
from ablate import AblateError
from ablate.config import (
    FinetuneConfig,
    FinetuneMode,
    ModelConfig,
    Quantization,
)
from ablate.finetune.recipe import as_model_config, resolve_budgets
from ablate.finetune.answers import ABLATED_DONOR, ablated_source, load_dataset_examples, read_identity_rows
from ablate.models import resolve_spec


def check_config(model: str | ModelConfig, config: FinetuneConfig) -> None:
    """Everything that can be checked before loading a model or generating data; one-line errors."""
    training, data = config.training, config.data
    if training.qlora:
        if training.full_finetune:
            raise AblateError("training.qlora: QLoRA trains a LoRA adapter; it cannot be combined with training.full_finetune")
        from ablate.models import pick_device
        from ablate.placement import check_quantization

        check_quantization(Quantization.nf4, pick_device(training.device).type)
    if training.full_finetune and as_model_config(model).quantization is not Quantization.none:
        raise AblateError(f"training.full_finetune: the base is quantised (model.quantization: "
                          f"{as_model_config(model).quantization.value}); quantised weights train only through LoRA")
    if training.scheduler not in ("linear", "cosine", "constant"):
        raise AblateError(f"training.scheduler: expected linear, cosine or constant (got {training.scheduler!r})")
    if training.device != "auto" and training.device.startswith("cuda") and not torch.cuda.is_available():
        raise AblateError(f"training.device: '{training.device}' requested but no CUDA GPU is available")
    if config.mode is FinetuneMode.dataset and not data.dataset:
        raise AblateError("data.dataset: mode 'dataset' needs a file path or hf:<id> with prompt/response columns")
    if config.eval.enabled and not config.eval.prompt_sets:
        raise AblateError("eval.prompt_sets: empty; list at least one prompt set or set eval.enabled: false")
    resolve_spec(as_model_config(model).spec)
    if data.donor_direction is not None and data.donor != ABLATED_DONOR:
        raise AblateError(f"data.donor_direction: only used with donor: {ABLATED_DONOR} (donor is {data.donor!r})")
    if config.donor_writes_answers:
        if data.donor == ABLATED_DONOR:
            if data.donor_direction is not None:
                from ablate.directions import load_direction

                try:
                    load_direction(Path(data.donor_direction))
                except AblateError as error:
                    raise AblateError(f"data.donor_direction: {error}") from None
        else:
            try:
                resolve_spec(ablated_source(data.donor, "") or data.donor or "embedded")
            except AblateError as error:
                raise AblateError(f"data.donor: {error}") from None
    if config.eval.enabled:
        from ablate.data import load_prompt_set

        for spec in config.eval.prompt_sets:
            try:
                load_prompt_set(spec, limit=1)
            except AblateError as error:
                raise AblateError(f"eval.prompt_sets: {error}") from None
        if config.eval.capability_prompts is not None:
            try:
                load_prompt_set(config.eval.capability_prompts, limit=1)
            except AblateError as error:
                raise AblateError(f"eval.capability_prompts: {error}") from None
        if config.eval.capability_reference is not None:
            try:
                resolve_spec(config.eval.capability_reference)
            except AblateError as error:
                raise AblateError(f"eval.capability_reference: {error}") from None
    budgets = resolve_budgets(config)
    capacity = pool_capacity(config)
    for budget in budgets:
        if budget["n_examples"] is not None and budget["n_examples"] > capacity:
            raise AblateError(f"budgets: '{budget['name']}' asks for n_examples={budget['n_examples']} but the "
                              f"{config.mode.value} data holds at most {capacity} examples")


def pool_capacity(config: FinetuneConfig) -> int:
    """How many training examples the configured data can hold (before dropping donor refusals)."""
    from ablate.data import load_prompt_set

    data = config.data

    def count(spec: str | None, limit: int | None, key: str) -> int:
        if not spec or limit == 0:
            return 0
        available = len(load_prompt_set(spec))
        if limit is not None and limit > available:
            raise AblateError(f"data.{key}: {limit} requested but '{spec}' holds {available} prompts")
        return available if limit is None else limit

    if config.mode is FinetuneMode.harden:
        return (count(data.refusal_prompts, data.n_refusal, "n_refusal")
                + count(data.harmless_prompts, data.n_harmless, "n_harmless")
                + count(data.borderline_prompts, data.n_borderline, "n_borderline"))
    if config.mode is FinetuneMode.harmful:
        return count(data.refusal_prompts, data.n_refusal, "n_refusal")
    if config.mode is FinetuneMode.benign:
        if data.dataset:
            return count(data.dataset, data.n_harmless, "n_harmless")
        return count(data.harmless_prompts, data.n_harmless, "n_harmless")
    if config.mode is FinetuneMode.dataset:
        return len(load_dataset_examples(config))
    return len(read_identity_rows(data.identity_file))
