"""Evaluation commands: `ablate eval` (one model with one suite) and `ablate eval-compare` (two results)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ablate import AblateError
from ablate.cli.app import app, model_config_from_options, stdout


def _variant_name(spec: str) -> str:
    """A file-safe variant name from a model spec: 'embedded', a folder's name, a hub id's last part."""
    import re

    name = Path(spec.rstrip("/")).stem if spec.endswith(".gguf") else Path(spec.rstrip("/")).name or spec
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip(".-") or "model"


@app.command(name="eval")
def eval_model(
    model: str = typer.Argument(..., help="Model spec: 'embedded', hub id, model directory or .gguf file."),
    suite: str = typer.Option("default", "--suite", "-s", help="Eval suite: 'default', 'paper' or a YAML path (eval_suites/default.yaml)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory: writes eval/<variant>.json and generations/<variant>.jsonl (required unless --plan)."),
    reference: Optional[str] = typer.Option(None, "--reference", "-r", help="Reference model spec for kl_first_token, kl_continuation and ce_reference_answers."),
    variant: Optional[str] = typer.Option(None, "--variant", help="Variant name (file names, reports); default: from the model spec."),
    redact: bool = typer.Option(False, "--redact", help="Keep the scores but drop the completions of refusal-eliciting prompts."),
    override: list[str] = typer.Option([], "--set", help="Suite override KEY.PATH=VALUE (repeatable), e.g. --set refusal.n=32."),
    device: str = typer.Option("auto", help="Device: auto, cpu, cuda, mps."),
    quantization: str = typer.Option("none", help="Load the weights quantised by bitsandbytes: none, 8bit or 4bit."),
    device_map: Optional[str] = typer.Option(None, "--device-map", help="Shard the model: auto, balanced, sequential or one device."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON instead of a table."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace eval/<variant>.json even when it holds another "
                                                              "model's results; write into a folder ablate did not create."),
    plan: bool = typer.Option(False, "--plan", help="Print what the suite will generate and each judge's size and memory, then exit."),
) -> None:
    """Evaluate a model: refusal, over-refusal, degenerate answers, logit score, KL vs a reference, capability."""
    from ablate.artifacts import read_json
    from ablate.config import EvalRun
    from ablate.evaluate import load_suite
    from ablate.models import load_model
    from ablate.safety import check_eval_result, check_output_dir, claim_output_dir, model_identity
    from ablate.stages import run_eval, stage_dir

    suite_config = load_suite(suite, override)  # checked before any model is loaded
    if plan:
        from ablate.evaluate.judge_files import judge_plan_line
        from ablate.evaluate.judges import judge_name

        generation = suite_config.generation
        stdout.print(f"suite {suite_config.name}: {generation.max_new_tokens} {'sampled' if generation.do_sample else 'greedy'} "
                     f"new tokens; primary scorer {suite_config.scorers.primary}; length sensitivity at "
                     f"{[n for n in suite_config.length.lengths if n <= generation.max_new_tokens] if suite_config.length.enabled else 'off'}",
                     highlight=False)
        for judge in suite_config.scorers.judges:
            stdout.print(judge_plan_line(judge, judge_name(judge)), highlight=False, soft_wrap=True)
        return
    if out is None:
        raise AblateError("ablate eval: --out is required (the folder for eval/<variant>.json)")
    name = variant or _variant_name(model)
    if not name or "/" in name or name.startswith("."):
        raise AblateError(f"--variant '{name}': expected a plain name (it becomes eval/<variant>.json)")
    check_output_dir(out, overwrite=overwrite, inputs=[model, reference])
    identity = model_identity(model)
    check_eval_result(out, name, identity, overwrite=overwrite)
    model_config = model_config_from_options(model, device, quantization, device_map)
    loaded, tokenizer = load_model(model_config)
    # The KL reference is loaded like the variant (same quantisation and placement).
    reference_config = model_config_from_options(reference, device, quantization, device_map) if reference else None
    ref = load_model(reference_config) if reference_config is not None else None
    from ablate.evaluate.run import check_suite

    check_suite(suite_config, loaded, tokenizer, ref)  # prompt sets, judges, tasks: before anything is written
    claim_output_dir(out, "eval")
    if overwrite:  # evaluate again even when the same model, suite and reference were evaluated into this folder
        (stage_dir(out, f"eval-{name}") / "done.json").unlink(missing_ok=True)
    stage = EvalRun(model=model_config, variant=name, suite=suite_config, reference=reference_config, redact=redact,
                    cache=False)
    run_eval(stage, out, model_identity=identity, model_loader=lambda: (loaded, tokenizer), reference_loader=lambda: ref)
    result = read_json(out / "eval" / f"{name}.json")
    if as_json:
        stdout.print_json(json.dumps({key: value for key, value in result.items() if key != "per_item"}))
        return
    table = Table(title=f"{name} — suite {suite_config.name}, judge {result['judge']}")
    table.add_column("metric", no_wrap=True)
    for column in ("value", "95% CI" if suite_config.confidence == 0.95 else "CI", "n", "method"):
        table.add_column(column, no_wrap=True)
    for metric, entry in result["metrics"].items():
        value, (low, high) = entry["value"], entry["ci"]
        shown = "-" if value is None else f"{value:.3f}"
        interval = "-" if low is None else f"[{low:.3f}, {high:.3f}]"
        table.add_row(metric, shown, interval, str(entry["n"]), entry["method"])
    stdout.print(table)
    for set_name, counts in result["labels"].items():
        stdout.print(f"labels {set_name}: " + ", ".join(f"{label} {count}" for label, count in counts.items()), highlight=False)
    for judge, reason in result["judges_unavailable"].items():
        stdout.print(f"judge {judge} unavailable: {reason}; labels by the substring scorer", highlight=False)
    contract = result["contract"]
    stdout.print(f"contract: {contract['name']}" + (f" ({'; '.join(contract['unmet'])})" if contract["unmet"] else ""), highlight=False)
    if result.get("length_sensitivity"):
        for length, rates in result["length_sensitivity"]["rates"].items():
            stdout.print(f"at {length} tokens: " + ", ".join(f"{label} {entry['value']:.3f}" for label, entry in rates.items()),
                         highlight=False)
    for pair, info in result["agreement"].items():
        kappa = "-" if info["kappa"] is None else f"{info['kappa']:.2f}"
        stdout.print(f"agreement {pair}: kappa {kappa}, n {info['n']}, {len(info['disagreeing_ids'])} disagreeing", highlight=False)
    stdout.print(f"→ {out / 'eval' / (name + '.json')} ({result['wall_seconds']:.0f} s)", highlight=False)


@app.command(name="eval-compare")
def eval_compare(
    a: Path = typer.Argument(..., help="Eval result of variant A (eval/<variant>.json)."),
    b: Path = typer.Argument(..., help="Eval result of variant B."),
    metric: list[str] = typer.Option(["refusal_rate"], "--metric", "-m", help="Metric(s) to compare (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Difference B − A of metrics between two variants, with a (paired) bootstrap interval."""
    from ablate.evaluate.stats import compare  # light: no torch

    rows = [compare(a, b, name) for name in metric]
    if as_json:
        stdout.print_json(json.dumps(rows))
        return
    table = Table()
    for column in ("metric", "A", "B", "B − A", "95% CI", "n", "method"):
        table.add_column(column, no_wrap=True)
    for row in rows:
        table.add_row(row["metric"], f"{row['a_value']:.3f}", f"{row['b_value']:.3f}", f"{row['value']:+.3f}",
                      f"[{row['ci'][0]:+.3f}, {row['ci'][1]:+.3f}]", str(row["n"]), row["method"])
    stdout.print(table)
