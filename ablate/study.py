"""Studies: model → [harden] → attacks (direction ablation, LoRA sweep) → evaluate every variant → report.

    ablate study                       # the default study on the embedded model (ablate/studies/default.yaml)
    ablate study my_study.yaml --out runs/mine
    ablate study --resume              # continue the newest run of the default study

Every stage is the entry point its single command runs (`ablate.stages`: run_harden, run_direction,
run_finetune, run_eval). The study only chains them inside a run directory (layout in docs/study.md) and
records what happened in `manifest.json`. Each stage computes a fingerprint of its inputs (configs, model
identity, prompt sets) and, when finished, writes `.stages/<stage>/done.json` last; a rerun skips every stage
whose fingerprint matches, so a killed study resumes where it stopped and ends with the same numbers as an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata, resources
from pathlib import Path
from typing import Any, Callable

import torch

from ablate import AblateError, __version__
from ablate.artifacts import fingerprint, read_json, write_json
from ablate.config import (DirectionRun, EvalRun, FinetuneRun, HardenRun, ModelConfig, StudyConfig, dump_config, load_config,
                           read_yaml, validate_config)
from ablate.export import cache_root, describe_artifacts
from ablate.stages import StageOutcome, run_direction, run_eval, run_finetune, run_harden, run_once
from ablate.variants import load_variant, measure_projections, model_fingerprint, qlora_base
PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "lm_eval", "bitsandbytes",
            "safetensors", "gguf", "pydantic")


# --------------------------------------------------------------------------------------------
# Loading and resolving a study config
# --------------------------------------------------------------------------------------------


@dataclass
class ResolvedStudy:
    """A study config with every stage config loaded and validated (before any work starts)."""

    config: StudyConfig
    source: str
    raw: dict
    harden: Any = None  # FinetuneConfig | None
    direction: Any = None  # DirectionConfig | None
    finetune: Any = None  # FinetuneConfig | None
    suite: Any = None  # EvalSuite


def builtin_studies() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in resources.files("ablate").joinpath("studies").iterdir()
                  if p.name.endswith(".yaml"))


def study_path(name_or_path: str | Path | None) -> Path:
    """A study YAML path: a file, or the name of a study shipped in ablate/studies/."""
    if name_or_path is None:
        name_or_path = "default"
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise AblateError(f"study file not found: {path}")
        return path
    shipped = resources.files("ablate").joinpath("studies", f"{name_or_path}.yaml")
    if shipped.is_file():
        return Path(str(shipped))
    raise AblateError(f"unknown study '{name_or_path}'; expected a .yaml file or one of: {', '.join(builtin_studies())}")


def _stage_source(value: Any, base: Path, what: str, study_file: str) -> tuple[dict, str]:
    """Inline dict, or a YAML path relative to the study file's folder, the CWD, then the package (so
    `finetune_configs/lora_attack.yaml` names the shipped recipe in an installed package too)."""
    if value is None:
        return {}, f"{study_file}: {what} (defaults)"
    if isinstance(value, dict):
        return value, f"{study_file}: {what}"
    for candidate in (base / value, Path(value), Path(str(resources.files("ablate").joinpath(value)))):
        if candidate.is_file():
            return read_yaml(candidate) or {}, str(candidate)
    raise AblateError(f"{study_file}: key '{what}': file not found: {value}")


def _preset_or(value: Any, base: Path) -> Any:
    """A direction config given as the name of a shipped preset ('arditi2024') becomes that preset's YAML path."""
    from ablate.config import direction_preset_path, direction_presets

    if isinstance(value, str) and not (base / value).is_file() and not Path(value).is_file() and value in direction_presets():
        return str(direction_preset_path(value))
    return value


