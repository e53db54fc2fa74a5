"""The robustness study: defences × attacks × budgets × seeds, each (defence, seed) cell an independent job.

    ablate study robustness                                   # ablate/studies/robustness.yaml, cells in this process
    ablate study robustness --executor submitit               # each cell a SLURM job (submitit's AutoExecutor)
    ablate study robustness --executor ray                    # each cell a Ray task
    ablate study robustness --out runs/matrix --set 'defences=[refusal_sft,vaccine]'   # resume / extend a run

A cell is the default study's chain run with `ablate.study.run_study` (so every stage is resumable and cached)
with the defence's recipe as its hardening and the seed as its seed, in

    RUN/cells/<defence>/seed-<n>/attacks/   harden → direction ablation → harmful LoRA budgets → eval
    RUN/cells/<defence>/seed-<n>/benign/    harden (the same organism, cached) → benign LoRA budgets → eval

and ends by writing `RUN/cells/<defence>/seed-<n>/.cell/done.json` (its inputs' fingerprint and its rows). A
rerun submits only the cells without a matching marker, so adding a defence or a seed to a finished study
runs only the new cells. Cells run through an existing engine (submitit for SLURM, Ray), never a scheduler of
our own; the run directory is the shared state, so it must be on storage every node sees. A cell that fails
(a one-line `AblateError`) is recorded and the others go on; the report then lists it, and the study ends
with an error naming it, every finished stage kept.
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

from ablate import AblateError
from ablate.artifacts import fingerprint, is_done, mark_done, read_json, write_json
from ablate.config import DirectionConfig, FinetuneBudget, FinetuneConfig, apply_overrides, load_config, read_yaml, validate_config
from ablate.matrix_config import ExecutorKind, RobustnessConfig

CELL_MARKER = ".cell"
PARTS = ("attacks", "benign")


def is_robustness_study(path: str | Path) -> bool:
    """Whether a study YAML is a robustness study (a top-level `defences:` key)."""
    data = read_yaml(path)
    return isinstance(data, dict) and "defences" in data


def known_defences() -> list[str]:
    folder = resources.files("ablate").joinpath("finetune_configs")
    return sorted(p.name[len("defence_"):-len(".yaml")] for p in folder.iterdir()
                  if p.name.startswith("defence_") and p.name.endswith(".yaml"))


def defence_source(entry: str, base: Path, source: str) -> tuple[str, Path]:
    """(cell folder name, recipe YAML) of a `defences:` entry: a shipped defence's name or a YAML path."""
    if entry.endswith((".yaml", ".yml")):
        for candidate in (base / entry, Path(entry)):
            if candidate.is_file():
                return safe_name(Path(entry).stem.removeprefix("defence_")), candidate
        raise AblateError(f"{source}: key 'defences': file not found: {entry}")
    shipped = resources.files("ablate").joinpath("finetune_configs", f"defence_{entry}.yaml")
    if not shipped.is_file():
        raise AblateError(f"{source}: key 'defences': unknown defence '{entry}'; expected one of "
                          f"{', '.join(known_defences())} or a recipe's .yaml path")
    return safe_name(entry), Path(str(shipped))


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", text) or "defence"


def _stage_dict(value: Any, base: Path, what: str, source: str) -> dict:
    """An attack recipe given inline or as a YAML path (the study file's folder, the CWD, then the package)."""
    if isinstance(value, dict):
        return value
    for candidate in (base / value, Path(value), Path(str(resources.files("ablate").joinpath(value)))):
        if candidate.is_file():
            return read_yaml(candidate) or {}
    raise AblateError(f"{source}: key '{what}': file not found: {value}")


@dataclass
class ResolvedMatrix:
    """A robustness study with every cell's studies built and validated (before any work starts)."""

    config: RobustnessConfig
    source: str
    raw: dict
    cells: list[dict] = field(default_factory=list)
    contract: dict = field(default_factory=dict)  # what a refusal figure is measured on: prompts, new tokens, scorer


