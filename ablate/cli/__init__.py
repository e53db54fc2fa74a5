"""The `ablate` command line: one thin command per pipeline stage, one module per stage.

    ablate --help
    ablate models embedded                       # resolve and describe a model spec
    ablate data                                  # built-in and registered prompt sets
    ablate generate embedded --prompts harmless:test --limit 16 --out gens.jsonl

    app          the typer app, the consoles, `main` (one-line errors), shared options
    foundation   models, data, generate
    finetune     harden, finetune
    directions   direction, abliterate
    evaluate     eval, eval-compare
    study        study, label, report, export

Every command wraps one stage function; bad input is reported as one line naming the culprit, with exit
status 2 (`--debug` shows the traceback). Output folders are checked before any work (`ablate.safety`).
"""

# Importing a command module registers its commands on `app`, in this order (the order of `ablate --help`).
from ablate.cli import foundation, finetune, directions, evaluate, study  # noqa: F401, I001
from ablate.cli.app import app, main
from ablate.cli.finetune import load_finetune_config, print_budget_table

__all__ = ["app", "main", "load_finetune_config", "print_budget_table"]