def resolve_study(path: str | Path | None = None, overrides: list[str] | None = None) -> ResolvedStudy:
    """Load a study and every stage config it names; any problem is one line naming file and key."""
    from ablate.config import DirectionConfig, EvalSuite, FinetuneConfig
    from ablate.evaluate import load_suite

    file = study_path(path)
    config = load_config(file, StudyConfig, overrides=overrides)
    raw = read_yaml(file) or {}
    base = file.parent
    resolved = ResolvedStudy(config=config, source=str(file), raw=raw)
    if config.harden.enabled:
        data, source = _stage_source(config.harden.config, base, "harden.config", str(file))
        resolved.harden = validate_config(data, FinetuneConfig, source) if data else None
    if config.attacks.direction.enabled:
        data, source = _stage_source(_preset_or(config.attacks.direction.config, base), base, "attacks.direction.config", str(file))
        resolved.direction = validate_config(data, DirectionConfig, source)
    if config.attacks.finetune.enabled:
        data, source = _stage_source(config.attacks.finetune.config, base, "attacks.finetune.config", str(file))
        resolved.finetune = validate_config(data, FinetuneConfig, source)
    suite = config.eval.suite
    if isinstance(suite, dict):
        resolved.suite = load_suite(validate_config(suite, EvalSuite, f"{file}: eval.suite"), config.eval.overrides)
    else:
        candidate = base / suite
        resolved.suite = load_suite(str(candidate) if candidate.is_file() else suite, config.eval.overrides)
    return resolved


# --------------------------------------------------------------------------------------------
# Run directory, manifest, fingerprints
# --------------------------------------------------------------------------------------------


def new_run_dir(config: StudyConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(config.output_dir) / f"{config.name}-{stamp}"


def latest_run_dir(config: StudyConfig) -> Path | None:
    runs = sorted(Path(config.output_dir).glob(f"{config.name}-*/manifest.json"))
    return runs[-1].parent if runs else None


def package_versions() -> dict[str, str]:
    versions = {"ablate": __version__, "python": sys.version.split()[0]}
    for name in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name.replace("_", "-"))
    return versions


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=5,
                               cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def hardware() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": __import__("os").cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


@dataclass
class StageLog:
    """What one study run did: per stage, wall seconds, skipped or not, the key of a cache it restored from or stored
    into (`stage_cache`, `eval_cache`: key and hit), and the stage's own figures; it prints the
    stage headers as the stages start and finish (an `ablate.stages.StageObserver`)."""

    console: Any = None
    stages: dict[str, dict] = field(default_factory=dict)
    artifacts: list[dict] = field(default_factory=list)  # cache entries the stages used: [{key, kind}]

    def record(self, name: str, artifacts: list[dict] | None = None, **info: Any) -> None:
        self.stages[name] = {**self.stages.get(name, {}), **info}
        self.artifacts += [entry for entry in artifacts or [] if entry not in self.artifacts]

    def starting(self, name: str) -> None:
        if self.console is not None:
            self.console.rule(f"[bold]{name}")

    def finished(self, outcome: StageOutcome) -> None:
        caches = {name: outcome.result[name] for name in ("stage_cache", "eval_cache") if name in outcome.result}
        self.record(outcome.name, artifacts=outcome.artifacts, skipped=outcome.skipped, fingerprint=outcome.fingerprint,
                    wall_seconds=outcome.wall_seconds, **caches)  # a restore from a cache: its key, and hit or not
        if self.console is None:
            return
        if outcome.skipped:
            self.console.print(f"[dim]✓ {outcome.name}: done already (fingerprint {outcome.fingerprint}), skipped[/]", soft_wrap=True)
        else:
            self.console.print(f"[green]✓ {outcome.name}[/] in {outcome.wall_seconds:.1f} s")

    def note(self, text: str) -> None:
        if self.console is not None:
            self.console.print(f"[dim]  {text}[/]", soft_wrap=True)


# --------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------


def _with_spec(model: ModelConfig, spec: str) -> ModelConfig:
    return model.model_copy(update={"spec": spec})


