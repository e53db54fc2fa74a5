"""Studies: model → [harden] → attacks (direction ablation, LoRA sweep) → evaluate every variant → report.

    ablate study                       # the default study on the embedded model (ablate/studies/default.yaml)
    ablate study my_study.yaml --out runs/mine
    ablate study --resume              # continue the newest run of the default study

Every stage is the same function its single command runs. The study only chains them inside a run
directory (layout in docs/study.md) and records what happened in `manifest.json`. Each stage computes a
fingerprint of its inputs (configs, model identity, prompt sets) and, when finished, writes
`.stages/<stage>/done.json` last; a rerun skips every stage whose fingerprint matches, so a killed study
resumes where it stopped and ends with the same numbers as an uninterrupted one.
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
from ablate.artifacts import file_sha256, fingerprint, is_done, mark_done, read_done, read_json, write_json
from ablate.config import ModelConfig, StudyConfig, dump_config, load_config, read_yaml, validate_config
from ablate.export import cache_root, describe_artifacts, locate, note_artifact

STAGES_DIR = ".stages"
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


def model_fingerprint(spec: str) -> str:
    """Identity of a model spec (weights and config files; a hub id by id and revision): one definition,
    shared with the fine-tuning stage's cache keys."""
    from ablate.finetune import model_fingerprint as fingerprint_model

    return fingerprint_model(spec)


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
    """What one study run did: per stage, wall seconds, skipped or not, and the stage's own figures."""

    stages: dict[str, dict] = field(default_factory=dict)
    artifacts: list[dict] = field(default_factory=list)  # cache entries the stages used: [{key, kind}]

    def record(self, name: str, artifacts: list[dict] | None = None, **info: Any) -> None:
        self.stages[name] = {**self.stages.get(name, {}), **info}
        self.artifacts += [entry for entry in artifacts or [] if entry not in self.artifacts]


def run_stage(run_dir: Path, name: str, inputs: Any, work: Callable[[], dict], log: StageLog,
              console=None) -> dict:
    """Run `work()` unless `.stages/<name>/done.json` holds the same input fingerprint.

    `work` returns a JSON-able dict of the stage's results, stored in done.json and returned again when
    the stage is skipped, so later stages see identical inputs either way; so is the list of cache entries
    the stage used (`ablate.export.recording`), which the manifest records.
    """
    from ablate.export import recording

    stage_dir = run_dir / STAGES_DIR / name
    key = fingerprint(inputs)
    if is_done(stage_dir, key):
        done = read_done(stage_dir)
        result = done["result"]
        log.record(name, artifacts=done.get("artifacts"), skipped=True, fingerprint=key,
                   wall_seconds=done.get("wall_seconds"))
        if console is not None:
            console.print(f"[dim]✓ {name}: done already (fingerprint {key}), skipped[/]")
        return result
    if console is not None:
        console.rule(f"[bold]{name}")
    start = time.perf_counter()
    with recording() as used:
        result = work()
    wall = time.perf_counter() - start
    mark_done(stage_dir, key, result=result, artifacts=used, wall_seconds=wall,
              finished=datetime.now(timezone.utc).isoformat())
    log.record(name, artifacts=used, skipped=False, fingerprint=key, wall_seconds=wall)
    if console is not None:
        console.print(f"[green]✓ {name}[/] in {wall:.1f} s")
    return result


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
        return run_stage(self.run_dir, name, inputs, work, self.log, self.console)