def resolve_matrix(path: str | Path, overrides: list[str] | None = None) -> ResolvedMatrix:
    """Load a robustness study and build its cells; any problem is one line naming file and key."""
    from ablate.study import resolve_study, study_path

    path = study_path(path)  # a YAML path, or a shipped study's name ('robustness')
    config = load_config(path, RobustnessConfig, overrides=overrides)
    source, folder = str(path), path.parent
    if isinstance(config.study, dict):
        with tempfile.TemporaryDirectory() as scratch:  # an inline base study, read like a file of its own
            inline = Path(scratch) / "study.yaml"
            write_json(inline, config.study)  # JSON is YAML
            base = resolve_study(inline)
    else:
        candidate = folder / config.study if config.study else None
        base = resolve_study(str(candidate) if candidate is not None and candidate.is_file() else config.study)
    direction = base.direction or DirectionConfig()
    harmful = None
    if config.attacks.harmful.enabled:
        if config.attacks.harmful.config is None and base.finetune is None:
            raise AblateError(f"{source}: key 'attacks.harmful.config': null, and the base study has no attacks.finetune.config to use")
        harmful = (base.finetune if config.attacks.harmful.config is None else
                   validate_config(_stage_dict(config.attacks.harmful.config, folder, "attacks.harmful.config", source),
                                   FinetuneConfig, f"{source}: attacks.harmful.config"))
    benign = None
    if config.attacks.benign.enabled:
        value = config.attacks.benign.config or "finetune_configs/benign_finetune.yaml"
        benign = validate_config(_stage_dict(value, folder, "attacks.benign.config", source), FinetuneConfig,
                                 f"{source}: attacks.benign.config")
    harmful, benign = (shared_donor(recipe, base.config.model.spec) for recipe in (harmful, benign))
    resolved = ResolvedMatrix(config=config, source=source, raw=read_yaml(path) or {}, contract=suite_contract(base.suite))
    for entry in config.defences:
        name, recipe_path = defence_source(entry, folder, source)
        data = read_yaml(recipe_path) or {}
        if config.defence_overrides:
            data = apply_overrides(data, config.defence_overrides, source=f"{source}: defence_overrides")
        recipe = validate_config(data, FinetuneConfig, f"{recipe_path} (defence '{entry}')")
        if recipe.mode.value != "harden":
            raise AblateError(f"{recipe_path}: key 'mode': a defence is a hardening recipe (mode harden), got {recipe.mode.value}")
        for seed in config.seeds:
            resolved.cells.append(build_cell(config, base, name, recipe, direction, harmful, benign, seed))
    names = [cell["defence"] for cell in resolved.cells]
    duplicates = sorted({name for name in names if names.count(name) > len(config.seeds)})
    if duplicates:
        raise AblateError(f"{source}: key 'defences': two entries share the folder name {', '.join(duplicates)}")
    return resolved


def shared_donor(recipe: FinetuneConfig | None, base_spec: str) -> FinetuneConfig | None:
    """An attack whose donor is 'ablated' (the attacked model, ablated) gets the base model, ablated, instead: one
    donor, so one set of attack data, for every defence. A defence that survives ablation would otherwise leave
    its own attack without compliant answers, and the defences would face different data."""
    from ablate.finetune.answers import ABLATED_DONOR, ABLATED_PREFIX

    if recipe is None or recipe.data.donor != ABLATED_DONOR or recipe.data.donor_direction is not None:
        return recipe
    return recipe.model_copy(update={"data": recipe.data.model_copy(update={"donor": ABLATED_PREFIX + base_spec})})


def suite_contract(suite) -> dict:
    """The prompts, new tokens and scorer behind every refusal rate of the study (its eval suite's)."""
    refusal, harmless = suite.refusal, suite.harmless
    return {"refusal_prompts": refusal.set if refusal else None, "refusal_n": refusal.n if refusal else None,
            "harmless_prompts": harmless.set if harmless else None, "harmless_n": harmless.n if harmless else None,
            "max_new_tokens": suite.generation.max_new_tokens, "scorer": suite.scorers.primary,
            "capability_tasks": [task.name for task in suite.capability.tasks]}


def _seeded_attack(recipe: FinetuneConfig, budgets: list[int], seed: int, pool_key: str) -> dict:
    """The attack recipe at the study's budgets (n<examples> each) and this seed; its pool holds the largest budget."""
    data = recipe.data.model_dump(mode="json")
    pool = data.get(pool_key)
    if pool is not None and pool < max(budgets):
        data[pool_key] = max(budgets)
    data["seed"] = seed
    result = recipe.model_dump(mode="json")
    result.update(data=data, budgets=[FinetuneBudget(name=f"n{n}", n_examples=n).model_dump(mode="json", exclude_none=True)
                                      for n in budgets],
                  training={**result["training"], "seed": seed})
    return result


