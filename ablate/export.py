"""Cached artifacts a run used, and `ablate export RUN --self-contained`, which copies them into the run.

    ablate export runs/default-20261126-201500 --self-contained
    ablate report runs/default-20261126-201500       # the folder alone: the same report.md

The model cache (`ablate.models.cache_dir()`: hardened organisms, ablated donors, donor answers) is
addressed by the hash of each entry's inputs: `organisms/<key>`, `ablated/<key>/model`,
`finetune_data/<key>.jsonl`. Code that reads or builds an entry calls `note_artifact(path)`; a study stage
runs inside `recording()`, keeps the list in its done-marker (so a resumed study still knows it), and the
manifest's `artifacts` records every entry the run used with the SHA-256 of its content.

The export copies each entry to `<run>/artifacts/<its key>` and checks the copy against the recorded hash,
so a run folder moved to another machine or attached to a paper holds every model it evaluated. Donor
answers (compliant answers to refusal-eliciting prompts) stay out unless asked for with `--with-answers`:
the donor they came from is in the folder and writes the same greedy answers again.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
from pathlib import Path
from typing import Iterator

from ablate import AblateError
from ablate.artifacts import file_sha256, read_json, write_json

ARTIFACTS_DIR = "artifacts"
ANSWERS = "answers"
UNHASHED = ("done.json", "metrics.json")
_recorders: list[list[dict]] = []


def cache_root() -> Path:
    from ablate.models import cache_dir

    return cache_dir().resolve()


def cache_key(path: str | Path) -> str | None:
    """The path of a cache entry relative to the cache (`organisms/<key>`), or None outside the cache."""
    try:
        return Path(path).resolve().relative_to(cache_root()).as_posix()
    except ValueError:
        return None


def note_artifact(path: str | Path, kind: str) -> None:
    """Record that the code running now used the cache entry at `path` (a no-op outside `recording()`)."""
    key = cache_key(path)
    if key is None:
        return
    for recorder in _recorders:
        if not any(entry["key"] == key for entry in recorder):
            recorder.append({"key": key, "kind": kind})


@contextlib.contextmanager
def recording() -> Iterator[list[dict]]:
    """Collect the cache entries used inside the block: [{key, kind}, ...]."""
    recorder: list[dict] = []
    _recorders.append(recorder)
    try:
        yield recorder
    finally:
        _recorders.remove(recorder)


def tree_sha256(path: str | Path) -> tuple[str, int]:
    """SHA-256 of a file, or of a folder (each file's relative path and SHA-256, in sorted order), and its
    size in bytes. A folder's `done.json` and `metrics.json` are left out: they record when and how well,
    not what (scoring an organism again adds to its metrics)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path), path.stat().st_size
    digest, size = hashlib.sha256(), 0
    for item in sorted(p for p in path.rglob("*") if p.is_file() and p.name not in UNHASHED):
        digest.update(f"{item.relative_to(path).as_posix()}\0{file_sha256(item)}\n".encode())
        size += item.stat().st_size
    return digest.hexdigest(), size


def describe_artifacts(used: list[dict]) -> list[dict]:
    """The manifest's `artifacts`: each used entry with the SHA-256 and size of its content now."""
    entries = []
    for entry in sorted(used, key=lambda item: item["key"]):
        path = cache_root() / entry["key"]
        if not path.exists():
            entries.append({**entry, "sha256": None, "bytes": None, "missing": True})
            continue
        sha256, size = tree_sha256(path)
        entries.append({**entry, "sha256": sha256, "bytes": size})
    return entries


def locate(run_dir: str | Path, path: str | Path) -> Path:
    """`path`, or the run's exported copy of it when the cache no longer holds it (another machine)."""
    path = Path(path)
    if path.exists():
        return path
    key = cache_key(path)
    if key is not None and (Path(run_dir) / ARTIFACTS_DIR / key).exists():
        return Path(run_dir) / ARTIFACTS_DIR / key
    return path


def export_run(run_dir: str | Path, with_answers: bool = False) -> list[dict]:
    """Copy every cache entry the run used into `<run>/artifacts/` and check each copy against the hash
    recorded when the run used it; the manifest's `artifacts` then name the copies. Returns the entries."""
    run_dir = Path(run_dir)
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.exists():
        raise AblateError(f"{run_dir}: not a run directory (no manifest.json)")
    manifest = read_json(manifest_path)
    if "artifacts" not in manifest:
        raise AblateError(f"{manifest_path}: no 'artifacts' list (written by studies of this version); rerun the study "
                          "with --out to record them (finished stages are skipped)")
    entries = []
    for entry in manifest["artifacts"]:
        entry = dict(entry)
        target = run_dir / ARTIFACTS_DIR / entry["key"]
        if entry["kind"] == ANSWERS and not with_answers:
            entries.append({**entry, "exported": None})
            continue
        if not target.exists():
            source = cache_root() / entry["key"]
            if not source.exists():
                raise AblateError(f"{entry['key']}: not in the cache {cache_root()} any more; rerun the study to rebuild it")
            staging = target.with_name(f".{target.name}.partial")
            shutil.rmtree(staging, ignore_errors=True)
            staging.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, staging)
            else:
                shutil.copy2(source, staging)
            staging.rename(target)  # complete copies only: a crash leaves a .partial, redone next time
        sha256, size = tree_sha256(target)
        if entry.get("sha256") not in (None, sha256):
            raise AblateError(f"{entry['key']}: its content changed since the run used it (SHA-256 {sha256[:16]}, "
                              f"recorded {entry['sha256'][:16]}); the cache entry was rebuilt or extended")
        entries.append({**entry, "sha256": sha256, "bytes": size, "exported": f"{ARTIFACTS_DIR}/{entry['key']}"})
    manifest["artifacts"] = entries
    write_json(manifest_path, manifest)
    return entries