def run_study(
    study: str | Path | None = None,
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
    """Run a study end to end and return its run directory (see the module docstring). A study whose
    stages cannot fit the visible (or `hardware`-named) devices stops here, before any work (ablate.plan)."""
    from rich.console import Console
    from transformers import set_seed

    from ablate.plan import check_fits, plan_study, visible_hardware

    console = Console(stderr=True, quiet=not progress)
    resolved = resolve_study(study, overrides)
    machine = visible_hardware(hardware)
    check_fits(plan_study(resolved, machine)[1], machine)  # before any work: every stage fits the devices
    run_dir = choose_run_dir(resolved.config, out, resume, overwrite)
    console.print(f"[bold]study[/] {resolved.config.name} → {run_dir}")
    set_seed(resolved.config.seed)
    started = time.perf_counter()
    manifest = start_manifest(resolved, run_dir, command)
    run = StudyRun(resolved=resolved, run_dir=run_dir, console=console, progress=progress)
    harden_target(run)
    attack_with_direction(run)
    attack_with_finetuning(run)
    measure_geometry(run)
    evaluate_variants(run)
    finish_manifest(run, manifest, started)
    if report:
        from ablate.report import write_report

        write_report(run_dir)
        console.print(f"[bold green]report[/] {run_dir / 'report.md'}  {run_dir / 'report.html'}")
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
    from ablate.finetune import default_config, harden

    recipe = resolved.harden or default_config()  # the suite evaluates the organism: skip the recipe's own scoring
    recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"enabled": False})})

    def work_harden() -> dict:
        organism = harden(config.model, recipe, progress=run.progress)
        note_artifact(organism, "organism")
        return {"model_dir": str(organism)}

    harden_inputs = {"model": run.base_fp, "config": resolved.harden.model_dump(mode="json") if resolved.harden else None}
    hardened = run.stage("harden", harden_inputs, work_harden)
    # The cache cleared since, on this machine or another: the run's exported copy, else rebuild it.
    hardened = {**hardened, "model_dir": str(locate(run.run_dir, hardened["model_dir"]))}
    if not Path(hardened["model_dir"], "config.json").exists():
        (run.run_dir / STAGES_DIR / "harden" / "done.json").unlink()
        hardened = run.stage("harden", harden_inputs, work_harden)
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
    from ablate.compute import run_direction_counted

    target_model = run.target_model

    def work_direction() -> dict:
        from ablate.models import load_model

        model, tokenizer = load_model(target_model)  # (directions/compute.json: the attack's FLOPs and seconds)
        selected = run_direction_counted(model, tokenizer, resolved.direction, run_dir / "directions",
                                         progress=run.progress)
        return {"selected": selected}

    run.direction = run.stage("direction", {"model": run.target_fp, "config": resolved.direction.model_dump(mode="json")},
                              work_direction)
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
    from ablate.finetune import ABLATED_DONOR, run_finetune

    recipe = resolved.finetune
    finetune_inputs = {"model": run.target_fp, "config": recipe.model_dump(mode="json")}
    # The study's eval suite scores the untrained model as its own variant: no 'before training' row here.
    recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"before": False})})
    if recipe.data.donor == ABLATED_DONOR and recipe.data.donor_direction is None and resolved.direction is not None:
        # The ablated donor is the direction attack's own pick: no second direction stage.
        recipe = recipe.model_copy(update={"data": recipe.data.model_copy(
            update={"donor_direction": str(run_dir / "directions")})})
        finetune_inputs["donor_direction"] = run.direction
    target_model = run.target_model

    def work_finetune() -> dict:
        return {"budgets": run_finetune(target_model, recipe, run_dir / "finetune", progress=run.progress)}

    sweep = run.stage("finetune", finetune_inputs, work_finetune)
    for budget in sweep["budgets"]:
        # A merged model when the recipe merges; otherwise (QLoRA) the attacked model plus the adapter.
        merged = None if budget.get("qlora") else budget.get("model_dir")  # QLoRA: scored on its 4-bit base
        run.variants[f"lora-{budget['name']}"] = {"spec": merged or run.target_spec, "kind": "finetune",
                                                  "adapter_dir": None if merged else budget.get("adapter_dir"),
                                                  "info": budget}


def measure_geometry(run: StudyRun) -> None:
    """Step 3b: does the LoRA attack remove the direction that ablation removes? The projections of the residual
    stream on r̂ at the selected layer, per variant (directions/projections.json)."""
    resolved, run_dir, config, variants = run.resolved, run.run_dir, run.config, run.variants
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
            model, tokenizer = load_variant(config.model, variant)
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
    """Step 4: every variant evaluated with the study's suite, with the attacked model as the KL reference."""
    from ablate.evaluate.run import suite_fingerprint

    resolved, run_dir, config = run.resolved, run.run_dir, run.config
    suite_json = {"suite": resolved.suite.model_dump(mode="json"), "fingerprint": suite_fingerprint(resolved.suite)}
    reference_holder: dict[str, Any] = {}
    target_model, target_name = run.target_model, run.target_name

    def reference():
        if "pair" not in reference_holder:
            from ablate.models import load_model

            reference_holder["pair"] = load_model(target_model)
        return reference_holder["pair"]

    for name, variant in run.variants.items():
        variant_fp = variant_fingerprint(variant, run.target_fp)
        eval_inputs = {"variant": variant_fp, "reference": run.target_fp, "suite": suite_json, "redact": config.eval.redact}

        def work_eval(name=name, variant=variant, eval_inputs=eval_inputs) -> dict:
            from ablate.evaluate import run_eval
            from ablate.evaluate.cache import cached_eval, eval_cache_key
            from ablate.evaluate.run import capability_folder
            from ablate.models import resolve_spec

            def evaluate() -> dict:
                # The target is its own KL reference: one load serves both.
                model, tokenizer = reference() if name == target_name else load_variant(config.model, variant)
                ref = None if name == target_name else reference()
                with variant_hooks(model, variant):  # a quantised model's direction variant: hooks, not weights
                    return run_eval(model, tokenizer, resolved.suite, run_dir, variant=name, reference=ref,
                                    redact=config.eval.redact, progress=run.progress)

            if not config.eval.cache:
                return {"metrics_path": str(run_dir / "eval" / f"{name}.json"), "summary": _summary(evaluate())}
            key = eval_cache_key({**eval_inputs, "variant": variant_content_fingerprint(variant, run.target_fp), "name": name},
                                 capability_folder(resolved.suite))
            metrics, hit = cached_eval(key, run_dir, name, resolve_spec(variant["spec"])[1], evaluate)
            if hit:
                run.console.print(f"[dim]  eval-{name}: the same weights, reference, suite and code were evaluated "
                                  f"before; result copied from the eval cache ({key})[/]")
            return {"metrics_path": str(run_dir / "eval" / f"{name}.json"), "summary": _summary(metrics),
                    "eval_cache": {"key": key, "hit": hit}}

        run.stage(f"eval-{name}", eval_inputs, work_eval)


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