@dataclass
class StudyRun:
    """What the steps of one study run share: the resolved configs, the run directory and its log, and the model
    variants found so far (name -> {"spec": model spec, "kind": ..., "info": {...}})."""

    resolved: ResolvedStudy
    run_dir: Path
    console: Any
    progress: bool
    log: StageLog = field(default_factory=StageLog)
    variants: dict[str, dict] = field(default_factory=dict)
    base_fp: str = ""
    target_spec: str = ""
    target_fp: str = ""
    direction: dict | None = None  # the direction stage's result, when it ran

    @property
    def config(self) -> StudyConfig:
        return self.resolved.config

    @property
    def target_name(self) -> str:
        return "organism" if self.config.harden.enabled else "base"

    @property
    def target_model(self) -> ModelConfig:
        return _with_spec(self.config.model, self.target_spec)

    def stage(self, name: str, inputs: Any, work: Callable[[], dict]) -> dict:
        """A step of the study's own (not a stage of its own command) under the same done-marker."""
        return run_once(self.run_dir, name, inputs, work, self.log).result

    def eval_run(self, name: str, variant: dict) -> EvalRun:
        """The eval stage's config for one variant, with the attacked model as the KL reference (none for the
        attacked model itself)."""
        model = _with_spec(self.config.model, variant["spec"])
        if variant.get("adapter_dir") and (variant.get("info") or {}).get("qlora"):
            model = qlora_base(model)  # the 4-bit base it was trained on
        reference = None if name == self.target_name else self.target_model
        return EvalRun(model=model, variant=name, suite=self.resolved.suite, reference=reference,
                       direction=variant.get("direction_dir"), adapter=variant.get("adapter_dir"),
                       redact=self.config.eval.redact, cache=self.config.eval.cache)


def run_study(
    study: str | Path | None = None,
    run_dir: str | Path | None = None,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    overrides: list[str] | None = None,
    progress: bool = True,
    report: bool = True,
    command: str | None = None,
    overwrite: bool = False,
    hardware: str | None = None,
) -> Path:
    """Run a study end to end and return its run directory (see the module docstring): `study` is a YAML path or a
    shipped study's name, `run_dir` (or `out`) the run directory, None = a new timestamped one. A study whose
    stages cannot fit the visible (or `hardware`-named) devices stops here, before any work (ablate.plan)."""
    from rich.console import Console
    from transformers import set_seed

    from ablate.logs import study_output
    from ablate.plan import check_fits, plan_study, visible_hardware

    console = Console(stderr=True, quiet=not progress)
    resolved = resolve_study(study, overrides)
    machine = visible_hardware(hardware)
    check_fits(plan_study(resolved, machine)[1], machine)  # before any work: every stage fits the devices
    run_dir = choose_run_dir(resolved.config, out if out is not None else run_dir, resume, overwrite)
    console.print(f"[bold]study[/] {resolved.config.name} → {run_dir}", soft_wrap=True)
    set_seed(resolved.config.seed)
    started = time.perf_counter()
    manifest = start_manifest(resolved, run_dir, command)
    run = StudyRun(resolved=resolved, run_dir=run_dir, console=console, progress=progress, log=StageLog(console))
    with study_output():  # stage headers, the stages' own bars, any unknown warning on one line (ablate.logs)
        harden_target(run)
        attack_with_direction(run)
        attack_with_finetuning(run)
        measure_geometry(run)
        evaluate_variants(run)
        finish_manifest(run, manifest, started)
        if report:
            from ablate.report import write_report

            write_report(run_dir)
            console.print(f"[bold green]report[/] {run_dir / 'report.md'}  {run_dir / 'report.html'}", soft_wrap=True)
    return run_dir


def choose_run_dir(config: StudyConfig, out: str | Path | None, resume: bool, overwrite: bool = False) -> Path:
    """`out`, or with `resume` the newest run of this study, or a new timestamped folder; created and marked
    as ablate's (a non-empty folder that ablate did not create is refused unless `overwrite`)."""
    if out is not None:
        run_dir = Path(out)
    elif resume:
        run_dir = latest_run_dir(config)
        if run_dir is None:
            raise AblateError(f"--resume: no earlier run of study '{config.name}' under {config.output_dir}/")
    else:
        run_dir = new_run_dir(config)
    from ablate.safety import check_output_dir, claim_output_dir

    check_output_dir(run_dir, overwrite=overwrite, what="run directory")  # never a folder ablate did not create
    claim_output_dir(run_dir, "study")
    return run_dir


