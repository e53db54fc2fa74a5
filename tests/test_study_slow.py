"""The default study end to end on the embedded SmolLM2 organism, through the real CLI (slow: minutes)."""

import json
import re

import pytest

from test_cli import run_cli_process as run_cli

pytestmark = pytest.mark.slow


def test_default_study_end_to_end_then_resume(organism_cache, tmp_path):
    # organism_cache holds the embedded model hardened once per session: the study's harden stage hits it.
    out = tmp_path / "default-run"
    cache = {"ABLATE_CACHE": str(organism_cache)}
    result = run_cli("study", "--out", str(out), env=cache, timeout=3600)  # ~10 min on 2 cores
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    metrics = {path.stem: json.loads(path.read_text())["metrics"] for path in (out / "eval").glob("*.json")}
    refusal = {variant: values["refusal_rate"]["value"] for variant, values in metrics.items()}
    # Hardening adds refusal; both attacks strip most of it.
    assert refusal["organism"] >= 0.8 and refusal["organism"] >= refusal["base"] + 0.3, refusal
    assert refusal["ablated"] <= refusal["organism"] - 0.5, refusal
    largest_budget = max((v for v in refusal if v.startswith("lora-")), key=lambda v: int(v.split("-n")[-1]))
    assert refusal[largest_budget] <= refusal["organism"] - 0.5, refusal
    assert metrics["ablated"]["kl_first_token"]["value"] >= 0.0
    for name in ("report.md", "report.html", "tables.tex", "figures/refusal_vs_budget.png"):
        assert (out / name).exists(), name
    assert re.search(r"^\| organism +\|", (out / "report.md").read_text(), re.MULTILINE)

    # A second run over the same directory skips every stage and reports identical numbers.
    again = run_cli("study", "--out", str(out), env=cache, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(stage["skipped"] for stage in manifest["stages"].values())
    assert {path.stem: json.loads(path.read_text())["metrics"]["refusal_rate"]["value"]
            for path in (out / "eval").glob("*.json")} == refusal
