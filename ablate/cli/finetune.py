"""Fine-tuning commands: `ablate harden` (a model organism or a defence) and `ablate finetune` (a LoRA budget sweep)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ablate.cli.app import app, model_config_from_options, on_interrupt, overwrite_option, stdout


def load_finetune_config(config: Optional[Path], overrides: list[str] | None):
    from ablate.config import ORGANISM_RECIPE, FinetuneConfig, apply_overrides, load_config, validate_config

    if config is not None:
        return load_config(config, FinetuneConfig, overrides or None)
    return validate_config(apply_overrides(ORGANISM_RECIPE, overrides or []), FinetuneConfig, "<organism recipe>")


def _with_interval(value: float | None, interval: list[float] | None, spec: str) -> str:
    """'2.1% [0.4%, 10.9%]' — a figure and its interval in one cell; '-' when there is no figure."""
    if value is None:
        return "-"
    return format(value, spec) + (f" [{format(interval[0], spec)}, {format(interval[1], spec)}]" if interval else "")


def print_budget_table(results: list[dict]) -> None:
    capability = any(row.get("capability") for row in results)
    # The first eval set gives `refusal` (with its interval); the others (over-refusal) a column each.
    others = list(dict.fromkeys(name for row in results for name in list(row.get("refusal_rates") or {})[1:]))
    table = Table("budget", "examples", "steps", "wall s", "tokens", "TFLOPs", "final loss", "refusal", *others,
                  *(["CE change"] if capability else []))
    for row in results:
        loss, rates = row.get("final_loss"), row.get("refusal_rates") or {}
        first = next(iter(rates), None)
        check = row.get("capability") or {}
        table.add_row(row["name"], str(row["n_examples"]), str(row["steps"]), f"{row['wall_seconds']:.1f}",
                      str(row["train_tokens"]), f"{row['train_flops'] / 1e12:.3f}",
                      "-" if loss is None else f"{loss:.3f}",
                      _with_interval(row.get("refusal_rate"), (row.get("refusal_ci") or {}).get(first), ".1%"),
                      *(_with_interval(rates.get(name), None, ".1%") for name in others),
                      *([_with_interval(check.get("ce_change"), check.get("ce_change_ci"), "+.1%")] if capability else []))
    # A file or a pipe gets 160 columns, not rich's default 80 (which cut the figures short).
    (stdout if stdout.is_terminal else Console(width=160)).print(table)
    if any(row.get("refusal_ci") for row in results):
        stdout.print("[brackets: 95% intervals — Wilson for the refusal rate, paired bootstrap over the prompts for the "
                     "CE change; further columns: the other eval sets' refusal rates (over-refusal)]",
                     markup=False, highlight=False, soft_wrap=True)


def copy_model_files(model_dir: Path, out: Path) -> Path:
    """The files of a cached model directory copied into `out` (its done-marker left behind); returns `out`."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    for item in model_dir.iterdir():
        if item.is_file() and item.name != "done.json":
            shutil.copy2(item, out / item.name)
    return out


