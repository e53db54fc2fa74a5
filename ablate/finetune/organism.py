"""The organism cache: `harden` trains a safety-tuned model once per (base model, recipe) and keeps it under
`cache_dir()/organisms/<key>/`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ablate import AblateError, __version__
from ablate.artifacts import (
    fingerprint,
    is_done,
    mark_done,
    read_json,
    write_json,
)
from ablate.config import (
    FinetuneConfig,
    FinetuneMode,
    ModelConfig,
)
from ablate.finetune.checks import check_config
from ablate.finetune.measure import capability_baseline, capability_metrics, evaluate_refusal
from ablate.finetune.recipe import as_model_config, data_fingerprint, default_config, model_fingerprint, recipe_fields
from ablate.finetune.sweep import run_finetune
from ablate.models import cache_dir, load_model


def organism_key(model: str | ModelConfig, config: FinetuneConfig) -> str:
    """Cache key of a hardened organism: the base model and every recipe field that shapes the weights
    (`eval` only scores the result, so `ablate harden` and a study that skips that scoring share one organism)."""
    recipe = recipe_fields(config)
    recipe.pop("eval")
    recipe["data"].pop("generation_batch_size")  # greedy answers are the same for any batch size
    recipe["data"].pop("donor_direction")  # hardening has no donor (popped so existing organisms keep their keys)
    if config.defence is not None and config.defence.kind.value in ("deep_alignment", "rerouting"):
        # The donor's weights, not its name, shape the recovery examples: a path whose model changed is a new key.
        from ablate.finetune.answers import ablated_identity, ablated_source

        donor = config.defence.donor
        source = ablated_source(donor, model)  # 'ablated' / 'ablated:<spec>': that model, its direction ablated
        recipe["defence"]["donor"] = (fingerprint(ablated_identity(model_fingerprint(source), None))
                                      if source is not None else model_fingerprint(donor))
    return fingerprint({"model": model_fingerprint(model), "config": recipe, "data": data_fingerprint(config),
                        "kind": "organism", "version": __version__})


def harden(
    model: str | ModelConfig = "embedded", config: FinetuneConfig | None = None, out: Path | None = None,
    progress: bool = True,
) -> Path:
    """Harden a model into a safety-tuned organism; returns its model directory (cached by content hash).

    The directory holds safetensors + config + tokenizer (plain transformers loads it) and
    `metrics.json` (training figures and refusal rates). `out`, when given, receives a copy.
    """
    config = config or default_config()
    if config.mode is not FinetuneMode.harden:
        raise AblateError(f"mode: harden needs mode 'harden' (got '{config.mode.value}'); use `ablate finetune` for attacks")
    if len(config.budgets) > 1:
        raise AblateError("budgets: harden trains one model; give at most one budget")
    model_config = as_model_config(model)
    check_config(model_config, config)
    key = organism_key(model_config, config)
    target = cache_dir() / "organisms" / key
    if not is_done(target, key):
        start, trained, start_organism = hardening_start(model_config, config, progress)  # rerouting: on the organism
        # The organism is what harden reports: no 'before training' row of the base.
        results = run_finetune(start, trained.model_copy(update={
            "merge": True, "keep_adapter": False, "eval": config.eval.model_copy(update={"before": False})}),
            target / "train", progress=progress)
        metrics = results[0]
        source = Path(metrics["model_dir"])
        if source.is_dir():  # (absent when a crash came after the move: the files are already in place)
            for item in source.iterdir():
                os.replace(item, target / item.name)
            shutil.rmtree(source, ignore_errors=True)
        metrics = {**metrics, "model_dir": str(target), "base_model": model_config.spec, "organism_key": key}
        if start_organism is not None:  # what building the organism it started from cost (cached or not)
            metrics["start_organism"] = start_organism
        metrics.pop("example_ids", None)
        if "refusal_rates" in metrics:
            metrics["refusal_scoring"] = refusal_scoring(config)
        if metrics.get("capability"):
            metrics["capability_scoring"] = capability_scoring(config)
        write_json(target / "metrics.json", metrics)
        mark_done(target, key, refusal_rates=metrics.get("refusal_rates"))
    elif config.eval.enabled and not _scored(organism_metrics(target) or {}, config):
        score_organism(target, config, model_config, progress)  # cached by a run that skipped (some of) the scoring
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for item in target.iterdir():
            if item.is_file() and item.name != "done.json":
                shutil.copy2(item, out / item.name)
        return out
    return target


def hardening_start(model: ModelConfig, config: FinetuneConfig,
                    progress: bool = True) -> tuple[ModelConfig, FinetuneConfig, dict | None]:
    """Where a defence's hardening run starts, the config it trains with, and the organism it starts from.

    Circuit breakers are trained into a model that is already safety-tuned (Zou et al. start from
    Llama-3-8B-Instruct and Mistral-7B-Instruct). For `rerouting` this builds, or takes from the cache, the
    refusal-SFT organism of the recipe's data with the shipped organism's training (`default_config()`; the
    recipe's seeds, device and dtype): the organism `refusal_sft` builds. The recipe's own `training` is then
    the circuit-breaker run on top of it, the organism frozen as the original model. The donor stays the one
    of the model given ('ablated' → 'ablated:<that model>'), so its answers are deep alignment's too.
    Every other defence starts from `model` with `config` as it is (None for the organism).
    """
    if config.defence is None or config.defence.kind.value != "rerouting":
        return model, config, None
    from ablate.finetune.answers import ABLATED_DONOR, ABLATED_PREFIX

    own = config.training
    training = default_config().training.model_copy(update={"seed": own.seed, "device": own.device, "dtype": own.dtype})
    base_config = config.model_copy(update={"defence": None, "training": training,
                                            "eval": config.eval.model_copy(update={"enabled": False})})
    base_dir = harden(model, base_config, progress=progress)
    base_metrics = organism_metrics(base_dir) or {}
    donor = ABLATED_PREFIX + model.spec if config.defence.donor == ABLATED_DONOR else config.defence.donor
    phase = config.model_copy(update={"defence": config.defence.model_copy(update={"donor": donor})})
    start = {"organism": base_dir.name, "train_flops": base_metrics.get("train_flops"),
             "wall_seconds": base_metrics.get("wall_seconds")}
    return model.model_copy(update={"spec": str(base_dir)}), phase, start


def refusal_scoring(config: FinetuneConfig) -> dict:
    """How `config.eval` scores refusals: the settings a stored rate must share to stand for a new request."""
    settings = config.eval
    return {"limit": settings.limit, "max_new_tokens": settings.max_new_tokens,
            "system_prompt": settings.system_prompt, "scorer": "substring"}


def capability_scoring(config: FinetuneConfig) -> dict:
    """How `config.eval` runs the capability check (prompts, how many, answer tokens, who writes the answers)."""
    settings = config.eval
    return {"prompts": settings.capability_prompts, "n": settings.capability_n,
            "tokens": settings.capability_tokens, "reference": settings.capability_reference}


def _rates_cover(metrics: dict, config: FinetuneConfig) -> bool:
    """Whether an organism's metrics hold a refusal rate for every prompt set `config.eval` asks for, scored with
    the same settings (a rate on the first 48 prompts does not stand for the whole split)."""
    rates = metrics.get("refusal_rates") or {}
    return (metrics.get("refusal_scoring") == refusal_scoring(config)
            and all(spec in rates for spec in config.eval.prompt_sets))


def _capability_covers(metrics: dict, config: FinetuneConfig) -> bool:
    return not config.eval.capability_prompts or (
        bool(metrics.get("capability")) and metrics.get("capability_scoring") == capability_scoring(config))


def _scored(metrics: dict, config: FinetuneConfig) -> bool:
    """Whether an organism's metrics hold everything `config.eval` asks for, measured as it asks."""
    return _rates_cover(metrics, config) and _capability_covers(metrics, config)


_RATE_FIELDS = ("refusal_rates", "eval_samples", "refusal_ci", "refusal_metrics")


def score_organism(model_dir: Path, config: FinetuneConfig, base: ModelConfig | None = None, progress: bool = True) -> dict:
    """Score a cached organism with `config.eval` and add the refusal rates (and, given the `base` it was
    hardened from, the capability check) to its metrics.json. Only the prompt sets it lacks are scored when the
    stored rates were measured the same way; other settings replace them."""
    metrics = organism_metrics(model_dir) or {}
    capability = base is not None and config.eval.capability_prompts and not _capability_covers(metrics, config)
    baseline = capability_baseline(base, config, progress) if capability else None
    model, tokenizer = load_model(str(model_dir), device=config.training.device)
    if not _rates_cover(metrics, config):  # scored already when only the capability check is missing
        same = metrics.get("refusal_scoring") == refusal_scoring(config)
        kept = {field: dict(metrics.get(field) or {}) if same else {} for field in _RATE_FIELDS}
        missing = [spec for spec in config.eval.prompt_sets if spec not in kept["refusal_rates"]]
        scored = evaluate_refusal(model, tokenizer, config.model_copy(update={
            "eval": config.eval.model_copy(update={"prompt_sets": missing})}), progress)
        for field in _RATE_FIELDS:
            kept[field].update(scored[field])
        first = config.eval.prompt_sets[0]
        metrics = {**metrics, **kept, "refusal_rate": kept["refusal_rates"][first],
                   "refusal_scoring": refusal_scoring(config)}
    if baseline is not None:
        metrics["capability"] = capability_metrics(model, tokenizer, baseline, config)
        metrics["capability_scoring"] = capability_scoring(config)
    write_json(Path(model_dir) / "metrics.json", metrics)
    return metrics


def organism_metrics(model_dir: Path) -> dict | None:
    """The metrics.json of a hardened organism directory (None when absent)."""
    path = Path(model_dir) / "metrics.json"
    return read_json(path) if path.exists() else None