def build_cell(config: RobustnessConfig, base, defence: str, recipe: FinetuneConfig, direction: DirectionConfig,
               harmful: FinetuneConfig | None, benign: FinetuneConfig | None, seed: int) -> dict:
    """One (defence, seed) cell: the study dict of each part (see the module docstring), every stage config inline."""
    harden = recipe.model_dump(mode="json")
    if config.reseed_defences:
        harden["training"]["seed"], harden["data"]["seed"] = seed, seed
    study = base.config.model_dump(mode="json")
    common = {**study, "harden": {"enabled": True, "config": harden, "evaluate_base": False},
              "eval": {**study["eval"], "suite": base.suite.model_dump(mode="json"), "overrides": []}, "seed": seed}
    parts: dict[str, dict] = {}
    if config.attacks.direction or harmful is not None:
        parts["attacks"] = {**common, "name": safe_name(f"{config.name}-{defence}-seed{seed}-attacks"), "attacks": {
            "direction": {"enabled": config.attacks.direction,
                          "config": {**direction.model_dump(mode="json"), "seed": seed}, "save_model": False},
            "finetune": {"enabled": harmful is not None,
                         "config": _seeded_attack(harmful, config.budgets, seed, "n_refusal") if harmful else None}}}
    if benign is not None:
        parts["benign"] = {**common, "name": safe_name(f"{config.name}-{defence}-seed{seed}-benign"), "attacks": {
            "direction": {"enabled": False, "config": None, "save_model": False},
            "finetune": {"enabled": True, "config": _seeded_attack(benign, config.budgets, seed, "n_harmless")}}}
    return {"defence": defence, "kind": recipe.defence.kind.value if recipe.defence else "refusal_sft", "seed": seed,
            "dir": f"cells/{defence}/seed-{seed}", "parts": parts, "fingerprint": fingerprint(parts)}


# --------------------------------------------------------------------------------------------
# One cell: the job every executor runs
# --------------------------------------------------------------------------------------------


def cell_rows(part: str, part_dir: Path) -> tuple[dict, list[dict]]:
    """The organism's figures and one row per attack variant (its compute, refusal and capability change)."""
    from ablate.report import load_run

    run = load_run(part_dir)
    records = run.table.to_dict("records")
    # Compliance (the attack's success by the suite's scorer) is in the long metrics frame, not the summary table.
    compliance = {row["variant"]: row["value"] for row in run.metrics.to_dict("records")
                  if row["metric"] == "compliance_rate"} if not run.metrics.empty else {}

    def value(record: dict, key: str) -> Any:
        item = record.get(key)
        return None if item is None or item != item else (item.item() if hasattr(item, "item") else item)  # NaN → None

    organism = next((r for r in records if r["variant"] == "organism"), {})
    organism_figures = {key: value(organism, key) for key in ("refusal_rate", "harmless_refusal_rate",
                                                              "borderline_refusal_rate", "degenerate_rate", "capability")}
    organism_figures["compliance_rate"] = value(compliance, "organism")
    rows = []
    for record in records:
        if record["kind"] == "direction":
            attack, budget = "direction", "direction"
        elif record["variant"].startswith("lora-"):
            attack, budget = ("harmful" if part == "attacks" else "benign"), record["variant"][len("lora-"):]
        else:
            continue
        capability = value(record, "capability")
        rows.append({"attack": attack, "budget": budget, "n_examples": value(record, "n_examples"),
                     "flops": value(record, "attack_flops"), "seconds": value(record, "attack_seconds"),
                     "refusal_rate": value(record, "refusal_rate"),
                     "compliance_rate": value(compliance, record["variant"]), "capability": capability,
                     "capability_change": (capability - organism_figures["capability"]
                                           if capability is not None and organism_figures["capability"] is not None else None)})
    return organism_figures, rows


def run_cell(cell: dict) -> dict:
    """Run one cell's parts (each a resumable `run_study`), mark it done, return its summary. A part's AblateError
    is returned as {"status": "failed", "error": ..., "rows": the other parts' rows}, so that every executor
    carries it back the same way and the report keeps what finished; a failed cell is not marked done."""
    import yaml

    from ablate.study import run_study

    run_dir = Path(cell["run_dir"])
    cell_dir = run_dir / cell["dir"]
    started = time.perf_counter()
    summary: dict[str, Any] = {"defence": cell["defence"], "kind": cell["kind"], "seed": cell["seed"], "dir": cell["dir"],
                               "status": "done", "organism": {}, "rows": []}
    errors = []
    for part, study in cell["parts"].items():  # each part on its own: one that fails keeps the others' rows
        study_file = cell_dir / f"{part}.yaml"
        study_file.parent.mkdir(parents=True, exist_ok=True)
        study_file.write_text(yaml.safe_dump(study, sort_keys=False), encoding="utf-8")
        try:
            part_dir = run_study(study_file, out=cell_dir / part, progress=cell.get("progress", False),
                                 command=f"robustness cell {cell['dir']} ({part})")
        except AblateError as error:
            errors.append(f"{part}: {error}")
            print(f"cell {cell['dir']} ({part}) failed: {error}; the study goes on and names it again at the end",
                  file=sys.stderr)  # now, not only hours later in the study's closing error
            continue
        organism, rows = cell_rows(part, part_dir)
        summary["organism"] = summary["organism"] or organism
        summary["rows"] += rows
    if errors:
        return {**summary, "status": "failed", "error": "; ".join(errors)}
    summary["wall_seconds"] = round(time.perf_counter() - started, 3)
    mark_done(cell_dir / CELL_MARKER, cell["fingerprint"], result=summary,
              finished=datetime.now(timezone.utc).isoformat())
    return summary


