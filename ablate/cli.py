"""The `ablate` command line: one thin command per pipeline stage.

    ablate --help
    ablate models embedded                       # resolve and describe a model spec
    ablate data                                  # built-in and registered prompt sets
    ablate generate embedded --prompts harmless:test --limit 16 --out gens.jsonl

Every command wraps one stage function; bad input is reported as one line naming the culprit, with exit
status 2 (`--debug` shows the traceback). Output folders are checked before any work (`ablate.safety`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ablate import AblateError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Robustness studies of safety training: refusal-direction ablation, LoRA attacks, evaluation, reports.",
)
console = Console(stderr=True)
# A file or a pipe gets 200 columns, not rich's default 80 (which cut figures short).
stdout = Console() if sys.stdout.isatty() else Console(width=200)


# What Ctrl-C keeps and how to go on, set by the command that is running (one line on stderr).
_on_interrupt = {"note": "interrupted: every file already written is complete (writes are atomic); "
                         "rerun the command to continue"}


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: every user error becomes one line on stderr and exit status 2.

    `--debug` (anywhere on the command line) or ABLATE_DEBUG=1 shows the traceback instead.
    """
    import os

    from rich.markup import escape

    try:  # typer >= 0.20 carries its own copy of click, whose exceptions are these
        from typer._click import exceptions as click_errors
    except ImportError:  # pragma: no cover - older typer
        from click import exceptions as click_errors

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("ABLATE_DEBUG", "") not in ("", "0")
    args = [arg for arg in args if arg != "--debug"]

    def fail(message: str, code: int = 2) -> None:
        console.print(f"[bold red]error:[/] {escape(_one_line(message))}", highlight=False, soft_wrap=True)
        sys.exit(code)

    try:
        code = app(args=args, prog_name="ablate", standalone_mode=False)
    except AblateError as error:
        if debug:
            raise
        fail(str(error))
    except click_errors.NoArgsIsHelpError as error:
        error.show()
        sys.exit(2)
    except click_errors.UsageError as error:
        where = f"{error.ctx.command_path}: " if error.ctx is not None else ""
        fail(f"{where}{error.format_message()} (see --help)")
    except click_errors.ClickException as error:
        fail(error.format_message())
    except (KeyboardInterrupt, click_errors.Abort):
        code = 130
    except OSError as error:  # a path the user named: unreadable, read-only, full disk, a folder for a file
        if debug:
            raise
        where = f"{error.filename}: " if error.filename else ""
        fail(f"{where}{error.strerror or error} (rerun with --debug for the traceback)")
    except Exception as error:  # a bug, not a bad input: still one line, the traceback behind --debug
        if debug:
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        fail(f"internal error {type(error).__name__}: {first[:300]} (rerun with --debug for the traceback, "
             "and please report it)", code=1)
    if code == 130:  # typer turns Ctrl-C into exit status 130 without a word
        console.print(_on_interrupt["note"], highlight=False, soft_wrap=True, markup=False)
    sys.exit(code or 0)


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error instead of one line "
                                                      "(also ABLATE_DEBUG=1; accepted anywhere on the line)."),
) -> None:
    """Robustness studies of safety training: refusal-direction ablation, LoRA attacks, evaluation, reports."""


def _overwrite_option(what: str):
    return typer.Option(False, "--overwrite", help=f"Write into {what} even if it holds files ablate did not write "
                                                   "(they are kept; same-named files are replaced).")


# --------------------------------------------------------------------------------------------
# Foundation: models, data, generate
# --------------------------------------------------------------------------------------------


