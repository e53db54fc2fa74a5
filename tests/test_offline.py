"""Offline by default: the fast command paths open no network connection when only local things are named.

One subprocess (a clean interpreter, without the test suite's HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)
patches socket creation to fail and to record who asked, then runs several `ablate` command lines
through `ablate.cli.main`, the console script's function. The evaluation includes a capability task,
which loads its data through `datasets`: that library pings the hub on every load unless told not to.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import build_model

REPO = Path(__file__).resolve().parents[1]

GUARD = r"""
import json, socket, sys
attempts = []

def refuse(name):
    def blocked(*args, **kwargs):
        attempts.append(f"{name}{args[1:2] if name.startswith('socket.') else args[:1]}")
        raise OSError(101, "network is unreachable (blocked by the offline test)")
    return blocked

socket.socket.connect = refuse("socket.connect")
socket.socket.connect_ex = refuse("socket.connect_ex")
socket.create_connection = refuse("create_connection")
socket.getaddrinfo = refuse("getaddrinfo")

from ablate.cli import main

codes = []
for argv in json.loads(sys.argv[1]):
    try:
        main(argv)
    except SystemExit as exited:
        codes.append(exited.code)
print("RESULT " + json.dumps({"codes": codes, "attempts": attempts}))
"""


def test_local_commands_touch_no_network(tmp_path, tokenizer):
    model_dir = tmp_path / "tiny"
    build_model("llama", tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({
        "name": "offline", "refusal": {"set": "refusal:test", "n": 2}, "harmless": None, "borderline": None,
        "generation": {"max_new_tokens": 2}, "bootstrap_samples": 100,
        "capability": {"tasks": [{"name": "ablate_everyday_mc", "limit": 2}],
                       "include_path": str(REPO / "eval_suites" / "tasks")},
    }))
    commands = [
        ["data", "--json"],
        ["models", str(model_dir), "--json"],
        ["generate", str(model_dir), "-p", "refusal:test", "--limit", "2", "--max-new-tokens", "2",
         "--out", str(tmp_path / "gens.jsonl")],
        ["eval", str(model_dir), "--suite", str(suite), "--out", str(tmp_path / "eval"), "--json"],
    ]
    env = {key: value for key, value in os.environ.items()
           if key not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_UPDATE_DOWNLOAD_COUNTS",
                          "HF_HUB_DISABLE_TELEMETRY")}
    env["HF_HOME"] = str(tmp_path / "hf-home")  # an empty hub cache: nothing to fall back on
    result = subprocess.run([sys.executable, "-c", GUARD, json.dumps(commands)], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=600)
    line = next((line for line in result.stdout.splitlines() if line.startswith("RESULT ")), None)
    assert line is not None, result.stderr[-3000:]
    outcome = json.loads(line[len("RESULT "):])
    assert outcome["attempts"] == [], outcome["attempts"]
    assert outcome["codes"] == [0] * len(commands), result.stderr[-3000:]
    assert (tmp_path / "eval" / "eval" / "tiny.json").exists()


def test_bitsandbytes_fetches_no_hub_kernel_through_ablate(tmp_path):
    # bitsandbytes 0.50 asks the Hub for a kernel when it is imported on a CPU with AVX512-BF16 (or on MPS); after
    # ablate's model layer is imported, that request is refused before it reaches the network.
    pytest.importorskip("kernels")
    script = GUARD.split("from ablate.cli import main")[0] + (
        "import ablate.models, kernels\n"
        "from ablate.compat import UNASKED_HUB_KERNELS\n"
        "refused = []\n"
        "for repo in UNASKED_HUB_KERNELS:\n"
        "    try:\n"
        "        kernels.get_kernel(repo, version=1)\n"
        "    except RuntimeError as error:\n"
        "        refused.append('does not fetch' in str(error))\n"
        "import bitsandbytes\n"
        "print('RESULT ' + json.dumps({'refused': refused, 'attempts': attempts}))\n")
    env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_HOME"] = str(tmp_path / "hf-home")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=300)
    line = next((line for line in result.stdout.splitlines() if line.startswith("RESULT ")), None)
    assert line is not None, result.stderr[-3000:]
    outcome = json.loads(line[len("RESULT "):])
    assert outcome == {"refused": [True, True], "attempts": []}
