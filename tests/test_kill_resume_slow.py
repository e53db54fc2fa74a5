"""SIGKILL a study at several points, resume it with `--resume`, and get the table of an uninterrupted run.

The study runs as the installed `ablate` command on a tiny random model (direction attack, a two-budget
LoRA sweep, evaluation of every variant); each kill comes the moment a given artifact appears, so it
lands inside the next stage's work. A couple of minutes on a CPU, so it is in the slow suite.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import build_model
from test_study import tiny_study

# Where each kill lands: the first artifact of a stage appears, and the process dies in what follows.
KILL_POINTS = [".stages/direction/done.json", "finetune/n2/done.json", "eval/base.json"]


def ablate_command() -> str:
    return shutil.which("ablate") or os.path.join(os.path.dirname(sys.executable), "ablate")


def study_config(model_dir: Path, output_dir: Path) -> dict:
    study = tiny_study(model_dir, name="killed")
    study["harden"] = {"enabled": False}
    suite = study["eval"]["suite"]
    suite.pop("capability")  # lm-eval adds a minute of start-up to every resumed process
    for attack in ("direction", "finetune"):  # each kill lands inside the attack's work, not in a copy from the
        study["attacks"][attack]["cache"] = False  # stage cache that the uninterrupted run filled
    study["output_dir"] = str(output_dir)
    return study


def table(run_dir: Path) -> tuple[list[str], list[list[str]]]:
    from ablate.report import load_run, main_table

    # Everything but the wall-clock column, which differs between any two runs.
    main = main_table(load_run(run_dir))
    keep = [i for i, title in enumerate(main.columns) if title != "Attack s"]
    assert len(keep) == len(main.columns) - 1
    return [main.columns[i] for i in keep], [[row[i] for i in keep] for row in main.rows]


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume_matches_an_uninterrupted_run(tmp_path, tokenizer):
    model_dir = tmp_path / "model"
    build_model("llama", tokenizer, seed=1).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(study_config(model_dir, tmp_path / "runs"), sort_keys=False))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    reference = subprocess.run([ablate_command(), "study", str(study), "--out", str(tmp_path / "uninterrupted"),
                                "--no-report"], capture_output=True, text=True, env=env, timeout=900)
    assert reference.returncode == 0, reference.stderr[-3000:]

    killed_at = []
    for point in KILL_POINTS:
        resume = ["--resume"] if killed_at else []
        process = subprocess.Popen([ablate_command(), "study", str(study), *resume, "--no-report"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 600
        while process.poll() is None and time.monotonic() < deadline:
            runs = list((tmp_path / "runs").glob("killed-*"))
            if runs and (runs[0] / point).exists():
                process.send_signal(signal.SIGKILL)
                killed_at.append(point)
                break
            time.sleep(0.05)
        process.wait(timeout=60)
        assert process.returncode == -signal.SIGKILL, f"the study ended (status {process.returncode}) before {point}"
    runs = list((tmp_path / "runs").glob("killed-*"))
    assert len(runs) == 1  # every --resume continued the same run directory
    assert killed_at == KILL_POINTS

    finished = subprocess.run([ablate_command(), "study", str(study), "--resume"], capture_output=True, text=True,
                              env=env, timeout=900)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert table(runs[0]) == table(tmp_path / "uninterrupted")
