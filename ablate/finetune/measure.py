"""What a fine-tuning run measures on a model: refusal rates on the eval prompt sets, and the capability check
(the cross-entropy of fixed answers before and after training)."""

from __future__ import annotations

import gc
import os
from pathlib import Path

from ablate import AblateError
from ablate.artifacts import (
    read_json,
    write_json,
)
from ablate.config import (
    FinetuneConfig,
    FinetuneEvalConfig,
    GenerationConfig,
    ModelConfig,
)
from ablate.models import load_model


def evaluate_refusal(model, tokenizer, config: FinetuneConfig, progress: bool = True) -> dict:
    """Refusal rate (substring scorer, `eval.max_new_tokens` new tokens) of a model on each eval prompt set, measured
    by `ablate.evaluate.measure`: per set in its result format (`refusal_metrics`) and rounded — the first set's
    as `refusal_rate`."""
    from ablate.data import load_prompt_set
    from ablate.evaluate.measure import measure_refusal

    model.eval()
    tokenizer.padding_side = "left"
    generation = GenerationConfig(max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size,
                                  system_prompt=config.eval.system_prompt)
    rates, samples, intervals, figures = {}, {}, {}, {}
    for spec in config.eval.prompt_sets:
        prompt_set = load_prompt_set(spec, limit=config.eval.limit)
        figure, _ = measure_refusal(model, tokenizer, prompt_set.prompts, generation, scorer="substring",
                                    progress=progress, description=f"eval {spec}")
        figures[spec] = {**figure, "prompts": spec}
        rates[spec] = round(figure["value"], 4) if figure["n"] else 0.0
        samples[spec] = figure["n"]
        intervals[spec] = [round(bound, 4) for bound in figure["ci"]] if figure["n"] else None
    first = config.eval.prompt_sets[0]
    return {"refusal_rate": rates[first], "refusal_rates": rates, "eval_samples": samples, "refusal_ci": intervals,
            "refusal_metrics": figures}


def capability_baseline(model_config: ModelConfig, config: FinetuneConfig, progress: bool = True) -> dict | None:
    """The capability check's fixed answers — greedy, `eval.capability_tokens` tokens, to the first
    `eval.capability_n` prompts of `eval.capability_prompts`, written by `eval.capability_reference` (None:
    the model before training) — and the untrained model's cross-entropy on them. None when the check is off."""
    return before_training(model_config, config, progress, refusal=False)["capability"]


def before_training(model_config: ModelConfig, config: FinetuneConfig, progress: bool = True, *,
                    refusal: bool) -> dict:
    """What a run measures on the model before training, loading it once: {"capability": the capability
    check's baseline (`capability_baseline`) or None, "refusal": with `refusal`, its `evaluate_refusal` on
    the eval sets, else None}. Nothing on a non-main process of a distributed launch."""
    settings = config.eval
    capability = settings.enabled and bool(settings.capability_prompts)
    refusal = refusal and settings.enabled
    if not (capability or refusal) or not is_main_process():
        return {"capability": None, "refusal": None}
    model, tokenizer = load_model(model_config)
    checks = {"capability": capability_answers(model, tokenizer, settings, progress) if capability else None,
              "refusal": evaluate_refusal(model, tokenizer, config, progress) if refusal else None}
    del model
    gc.collect()
    return checks


def capability_answers(model, tokenizer, settings: FinetuneEvalConfig, progress: bool) -> dict:
    """The capability check's answers (by `settings.capability_reference`, or by `model`) and `model`'s
    cross-entropy on them, per prompt and on average."""
    from ablate.data import load_prompt_set
    from ablate.evaluate.divergence import answer_cross_entropy, check_same_vocabulary, reference_continuations

    prompts = load_prompt_set(settings.capability_prompts, limit=settings.capability_n).prompts
    writer, writer_tokenizer = model, tokenizer
    if settings.capability_reference is not None:
        try:
            writer, writer_tokenizer = load_model(settings.capability_reference)
        except AblateError as error:
            raise AblateError(f"eval.capability_reference: {error}") from None
        check_same_vocabulary(model, tokenizer, writer, writer_tokenizer)
    answers = reference_continuations(writer, writer_tokenizer, prompts, settings.capability_tokens, progress=progress)
    ce = answer_cross_entropy(model, tokenizer, prompts, answers)
    return {"prompts": prompts, "answers": answers, "ce_before": sum(ce) / len(ce), "ce_before_items": ce}


def is_main_process() -> bool:
    """False on the non-main processes of a distributed launch (`accelerate launch` sets RANK): they train, and
    only the main one evaluates and reports."""
    return int(os.environ.get("RANK", "0")) == 0


def write_before(out_dir: Path, key: str, scored: dict) -> None:
    """out_dir/before.json: the untrained model's refusal rates as a row of the budget table."""
    write_json(out_dir / "before.json", {"name": "before training", "n_examples": 0, "steps": 0, "wall_seconds": 0.0,
                                         "train_tokens": 0, "train_flops": 0, "final_loss": None, **scored,
                                         "fingerprint": key})


def read_before(out_dir: Path) -> dict | None:
    """The 'before training' row a run wrote (None when it wrote none)."""
    path = Path(out_dir) / "before.json"
    return read_json(path) if path.exists() else None


def capability_metrics(model, tokenizer, baseline: dict, config: FinetuneConfig) -> dict:
    """Mean cross-entropy (nats/token) of the baseline's answers under the trained model, beside the
    untrained model's, and the relative change (ce / ce_before − 1) with its
    95% paired-bootstrap interval over the prompts (`ce_change_ci`: 48 prompts leave a few points either way)."""
    from ablate.evaluate.divergence import answer_cross_entropy
    from ablate.evaluate.stats import bootstrap_relative_change

    ce = answer_cross_entropy(model, tokenizer, baseline["prompts"], baseline["answers"])
    after = sum(ce) / len(ce)
    settings = config.eval
    interval = bootstrap_relative_change(baseline["ce_before_items"], ce)
    return {"prompts": settings.capability_prompts, "n": len(ce), "tokens": settings.capability_tokens,
            "reference": settings.capability_reference or "the model before training",
            "ce": round(after, 4), "ce_before": round(baseline["ce_before"], 4),
            "ce_change": round(after / baseline["ce_before"] - 1, 4),
            "ce_change_ci": [round(bound, 4) for bound in interval], "ce_items": [round(value, 4) for value in ce]}