@app.command()
def models(
    spec: str = typer.Argument("embedded", help="'embedded', a hub id, a local model directory, or a .gguf file."),
    device: str = typer.Option("auto", help="Device: auto, cpu, cuda, mps."),
    quantization: str = typer.Option("none", help="Load the weights quantised by bitsandbytes: none, 8bit or 4bit."),
    device_map: Optional[str] = typer.Option(None, "--device-map", help="Shard the model: auto, balanced, sequential or one device."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Resolve a model spec, load it, and describe it (architecture, layers, d_model, chat template)."""
    from ablate.models import describe_model, load_model, resolve_spec

    kind, location = resolve_spec(spec)
    model, tokenizer = load_model(spec, device=device)
    info = {"spec": spec, "kind": kind, "location": location, **describe_model(model, tokenizer)}
    if as_json:
        stdout.print_json(json.dumps(info))
        return
    table = Table(show_header=False)
    for key, value in info.items():
        table.add_row(key, str(value))
    stdout.print(table)


@app.command()
def data(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List the built-in prompt sets (with sizes) and the registered public benchmarks."""
    from ablate.data import list_sets

    rows = list_sets()
    if as_json:
        stdout.print_json(json.dumps(rows))
        return
    table = Table("name", "n", "categories", "source")
    for row in rows:
        table.add_row(row["name"], str(row["n"] or "-"), str(row["categories"] or "-"), row["source"])
    stdout.print(table)


def _positive(value: float) -> float:
    if not value > 0:
        raise typer.BadParameter(f"{value} is not > 0")
    return value


@app.command()
def generate(
    model: str = typer.Argument(..., help="Model spec: 'embedded', hub id, directory or .gguf file."),
    prompts: str = typer.Option(..., "--prompts", "-p", help="Prompt set: refusal:test, harmless:train, a file, or a registry name."),
    limit: Optional[int] = typer.Option(None, min=1, help="Use only the first N prompts."),
    out: Optional[Path] = typer.Option(None, help="Write completions as JSONL here (an existing file only with --overwrite)."),
    max_new_tokens: int = typer.Option(64, min=1, help="Tokens generated per prompt."),
    batch_size: int = typer.Option(16, min=1, help="Prompts per batch."),
    sample: bool = typer.Option(False, help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(1.0, callback=_positive, help="Sampling temperature (> 0)."),
    seed: int = typer.Option(0, help="Sampling seed."),
    prompt_column: str = typer.Option("prompt", help="Prompt column of a file set."),
    device: str = typer.Option("auto", help="Device: auto, cpu, cuda, mps."),
    prompt_too_long: str = typer.Option("error", help="A prompt beyond the model's context window: 'error' or 'truncate' (with a warning)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
) -> None:
    """Generate completions for a prompt set and print its refusal rate (substring scorer)."""
    from ablate.artifacts import write_jsonl
    from ablate.config import GenerationConfig, validate_config
    from ablate.data import load_prompt_set
    from ablate.evaluate.refusal import is_refusal
    from ablate.generation import generate as run_generate
    from ablate.models import load_model
    from ablate.safety import check_output_file

    if out is not None:
        check_output_file(out, overwrite=overwrite)
    config = validate_config({"max_new_tokens": max_new_tokens, "batch_size": batch_size, "do_sample": sample,
                              "temperature": temperature, "seed": seed, "prompt_too_long": prompt_too_long},
                             GenerationConfig, "command line")
    prompt_set = load_prompt_set(prompts, limit=limit, prompt_column=prompt_column)
    if len(prompt_set) == 0:
        raise AblateError(f"--prompts '{prompts}': the prompt set is empty")
    loaded, tokenizer = load_model(model, device=device)
    completions = run_generate(loaded, tokenizer, prompt_set.prompts, config)
    rows = [
        {"id": item_id, "category": category, "prompt": prompt, "completion": completion, "refusal": is_refusal(completion)}
        for item_id, category, prompt, completion in zip(prompt_set.ids, prompt_set.categories, prompt_set.prompts, completions)
    ]
    if out is not None:
        write_jsonl(out, rows)
    else:
        for row in rows:
            stdout.print(f"[bold]{row['id']}[/] {row['prompt']}\n  → {row['completion']}", highlight=False)
    refusals = sum(row["refusal"] for row in rows)
    stdout.print(f"refusal rate: {refusals / len(rows):.3f} ({refusals}/{len(rows)}) on {prompt_set.name} "
                 f"[fingerprint {prompt_set.fingerprint}]" + (f" → {out}" if out else ""), highlight=False)


# --------------------------------------------------------------------------------------------
# Fine-tuning: harden, finetune
# --------------------------------------------------------------------------------------------


def _model_config(spec: str, device: str, quantization: str, device_map: str | None):
    """A ModelConfig from command-line options; a bad value is one line naming the option."""
    from ablate.config import ModelConfig, validate_config

    return validate_config({"spec": spec, "device": device, "quantization": quantization, "device_map": device_map},
                           ModelConfig, "command line")


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


@app.command()
def harden(
    model: str = typer.Argument("embedded", help="Model spec to harden: 'embedded', hub id, directory or .gguf file."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Fine-tuning YAML (mode: harden); default: the shipped organism recipe."),
    out: Optional[Path] = typer.Option(None, help="Copy the hardened model directory here."),
    override: Optional[list[str]] = typer.Option(None, "--set", help="Override a config key: --set training.epochs=3 (repeatable)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    overwrite: bool = _overwrite_option("--out"),
) -> None:
    """Harden a model into a safety-tuned organism (LoRA SFT, merged); cached by content hash."""
    from ablate.finetune import harden as run_harden
    from ablate.safety import check_output_dir, claim_output_dir

    recipe = load_finetune_config(config, override)
    if out is not None:
        check_output_dir(out, overwrite=overwrite, inputs=[model])
        claim_output_dir(out, "harden")
        _on_interrupt["note"] = ("interrupted: finished training is kept in the cache; rerun the same command "
                                 "to continue")
    model_dir = run_harden(model, recipe, out=out, progress=progress)
    metrics = json.loads((model_dir / "metrics.json").read_text()) if (model_dir / "metrics.json").exists() else {}
    intervals = metrics.get("refusal_ci") or {}
    rates = ", ".join(f"{name} {rate:.3f}" + (" [{:.3f}, {:.3f}]".format(*intervals[name]) if intervals.get(name) else "")
                      for name, rate in (metrics.get("refusal_rates") or {}).items())
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
def finetune(
    model: str = typer.Argument(..., help="Model spec to fine-tune: 'embedded', hub id, directory or .gguf file."),
    config: Path = typer.Option(..., "--config", "-c", help="Fine-tuning YAML, e.g. finetune_configs/lora_attack.yaml."),
    out: Path = typer.Option(..., help="Output directory: one folder per budget (adapter, model, metrics.json, done.json)."),
    override: Optional[list[str]] = typer.Option(None, "--set", help="Override a config key: --set training.lr=2e-4 (repeatable)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    overwrite: bool = _overwrite_option("--out"),
    quantization: str = typer.Option("none", help="Load the weights quantised by bitsandbytes: none, 8bit or 4bit."),
    device_map: Optional[str] = typer.Option(None, "--device-map", help="Shard the model: auto, balanced, sequential or one device."),
) -> None:
    """Fine-tune (LoRA/QLoRA/full) over a budget sweep; finished budgets are skipped on a rerun."""
    from ablate.finetune import as_model_config, check_config, is_main_process, read_before, run_finetune
    from ablate.safety import check_output_dir, claim_output_dir

    recipe = load_finetune_config(config, override)
    check_output_dir(out, overwrite=overwrite, inputs=[model])
    model_config = _model_config(model, "auto", quantization, device_map)
    check_config(model_config, recipe)  # everything checkable before a model loads
    claim_output_dir(out, "finetune")
    _on_interrupt["note"] = f"interrupted: finished budgets are kept in {out}; rerun the same command to resume"
    results = run_finetune(model_config, recipe, out, progress=progress)
    before = read_before(out) if recipe.eval.before else None
    results = ([before] if before else []) + results
    if not is_main_process():  # other processes of a distributed launch: the main one reports
        return
    print_budget_table(results)
    stdout.print(f"→ {out}", highlight=False)

# --------------------------------------------------------------------------------------------
# Refusal directions: direction, abliterate
# --------------------------------------------------------------------------------------------

# (section owned by the direction stage)


@app.command()
def direction(
    model: str = typer.Argument(..., help="Model spec: 'embedded', hub id, directory or .gguf file."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for candidates, sweep, figure and the selected direction."),
    refusal: Optional[str] = typer.Option(None, "--refusal", help="Refusal prompt set for the train means (default refusal:train)."),
    harmless: Optional[str] = typer.Option(None, "--harmless", help="Harmless prompt set for the train means (default harmless:train)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="DirectionConfig YAML (see docs/directions.md)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="A shipped DirectionConfig instead of --config: 'arditi2024' (the paper's method, no learned strength)."),
    override: Optional[list[str]] = typer.Option(None, "--set", help="Config override KEY=VALUE (repeatable), e.g. --set kl_max=0.3."),
    device: str = typer.Option("auto", help="Device: auto, cpu, cuda, mps."),
    overwrite: bool = _overwrite_option("--out"),
    quantization: str = typer.Option("none", help="Load the weights quantised by bitsandbytes: none, 8bit or 4bit."),
    device_map: Optional[str] = typer.Option(None, "--device-map", help="Shard the model: auto, balanced, sequential or one device."),
) -> None:
    """Extract refusal-direction candidates, score them on validation prompts, select one, save it."""
    from ablate.config import DirectionConfig, apply_overrides, direction_preset_path, dump_config, load_config, validate_config
    from ablate.safety import check_output_dir, claim_output_dir

    check_output_dir(out, overwrite=overwrite, inputs=[model])

    if preset is not None:
        if config is not None:
            raise AblateError("give --config or --preset, not both")
        config = direction_preset_path(preset)
    if config is not None:
        settings = load_config(config, DirectionConfig, override or [])
    else:
        settings = validate_config(apply_overrides({}, override or [], "--set"), DirectionConfig, "--set")
    updates = {key: value for key, value in (("refusal_train", refusal), ("harmless_train", harmless)) if value}
    if updates:
        settings = validate_config({**settings.model_dump(mode="json"), **updates}, DirectionConfig, "command line")
    console.print(dump_config(settings), highlight=False)  # the resolved config, before any expensive work

    from ablate.compute import run_direction_counted
    from ablate.directions import load_sets
    from ablate.models import load_model

    load_sets(settings)  # a bad set name fails here, before the model loads
    loaded, tokenizer = load_model(_model_config(model, device, quantization, device_map))
    claim_output_dir(out, "direction")
    selected = run_direction_counted(loaded, tokenizer, settings, out)  # + out/compute.json: its FLOPs and seconds
    counts = ", ".join(f"{name} {count}" for name, count in selected["filter_counts"].items())
    stdout.print(
        f"selected {selected['variant']} direction: layer {selected['layer']}, position {selected['position']} "
        f"({selected['position_token']}); refusal score {selected['refusal_score']:.2f} (base {selected['base_refusal_score']:.2f}), "
        f"steering {selected['steering_score']:.2f}, KL {selected['kl']:.3f}"
        f"{' [FALLBACK]' if selected['fallback'] else ''}; filters: {counts}; {selected['wall_seconds']:.0f} s → {out}",
        highlight=False,
    )


@app.command()
def abliterate(
    model: str = typer.Argument(..., help="Model spec the direction was extracted from."),
    direction_dir: Path = typer.Option(..., "--direction", "-d", help="Directory written by `ablate direction`."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to save the orthogonalised model (loadable by transformers)."),
    device: str = typer.Option("cpu", help="Device for the weight edit."),
    overwrite: bool = _overwrite_option("--out"),
    stream: Optional[bool] = typer.Option(None, "--stream/--in-memory", help="Read the original safetensors shard by shard (peak memory about one shard) or load the model; default: stream when the weights do not fit in free memory."),
) -> None:
    """Bake the selected direction's ablation into the weights and save a plain transformers model."""
    from ablate.config import ModelConfig
    from ablate.directions import load_direction
    from ablate.abliterate import abliterate as run_abliterate
    from ablate.safety import check_output_dir, claim_output_dir
    from ablate.streaming import too_large_for_memory

    check_output_dir(out, overwrite=overwrite, inputs=[direction_dir, model])
    load_direction(direction_dir)  # fails with one line before loading the model
    claim_output_dir(out, "abliterate")
    config = ModelConfig(spec=model, device=device)
    stream = too_large_for_memory(model) if stream is None else stream
    saved = run_abliterate(config, direction_dir, out, stream=stream)
    stdout.print(f"abliterated model saved → {saved} (load with AutoModelForCausalLM.from_pretrained)", highlight=False)

# --------------------------------------------------------------------------------------------
# Evaluation: eval
# --------------------------------------------------------------------------------------------

# (section owned by the evaluation stage)


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
    from ablate.evaluate import load_suite, run_eval
    from ablate.models import load_model
    from ablate.safety import check_eval_result, check_output_dir, claim_output_dir, model_identity

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
    loaded, tokenizer = load_model(_model_config(model, device, quantization, device_map))
    # The KL reference is loaded like the variant (same quantisation and placement).
    ref = load_model(_model_config(reference, device, quantization, device_map)) if reference else None
    from ablate.evaluate.run import check_suite

    check_suite(suite_config, loaded, tokenizer, ref)  # prompt sets, judges, tasks: before anything is written
    claim_output_dir(out, "eval")
    result = run_eval(loaded, tokenizer, suite_config, out, name, reference=ref, redact=redact, progress=True,
                      model_spec=identity)
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

# --------------------------------------------------------------------------------------------
# Studies and reports: study, report
# --------------------------------------------------------------------------------------------

# (section owned by the study stage)


@app.command()
def study(
    study_config: Optional[str] = typer.Argument(None, metavar="[STUDY.yaml | NAME]",
                                                 help="A study YAML, or a shipped study's name (default: 'default')."),
    out: Optional[Path] = typer.Option(None, help="Run directory (an existing one is resumed)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the newest run of this study: finished stages are skipped."),
    set_: list[str] = typer.Option([], "--set", help="Override a config value: --set attacks.finetune.enabled=false (repeatable)."),
    no_report: bool = typer.Option(False, "--no-report", help="Skip writing the report at the end."),
    overwrite: bool = _overwrite_option("--out"),
    plan: bool = typer.Option(False, "--plan", help="Print each stage's model loads, precision, estimated peak memory and devices, then stop."),
    hardware: Optional[str] = typer.Option(None, "--hardware", help="Plan for these devices instead of the visible ones, e.g. 'cuda:0=80GiB'."),
    executor: Optional[str] = typer.Option(None, "--executor", help="Robustness study: where its cells run, local | submitit | ray (default: the study's executor.kind)."),
) -> None:
    """Run a whole study: (optional hardening) → direction ablation and LoRA sweep → evaluate every variant → report.
    A robustness study (`ablate study robustness`) runs that chain for every defence and seed, and reports the matrix."""
    from ablate.logs import known_warnings_silenced, quiet_loading
    from ablate.matrix import is_robustness_study
    from ablate.safety import check_output_dir
    from ablate.study import run_study, study_path

    if is_robustness_study(study_path(study_config)):
        _study_matrix(study_config, out, resume, list(set_) or None, executor, no_report, overwrite, plan)
        return
    if executor is not None:
        raise AblateError(f"--executor: only a robustness study (a YAML with a 'defences:' key) runs cells on an "
                          f"executor; '{study_config or 'default'}' is a single study")
    if plan:
        from ablate.plan import format_plan, plan_study, visible_hardware
        from ablate.study import resolve_study

        machine = visible_hardware(hardware)
        shape, plans = plan_study(resolve_study(study_config, list(set_) or None), machine)
        for line in format_plan(shape, plans, machine):
            stdout.print(line, highlight=False, soft_wrap=True)
        if any(not stage.fits for stage in plans):
            raise typer.Exit(1)
        return
    if out is not None:
        check_output_dir(out, overwrite=overwrite)
    name = study_config or "default"
    _on_interrupt["note"] = ("interrupted: finished stages are kept in the run directory; resume with "
                             + (f"`ablate study {name} --out {out}`" if out is not None else f"`ablate study {name} --resume`"))
    with quiet_loading(), known_warnings_silenced():  # stage headers, the stages' own bars, the table
        run_dir = run_study(study_config, out=out, resume=resume, overrides=list(set_) or None, report=not no_report,
                            command="ablate " + " ".join(sys.argv[1:]), overwrite=overwrite, hardware=hardware)
    stdout.print(f"run directory: {run_dir}", highlight=False)
    _print_main_table(run_dir)


def _study_matrix(study_config: str, out: Optional[Path], resume: bool, overrides: Optional[list[str]],
                  executor: Optional[str], no_report: bool, overwrite: bool, plan: bool) -> None:
    """`ablate study` on a robustness study: every (defence, seed) cell through the executor, then the matrix."""
    from ablate.logs import known_warnings_silenced, quiet_loading
    from ablate.matrix import run_matrix
    from ablate.safety import check_output_dir

    if plan:
        raise AblateError(f"--plan: plans one study; every cell of '{study_config}' runs its base study's stages, so plan "
                          "that one (`ablate study default --plan`)")
    if out is not None:
        check_output_dir(out, overwrite=overwrite)
    _on_interrupt["note"] = ("interrupted: finished cells and stages are kept in the run directory; resume with "
                             + (f"`ablate study {study_config} --out {out}`" if out is not None else f"`ablate study {study_config} --resume`"))
    with quiet_loading(), known_warnings_silenced():
        run_dir = run_matrix(study_config, out=out, resume=resume, overrides=overrides, executor=executor,
                             report=not no_report, command="ablate " + " ".join(sys.argv[1:]), overwrite=overwrite)
    stdout.print(f"run directory: {run_dir}", highlight=False)
    _print_matrix_table(run_dir)


def _print_matrix_table(run_dir: Path) -> None:
    from ablate.matrix_report import load_matrix, matrix_table

    model = matrix_table(load_matrix(run_dir))
    table = Table(*model.columns)
    for cells in model.rows:
        table.add_row(*cells)
    stdout.print(table)


@app.command()
def label(
    run_dir: Path = typer.Argument(..., help="A run directory with generations/*.jsonl (from `ablate study` or `ablate eval`)."),
    n: int = typer.Option(50, "--n", min=1, help="Completions in the sample (refusal-eliciting prompts, every variant)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sample."),
    html_page: bool = typer.Option(False, "--html", help="Write labels/label.html to label in a browser instead of the terminal."),
    import_file: Optional[Path] = typer.Option(None, "--import", help="Store a label file downloaded from the HTML page (checked against this run)."),
) -> None:
    """Label a seeded sample of a run's completions by hand (prompt and completion only, no scores)."""
    from ablate import label as labelling

    if import_file is not None:
        stdout.print(f"labels: {labelling.import_labels(run_dir, import_file)}", highlight=False)
        return
    if html_page:
        stdout.print(f"open {labelling.write_label_page(run_dir, n, seed)}", highlight=False)
        return
    data = labelling.label_in_terminal(run_dir, n, seed, console=stdout)
    stdout.print(f"{len(data['labels'])} of {len(data['sample'])} labelled → {run_dir / labelling.LABELS_FILE}", highlight=False)


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A run directory written by `ablate study`."),
    partial: bool = typer.Option(False, "--partial", help="Report an unfinished run: what is there, with what is "
                                                          "missing listed at the top (otherwise an error, exit 2)."),
) -> None:
    """Write report.md, report.html (self-contained), tables.tex and figures/ for a run directory."""
    from ablate.report import write_report

    if not run_dir.is_dir():
        raise AblateError(f"run directory not found: {run_dir}")
    from ablate.matrix_report import is_matrix_run, write_matrix_report

    if is_matrix_run(run_dir):  # a robustness study: the matrix (failed cells are listed in it)
        for name, path in write_matrix_report(run_dir).items():
            stdout.print(f"{name}: {path}", highlight=False)
        _print_matrix_table(run_dir)
        return
    paths = write_report(run_dir, partial=partial)
    for name, path in paths.items():
        stdout.print(f"{name}: {path}", highlight=False)
    _print_main_table(run_dir)


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A run directory written by `ablate study`."),
    self_contained: bool = typer.Option(False, "--self-contained", help="Copy every cached artifact the run used into RUN/artifacts/."),
    with_answers: bool = typer.Option(False, "--with-answers", help="Copy the donor's answers too (compliant answers to refusal-eliciting prompts)."),
) -> None:
    """List the cached artifacts a run used (organisms, donors, answers) or, with --self-contained, copy them into it."""
    from ablate.artifacts import read_json
    from ablate.export import cache_root, export_run

    if self_contained:
        entries = export_run(run_dir, with_answers=with_answers)
    else:
        manifest_path = run_dir / "manifest.json"
        if not manifest_path.exists():
            raise AblateError(f"{run_dir}: not a run directory (no manifest.json)")
        entries = read_json(manifest_path).get("artifacts") or []
    table = Table("kind", "cache entry", "SHA-256", "MB", "in the run")
    for entry in entries:
        size = entry.get("bytes")
        table.add_row(entry["kind"], entry["key"], (entry.get("sha256") or "-")[:16],
                      "-" if size is None else f"{size / 2**20:.1f}", entry.get("exported") or "-")
    stdout.print(table)
    stdout.print(f"cache: {cache_root()}" + ("" if self_contained else "; copy them with --self-contained"), highlight=False)


def _print_main_table(run_dir: Path) -> None:
    from ablate.report import load_run, main_table

    run = load_run(run_dir)
    if run.table.empty:
        return
    model = main_table(run)
    table = Table(*model.columns)
    for cells in model.rows:
        table.add_row(*cells)
    stdout.print(table)


if __name__ == "__main__":
    main()
