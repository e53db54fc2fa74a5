"""Study commands: `ablate study`, `ablate label`, `ablate report` and `ablate export`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ablate import AblateError
from ablate.cli.app import app, on_interrupt, overwrite_option, stdout


@app.command()
def study(
    study_config: Optional[str] = typer.Argument(None, metavar="[STUDY.yaml | NAME]",
                                                 help="A study YAML, or a shipped study's name (default: 'default')."),
    out: Optional[Path] = typer.Option(None, help="Run directory (an existing one is resumed)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the newest run of this study: finished stages are skipped."),
    set_: list[str] = typer.Option([], "--set", help="Override a config value: --set attacks.finetune.enabled=false (repeatable)."),
    no_report: bool = typer.Option(False, "--no-report", help="Skip writing the report at the end."),
    overwrite: bool = overwrite_option("--out"),
    plan: bool = typer.Option(False, "--plan", help="Print each stage's model loads, precision, estimated peak memory and devices, then stop."),
    hardware: Optional[str] = typer.Option(None, "--hardware", help="Plan for these devices instead of the visible ones, e.g. 'cuda:0=80GiB'."),
    executor: Optional[str] = typer.Option(None, "--executor", help="Robustness study: where its cells run, local | submitit | ray (default: the study's executor.kind)."),
) -> None:
    """Run a whole study: (optional hardening) → direction ablation and LoRA sweep → evaluate every variant → report.
    A robustness study (`ablate study robustness`) runs that chain for every defence and seed, and reports the matrix."""
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
    on_interrupt["note"] = ("interrupted: finished stages are kept in the run directory; resume with "
                             + (f"`ablate study {name} --out {out}`" if out is not None else f"`ablate study {name} --resume`"))
    # Stage headers, the stages' own bars (ablate.logs.study_output), then the table.
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
    on_interrupt["note"] = ("interrupted: finished cells and stages are kept in the run directory; resume with "
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
