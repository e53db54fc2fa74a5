"""The prepared GPU run (benchmarks/bench_models_gpu.py) works end to end, here with a tiny shape on the CPU:
a 4-bit load, the direction stage on it (hooks), QLoRA, streaming abliteration."""

from __future__ import annotations

import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_models_gpu.py"


def test_bench_models_gpu_tiny_runs_every_step(tmp_path, monkeypatch):
    import runpy

    out = tmp_path / "figures.json"
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--tiny", "--steps", "2", "--work", str(tmp_path / "work"), "--out", str(out)])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    figures = json.loads(out.read_text())
    assert figures["device"] == "cpu" and figures["shape"] == "tiny"
    for step in ("build", "load_4bit", "direction", "qlora"):
        assert figures[step]["seconds"] > 0 and figures[step]["peak_gib"] > 0
    assert figures["stream"]["projected_tensors"] == 1 + 2 * 2  # the embedding and both writers of 2 layers
    assert (tmp_path / "work" / "streamed" / "config.json").exists()
    assert (tmp_path / "work" / "directions" / "direction.pt").exists()  # the direction stage ran on the 4-bit model