def start_manifest(resolved: ResolvedStudy, run_dir: Path, command: str | None) -> dict:
    """manifest.json with status 'running': configs as given and resolved, versions, commit, hardware, seed;
    and config.yaml. Returns the manifest, which `finish_manifest` completes."""
    config = resolved.config
    manifest_path = run_dir / "manifest.json"
    previous = read_json(manifest_path) if manifest_path.exists() else {}
    manifest: dict[str, Any] = {
        "study": config.name,
        "description": config.description,
        "status": "running",
        "command": command or " ".join(sys.argv),
        "config_source": resolved.source,
        "config_as_given": resolved.raw,
        "config_resolved": {
            "study": config.model_dump(mode="json"),
            "harden": resolved.harden.model_dump(mode="json") if resolved.harden is not None else None,
            "direction": resolved.direction.model_dump(mode="json") if resolved.direction is not None else None,
            "finetune": resolved.finetune.model_dump(mode="json") if resolved.finetune is not None else None,
            "suite": resolved.suite.model_dump(mode="json"),
        },
        "config_hash": fingerprint(resolved.raw),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "hardware": hardware(),
        "seed": config.seed,
        "created": previous.get("created", datetime.now(timezone.utc).isoformat()),
        "runs": previous.get("runs", 0) + 1,
    }
    write_json(manifest_path, manifest)
    (run_dir / "config.yaml").write_text(dump_config(config), encoding="utf-8")
    return manifest


def harden_target(run: StudyRun) -> None:
    """Step 1: the model the attacks target — the base, or with `harden` the organism hardened from it (cached by
    content hash inside ablate.finetune as well)."""
    config, resolved = run.config, run.resolved
    base_spec = config.model.spec
    run.base_fp = model_fingerprint(base_spec)
    run.target_spec, run.target_fp = base_spec, run.base_fp
    if not config.harden.enabled:
        run.variants["base"] = {"spec": base_spec, "kind": "base"}
        return
    hardened = run_harden(HardenRun(model=config.model, recipe=resolved.harden, score=False), run.run_dir,
                          progress=run.progress, observer=run.log)
    if config.harden.evaluate_base:
        run.variants["base"] = {"spec": base_spec, "kind": "base"}
    run.target_spec = hardened["model_dir"]
    run.target_fp = model_fingerprint(run.target_spec)
    run.variants["organism"] = {"spec": run.target_spec, "kind": "organism"}


def attack_with_direction(run: StudyRun) -> None:
    """Step 2, attack A: the refusal direction (selected on validation prompts), applied by orthogonalisation."""
    resolved, run_dir = run.resolved, run.run_dir
    if resolved.direction is None:
        return
    target_model = run.target_model
    run.direction = run_direction(DirectionRun(model=target_model, direction=resolved.direction,
                                               cache=run.config.attacks.direction.cache), run_dir,
                                  progress=run.progress, observer=run.log, seed=run.config.seed)
    run.variants["ablated"] = {"spec": run.target_spec, "kind": "direction", "direction_dir": str(run_dir / "directions"),
                               "info": run.direction["selected"]}
    if run.config.attacks.direction.save_model:
        from ablate.abliterate import abliterate

        run.stage("save-ablated", {"model": run.target_fp, "direction": run.direction},
                  lambda: {"model_dir": str(abliterate(target_model, run_dir / "directions", run_dir / "models" / "ablated"))})


