"""Guards around the user's files: what a command may write, checked before any work starts.

Every folder `ablate` creates for its output holds a small marker file, `.ablate-output.json`.
A command that writes into a folder accepts it when it does not exist yet, is empty, or carries
that marker (its own earlier output: a rerun resumes or refreshes it). Any other non-empty folder
is the user's, and is refused unless `--overwrite` is given; even then `ablate` only writes its
own file names into it and deletes nothing it did not write. An output *file* that already exists
is replaced only with `--overwrite`.

    from ablate.safety import check_output_dir, claim_output_dir
    check_output_dir(out, overwrite=False, inputs=[direction_dir])   # before loading anything
    ...                                                              # validate inputs, load the model
    claim_output_dir(out)                                            # create it, write the marker
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ablate import AblateError, __version__

MARKER = ".ablate-output.json"
# Folders written by earlier versions, before the marker existed: a run directory has its manifest.
LEGACY_MARKERS = ("manifest.json",)


def is_ablate_output(folder: str | Path) -> bool:
    """True when `folder` was created by `ablate` (it holds the marker, or a run manifest)."""
    folder = Path(folder)
    return any((folder / name).is_file() for name in (MARKER, *LEGACY_MARKERS))


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def _holds_files(folder: Path) -> bool:
    """True when `folder` holds anything but a marker being written (its temporary file, seen when the processes
    of a distributed launch claim the same folder at once, or left by a crash)."""
    return any(not (entry.name.startswith(f".{MARKER}.") and entry.name.endswith(".tmp")) for entry in folder.iterdir())


def _check_writable(path: Path, what: str) -> None:
    """The folder that would receive `path` exists (or can be created) and accepts writes."""
    ancestor = _nearest_existing(path.parent if not path.exists() else path)
    if not ancestor.is_dir():
        raise AblateError(f"{what} '{path}': '{ancestor}' is a file, so no folder can be created there")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise AblateError(f"{what} '{path}': '{ancestor}' does not accept writes (permission denied or read-only)")


def _same_or_inside(a: Path, b: Path) -> bool:
    """True when `a` is `b` or lies inside it (both resolved)."""
    try:
        a, b = a.resolve(), b.resolve()
    except OSError:
        return False
    return a == b or b in a.parents


def check_output_dir(out: str | Path, *, overwrite: bool = False, what: str = "--out",
                     inputs: list[str | Path] | tuple = ()) -> Path:
    """Refuse an output folder that would put a user's files at risk; writes nothing.

    Refused always: a file where a folder is expected, the working directory or the home folder or
    one above them, an input of the command (or a folder inside one), a folder without write access. Refused unless `overwrite`: a non-empty folder that `ablate` did not create.
    """
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise AblateError(f"{what} '{out}': a file is there; expected a folder (or a path that does not exist yet)")
    for protected in (Path.cwd(), Path.home()):
        if _same_or_inside(protected, out):
            raise AblateError(f"{what} '{out}': that is the working directory, the home folder or a folder above them; "
                              "give a new folder, e.g. --out runs/mine")
    for item in inputs:
        if item is not None and Path(item).exists() and _same_or_inside(out, Path(item)):
            raise AblateError(f"{what} '{out}': it is (or lies inside) the input '{item}'; give another folder")
    _check_writable(out, what)
    if out.is_dir() and _holds_files(out) and not is_ablate_output(out) and not overwrite:
        raise AblateError(f"{what} '{out}': folder is not empty and was not written by ablate (no {MARKER}); "
                          "give a new or empty folder, or pass --overwrite to write ablate's files into it "
                          "(nothing else in it is deleted)")
    return out


def claim_output_dir(out: str | Path, command: str = "") -> Path:
    """Create `out` (if needed) and write the marker that makes it recognisably ablate's output."""
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    marker = out / MARKER
    if not marker.exists():
        from ablate.artifacts import atomic_write_text

        atomic_write_text(marker, json.dumps({"written_by": "ablate", "version": __version__,
                                               "command": command}, indent=2) + "\n")
    return out


def check_output_file(out: str | Path, *, overwrite: bool = False, what: str = "--out") -> Path:
    """Refuse an output file path that is a folder, cannot be written, or exists (unless `overwrite`)."""
    out = Path(out).expanduser()
    if out.is_dir():
        raise AblateError(f"{what} '{out}': a folder is there; expected a file name")
    if out.exists() and not overwrite:
        raise AblateError(f"{what} '{out}': file exists; pass --overwrite to replace it, or give another name")
    _check_writable(out, what)
    return out


def model_identity(spec: str) -> str:
    """A model spec as an identity: a local folder or file by its absolute path, anything else as given."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if spec != "embedded" and path.exists() else spec


def _same_model(recorded: str, identity: str) -> bool:
    if recorded == identity:
        return True
    try:  # results written before identities were recorded hold the path as the model was loaded
        return Path(recorded).expanduser().exists() and Path(recorded).expanduser().resolve() == Path(identity).resolve()
    except OSError:
        return False


def check_eval_result(out: str | Path, variant: str, identity: str, *, overwrite: bool = False) -> None:
    """Refuse to replace `out/eval/<variant>.json` when it holds another model's results (unless `overwrite`)."""
    from ablate.artifacts import read_json

    path = Path(out) / "eval" / f"{variant}.json"
    if overwrite or not path.exists():
        return
    result = read_json(path)
    recorded = (result.get("model_spec") or result.get("model")) if isinstance(result, dict) else None
    if recorded is None or not _same_model(str(recorded), identity):
        raise AblateError(f"{path}: holds the results of another model ({recorded or 'unknown'}), not {identity}; "
                          "give this one its own name with --variant NAME, or pass --overwrite to replace them")
