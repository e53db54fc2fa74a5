"""Capability: lm-eval tasks run on the model already in memory.

lm-eval's HF wrapper accepts a loaded model (`HFLM(pretrained=model, tokenizer=tokenizer)`), so an
ablated or LoRA-merged model is evaluated as it is, without saving it. Tasks are lm-eval names
(`mmlu`, `arc_challenge`, … — they need the hub or its cache) or local tasks shipped in
`eval_suites/tasks/` (JSONL + lm-eval YAML, written by us; they run offline).

lm-eval resolves a local task's relative `data_files` against the current directory, not the
YAML's folder, so the task folder is copied to a temporary directory with every `data_files`
entry made absolute before lm-eval reads it.

Each task gives `capability/<task>`: its accuracy (acc, or exact_match for short-answer tasks),
with a Wilson interval over the documents scored and per-document values for paired comparisons.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import yaml

from ablate import AblateError
from ablate.config import CapabilityConfig
from ablate.evaluate.stats import mean_metric, rate_metric, z_value
from ablate.logs import quiet_lm_eval

# Preferred metric per task, first match wins ("<metric>,<filter>" as lm-eval reports it).
METRIC_PREFERENCE = ("acc,none", "exact_match,first-number", "exact_match,strict-match", "exact_match,flexible-extract",
                     "exact_match,none", "acc_norm,none", "mc2,none", "mc1,none")
BINARY_METRICS = ("acc", "acc_norm", "exact_match", "mc1")


def _resolve_paths(data_files, folder: Path):
    if isinstance(data_files, str):
        path = Path(data_files)
        return str(path if path.is_absolute() else (folder / path).resolve())
    if isinstance(data_files, list):
        return [_resolve_paths(item, folder) for item in data_files]
    if isinstance(data_files, dict):
        return {key: _resolve_paths(value, folder) for key, value in data_files.items()}
    return data_files


def resolve_task_folder(include_path: Path, destination: Path) -> dict[str, Path]:
    """Copy a local task folder to `destination`, making every `dataset_kwargs.data_files` absolute.

    Returns {task name: resolved YAML path}. YAMLs that safe_load cannot read (lm-eval's
    `!function` tags) are copied unchanged.
    """
    if not include_path.is_dir():
        raise AblateError(f"capability.include_path: task folder not found: {include_path}")
    shutil.copytree(include_path, destination, dirs_exist_ok=True)
    tasks: dict[str, Path] = {}
    for source in sorted(include_path.rglob("*.yaml")):
        try:
            data = yaml.safe_load(source.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            continue
        if not isinstance(data, dict):
            continue
        target = destination / source.relative_to(include_path)
        data_files = (data.get("dataset_kwargs") or {}).get("data_files")
        if data_files is not None:
            data["dataset_kwargs"]["data_files"] = _resolve_paths(data_files, source.parent)
            for path in _flatten(data["dataset_kwargs"]["data_files"]):
                if not Path(path).exists():
                    raise AblateError(f"{source}: key 'dataset_kwargs.data_files': file not found: {path}")
            target.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        if isinstance(data.get("task"), str):
            tasks[data["task"]] = target
    return tasks


def _flatten(data_files) -> list[str]:
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, list):
        return [item for value in data_files for item in _flatten(value)]
    if isinstance(data_files, dict):
        return [item for value in data_files.values() for item in _flatten(value)]
    return []


def local_task_names(include_path: Path) -> list[str]:
    """Task names defined by the YAMLs of a local task folder."""
    names = []
    for source in sorted(include_path.rglob("*.yaml")):
        try:
            data = yaml.safe_load(source.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            continue
        if isinstance(data, dict) and isinstance(data.get("task"), str):
            names.append(data["task"])
    return names


def _pick_metric(task_results: dict) -> tuple[str, float, float | None]:
    """(metric key, value, stderr) of the preferred metric in one task's lm-eval results."""
    for key in METRIC_PREFERENCE:
        if isinstance(task_results.get(key), (int, float)):
            name, _, filter_name = key.partition(",")
            stderr = task_results.get(f"{name}_stderr,{filter_name}")
            return key, float(task_results[key]), stderr if isinstance(stderr, (int, float)) else None
    for key, value in task_results.items():
        if "," in key and "_stderr" not in key and isinstance(value, (int, float)) and key != "alias":
            name, _, filter_name = key.partition(",")
            stderr = task_results.get(f"{name}_stderr,{filter_name}")
            return key, float(value), stderr if isinstance(stderr, (int, float)) else None
    raise AblateError(f"lm-eval returned no numeric metric for a task: {sorted(task_results)}")


