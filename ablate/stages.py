"""The stage entry points: one way into each stage, `run_<stage>(config, run_dir) -> dict`.

    run_harden(HardenRun, run_dir)        the organism (cached by content hash)     → {"model_dir"}
    run_direction(DirectionRun, run_dir)  run_dir/directions/                        → {"selected"}
    run_finetune(FinetuneRun, run_dir)    run_dir/finetune/<budget>/                 → {"budgets"}
    run_eval(EvalRun, run_dir)            run_dir/eval/<variant>.json, generations/  → {"metrics_path", "summary", ...}
    ablate.study.run_study(study, run_dir)  every stage above, chained               → the run directory

Each takes its typed config (ablate/config/stages.py) and a run directory, and runs its work through `run_once`:
the one done-marker mechanism. It computes the fingerprint of the stage's inputs (model identity, configs), and
when `run_dir/.stages/<stage>/done.json` holds the same fingerprint it returns the stored result without
loading a model; otherwise it does the work and writes that marker last, with the result, the wall seconds
and the cache entries the stage used. Inside a stage, the units it resumes one by one (a fine-tuning budget,
the direction folder, a cached organism) carry `done.json` markers written by the same `ablate.artifacts`
functions. The command line's `ablate harden`, `direction`, `finetune` and `eval` and the study all call
these functions; the in-memory functions they wrap (`ablate.directions.run_direction(model, tokenizer, ...)`,
`ablate.finetune.run_finetune`, `ablate.evaluate.run_eval`, `ablate.finetune.harden`) serve scripts and tests
that already hold a loaded model.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Protocol

from ablate.artifacts import is_done, mark_done, read_done
from ablate.artifacts import fingerprint as fingerprint_of
from ablate.config import DirectionRun, EvalRun, FinetuneRun, HardenRun
from ablate.stage_cache import cacheable, cached_stage, local_files, stage_cache_key
from ablate.variants import model_fingerprint, variant_content_fingerprint, variant_fingerprint

STAGES_DIR = ".stages"


@dataclass
class StageOutcome:
    """What `run_once` did: the stage's result, whether it was skipped as done, its input fingerprint, its wall
    seconds (those of the run that did the work, when skipped) and the cache entries it used."""

    name: str
    result: dict
    skipped: bool
    fingerprint: str
    wall_seconds: float | None
    artifacts: list[dict] = field(default_factory=list)


class StageObserver(Protocol):
    """Told when a stage starts its work and when it has finished or was skipped (a study's log and headers)."""

    def starting(self, name: str) -> None: ...

    def finished(self, outcome: StageOutcome) -> None: ...

    def note(self, text: str) -> None: ...


def stage_dir(run_dir: str | Path, name: str) -> Path:
    """The folder of a stage's done-marker inside a run directory."""
    return Path(run_dir) / STAGES_DIR / name


def run_once(run_dir: str | Path, name: str, inputs: Any, work: Callable[[], dict],
             observer: StageObserver | None = None) -> StageOutcome:
    """Run `work()` unless `run_dir/.stages/<name>/done.json` holds the fingerprint of `inputs`; write it last.

    `work` returns a JSON-able dict of the stage's results, stored in done.json and returned again when the
    stage is skipped, so later stages see identical inputs either way; so is the list of cache entries the
    stage used (`ablate.export.recording`), which a run's manifest records.
    """
    from ablate.export import recording

    folder = stage_dir(run_dir, name)
    key = fingerprint_of(inputs)
    if is_done(folder, key):
        done = read_done(folder)
        outcome = StageOutcome(name, done["result"], True, key, done.get("wall_seconds"), done.get("artifacts") or [])
    else:
        if observer is not None:
            observer.starting(name)
        start = time.perf_counter()
        with recording() as used:
            result = work()
        wall = time.perf_counter() - start
        mark_done(folder, key, result=result, artifacts=used, wall_seconds=wall,
                  finished=datetime.now(timezone.utc).isoformat())
        outcome = StageOutcome(name, result, False, key, wall, list(used))
    if observer is not None:
        observer.finished(outcome)
    return outcome


def run_harden(config: HardenRun, run_dir: str | Path | None, *, progress: bool = True,
               observer: StageObserver | None = None) -> dict:
    """The organism hardened from `config.model` (cached by content hash in the model cache): {"model_dir"}.

    With a run directory, the stage's marker is kept there, and an organism the cache no longer holds is taken
    from the run's exported copy (`ablate export --self-contained`) or, failing that, trained again.
    """
    from ablate.export import locate, note_artifact
    from ablate.finetune import default_config, harden

    recipe = config.recipe or default_config()
    if not config.score:  # the organism is scored by the study's eval suite instead
        recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"enabled": False})})

    def work() -> dict:
        organism = harden(config.model, recipe, progress=progress)
        note_artifact(organism, "organism")
        return {"model_dir": str(organism)}

    if run_dir is None:
        return work()
    inputs = {"model": model_fingerprint(config.model.spec),
              "config": config.recipe.model_dump(mode="json") if config.recipe else None,
              **({"score": True} if config.score else {})}
    result = run_once(run_dir, "harden", inputs, work, observer).result
    # The cache cleared since, on this machine or another: the run's exported copy, else rebuild it.
    result = {**result, "model_dir": str(locate(run_dir, result["model_dir"]))}
    if not Path(result["model_dir"], "config.json").exists():
        (stage_dir(run_dir, "harden") / "done.json").unlink()
        result = run_once(run_dir, "harden", inputs, work, observer).result
    return result