def attack_with_finetuning(run: StudyRun) -> None:
    """Step 3, attack B: the LoRA fine-tuning budget sweep (each budget resumable on its own); one variant per budget."""
    resolved, run_dir = run.resolved, run.run_dir
    if resolved.finetune is None:
        return
    from ablate.finetune import ABLATED_DONOR

    recipe = resolved.finetune
    # The study's eval suite scores the untrained model as its own variant: no 'before training' row here.
    recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"before": False})})
    if recipe.data.donor == ABLATED_DONOR and recipe.data.donor_direction is None and resolved.direction is not None:
        # The ablated donor is the direction attack's own pick: no second direction stage.
        recipe = recipe.model_copy(update={"data": recipe.data.model_copy(
            update={"donor_direction": str(run_dir / "directions")})})
    sweep = run_finetune(FinetuneRun(model=run.target_model, recipe=recipe, cache=run.config.attacks.finetune.cache),
                         run_dir, progress=run.progress, observer=run.log, seed=run.config.seed)
    for budget in sweep["budgets"]:
        # A merged model when the recipe merges; otherwise (QLoRA) the attacked model plus the adapter.
        merged = None if budget.get("qlora") else budget.get("model_dir")  # QLoRA: scored on its 4-bit base
        run.variants[f"lora-{budget['name']}"] = {"spec": merged or run.target_spec, "kind": "finetune",
                                                  "adapter_dir": None if merged else budget.get("adapter_dir"),
                                                  "info": budget}


def measure_geometry(run: StudyRun) -> None:
    """Step 3b: does the LoRA attack remove the direction that ablation removes? The projections of the residual
    stream on r̂ at the selected layer, per variant (directions/projections.json)."""
    resolved, run_dir, variants = run.resolved, run.run_dir, run.variants
    if resolved.direction is None or resolved.finetune is None:
        return

    def work_projections() -> dict:
        from ablate.data import load_prompt_set
        from ablate.directions import load_direction

        direction_vector, selected = load_direction(run_dir / "directions")
        refusal = load_prompt_set("refusal:test", limit=32).prompts
        harmless = load_prompt_set("harmless:test", limit=32).prompts
        table = {}
        for name, variant in variants.items():
            if variant["kind"] not in ("organism", "finetune", "base"):
                continue
            model, tokenizer = load_variant(run.eval_run(name, variant))
            on_refusal = measure_projections(model, tokenizer, direction_vector, selected["layer"], refusal)
            on_harmless = measure_projections(model, tokenizer, direction_vector, selected["layer"], harmless)
            table[name] = {"refusal_mean": sum(on_refusal) / len(on_refusal),
                           "harmless_mean": sum(on_harmless) / len(on_harmless),
                           "refusal": on_refusal, "harmless": on_harmless}
            del model
        payload = {"layer": selected["layer"], "n_refusal": len(refusal), "n_harmless": len(harmless),
                   "variants": table}
        write_json(run_dir / "directions" / "projections.json", payload)
        return {"path": str(run_dir / "directions" / "projections.json")}

    run.stage("projections", {"variants": {n: v.get("spec") for n, v in variants.items()}, "direction": run.direction},
              work_projections)


def evaluate_variants(run: StudyRun) -> None:
    """Step 4: every variant evaluated with the study's suite, with the attacked model as the KL reference (loaded
    once for all of them)."""
    loaded: dict[str, Any] = {}

    def reference():
        if "pair" not in loaded:
            from ablate.models import load_model

            loaded["pair"] = load_model(run.target_model)
        return loaded["pair"]

    for name, variant in run.variants.items():
        own = name == run.target_name  # the attacked model: the reference's one load serves it too
        run_eval(run.eval_run(name, variant), run.run_dir, progress=run.progress, observer=run.log,
                 model_loader=reference if own else None, reference_loader=reference)


def finish_manifest(run: StudyRun, manifest: dict, started: float) -> None:
    """manifest.json with status 'complete': the variants, the stages' log and the fingerprints."""
    manifest.update({
        "status": "complete",
        "variants": {name: {k: v for k, v in variant.items() if k != "info"} for name, variant in run.variants.items()},
        "target": run.target_name,
        "stages": run.log.stages,
        "fingerprints": {"base_model": run.base_fp, "target_model": run.target_fp},
        "artifacts": describe_artifacts(run.log.artifacts),
        "run_dir": str(run.run_dir.resolve()),
        "cache_dir": str(cache_root()),
        "wall_seconds_this_run": time.perf_counter() - started,
        "finished": datetime.now(timezone.utc).isoformat(),
    })
    write_json(run.run_dir / "manifest.json", manifest)
