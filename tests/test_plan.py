"""`ablate study --plan`: loads, precision, estimated memory and devices per stage; a study that cannot fit
the (injected) hardware stops before any work with one line naming the stage and the shortfall."""

from __future__ import annotations

import pytest

from ablate import AblateError
from ablate.plan import GIB, parse_hardware, parse_size, plan_study
from ablate.study import resolve_study, run_study

H100 = "cuda:0=79GiB"  # what one 80 GB H100 reports as its total memory (79.2 GiB)


@pytest.mark.parametrize("study", ["llama3_8b_gpu", "llama3_70b_qlora"])
def test_shipped_gpu_studies_fit_one_80gb_gpu(study):
    shape, plans = plan_study(resolve_study(study), parse_hardware(H100))
    assert shape is not None and {plan.stage for plan in plans} >= {"direction", "finetune", "eval"}
    for plan in plans:
        assert plan.fits, plan
        assert plan.devices == ["cuda:0"] and plan.peak_bytes > 10 * GIB
    if study == "llama3_70b_qlora":  # every stage at 4 bits; evaluation holds the variant and a 4-bit reference
        assert all(plan.precision.startswith("4bit") for plan in plans)
        eval_plan = next(plan for plan in plans if plan.stage == "eval")
        assert eval_plan.loads == "variant + KL reference" and 70 * GIB < eval_plan.peak_bytes < 79 * GIB


def test_a_study_that_cannot_fit_stops_before_any_work(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(AblateError, match=r"^stage 'direction' does not fit: .*bfloat16.*cuda:0 \(79.0 GiB\); short by \d+\.\d GiB") as raised:
        run_study("llama3_70b_qlora", out=out, overrides=["model.quantization=none"], hardware=H100, progress=False)
    assert "\n" not in str(raised.value)
    assert not out.exists()


def test_plan_command_prints_each_stage_and_fails_when_it_does_not_fit(tmp_path, tokenizer):
    from typer.testing import CliRunner

    from ablate.cli import app
    from conftest import build_model

    model_dir = tmp_path / "tiny"
    build_model("llama", tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    runner = CliRunner()
    fits = runner.invoke(app, ["study", "default", "--plan", "--hardware", "cpu=8GiB", "--set", f"model.spec={model_dir}"])
    assert fits.exit_code == 0, fits.output
    lines = fits.output.splitlines()
    assert lines[0].startswith("model: ") and "config.json" in lines[0]
    for stage in ("direction", "finetune", "eval"):
        assert any(line.startswith(stage) and "precision float32" in line and "on cpu (8.0 GiB): fits" in line
                   for line in lines), stage
    short = runner.invoke(app, ["study", "default", "--plan", "--hardware", "cpu=64MiB", "--set", f"model.spec={model_dir}",
                                "--set", "model.quantization=4bit"])
    assert short.exit_code == 1 and "DOES NOT FIT (short by" in short.output and "4bit (float32 compute)" in short.output


def test_bad_hardware_and_sizes_are_one_line():
    assert parse_size("80GiB") == 80 * GIB and parse_size("1.5GB") == 1_500_000_000 and parse_size("512") == 512
    with pytest.raises(AblateError, match="memory size 'lots'"):
        parse_size("lots")
    with pytest.raises(AblateError, match="hardware 'gpu0=80GiB': expected DEVICE=SIZE"):
        parse_hardware("gpu0=80GiB")
