"""What `ablate` may write, what Ctrl-C says, partial reports and over-long prompts (the good paths of the
guards whose refusals tests/test_bad_inputs.py checks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ablate import AblateError
from ablate.cli import main
from ablate.safety import MARKER, check_eval_result, check_output_dir, claim_output_dir


def run_main(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exited:
        main([str(arg) for arg in argv])
    return exited.value.code


def test_output_dir_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    check_output_dir(tmp_path / "new")  # does not exist yet
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.md").write_text("mine")
    with pytest.raises(AblateError, match="not empty"):
        check_output_dir(tmp_path / "mine")
    check_output_dir(tmp_path / "mine", overwrite=True)
    claim_output_dir(tmp_path / "ours")
    (tmp_path / "ours" / "result.json").write_text("{}")
    check_output_dir(tmp_path / "ours")  # ablate's own output: a rerun may write into it
    with pytest.raises(AblateError, match="working directory"):
        check_output_dir(".", overwrite=True)
    with pytest.raises(AblateError, match="working directory"):
        check_output_dir(tmp_path.parent, overwrite=True)
    with pytest.raises(AblateError, match="input"):
        check_output_dir(tmp_path / "ours" / "sub", overwrite=True, inputs=[tmp_path / "ours"])


def test_a_marker_being_written_by_another_process_is_not_a_users_file(tmp_path):
    # The processes of a distributed launch claim one --out at once: one may check while another's marker is
    # still its temporary file.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / f".{MARKER}.k3j2x9.tmp").write_text("{")  # the name atomic_write_text gives it
    check_output_dir(tmp_path / "out")
    (tmp_path / "out" / "notes.tmp").write_text("mine")
    with pytest.raises(AblateError, match="not empty"):
        check_output_dir(tmp_path / "out")


def test_eval_result_of_another_model_is_kept(tmp_path):
    (tmp_path / "n1" / "model").mkdir(parents=True)
    (tmp_path / "n4" / "model").mkdir(parents=True)
    (tmp_path / "out" / "eval").mkdir(parents=True)
    result = tmp_path / "out" / "eval" / "model.json"
    result.write_text(json.dumps({"model": str(tmp_path / "n1" / "model"), "metrics": {}}))  # an older result: no model_spec
    check_eval_result(tmp_path / "out", "model", str((tmp_path / "n1" / "model").resolve()))  # same model: a rerun
    with pytest.raises(AblateError, match="another model"):
        check_eval_result(tmp_path / "out", "model", str((tmp_path / "n4" / "model").resolve()))
    check_eval_result(tmp_path / "out", "model", str(tmp_path / "n4" / "model"), overwrite=True)


def test_abliterate_with_overwrite_keeps_the_users_files(tmp_path, tokenizer):
    from conftest import build_model

    build_model("llama", tokenizer).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    direction = tmp_path / "direction"
    direction.mkdir()
    torch.save(torch.randn(32), direction / "direction.pt")
    (direction / "selected.json").write_text(json.dumps({"layer": 1, "position": -1}))
    (direction / "done.json").write_text(json.dumps({"fingerprint": "f"}))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.md").write_text("do not delete")
    args = ["abliterate", tmp_path / "tiny", "--direction", direction, "--out", mine]
    assert run_main(args) == 2  # not ablate's folder
    assert run_main(args + ["--overwrite"]) == 0
    assert (mine / "notes.md").read_text() == "do not delete"
    assert (mine / "model.safetensors").exists() and (mine / MARKER).exists()
    assert run_main(args) == 0  # now marked as ablate's output: a rerun needs no --overwrite
    assert (mine / "notes.md").read_text() == "do not delete"


def test_an_os_error_or_a_bug_is_one_line(tmp_path, monkeypatch, capsys):
    import ablate.study

    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "locked"))

    def bug(*args, **kwargs):
        raise ValueError("something broke\nsecond line")

    for raiser, code, expected in [(unreadable, 2, f"{tmp_path / 'locked'}: Permission denied"),
                                   (bug, 1, "internal error ValueError: something broke")]:
        monkeypatch.setattr(ablate.study, "run_study", raiser)
        assert run_main(["study", "default", "--out", tmp_path / "run"]) == code
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and expected in lines[0], lines


def test_ctrl_c_says_what_was_kept_and_how_to_resume(tmp_path, monkeypatch, capsys):
    import ablate.study

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ablate.study, "run_study", interrupted)
    assert run_main(["study", "default", "--out", tmp_path / "run"]) == 130
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1
    assert "kept" in lines[0] and f"ablate study default --out {tmp_path / 'run'}" in lines[0]


def fake_run(root: Path, status: str) -> Path:
    entry = {"value": 0.5, "ci": [0.2, 0.8], "n": 4, "method": "wilson"}
    manifest = {"study": "s", "status": status, "config_source": "s.yaml",
                "config_resolved": {"study": {"harden": {"enabled": False}}, "direction": {"kl_max": 0.1},
                                    "finetune": None, "suite": {"name": "default"}}}
    (root / "eval").mkdir(parents=True)
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / "eval" / "base.json").write_text(json.dumps({"metrics": {"refusal_rate": entry}}))
    (root / ".stages" / "eval-base").mkdir(parents=True)
    (root / ".stages" / "eval-base" / "done.json").write_text("{}")
    return root


def test_partial_report_lists_what_is_missing(tmp_path, capsys):
    run = fake_run(tmp_path / "run", "running")
    assert run_main(["report", run]) == 2
    assert not (run / "report.md").exists()
    assert run_main(["report", run, "--partial"]) == 0
    page = (run / "report.md").read_text()
    assert "Incomplete run" in page and "ablated" in page and "direction" in page
    assert "Incomplete run" in (run / "report.html").read_text()


def test_prompt_beyond_the_context_window_is_cut_with_a_warning(llama, tokenizer, capsys):
    from ablate.config import GenerationConfig
    from ablate.generation import generate

    long_prompt = "Explain how photosynthesis works in simple terms. " * 40
    config = GenerationConfig(max_new_tokens=8, prompt_too_long="truncate")
    completions = generate(llama, tokenizer, [long_prompt, "Hello"], config, progress=False)
    assert len(completions) == 2
    assert "1 prompt(s) longer than the model's context window (256 tokens" in capsys.readouterr().err
    with pytest.raises(AblateError, match="prompt 1 .* exceed the model's context window of 256 tokens"):
        generate(llama, tokenizer, [long_prompt], GenerationConfig(max_new_tokens=8), progress=False)