def run_direction(config: DirectionRun, run_dir: str | Path, *, progress: bool = True,
                  observer: StageObserver | None = None, seed: int | None = None) -> dict:
    """Attack A: the refusal direction of `config.model`, selected on validation prompts, written to
    run_dir/<config.folder> (candidates, sweep, selected.json, direction.pt, compute.json): {"selected"}.

    With `config.cache`, the folder is restored from the stage cache when the same model, config, prompt sets,
    `seed` (the study's) and code computed it before (ablate.stage_cache), and stored there otherwise."""
    out = Path(run_dir) / config.folder

    def compute() -> dict:
        from ablate.compute import run_direction_counted
        from ablate.models import load_model

        model, tokenizer = load_model(config.model)  # (compute.json: the attack's FLOPs and seconds)
        return {"selected": run_direction_counted(model, tokenizer, config.direction, out, progress=progress)}

    inputs = {"model": model_fingerprint(config.model.spec), "config": config.direction.model_dump(mode="json")}

    def work() -> dict:
        if not config.cache or not cacheable(run_dir, config.folder):
            return compute()
        from ablate.directions import load_sets

        sets = {name: prompt_set.fingerprint for name, prompt_set in load_sets(config.direction).items()}
        content = {**inputs, "model_config": config.model.model_dump(mode="json"), "sets": sets,
                   "files": local_files(inputs["config"])}
        return restore_or_compute("direction", content, seed, run_dir, config.folder, compute, ("selected.json",),
                                  observer)

    return run_once(run_dir, "direction", inputs, work, observer).result


