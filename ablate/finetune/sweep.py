"""The fine-tuning stage, `run_finetune`: every budget of a recipe trained, saved and measured in its own folder."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

import torch
from ablate import AblateError
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
    dump_config,
)
from ablate.finetune.checks import check_config
from ablate.finetune.measure import (
    before_training,
    capability_metrics,
    evaluate_refusal,
    is_main_process,
    read_before,
    write_before,
)
from ablate.finetune.recipe import as_model_config, budget_fingerprint, model_fingerprint, resolve_budgets
from ablate.finetune.trainer import save_model_dir, train_budget
from ablate.finetune.answers import donor_fingerprint
from ablate.finetune.training_data import build_examples
from ablate.models import pick_dtype
from ablate.placement import is_quantized


def run_finetune(model: str | ModelConfig, config: FinetuneConfig, out_dir: Path, progress: bool = True) -> list[dict]:
    """Train every budget of `config` on `model`; one folder per budget under `out_dir`.

    Returns one metrics dict per budget (also in out_dir/<budget>/metrics.json). A budget whose
    done.json matches its input fingerprint is skipped, so an interrupted sweep resumes.
    """
    model_config = as_model_config(model)
    out_dir = Path(out_dir)
    check_config(model_config, config)
    budgets = resolve_budgets(config)
    model_fp = model_fingerprint(model_config)
    needs_donor = config.mode in (FinetuneMode.harmful, FinetuneMode.benign) and not config.data.dataset
    donor_fp = donor_fingerprint(model_fp, config.data) if needs_donor else None
    fingerprints = {b["name"]: budget_fingerprint(model_fp, donor_fp, config, b) for b in budgets}
    results: dict[str, dict] = {}
    for budget in budgets:
        if is_done(out_dir / budget["name"], fingerprints[budget["name"]]):
            results[budget["name"]] = read_json(out_dir / budget["name"] / "metrics.json")
    pending = [b for b in budgets if b["name"] not in results]
    if pending:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "config.json", {"model": model_config.model_dump(mode="json"),
                                             "config": config.model_dump(mode="json")})
        (out_dir / "config.yaml").write_text(dump_config(config), encoding="utf-8")
        examples, data_stats = build_examples(model_config, config, progress)
        # The untrained model, once: the capability check's answers and, with eval.before, its refusal rates
        # (kept in before.json for a rerun with the same model and eval settings).
        before_key = fingerprint({"model": model_fp, "eval": config.eval.model_dump(mode="json")})
        previous = read_before(out_dir)
        current = previous is not None and previous.get("fingerprint") == before_key
        checks = before_training(model_config, config, progress, refusal=config.eval.before and not current)
        if checks["refusal"] is not None:
            write_before(out_dir, before_key, checks["refusal"])
        elif previous is not None and not (config.eval.before and current) and is_main_process():
            (out_dir / "before.json").unlink()  # another run's row (other model or eval settings), and none of this one
        baseline = checks["capability"]
        for budget in pending:
            n = budget["n_examples"] or len(examples)
            if n > len(examples):
                raise AblateError(f"budgets: '{budget['name']}' asks for {n} examples but only {len(examples)} remain "
                                  f"after dropping {data_stats['dropped_refusals']} donor refusals")
            results[budget["name"]] = run_budget(model_config, config, budget, examples[:n], data_stats,
                                                 out_dir / budget["name"], fingerprints[budget["name"]], progress,
                                                 baseline)
    return [results[b["name"]] for b in budgets]


def run_budget(model_config: ModelConfig, config: FinetuneConfig, budget: dict, examples: list[dict],
               data_stats: dict, budget_dir: Path, budget_fp: str, progress: bool, capability: dict | None = None) -> dict:
    """Train, save (adapter and/or merged model), evaluate (refusal; with `capability`, a `capability_baseline`,
    also the cross-entropy of its answers), write metrics.json, then done.json."""
    budget_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.training.seed)
    model, tokenizer, train_metrics = train_budget(model_config, config, budget, examples, budget_dir, progress)
    if model is None:  # a non-main process of a distributed launch: the main process saves and evaluates
        return {"name": budget["name"], **train_metrics}
    shutil.rmtree(budget_dir / "trainer", ignore_errors=True)
    shutil.rmtree(budget_dir / "gathered", ignore_errors=True)
    adapter_dir = model_dir = None
    is_peft = hasattr(model, "merge_and_unload")
    quantized = is_quantized(model)
    dequantization = None
    if is_peft and (config.keep_adapter or quantized):  # a QLoRA variant is evaluated as its 4-bit base + this adapter
        adapter_dir = save_model_dir(model, tokenizer, budget_dir / "adapter")
    if is_peft and not quantized:
        model = model.merge_and_unload()
    if config.merge or not is_peft:
        if quantized:  # the merged export de-quantises the base; dequantization.json says how
            from ablate.streaming import export_dequantized_merge

            device = next(model.parameters()).device
            bf16 = pick_dtype(config.training.dtype, device) == torch.bfloat16
            dequantization = export_dequantized_merge(model, tokenizer, budget_dir / "model",
                                                      dtype=torch.bfloat16 if bf16 else torch.float32)
            model_dir = budget_dir / "model"
        else:
            model_dir = save_model_dir(model, tokenizer, budget_dir / "model")
    metrics = {
        "name": budget["name"], "mode": config.mode.value, "n_examples": len(examples),
        "epochs": budget["epochs"], "max_steps": budget["max_steps"], "rank": None if config.training.full_finetune else budget["rank"],
        "lr": budget["lr"], "full_finetune": config.training.full_finetune, "qlora": quantized, "dequantization": dequantization,
        **train_metrics,
        "examples_by_kind": {k: sum(e["kind"] == k for e in examples) for k in sorted({e["kind"] for e in examples})},
        "example_ids": [e["id"] for e in examples],
        "generated": data_stats.get("generated", 0), "dropped_refusals": data_stats.get("dropped_refusals", 0),
        "donor": data_stats.get("donor"), "pool": data_stats.get("pool"),
        "model_dir": str(model_dir) if model_dir else None, "adapter_dir": str(adapter_dir) if adapter_dir else None,
        "refusal_rate": None,
    }
    if data_stats.get("defence"):
        metrics["defence_data"] = data_stats["defence"]
    if config.mode is not FinetuneMode.harden:  # an attack: everything it used, on one axis (ablate.compute)
        from ablate.compute import attack_compute

        metrics["attack_compute"] = attack_compute(train_metrics, data_stats.get("donor_compute"), len(examples),
                                                   data_stats.get("pool"))
    if config.eval.enabled:
        metrics.update(evaluate_refusal(model, tokenizer, config, progress))
    if capability is not None:
        metrics["capability"] = capability_metrics(model, tokenizer, capability, config)
    write_json(budget_dir / "metrics.json", metrics)
    mark_done(budget_dir, budget_fp, refusal_rate=metrics["refusal_rate"], wall_seconds=metrics["wall_seconds"])
    del model
    gc.collect()
    return metrics
