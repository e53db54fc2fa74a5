"""Work shared across a study's evaluations: the eval cache, and the reference's log-probabilities."""

from __future__ import annotations

import json

import pytest
import torch

from ablate.artifacts import write_json


def fake_evaluation(run_dir, variant, model_name, calls):
    def evaluate():
        calls.append(variant)
        result = {"variant": variant, "model": model_name, "metrics": {"refusal_rate": {"value": 0.25}}}
        write_json(run_dir / "eval" / f"{variant}.json", result)
        (run_dir / "generations").mkdir(parents=True, exist_ok=True)
        (run_dir / "generations" / f"{variant}.jsonl").write_text('{"id": "a", "label": "refusal"}\n')
        return result

    return evaluate


def test_an_evaluation_with_the_same_key_is_copied_not_rerun(tmp_path):
    from ablate.evaluate.cache import cached_eval, eval_cache_key

    calls: list[str] = []
    key = eval_cache_key({"variant": "abc", "reference": "def", "suite": {"n": 1}, "redact": False, "name": "lora-n1"})
    first_run, second_run = tmp_path / "run1", tmp_path / "run2"
    first, hit = cached_eval(key, first_run, "lora-n1", str(first_run / "model"),
                             fake_evaluation(first_run, "lora-n1", str(first_run / "model"), calls))
    assert not hit and calls == ["lora-n1"]
    second, hit = cached_eval(key, second_run, "lora-n1", str(second_run / "model"),
                              fake_evaluation(second_run, "lora-n1", str(second_run / "model"), calls))
    assert hit and calls == ["lora-n1"]  # not evaluated again
    assert second["metrics"] == first["metrics"]
    assert second["model"] == str(second_run / "model")  # this run's folder, not the first run's
    assert json.loads((second_run / "eval" / "lora-n1.json").read_text()) == second
    assert (second_run / "generations" / "lora-n1.jsonl").read_text() == (first_run / "generations" / "lora-n1.jsonl").read_text()


def test_the_key_changes_with_every_input_and_the_tasks(tmp_path):
    from ablate.evaluate.cache import eval_cache_key

    inputs = {"variant": "abc", "reference": "def", "suite": {"n": 1}, "redact": False, "name": "base"}
    keys = {eval_cache_key(inputs)}
    for field, value in (("variant", "abd"), ("reference", "deg"), ("suite", {"n": 2}), ("redact", True), ("name", "organism")):
        keys.add(eval_cache_key({**inputs, field: value}))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "task.yaml").write_text("task: t\n")
    keys.add(eval_cache_key(inputs, tasks))
    (tasks / "t.jsonl").write_text('{"q": 1}\n')
    keys.add(eval_cache_key(inputs, tasks))
    assert len(keys) == 8


def test_reference_log_probs_are_computed_once_per_reference_and_unchanged(tokenizer, llama, monkeypatch):
    from conftest import build_model

    import ablate.evaluate.divergence as divergence

    prompts = ["Write a short poem about the sea.", "Explain photosynthesis.", "List three tips for studying."]
    model = build_model("llama", tokenizer)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.add_(0.05)
    fresh = divergence.divergence_per_prompt(model, tokenizer, llama, tokenizer, prompts, continuation_tokens=5,
                                             batch_size=2, progress=False)
    calls = []
    original = divergence.teacher_forced_log_probs

    def counting(model_, *args, **kwargs):
        calls.append(model_ is llama)
        return original(model_, *args, **kwargs)

    monkeypatch.setattr(divergence, "teacher_forced_log_probs", counting)
    again = divergence.divergence_per_prompt(model, tokenizer, llama, tokenizer, prompts, continuation_tokens=5,
                                             batch_size=2, progress=False)
    assert calls == [False, False]  # two batches of the model; the reference's are stored
    assert again == fresh
    monkeypatch.setattr(divergence, "REFERENCE_LOG_PROBS_BYTES", 0)  # nothing more is stored past the cap
    divergence._REFERENCE_LOG_PROBS.clear()
    calls.clear()
    divergence.divergence_per_prompt(model, tokenizer, llama, tokenizer, prompts, continuation_tokens=5, batch_size=2,
                                     progress=False)
    divergence.divergence_per_prompt(model, tokenizer, llama, tokenizer, prompts, continuation_tokens=5, batch_size=2,
                                     progress=False)
    assert calls.count(True) == 4