@torch.inference_mode()
def measure_projections(model, tokenizer, direction: torch.Tensor, layer: int, prompts: list[str],
                        batch_size: int = 32) -> list[float]:
    """Projection (x·r̂) of the residual stream entering `layer`, at each prompt's last token.

    Used to ask whether the LoRA attack removes the same direction that ablation removes: after such
    an attack, refusal-eliciting prompts would project on r̂ like harmless ones. The template prefix
    every prompt shares runs once per batch, as in the direction stage (`run_prefix_and_batch`).
    """
    from ablate.directions import prepare_batches, run_prefix_and_batch
    from ablate.hooks import StopForward, hidden_from, hooks
    from ablate.models import get_adapter

    adapter = get_adapter(model)
    device = next(model.parameters()).device
    r_hat = (direction / direction.norm()).to(device=device, dtype=torch.float32)
    state: dict[str, Any] = {"prefix": False, "last": None, "captured": None}

    def hook(_module, args, kwargs):
        if state["prefix"]:  # the shared template prefix runs first, on its own
            return None
        hidden = hidden_from(args, kwargs)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), state["last"]]
        state["captured"] = last.float() @ r_hat
        raise StopForward  # nothing after this layer's input is needed

    prepared = prepare_batches(tokenizer, prompts, batch_size, None, device)
    values: list[float | None] = [None] * len(prompts)
    with hooks(pre=[(adapter.layers[layer], hook)]):
        for batch, inputs in prepared.batches:
            state["last"] = inputs["last"]
            try:
                run_prefix_and_batch(model, prepared.prefix, inputs, logits=False,
                                     on_prefix=lambda flag: state.__setitem__("prefix", flag))
            except StopForward:
                pass
            for index, value in zip(batch, state["captured"].tolist()):
                values[index] = value
    return values  # type: ignore[return-value]


def _summary(metrics: dict) -> dict:
    return {name: entry.get("value") for name, entry in metrics.get("metrics", {}).items()}


def variant_fingerprint(variant: dict, target_fp: str) -> str:
    """Identity of a variant's weights: its model files, plus the direction or adapter applied on top."""
    if variant["kind"] == "direction":
        return fingerprint([target_fp, variant.get("info")])
    if variant.get("adapter_dir"):
        adapter = Path(variant["adapter_dir"])
        return fingerprint([model_fingerprint(variant["spec"])] + [file_sha256(f) for f in sorted(adapter.glob("*.safetensors"))])
    return model_fingerprint(variant["spec"])


def variant_content_fingerprint(variant: dict, target_fp: str) -> str:
    """`variant_fingerprint` by content alone, the same in every run directory: a direction variant by its
    direction file's bytes and strength (its `info` also holds this run's paths and timings)."""
    if variant["kind"] == "direction":
        direction_file = Path(variant["direction_dir"]) / "direction.pt"
        return fingerprint([target_fp, file_sha256(direction_file), (variant.get("info") or {}).get("strength")])
    return variant_fingerprint(variant, target_fp)


def load_variant(model_config: ModelConfig, variant: dict):
    """(model, tokenizer) of one variant; the direction variant is the target with r̂ projected out of its
    weights; an adapter-only budget (QLoRA) is the target with its LoRA adapter attached."""
    from ablate.config import Quantization
    from ablate.models import load_model
    from ablate.placement import is_quantized

    config = _with_spec(model_config, variant["spec"])
    if variant.get("adapter_dir") and (variant.get("info") or {}).get("qlora") and config.quantization is Quantization.none:
        config = config.model_copy(update={"quantization": Quantization.nf4})  # the 4-bit base it was trained on
    model, tokenizer = load_model(config)
    if variant.get("adapter_dir"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, variant["adapter_dir"]).eval()
    if variant["kind"] == "direction" and not is_quantized(model):  # a quantised model is ablated by hooks instead
        from ablate.abliterate import orthogonalize_from

        orthogonalize_from(model, Path(variant["direction_dir"]))  # at the strength the stage recorded
    return model, tokenizer


def variant_hooks(model, variant: dict):
    """The hooks a variant is evaluated under: directional ablation for the direction variant of a quantised
    model (whose weights cannot be orthogonalised), nothing otherwise."""
    from contextlib import nullcontext

    from ablate.placement import is_quantized

    if variant["kind"] != "direction" or not is_quantized(model):
        return nullcontext()
    from ablate.directions import load_direction
    from ablate.interventions import directional_ablation, weights_for

    direction, selected = load_direction(Path(variant["direction_dir"]))
    return directional_ablation(model, direction, weights_for(model, selected))
