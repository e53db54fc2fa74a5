"""The CLI through its real entry point (a subprocess running the `ablate` console script)."""

import json
import os
import shutil
import subprocess
import sys

import pytest


def run_cli(*args, env=None, cwd=None, timeout=600):
    exe = shutil.which("ablate") or os.path.join(os.path.dirname(sys.executable), "ablate")
    return subprocess.run([exe, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd,
                          timeout=timeout)


def test_help_lists_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("models", "data", "generate"):
        assert command in result.stdout


def test_data_lists_builtin_and_registry():
    result = run_cli("data", "--json")
    assert result.returncode == 0, result.stderr
    names = {row["name"]: row for row in json.loads(result.stdout)}
    assert names["refusal:test"]["n"] > 50
    assert "harmless_forms:train" in names and "harmless_forms:test" not in names  # train-only set: no empty rows
    assert "advbench" in names


def test_unknown_model_spec_is_one_line_error():
    result = run_cli("models", "./no/such/model")
    assert result.returncode == 2
    assert "no/such/model" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_generate_on_local_tiny_model(tmp_path, tokenizer, tiny_models):
    tiny_models["llama"].save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "gens.jsonl"
    result = run_cli("generate", str(tmp_path / "tiny"), "--prompts", "refusal:test", "--limit", "4",
                     "--max-new-tokens", "4", "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and {"id", "prompt", "completion", "refusal"} <= set(rows[0])
    assert "refusal rate:" in result.stdout


def test_generate_missing_prompt_file_is_one_line_error(tmp_path):
    result = run_cli("generate", "embedded", "--prompts", str(tmp_path / "nope.jsonl"))
    assert result.returncode == 2
    assert "prompt file not found" in result.stderr and "Traceback" not in result.stderr
