"""A content-addressed cache of evaluations: the same weights, reference and suite give the same figures.

A study evaluates every variant in every run, but most variants of a rerun hold the same weights as
before: the base model, the cached organism, and any attack whose inputs did not change (the direction
stage and LoRA training are deterministic on one machine). An evaluation's result depends only on

- the variant's weights (`variant_fingerprint`: model files, direction or adapter on top) and name,
- the KL reference's weights, the suite (`suite_fingerprint`) and `redact`,
- the code and data that compute the figures: every file of the installed `ablate` package, the suite's
  local capability tasks, and the versions of torch, transformers, peft and lm-eval,

so `cache_dir()/evals/<hash of those>/` keeps `eval.json` and `generations.jsonl`, and a study whose
variant matches copies them into its run directory instead of evaluating again. Any change to the code,
a prompt file or a package version is a new key: a stale figure is never returned. The copied result
keeps the `timings` and `wall_seconds` of the evaluation that computed it; the study's manifest records
the restore's own wall time and the cache key (`eval_cache`). `eval.cache: false` in a study turns it off.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
from importlib import metadata
from pathlib import Path
from typing import Callable

from ablate.artifacts import fingerprint, read_json, write_json

PACKAGES = ("torch", "transformers", "peft", "lm_eval", "accelerate")
SUFFIXES = (".py", ".jsonl", ".json", ".txt", ".yaml", ".yml", ".csv")


def _files_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in SUFFIXES and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@functools.lru_cache(maxsize=None)
def code_fingerprint() -> str:
    """Hash of every source and data file of the installed ablate package and of the packages it computes with."""
    import ablate

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[name] = None
    return fingerprint({"ablate": _files_digest(Path(ablate.__file__).resolve().parent), "versions": versions})


def eval_cache_key(inputs: dict, task_folder: Path | None = None) -> str:
    """The key of one evaluation: its inputs (variant, reference, suite, redact), the code, the local tasks."""
    tasks = _files_digest(task_folder) if task_folder is not None and task_folder.is_dir() else None
    return fingerprint({"inputs": inputs, "code": code_fingerprint(), "tasks": tasks})


def cache_folder(key: str) -> Path:
    from ablate.models import cache_dir

    return cache_dir() / "evals" / key


def cached_eval(key: str, run_dir: Path, variant: str, model_name: str | None, evaluate: Callable[[], dict]) -> tuple[dict, bool]:
    """(eval result, whether it came from the cache): copied from `cache_dir()/evals/<key>/` into
    `run_dir` (eval/<variant>.json, generations/<variant>.jsonl) when there, else `evaluate()`'s, stored.

    `model_name` is what the result's `model` field says for this run (a merged budget's folder lives in
    its own run directory); the cached result's own is replaced by it.
    """
    folder = cache_folder(key)
    eval_path = run_dir / "eval" / f"{variant}.json"
    generations_path = run_dir / "generations" / f"{variant}.jsonl"
    if (folder / "done.json").is_file() and (folder / "eval.json").is_file() and (folder / "generations.jsonl").is_file():
        result = read_json(folder / "eval.json")
        if model_name is not None and result.get("model") == read_json(folder / "done.json").get("model_name"):
            result["model"] = model_name
        generations_path.parent.mkdir(parents=True, exist_ok=True)
        partial = generations_path.with_name(generations_path.name + ".partial")
        shutil.copyfile(folder / "generations.jsonl", partial)
        os.replace(partial, generations_path)
        write_json(eval_path, result)
        return result, True
    result = evaluate()
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    shutil.copyfile(eval_path, partial / "eval.json")
    shutil.copyfile(generations_path, partial / "generations.jsonl")
    write_json(partial / "done.json", {"key": key, "variant": variant, "model_name": result.get("model")})
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    return result, False
