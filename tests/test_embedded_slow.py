"""End-to-end checks of the foundation on the embedded SmolLM2-135M-Instruct (converted from its GGUF file)."""

import json

import pytest

from test_cli import run_cli_process as run_cli

pytestmark = pytest.mark.slow


def test_embedded_model_converts_loads_and_describes():
    result = run_cli("models", "embedded", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["family"] == "llama" and info["layers"] == 30 and info["d_model"] == 576
    assert info["chat_template"] is True


def test_generate_embedded_harmless_and_refusal(tmp_path):
    out = tmp_path / "harmless.jsonl"
    result = run_cli("generate", "embedded", "--prompts", "harmless:test", "--limit", "8", "--max-new-tokens", "32",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 8
    # Sensible completions: non-empty text, mostly words, and not refusals of harmless requests.
    assert all(len(row["completion"].split()) >= 3 for row in rows)
    assert sum(row["refusal"] for row in rows) <= 2
    result = run_cli("generate", "embedded", "--prompts", "refusal:test", "--limit", "8", "--max-new-tokens", "32",
                     "--out", str(tmp_path / "refusal.jsonl"))
    assert result.returncode == 0, result.stderr
    assert "refusal rate:" in result.stdout
