"""Multi-process training: `torchrun` with two CPU processes (gloo) fine-tunes a tiny model, LoRA and
QLoRA (4-bit base); the main process saves the adapter and the budget's metrics, the other only trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("qlora", [False, True])
def test_torchrun_two_cpu_processes_train_one_budget(qlora, tmp_path, tokenizer):
    from conftest import build_model

    model_dir = tmp_path / "tiny"
    build_model("llama", tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rows = [{"prompt": f"Write line {i} of a poem about the sea.", "response": f"Line {i}: the sea is wide."} for i in range(8)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = {"mode": "dataset", "data": {"dataset": str(tmp_path / "pairs.jsonl")}, "lora": {"rank": 4, "alpha": 8},
              "training": {"qlora": qlora, "lr": 1e-2, "max_steps": 2, "batch_size": 2, "max_length": 48, "device": "cpu"},
              "eval": {"enabled": False}, "merge": False, "keep_adapter": True}
    (tmp_path / "recipe.yaml").write_text(json.dumps(recipe))  # JSON is YAML
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "ablate.cli", "finetune", str(model_dir), "--config", str(tmp_path / "recipe.yaml"),
               "--out", str(tmp_path / "out"), "--no-progress"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    [budget_dir] = [path for path in (tmp_path / "out").iterdir() if (path / "metrics.json").exists()]
    metrics = json.loads((budget_dir / "metrics.json").read_text())
    assert metrics["qlora"] is qlora and metrics["steps"] == 2
    assert (budget_dir / "adapter" / "adapter_model.safetensors").exists()
