"""The CLI through its real entry point (a subprocess running the `ablate` console script)."""

import json
import os
import shutil
import subprocess
import sys

import pytest


def run_cli_process(*args, env=None, cwd=None, timeout=600):
    """The installed `ablate` executable in a child process, as a user runs it (3–6 s of start-up each)."""
    exe = shutil.which("ablate") or os.path.join(os.path.dirname(sys.executable), "ablate")
    return subprocess.run([exe, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd,
                          timeout=timeout)


def run_cli(*args, env=None, cwd=None, timeout=None):
    """A command line through `ablate.cli.main` (what the console script calls), in this process: its exit
    status, stdout and stderr, like `run_cli_process` without the child's start-up. `env` is applied for the
    call and restored after it; `timeout` is accepted for the same signature and ignored."""
    import contextlib
    import io

    from ablate.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = {key: os.environ.get(key) for key in env or {}}
    previous = os.getcwd()
    code = 0
    try:
        os.environ.update(env or {})
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([str(arg) for arg in args])
            except SystemExit as exited:
                code = exited.code if isinstance(exited.code, int) else (0 if exited.code is None else 1)
    finally:
        os.chdir(previous)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def test_help_lists_commands():
    result = run_cli_process("--help")  # the installed console script itself
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
    assert "refusal rate:" in result.stdout and "category" not in result.stdout  # one category: no breakdown
    two = run_cli("generate", str(tmp_path / "tiny"), "--prompts", "refusal:val[category=fraud_scams,petty_theft]",
                  "--max-new-tokens", "2", "--out", str(tmp_path / "two.jsonl"))
    assert two.returncode == 0, two.stderr
    by_category = [line for line in two.stdout.splitlines() if "fraud_scams" in line or "petty_theft" in line]
    assert len(by_category) == 2 and all(" 10 " in line for line in by_category), two.stdout


def test_generate_missing_prompt_file_is_one_line_error(tmp_path):
    result = run_cli("generate", "embedded", "--prompts", str(tmp_path / "nope.jsonl"))
    assert result.returncode == 2
    assert "prompt file not found" in result.stderr and "Traceback" not in result.stderr