def _leaf_tasks(group_subtasks: dict, task: str) -> list[str]:
    """The leaf tasks under a group (mmlu → mmlu_stem → mmlu_anatomy …); [] for a plain task."""
    if task not in group_subtasks:
        return []
    leaves: list[str] = []
    for child in group_subtasks[task]:
        leaves.extend(_leaf_tasks(group_subtasks, child) or [child])
    return leaves


def _per_item(samples: dict, task: str, subtasks: list[str], metric_key: str) -> dict[str, float]:
    name, _, filter_name = metric_key.partition(",")
    values: dict[str, float] = {}
    for subtask in subtasks or [task]:
        for sample in samples.get(subtask, []):
            if filter_name and sample.get("filter", filter_name) != filter_name:
                continue
            if isinstance(sample.get(name), (int, float)):
                key = f"{subtask}/{sample['doc_id']}" if subtasks else str(sample["doc_id"])
                values[key] = float(sample[name])
    return values


def run_capability(
    model,
    tokenizer,
    config: CapabilityConfig,
    *,
    suite_dir: Path | None = None,
    seed: int = 0,
    bootstrap_samples: int = 2000,
    confidence: float = 0.95,
    progress: bool = True,
) -> tuple[dict[str, dict], dict[str, dict[str, float]]]:
    """Run every capability task; returns ({"capability/<task>": metric}, {same name: per-item values})."""
    if not config.tasks:
        return {}, {}
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    include_path = None
    if config.include_path is not None:
        include_path = Path(config.include_path)
        if not include_path.is_absolute():
            include_path = (Path(suite_dir or ".") / include_path).resolve()
    local = set(local_task_names(include_path)) if include_path is not None and include_path.is_dir() else set()
    needs_builtin = any(task.name not in local for task in config.tasks)
    metrics: dict[str, dict] = {}
    per_item: dict[str, dict[str, float]] = {}
    padding_side = tokenizer.padding_side
    with tempfile.TemporaryDirectory(prefix="ablate-tasks-") as temporary, quiet_lm_eval():
        try:
            resolved = resolve_task_folder(include_path, Path(temporary) / "tasks") if local else {}
            # Scanning lm-eval's thousands of built-in YAMLs takes seconds; only do it when needed.
            manager = TaskManager(include_path=str(Path(temporary) / "tasks") if resolved else None,
                                  include_defaults=needs_builtin)
            unknown = [task.name for task in config.tasks if task.name not in manager.all_tasks]
            if unknown:
                where = f" or in {include_path}" if include_path is not None else ""
                raise AblateError(f"capability.tasks: unknown lm-eval task(s) {', '.join(unknown)} (not built into lm-eval{where})")
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size, max_length=None)
            for task in config.tasks:
                limit = task.limit or config.limit
                results = simple_evaluate(
                    model=lm, tasks=[task.name], num_fewshot=task.num_fewshot, limit=limit, task_manager=manager,
                    apply_chat_template=config.apply_chat_template, log_samples=True, bootstrap_iters=0,
                    random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                    verbosity=None,
                )
                if results is None:
                    raise AblateError(f"lm-eval returned no results for task {task.name}")
                task_results = results["results"][task.name]
                key, value, stderr = _pick_metric(task_results)
                subtasks = _leaf_tasks(results.get("group_subtasks", {}), task.name)
                values = _per_item(results.get("samples", {}), task.name, subtasks, key)
                name = f"capability/{task.name}"
                base = key.partition(",")[0]
                if values and base in BINARY_METRICS and all(v in (0.0, 1.0) for v in values.values()):
                    metric = rate_metric(int(sum(values.values())), len(values), confidence)
                    if subtasks:  # a group's value is lm-eval's aggregate (it may weight subtasks)
                        metric["value"] = value
                elif values:
                    metric = mean_metric(list(values.values()), bootstrap_samples, confidence, seed)
                else:
                    n = int(results.get("n-samples", {}).get(task.name, {}).get("effective", 0))
                    half = z_value(confidence) * stderr if stderr is not None else math.nan
                    metric = {"value": value, "ci": [value - half, value + half], "n": n, "method": "normal (lm-eval stderr)"}
                metric["lm_eval_metric"] = key
                metrics[name] = metric
                per_item[name] = values
        finally:
            tokenizer.padding_side = padding_side
    return metrics, per_item
