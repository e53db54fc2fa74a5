"""The stage entry points (`ablate.stages`): one done-marker mechanism, and `run_<stage>(config, run_dir)` on a tiny
random model — artifacts written, the marker written last, a second call skipped without loading the model."""

from __future__ import annotations

import json

import pytest

from ablate.config import DirectionConfig, DirectionRun, EvalRun, EvalSuite, ModelConfig


def test_run_once_skips_a_stage_whose_marker_holds_the_same_fingerprint(tmp_path):
    from ablate.stages import run_once, stage_dir

    calls = []

    def work():
        calls.append(1)
        return {"value": len(calls)}

    first = run_once(tmp_path, "step", {"a": 1}, work)
    again = run_once(tmp_path, "step", {"a": 1}, work)
    changed = run_once(tmp_path, "step", {"a": 2}, work)
    assert (first.result, first.skipped) == ({"value": 1}, False)
    assert (again.result, again.skipped, again.fingerprint) == ({"value": 1}, True, first.fingerprint)
    assert (changed.result, changed.skipped) == ({"value": 2}, False) and len(calls) == 2
    marker = json.loads((stage_dir(tmp_path, "step") / "done.json").read_text())
    assert marker["fingerprint"] == changed.fingerprint and marker["result"] == {"value": 2}


def test_a_failed_stage_leaves_no_marker(tmp_path):
    from ablate.stages import run_once, stage_dir

    def broken():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        run_once(tmp_path, "step", {}, broken)
    assert not (stage_dir(tmp_path, "step") / "done.json").exists()


def test_run_direction_and_run_eval_on_a_run_directory(tiny_dir, tmp_path, monkeypatch):
    from ablate import models
    from ablate.stages import run_direction, run_eval

    model = ModelConfig(spec=str(tiny_dir), device="cpu")
    direction = DirectionConfig(n_train=4, n_val=4, shortlist=2, refusal_token_prompts=2, refusal_token_max_new_tokens=2,
                                batch_size=4, strength_learning={"enabled": False}, strength_search=[])
    with pytest.warns(UserWarning):  # a random model refuses nothing: the packaged refusal openers stand in
        result = run_direction(DirectionRun(model=model, direction=direction), tmp_path, progress=False)
    assert result["selected"] == json.loads((tmp_path / "directions" / "selected.json").read_text())
    assert (tmp_path / ".stages" / "direction" / "done.json").exists()
    suite = EvalSuite(name="tiny", refusal={"set": "refusal:test", "n": 2}, harmless={"set": "harmless:test", "n": 2},
                      borderline=None, generation={"max_new_tokens": 2, "batch_size": 4}, kl={"n": 2, "continuation_tokens": 2},
                      length={"enabled": False}, bootstrap_samples=100)
    stage = EvalRun(model=model, variant="ablated", suite=suite, reference=model, direction=str(tmp_path / "directions"),
                    cache=False)
    evaluated = run_eval(stage, tmp_path, progress=False)
    metrics = json.loads((tmp_path / "eval" / "ablated.json").read_text())["metrics"]
    assert evaluated["summary"] == {name: entry["value"] for name, entry in metrics.items()}
    assert "kl_first_token" in metrics  # the reference is the model without its direction ablated

    def no_loading(*args, **kwargs):
        raise AssertionError("a finished stage loads no model")

    monkeypatch.setattr(models, "load_model", no_loading)
    assert run_direction(DirectionRun(model=model, direction=direction), tmp_path, progress=False) == result
    assert run_eval(stage, tmp_path, progress=False) == evaluated
