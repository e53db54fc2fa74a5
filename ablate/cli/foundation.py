"""Commands of the foundation: `ablate models`, `ablate data`, `ablate generate`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ablate import AblateError
from ablate.cli.app import app, stdout


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
    categories = sorted({row["category"] for row in rows if row["category"]})
    if len(categories) > 1:  # where refusal reaches and where it does not
        table = Table("category", "n", "refused", "refusal rate")
        for category in categories:
            flags = [row["refusal"] for row in rows if row["category"] == category]
            table.add_row(category, str(len(flags)), str(sum(flags)), f"{sum(flags) / len(flags):.3f}")
        stdout.print(table)
    stdout.print(f"refusal rate: {refusals / len(rows):.3f} ({refusals}/{len(rows)}) on {prompt_set.name} "
                 f"[fingerprint {prompt_set.fingerprint}]" + (f" → {out}" if out else ""), highlight=False)
