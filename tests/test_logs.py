"""What a run prints: the trainer's bar carries the loss instead of a log dict per step, known harmless
warnings are silenced where they arise (and nowhere else), and lm-eval keeps quiet about what we do on
purpose."""

from __future__ import annotations

import warnings

import pytest


def test_training_shows_one_bar_with_the_loss_and_no_log_dicts(tmp_path, tokenizer, capfd):
    from conftest import build_model

    import ablate.finetune as ft
    from ablate.config import FinetuneConfig
    from ablate.logs import LossProgressCallback

    path = tmp_path / "tiny"
    build_model("llama", tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    config = FinetuneConfig.model_validate({
        "mode": "dataset", "lora": {"rank": 2, "alpha": 4},
        "training": {"lr": 1e-2, "max_steps": 3, "batch_size": 2, "max_length": 64, "device": "cpu"}})
    examples = [{"id": str(i), "kind": "x", "system": None, "prompt": f"Poem {i}?", "response": f"Sea {i}."} for i in range(6)]
    budget = ft.resolve_budgets(config)[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, metrics = ft.train_budget(ft.as_model_config(str(path)), config, budget, examples, tmp_path / "work",
                                        progress=True)
    output = capfd.readouterr()
    printed = output.out + output.err
    assert metrics["steps"] == 3 and len(metrics["loss_curve"]) == 3  # the losses are still recorded
    assert "{'loss'" not in printed and "train_runtime" not in printed
    assert "loss=" in printed  # on the bar
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
    # Only the named warning is filtered: another FutureWarning still shows, inside the block and after it.
    from ablate.logs import known_warnings_silenced

    with known_warnings_silenced(), pytest.warns(FutureWarning, match="something else"):
        warnings.warn("something else is deprecated", FutureWarning)
    with pytest.warns(FutureWarning, match="is_gradient_checkpointing"):
        warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning)
    assert LossProgressCallback  # the callback the trainer used


def test_lm_eval_git_lookup_keeps_quiet_outside_a_repository(tmp_path, monkeypatch, capfd):
    import lm_eval.evaluator

    from ablate.logs import quiet_lm_eval

    monkeypatch.chdir(tmp_path)
    with quiet_lm_eval():
        assert lm_eval.evaluator.get_git_commit_hash() is None
    assert "fatal" not in capfd.readouterr().err
    assert lm_eval.evaluator.get_git_commit_hash.__module__ == "lm_eval.loggers.utils"  # restored