# --------------------------------------------------------------------------------------------
# Executors: in this process, submitit (SLURM / local processes), Ray
# --------------------------------------------------------------------------------------------


def _failure(cell: dict, error: BaseException) -> dict:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return {"defence": cell["defence"], "kind": cell["kind"], "seed": cell["seed"], "dir": cell["dir"],
            "status": "failed", "error": f"the job crashed: {lines[-1] if lines else type(error).__name__}"}


def waves(cells: list[dict]) -> list[list[dict]]:
    """Cells that harden the same organism never run at once: the first seed of each defence goes first (it
    builds and caches the organism), the others after it."""
    first, rest, seen = [], [], set()
    for cell in cells:
        key = fingerprint(next(iter(cell["parts"].values()))["harden"])
        (rest if key in seen else first).append(cell)
        seen.add(key)
    return [wave for wave in (first, rest) if wave]


def execute_local(cells: list[dict], config, run_dir: Path) -> list[dict]:
    return [run_cell(cell) for cell in cells]


def execute_submitit(cells: list[dict], config, run_dir: Path) -> list[dict]:
    """Each cell a job of submitit's AutoExecutor (logs under RUN/submitit/)."""
    try:
        import submitit
    except ImportError:
        raise AblateError("--executor submitit: the submitit package is not installed (pip install submitit)") from None
    executor = submitit.AutoExecutor(folder=run_dir / "submitit", cluster=config.cluster)
    try:
        executor.update_parameters(name="ablate-cell", **config.parameters)
    except (TypeError, ValueError) as error:
        raise AblateError(f"executor.parameters: {error}") from None
    results = []
    for wave in waves(cells):
        jobs = [executor.submit(run_cell, cell) for cell in wave]
        for cell, job in zip(wave, jobs):
            try:
                results.append(job.result())
            except Exception as error:  # a crash of the job itself (an AblateError comes back as a result)
                results.append(_failure(cell, error))
    return results


def execute_ray(cells: list[dict], config, run_dir: Path) -> list[dict]:
    """Each cell a Ray task: on the cluster at `ray_address`, or on a local Ray started (and stopped) here."""
    try:
        import ray
    except ImportError:
        raise AblateError("--executor ray: the ray package is not installed (pip install 'ablate[ray]')") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=config.ray_address, include_dashboard=False, log_to_driver=False)
    try:
        task = ray.remote(num_cpus=config.ray_num_cpus, num_gpus=config.ray_num_gpus)(run_cell)
        results = []
        for wave in waves(cells):
            refs = [task.remote(cell) for cell in wave]
            for cell, ref in zip(wave, refs):
                try:
                    results.append(ray.get(ref))
                except Exception as error:  # ray.exceptions.RayTaskError: a crash inside the task
                    results.append(_failure(cell, error))
        return results
    finally:
        if started:
            ray.shutdown()


EXECUTORS = {ExecutorKind.local: execute_local, ExecutorKind.submitit: execute_submitit, ExecutorKind.ray: execute_ray}


# --------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------


