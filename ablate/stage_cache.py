"""A content-addressed cache of the attack stages: the same model, config, data, seed and code give the same artifacts.

A study's direction stage and its LoRA budget sweep are deterministic on one machine, and a rerun of a study
(a new run directory, an attack setting changed elsewhere, another suite) repeats them with the same inputs.
Their artifacts depend only on

- the attacked model's weights (`ablate.variants.model_fingerprint`),
- the stage's config, the content of the prompt sets and data files it reads (`local_files`), and for the
  fine-tuning stage the content of the direction behind an `ablated` donor (its direction file and strength),
- the study's seed,
- the code and the packages it computes with (`ablate.evaluate.cache.code_fingerprint`: every file of the
  installed `ablate` package, and the versions of torch, transformers, peft, lm-eval, accelerate),

so `cache_dir()/stages/<stage>/<hash of those>/` keeps a copy of the stage's folder (`directions/`, or
`finetune/` with every budget's adapter, merged model, metrics and compute accounting) and the stage's result,
and a run whose inputs hash the same copies them into its run directory instead of computing them again. Any
change of an input is a new key, never a stale result. The copied artifacts keep the FLOPs and seconds of the
run that computed them (`directions/compute.json`, each budget's `metrics.json`), so a report's attack columns
read the same; the run's own paths inside them (`selected.json`, `metrics.json`, `config.json`) name the new
run directory. An entry is written into a temporary folder and renamed into place, its `done.json` written
last: a run killed while storing leaves no entry that a later run would read.

`attacks.direction.cache: false` / `attacks.finetune.cache: false` in a study turns it off. A stage that
writes into the run directory itself (`ablate direction --out`, `ablate finetune --out`) is not cached.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

from ablate.artifacts import file_sha256, fingerprint, read_json, write_json
from ablate.safety import MARKER

PLACEHOLDER = "{run_dir}"
SKIPPED = (".stages", MARKER)


def local_files(value: Any) -> dict[str, str]:
    """The SHA-256 of every local file a config names ({path: hash}): any string value (or part of a union
    `A+B`) that is an existing file. Built-in prompt sets and shipped files are package data, hashed by
    `code_fingerprint`; hub datasets are named by id."""
    found: dict[str, str] = {}

    def visit(item: Any) -> None:
        if isinstance(item, dict):
            for entry in item.values():
                visit(entry)
        elif isinstance(item, (list, tuple)):
            for entry in item:
                visit(entry)
        elif isinstance(item, str) and item:
            for part in [item, *item.split("+")]:
                path = Path(part.strip())
                if part.strip() and path.is_file() and part not in found:
                    found[part] = file_sha256(path)

    visit(value)
    return found


def stage_cache_key(stage: str, inputs: dict, seed: int | None) -> str:
    """The key of one stage: its content inputs, the seed, the code and the package versions."""
    from ablate.evaluate.cache import code_fingerprint

    return fingerprint({"stage": stage, "inputs": inputs, "seed": seed, "code": code_fingerprint()})


def cache_folder(stage: str, key: str) -> Path:
    from ablate.models import cache_dir

    return cache_dir() / "stages" / stage / key


def relocate(value: Any, old: str, new: str) -> Any:
    """`value` (JSON-like) with every string that is the path `old` or starts with `old/` moved under `new`."""
    if isinstance(value, dict):
        return {key: relocate(entry, old, new) for key, entry in value.items()}
    if isinstance(value, list):
        return [relocate(entry, old, new) for entry in value]
    if isinstance(value, str) and (value == old or value.startswith(old + os.sep)):
        return new + value[len(old):]
    return value


def relocate_files(folder: Path, patterns: tuple[str, ...], old: str, new: str) -> None:
    """Rewrite the JSON files of `folder` matching `patterns` (globs) with `relocate`."""
    for pattern in patterns:
        for path in sorted(folder.glob(pattern)):
            if path.suffix == ".json" and path.is_file():
                write_json(path, relocate(read_json(path), old, new))


def cacheable(run_dir: str | Path, folder: str) -> bool:
    """Whether a stage writing into `run_dir/folder` can be cached: a folder of its own inside a run directory
    that is not the working directory (paths relative to it could not be moved to another run)."""
    return folder not in ("", ".") and str(Path(run_dir)) != "."


def cached_stage(stage: str, key: str, run_dir: str | Path, folder: str, work: Callable[[], dict],
                 relocated: tuple[str, ...] = ()) -> tuple[dict, bool]:
    """(the stage's result, whether it came from the cache): the entry `cache_dir()/stages/<stage>/<key>/` copied
    into `run_dir/<folder>` when it is complete, else `work()`'s result and folder, stored there.

    Paths into the run directory inside the result and inside the `relocated` JSON files (globs relative to the
    folder) are kept as `{run_dir}/…` in the entry and name this run's directory when restored.
    """
    run_dir_text, out = str(Path(run_dir)), Path(run_dir) / folder
    if not cacheable(run_dir, folder):
        return work(), False
    entry = cache_folder(stage, key)
    if (entry / "done.json").is_file():
        done = read_json(entry / "done.json")
        partial = out.with_name(out.name + ".restoring")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(entry / "files", partial)
        relocate_files(partial, relocated, PLACEHOLDER, run_dir_text)
        if out.exists():
            shutil.rmtree(out)
        os.replace(partial, out)
        return relocate(done["result"], PLACEHOLDER, run_dir_text), True
    result = work()
    partial = entry.with_name(f"{entry.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(out, partial / "files", ignore=lambda _, names: [n for n in names if n in SKIPPED])
    relocate_files(partial / "files", relocated, run_dir_text, PLACEHOLDER)
    write_json(partial / "done.json", {"key": key, "stage": stage, "result": relocate(result, run_dir_text, PLACEHOLDER)})
    if not (entry / "done.json").is_file():
        shutil.rmtree(entry, ignore_errors=True)  # an incomplete entry (no done.json) of a killed run
    try:
        os.replace(partial, entry)
    except OSError:  # another process stored the same key first: its entry holds the same artifacts
        shutil.rmtree(partial, ignore_errors=True)
    return result, False