@app.command()
def harden(
    model: str = typer.Argument("embedded", help="Model spec to harden: 'embedded', hub id, directory or .gguf file."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Fine-tuning YAML (mode: harden); default: the shipped organism recipe."),
    out: Optional[Path] = typer.Option(None, help="Copy the hardened model directory here."),
    override: Optional[list[str]] = typer.Option(None, "--set", help="Override a config key: --set training.epochs=3 (repeatable)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    overwrite: bool = overwrite_option("--out"),
) -> None:
    """Harden a model into a safety-tuned organism (LoRA SFT, merged); cached by content hash."""
    from ablate.config import HardenRun, ModelConfig
    from ablate.safety import check_output_dir, claim_output_dir
    from ablate.stages import run_harden

    recipe = load_finetune_config(config, override)
    if out is not None:
        check_output_dir(out, overwrite=overwrite, inputs=[model])
        claim_output_dir(out, "harden")
        on_interrupt["note"] = ("interrupted: finished training is kept in the cache; rerun the same command "
                                 "to continue")
    model_dir = Path(run_harden(HardenRun(model=ModelConfig(spec=model), recipe=recipe), out, progress=progress)["model_dir"])
    if out is not None:  # a copy of the organism's files beside the stage's marker
        model_dir = copy_model_files(model_dir, out)
    metrics = json.loads((model_dir / "metrics.json").read_text()) if (model_dir / "metrics.json").exists() else {}
    intervals, stored = metrics.get("refusal_ci") or {}, metrics.get("refusal_rates") or {}
    asked = recipe.eval.prompt_sets if recipe.eval.enabled else []  # the sets this run scored, not every stored one
    rates = ", ".join(f"{name} {stored[name]:.3f}" + (" [{:.3f}, {:.3f}]".format(*intervals[name]) if intervals.get(name) else "")
                      for name in asked if name in stored)
    capability = metrics.get("capability")
    stdout.print(f"hardened model: {model_dir}" + (f"\nrefusal rates: {rates}" if rates else "")
                 + (f"\ncapability: cross-entropy {capability['ce']:.3f} nats/token (before training {capability['ce_before']:.3f}, "
                    f"{capability['ce_change']:+.1%}"
                    + (f", 95% interval [{capability['ce_change_ci'][0]:+.1%}, {capability['ce_change_ci'][1]:+.1%}]"
                       if capability.get("ce_change_ci") else "")
                    + f") on the greedy answers of {capability['reference']} to {capability['n']} "
                    f"{capability['prompts']} prompts" if capability else "")
                 + (f"\ntraining: {metrics.get('steps')} steps, {metrics.get('wall_seconds')} s" if metrics else ""),
                 highlight=False, soft_wrap=True)


@app.command()
def holdout(
    model: str = typer.Argument("embedded", help="Model spec to harden: 'embedded', hub id, directory or .gguf file."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Hardening recipe (mode: harden), e.g. finetune_configs/defence_refusal_sft.yaml; default: the shipped organism recipe."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for holdout.json and holdout.md; a rerun into it keeps the categories it finished."),
    category: Optional[list[str]] = typer.Option(None, "--category", help="Leave out only this category (repeatable); default: every category of the recipe's refusal prompts."),
    override: Optional[list[str]] = typer.Option(None, "--set", help="Override a recipe key: --set training.seed=1 (repeatable)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    overwrite: bool = overwrite_option("--out"),
) -> None:
    """Leave-one-category-out: harden without each category of refusal prompts, measure refusal on that category."""
    from ablate.finetune.holdout import check_holdout, markdown, run_holdout
    from ablate.safety import check_output_dir, claim_output_dir

    recipe = load_finetune_config(config, override)
    check_holdout(recipe, category or None)
    check_output_dir(out, overwrite=overwrite, inputs=[model])
    claim_output_dir(out, "holdout")
    on_interrupt["note"] = ("interrupted: finished categories are in holdout.json and their organisms in the cache; "
                             "rerun the same command to continue")
    result = run_holdout(model, recipe, out, categories=category or None, progress=progress,
                         log=lambda line: stdout.print(line, markup=False, highlight=False))
    stdout.print(markdown(result), markup=False, highlight=False, soft_wrap=True)


@app.command()
def finetune(
    model: str = typer.Argument(..., help="Model spec to fine-tune: 'embedded', hub id, directory or .gguf file."),
    config: Path = typer.Option(..., "--config", "-c", help="Fine-tuning YAML, e.g. finetune_configs/lora_attack.yaml."),
    out: Path = typer.Option(..., help="Output directory: one folder per budget (adapter, model, metrics.json, done.json)."),
    override: Optional[list[str]] = typer.Option(None, "--set", help="Override a config key: --set training.lr=2e-4 (repeatable)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    overwrite: bool = overwrite_option("--out"),
    quantization: str = typer.Option("none", help="Load the weights quantised by bitsandbytes: none, 8bit or 4bit."),
    device_map: Optional[str] = typer.Option(None, "--device-map", help="Shard the model: auto, balanced, sequential or one device."),
) -> None:
    """Fine-tune (LoRA/QLoRA/full) over a budget sweep; finished budgets are skipped on a rerun."""
    from ablate.config import FinetuneRun
    from ablate.finetune import check_config, is_main_process, read_before
    from ablate.safety import check_output_dir, claim_output_dir
    from ablate.stages import run_finetune

    recipe = load_finetune_config(config, override)
    check_output_dir(out, overwrite=overwrite, inputs=[model])
    model_config = model_config_from_options(model, "auto", quantization, device_map)
    check_config(model_config, recipe)  # everything checkable before a model loads
    claim_output_dir(out, "finetune")
    on_interrupt["note"] = f"interrupted: finished budgets are kept in {out}; rerun the same command to resume"
    results = run_finetune(FinetuneRun(model=model_config, recipe=recipe, folder="."), out, progress=progress)["budgets"]
    before = read_before(out) if recipe.eval.before else None
    results = ([before] if before else []) + results
    if not is_main_process():  # other processes of a distributed launch: the main one reports
        return
    print_budget_table(results)
    stdout.print(f"→ {out}", highlight=False)
