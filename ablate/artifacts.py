"""Small helpers every stage shares: atomic writes, JSON I/O, fingerprints and `done.json` markers.

The resume mechanism of the whole toolkit is here: a stage computes a fingerprint of its inputs,
and writes `done.json` (fingerprint + metrics) *last*, after all its artifacts are in place. A stage
directory whose `done.json` holds the same fingerprint is finished and is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

DONE_FILE = "done.json"


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and a rename.

    A crash leaves either the old file or the new one, never a truncated file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "model_dump"):  # pydantic models
        return value.model_dump(mode="json")
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    text = "".join(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n" for row in rows)
    return atomic_write_text(path, text)


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def fingerprint(obj: Any) -> str:
    """SHA-256 (first 16 hex digits) of a JSON-serialisable object, with sorted keys."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def is_done(stage_dir: str | Path, input_fingerprint: str) -> bool:
    """True when `stage_dir/done.json` exists and records the same input fingerprint."""
    marker = Path(stage_dir) / DONE_FILE
    if not marker.exists():
        return False
    try:
        return read_json(marker).get("fingerprint") == input_fingerprint
    except (json.JSONDecodeError, OSError):
        return False


def mark_done(stage_dir: str | Path, input_fingerprint: str, **info: Any) -> Path:
    """Write `done.json` last: the stage's artifacts are complete and match `input_fingerprint`."""
    return write_json(Path(stage_dir) / DONE_FILE, {"fingerprint": input_fingerprint, **info})


def read_done(stage_dir: str | Path) -> dict | None:
    marker = Path(stage_dir) / DONE_FILE
    return read_json(marker) if marker.exists() else None


def save_figure(figure, path: Path) -> Path:
    """A matplotlib figure as a PNG (130 dpi, tight box), written atomically; the figure is closed."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=130, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    plt.close(figure)
    return path
