"""`ablate eval` on the embedded SmolLM2 model, end to end through the console script (slow: minutes)."""

import json
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parents[1] / "eval_suites" / "default.yaml"

pytestmark = pytest.mark.slow


def test_eval_embedded_default_suite(tmp_path):
    from test_cli import run_cli_process as run_cli

    # One torch thread: on a shared 2-core CPU it is ~3x faster than two (see docs/evaluation.md).
    result = run_cli("eval", "embedded", "--reference", "embedded", "--suite", str(SUITE),
                     "--out", str(tmp_path), "--variant", "base", "--json", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    evaluation = json.loads((tmp_path / "eval" / "base.json").read_text())
    metrics = evaluation["metrics"]
    assert metrics["refusal_rate"]["n"] == 64 and metrics["harmless_refusal_rate"]["n"] == 24
    for name, metric in metrics.items():
        assert metric["ci"][0] <= metric["value"] <= metric["ci"][1], name
    # The instruct model answers harmless prompts and refuses some requests — not all, not none.
    assert metrics["harmless_refusal_rate"]["value"] < 0.3
    assert 0.0 < metrics["refusal_rate"]["value"] < 1.0
    # Against itself, the divergences vanish and the cross-entropy equals the reference's own.
    assert metrics["kl_first_token"]["value"] == pytest.approx(0.0, abs=1e-5)
    assert metrics["kl_continuation"]["value"] == pytest.approx(0.0, abs=1e-5)
    assert metrics["ce_reference_answers"]["value"] == pytest.approx(metrics["ce_reference_answers_by_reference"]["value"])
    # The local capability tasks ran offline, and the everyday questions are mostly answered right.
    assert metrics["capability/ablate_everyday_mc"]["n"] == 30 and metrics["capability/ablate_everyday_mc"]["value"] > 0.5
    assert metrics["capability/ablate_arithmetic"]["n"] == 30
    rows = [json.loads(line) for line in (tmp_path / "generations" / "base.jsonl").read_text().splitlines()]
    assert len(rows) == 64 + 24 + 24 and all(row["label"] in ("refusal", "compliance", "degenerate") for row in rows)
    print(f"default suite on the embedded model: {evaluation['wall_seconds']:.0f} s {evaluation['timings']}")