def run_finetune(config: FinetuneRun, run_dir: str | Path, *, progress: bool = True,
                 observer: StageObserver | None = None, seed: int | None = None) -> dict:
    """Attack B: the fine-tuning budget sweep of `config.recipe` on `config.model`, one folder per budget under
    run_dir/<config.folder> (each budget resumable on its own): {"budgets": [metrics per budget]}.

    With `config.cache`, the folder is restored from the stage cache when the same model, recipe, data, donor
    direction, `seed` (the study's) and code computed it before (ablate.stage_cache), and stored there otherwise."""
    from ablate.finetune import run_finetune as train_budgets

    recipe = config.recipe

    def compute() -> dict:
        return {"budgets": train_budgets(config.model, recipe, Path(run_dir) / config.folder, progress=progress)}

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a distributed launch: every process trains (the budgets' own
        return compute()                            # markers resume it); no process may skip while the others train
    inputs: dict[str, Any] = {"model": model_fingerprint(config.model.spec), "config": recipe.model_dump(mode="json")}
    donor = None
    if recipe.data.donor_direction and Path(recipe.data.donor_direction, "selected.json").is_file():
        from ablate.finetune.answers import ablated_identity
        from ablate.variants import direction_info

        inputs["donor_direction"] = direction_info(recipe.data.donor_direction)  # the pick, not only its folder
        donor = ablated_identity(inputs["model"], recipe.data.donor_direction)  # by content: direction file, strength

    def work() -> dict:
        if not config.cache or not cacheable(run_dir, config.folder):
            return compute()
        # The recipe by content: a donor direction's folder (this run's) enters the key as its direction's bytes.
        recipe_fields = {**inputs["config"], "data": {**inputs["config"]["data"], "donor_direction": donor}}
        content = {"model": inputs["model"], "model_config": config.model.model_dump(mode="json"),
                   "config": recipe_fields, "files": local_files(recipe_fields)}
        return restore_or_compute("finetune", content, seed, run_dir, config.folder, compute,
                                  ("config.json", "*/metrics.json"), observer)

    return run_once(run_dir, "finetune", inputs, work, observer).result


def restore_or_compute(stage: str, content: dict, seed: int | None, run_dir: str | Path, folder: str,
                       compute: Callable[[], dict], relocated: tuple[str, ...], observer: StageObserver | None) -> dict:
    """`compute()`'s result through the stage cache (ablate.stage_cache), with the key and whether it was a hit."""
    key = stage_cache_key(stage, content, seed)
    result, hit = cached_stage(stage, key, run_dir, folder, compute, relocated)
    if hit and observer is not None:
        observer.note(f"{stage}: the same model, config, data, seed and code computed it before; "
                      f"artifacts copied from the stage cache ({key})")
    return {**result, "stage_cache": {"key": key, "hit": hit}}


def run_eval(config: EvalRun, run_dir: str | Path, *, progress: bool = True, observer: StageObserver | None = None,
             model_identity: str | None = None, model_loader: Callable[[], tuple] | None = None,
             reference_loader: Callable[[], tuple] | None = None) -> dict:
    """One variant scored with one suite: run_dir/eval/<variant>.json and generations/<variant>.jsonl, with the
    reference's divergences when `config.reference` is another model; {"metrics_path", "summary", "eval_cache"}.

    `model_identity` is recorded in the result (so another model's result is never written over it);
    `model_loader` and `reference_loader` return models already loaded (model, tokenizer): the command line
    checks the suite against them before it writes anything, and a study's variants share one reference.
    """
    from ablate.evaluate import run_eval as evaluate_model
    from ablate.evaluate.run import suite_fingerprint

    run_dir = Path(run_dir)
    suite = config.suite
    loaded: dict[str, tuple] = {}

    def reference() -> tuple:
        if "pair" not in loaded:
            from ablate.models import load_model

            loaded["pair"] = reference_loader() if reference_loader is not None else load_model(config.reference)
        return loaded["pair"]

    def evaluate() -> dict:
        from ablate.variants import load_variant, variant_hooks

        model, tokenizer = model_loader() if model_loader is not None else load_variant(config)
        ref = reference() if config.reference is not None else None
        with variant_hooks(model, config):  # a quantised model's direction variant: hooks, not weights
            return evaluate_model(model, tokenizer, suite, run_dir, variant=config.variant, reference=ref,
                                  redact=config.redact, progress=progress, model_spec=model_identity)

    inputs = {"variant": variant_fingerprint(config),
              "reference": model_fingerprint(config.reference.spec) if config.reference is not None else None,
              "suite": {"suite": suite.model_dump(mode="json"), "fingerprint": suite_fingerprint(suite)},
              "redact": config.redact}
    metrics_path = str(run_dir / "eval" / f"{config.variant}.json")
    if not Path(metrics_path).is_file():  # the result was removed since: the marker alone does not make it done
        (stage_dir(run_dir, f"eval-{config.variant}") / "done.json").unlink(missing_ok=True)

    def work() -> dict:
        if not config.cache:
            return {"metrics_path": metrics_path, "summary": summary(evaluate())}
        from ablate.evaluate.cache import cached_eval, eval_cache_key
        from ablate.evaluate.run import capability_folder
        from ablate.models import resolve_spec

        key = eval_cache_key({**inputs, "variant": variant_content_fingerprint(config), "name": config.variant},
                             capability_folder(suite))
        metrics, hit = cached_eval(key, run_dir, config.variant, resolve_spec(config.model.spec)[1], evaluate)
        if hit and observer is not None:
            observer.note(f"eval-{config.variant}: the same weights, reference, suite and code were evaluated "
                          f"before; result copied from the eval cache ({key})")
        return {"metrics_path": metrics_path, "summary": summary(metrics), "eval_cache": {"key": key, "hit": hit}}

    return run_once(run_dir, f"eval-{config.variant}", inputs, work, observer).result


def summary(metrics: dict) -> dict:
    """Each metric's value, by name (what a stage marker keeps of an eval result)."""
    return {name: entry.get("value") for name, entry in metrics.get("metrics", {}).items()}