def run_matrix(study: str | Path, *, out: str | Path | None = None, resume: bool = False,
               overrides: list[str] | None = None, executor: str | None = None, progress: bool = True,
               report: bool = True, command: str | None = None, overwrite: bool = False) -> Path:
    """Run a robustness study (see the module docstring) and return its run directory."""
    from rich.console import Console

    from ablate.safety import check_output_dir, claim_output_dir
    from ablate.study import git_commit, hardware, package_versions

    console = Console(stderr=True, quiet=not progress)
    resolved = resolve_matrix(study, overrides)
    config = resolved.config
    if executor is not None:
        try:
            config.executor.kind = ExecutorKind(executor)
        except ValueError:
            raise AblateError(f"--executor '{executor}': expected one of {', '.join(k.value for k in ExecutorKind)}") from None
    if out is not None:
        run_dir = Path(out)
    elif resume:
        runs = [path for path in sorted(Path(config.output_dir).glob(f"{config.name}-*/manifest.json"))
                if read_json(path).get("kind") == "robustness"]
        if not runs:
            raise AblateError(f"--resume: no earlier run of study '{config.name}' under {config.output_dir}/")
        run_dir = runs[-1].parent
    else:
        run_dir = Path(config.output_dir) / f"{config.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    check_output_dir(run_dir, overwrite=overwrite, what="run directory")
    claim_output_dir(run_dir, "study")
    run_dir = run_dir.resolve()
    started = time.perf_counter()
    manifest_path = run_dir / "manifest.json"
    previous = read_json(manifest_path) if manifest_path.exists() else {}
    manifest: dict[str, Any] = {
        "study": config.name, "kind": "robustness", "description": config.description, "status": "running",
        "command": command or " ".join(sys.argv), "config_source": resolved.source, "config_as_given": resolved.raw,
        "config_resolved": config.model_dump(mode="json"), "run_dir": str(run_dir),
        "versions": package_versions(), "git_commit": git_commit(), "hardware": hardware(),
        "created": previous.get("created", datetime.now(timezone.utc).isoformat()), "runs": previous.get("runs", 0) + 1,
    }
    write_json(manifest_path, manifest)
    pending, reused = [], []
    for cell in resolved.cells:
        cell.update(run_dir=str(run_dir), progress=progress)
        (reused if is_done(run_dir / cell["dir"] / CELL_MARKER, cell["fingerprint"]) else pending).append(cell)
    console.print(f"[bold]robustness study[/] {config.name} → {run_dir}: {len(resolved.cells)} cells, "
                  f"{len(reused)} done already, {len(pending)} to run ({config.executor.kind.value})")
    results = {cell["dir"]: result for cell, result in
               zip(pending, _in_order(pending, EXECUTORS[config.executor.kind](pending, config.executor, run_dir)))}
    summaries = []
    for cell in resolved.cells:
        if cell["dir"] in results:
            summaries.append(results[cell["dir"]])
        else:
            summaries.append(reread_cell(run_dir, cell, read_json(run_dir / cell["dir"] / CELL_MARKER / "done.json")["result"]))
    failed = [summary for summary in summaries if summary["status"] != "done"]
    write_json(run_dir / "matrix.json", {"study": config.name, "description": config.description,
                                         "threshold": config.threshold, "defences": config.defences,
                                         "seeds": config.seeds, "budgets": config.budgets, "contract": resolved.contract,
                                         "cells": summaries})
    manifest.update(status="failed" if failed else "complete", cells_run=[cell["dir"] for cell in pending],
                    cells_reused=[cell["dir"] for cell in reused], wall_seconds_this_run=time.perf_counter() - started,
                    finished=datetime.now(timezone.utc).isoformat())
    write_json(manifest_path, manifest)
    if report and any(summary.get("rows") or summary.get("organism") for summary in summaries):  # anything finished
        from ablate.matrix_report import write_matrix_report

        write_matrix_report(run_dir)
        console.print(f"[bold green]report[/] {run_dir / 'report.md'}  {run_dir / 'report.html'}")
    if failed:
        first = failed[0]
        raise AblateError(f"robustness study: {len(failed)} of {len(summaries)} cells failed; {first['dir']}: "
                          f"{first['error']} (finished cells and stages are kept in {run_dir}; rerun with --out {run_dir})")
    return run_dir


def reread_cell(run_dir: Path, cell: dict, stored: dict) -> dict:
    """A finished cell's summary with its figures read again from its part runs, so that a figure the summary
    gained since the cell ran (compliance, say) reaches the report without recomputing anything; the marker's
    stored summary where a part run cannot be read."""
    organism, rows = {}, []
    try:
        for part in cell["parts"]:
            part_organism, part_rows = cell_rows(part, run_dir / cell["dir"] / part)
            organism, rows = organism or part_organism, rows + part_rows
    except (AblateError, OSError, KeyError, ValueError):  # a part run gone or damaged: what the marker kept
        return stored
    return {**stored, "organism": organism, "rows": rows}


def _in_order(cells: list[dict], results: list[dict]) -> list[dict]:
    """Executors run waves, so their results come back grouped; put them back in the cells' order."""
    by_dir = {result["dir"]: result for result in results}
    return [by_dir[cell["dir"]] for cell in cells]
