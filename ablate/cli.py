"""The `ablate` command line: one thin command per pipeline stage.

    ablate --help
    ablate models embedded                       # resolve and describe a model spec
    ablate data                                  # built-in and registered prompt sets
    ablate generate embedded --prompts harmless:test --limit 16 --out gens.jsonl

Every command wraps one stage function; bad input is reported as one line naming the culprit.
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
stdout = Console()


def main() -> None:
    """Console-script entry point: user errors become one line on stderr and exit status 2."""
    try:
        app()
    except AblateError as error:
        console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted; finished stages are kept and a rerun resumes from them")
        sys.exit(130)


# --------------------------------------------------------------------------------------------
# Foundation: models, data, generate
# --------------------------------------------------------------------------------------------


@app.command()
def models(
    spec: str = typer.Argument("embedded", help="'embedded', a hub id, a local model directory, or a .gguf file."),
    device: str = typer.Option("auto", help="Device: auto, cpu, cuda, mps."),
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


@app.command()
def generate(
    model: str = typer.Argument(..., help="Model spec: 'embedded', hub id, directory or .gguf file."),
    prompts: str = typer.Option(..., "--prompts", "-p", help="Prompt set: refusal:test, harmless:train, a file, or a registry name."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N prompts."),
    out: Optional[Path] = typer.Option(None, help="Write completions as JSONL here."),
    max_new_tokens: int = typer.Option(64, help="Tokens generated per prompt."),
    batch_size: int = typer.Option(16, help="Prompts per batch."),
    sample: bool = typer.Option(False, help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(1.0, help="Sampling temperature."),
    seed: int = typer.Option(0, help="Sampling seed."),
    prompt_column: str = typer.Option("prompt", help="Prompt column of a file set."),
    device: str = typer.Option("auto", help="Device: auto, cpu, cuda, mps."),
) -> None:
    """Generate completions for a prompt set and print its refusal rate (substring scorer)."""
    from ablate.artifacts import write_jsonl
    from ablate.config import GenerationConfig
    from ablate.data import load_prompt_set
    from ablate.evaluate.refusal import is_refusal
    from ablate.generation import generate as run_generate
    from ablate.models import load_model

    prompt_set = load_prompt_set(prompts, limit=limit, prompt_column=prompt_column)
    config = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size, do_sample=sample,
                              temperature=temperature, seed=seed)
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

# (section owned by the fine-tuning stage)

# --------------------------------------------------------------------------------------------
# Refusal directions: direction, abliterate
# --------------------------------------------------------------------------------------------

# (section owned by the direction stage)

# --------------------------------------------------------------------------------------------
# Evaluation: eval
# --------------------------------------------------------------------------------------------

# (section owned by the evaluation stage)

# --------------------------------------------------------------------------------------------
# Studies and reports: study, report
# --------------------------------------------------------------------------------------------

# (section owned by the study stage)


if __name__ == "__main__":
    main()
