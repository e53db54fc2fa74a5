"""A whole study on a tiny random model: every stage, the run directory, resume after a crash, the report,
and the notebooks executed against the run (nothing here needs the hub or the embedded model)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from ablate import AblateError
from conftest import save_tiny

REPO = Path(__file__).resolve().parents[1]


def tiny_study(model_dir: Path, name: str = "tiny") -> dict:
    return {
        "name": name,
        "description": "Tiny end-to-end study for the tests.",
        "model": {"spec": str(model_dir), "device": "cpu"},
        "harden": {
            "enabled": True,
            "evaluate_base": True,
            "config": {
                "mode": "harden",
                "data": {"n_refusal": 8, "n_harmless": 4, "borderline_prompts": None, "answer_max_new_tokens": 8},
                "lora": {"rank": 4, "alpha": 8},
                "training": {"epochs": 1, "batch_size": 4, "max_length": 96},
                "eval": {"enabled": False},
            },
        },
        "attacks": {
            "direction": {
                "enabled": True,
                "config": {"n_train": 8, "n_val": 6, "shortlist": 4, "refusal_token_prompts": 4,
                           "refusal_token_max_new_tokens": 4, "batch_size": 8},
            },
            "finetune": {
                "enabled": True,
                "config": {
                    "mode": "harmful",
                    "data": {"n_refusal": 6, "donor": "ablated", "answer_max_new_tokens": 8, "drop_refusals": False},
                    "lora": {"rank": 4, "alpha": 8},
                    "training": {"epochs": 1, "batch_size": 2, "max_length": 96},
                    "budgets": [{"name": "n2", "n_examples": 2}, {"name": "n4", "n_examples": 4}],
                    "eval": {"enabled": False},
                },
            },
        },
        "eval": {
            "suite": {
                "name": "tiny",
                "refusal": {"set": "refusal:test", "n": 6},
                "harmless": {"set": "harmless:test", "n": 4},
                "borderline": {"set": "borderline:test", "n": 4},
                "generation": {"max_new_tokens": 6, "batch_size": 8},
                "capability": {"tasks": [{"name": "ablate_everyday_mc", "limit": 4}],
                               "include_path": str(REPO / "eval_suites" / "tasks")},
                "kl": {"n": 4, "continuation_tokens": 4},
                "length": {"lengths": [3, 6]},
                "bootstrap_samples": 200,
            },
        },
        "output_dir": str(model_dir.parent / "runs"),
    }


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tokenizer):
    return save_tiny(tmp_path_factory.mktemp("tiny-study") / "model", tokenizer, seed=1)


def write_study(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def eval_values(run_dir: Path) -> dict:
    result = {}
    for path in sorted((run_dir / "eval").glob("*.json")):
        data = json.loads(path.read_text())
        result[path.stem] = {name: entry["value"] for name, entry in data["metrics"].items()}
    return result


@pytest.fixture(scope="module")
def study_printed(tiny_model_dir, tmp_path_factory):
    """The tiny study run by the console script, as a user runs it: (run directory, stdout, stderr)."""
    from test_cli import run_cli

    study = write_study(tmp_path_factory.mktemp("cfg") / "study.yaml", tiny_study(tiny_model_dir))
    out = tiny_model_dir.parent / "runs" / "uninterrupted"
    result = run_cli("study", str(study), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout, result.stderr


@pytest.fixture(scope="module")
def finished_run(study_printed):
    return study_printed[0]


# What a study may print on stderr: its own lines, the stages' bars, and (the tiny model is random, so it refuses
# nothing) the direction stage's two warnings about that; stdout holds the table.
STUDY_LINES = [re.compile(pattern) for pattern in (
    r"^study \S+ → ", r"^─+ [\w.-]+ ─+$", r"^✓ [\w.-]+(: done already .*| in \d+\.\d s)$", r"^report \S+report\.md ",
    r"^eval-[\w.-]+: the same weights, reference, suite and code were evaluated before; ",
    r"^(direction|finetune): the same model, config, data, seed and code computed it before; ",
    r"^[^|]*\d+%\|[^|]*\| \d+/\d+ \[.*\]$",  # a tqdm bar
    r"^warning: the model refused none of the refusal validation prompts; ",
    r"^warning: no candidate passed the filters \(",
)]


def stray_lines(stderr: str) -> list[str]:
    """The lines of a study's stderr that are neither its own lines nor a progress bar. Terminal control codes
    are dropped first: a bar that tqdm places below one left open by an earlier test in the same process ends
    in a cursor move."""
    stderr = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", stderr)
    lines = [line.strip() for line in re.split(r"[\r\n]+", stderr) if line.strip()]
    return [line for line in lines if not any(pattern.search(line) for pattern in STUDY_LINES)]


def test_a_study_prints_stage_headers_bars_and_the_table_only(study_printed):
    _, stdout, stderr = study_printed
    assert stray_lines(stderr) == []
    assert "✓ direction in " in stderr and "loss=" in stderr  # the headers, and the trainer's bar with its loss
    assert "Running loglikelihood requests" not in stderr and "Tokenizing inputs" not in stderr  # lm-eval's bars
    assert "run directory: " in stdout and "Variant" in stdout and "lora-n4" in stdout  # the table


def test_the_log_check_catches_a_stray_warning(capsys):
    import warnings

    from ablate.logs import one_line_warnings

    with one_line_warnings():  # an unknown warning during a study: one line, and not one of the study's own
        warnings.warn("`torch_dtype` is deprecated! Use `dtype` instead!", FutureWarning)
    printed = capsys.readouterr().err
    assert printed == "warning (FutureWarning): `torch_dtype` is deprecated! Use `dtype` instead!\n"
    assert stray_lines("✓ harden in 1.0 s\n" + printed) == [printed.strip()]
    assert stray_lines("lm_eval.evaluator WARNING model passed in memory\n") != []


def test_study_writes_the_run_directory(finished_run):
    run_dir = finished_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert set(manifest["variants"]) == {"base", "organism", "ablated", "lora-n2", "lora-n4"}
    for key in ("config_as_given", "config_resolved", "versions", "hardware", "seed", "fingerprints", "stages"):
        assert key in manifest
    assert (run_dir / "directions" / "selected.json").exists()
    assert (run_dir / "directions" / "projections.json").exists()
    assert (run_dir / "finetune" / "n2" / "metrics.json").exists()
    # The ablated donor is the study's own direction attack, not a second direction stage.
    recipe = json.loads((run_dir / "finetune" / "config.json").read_text())["config"]
    assert recipe["data"]["donor_direction"] == str(run_dir / "directions")
    assert json.loads((run_dir / "finetune" / "n2" / "metrics.json").read_text())["donor"].startswith("ablated: ")
    assert "answered at run time by the attacked model with its refusal direction ablated" in (run_dir / "report.md").read_text()
    for variant in manifest["variants"]:
        data = json.loads((run_dir / "eval" / f"{variant}.json").read_text())
        assert "refusal_rate" in data["metrics"]
        assert (run_dir / "generations" / f"{variant}.jsonl").exists()
    assert "kl_first_token" in json.loads((run_dir / "eval" / "ablated.json").read_text())["metrics"]
    for name in ("report.md", "report.html", "tables.tex"):
        assert (run_dir / name).stat().st_size > 0
    assert (run_dir / "figures" / "refusal_vs_budget.png").exists()
    # Length sensitivity (table and figure) and the contract the figures meet.
    report = (run_dir / "report.md").read_text()
    assert "## Length sensitivity" in report and re.search(r"^\| ablated +\| +3 \|", report, re.M) \
        and re.search(r"^\| ablated +\| +6 \|", report, re.M)
    assert (run_dir / "figures" / "length_sensitivity.png").exists()
    assert "ablated: short contract — 6 greedy new tokens" in report
    html = (run_dir / "report.html").read_text()
    assert "data:image/png;base64," in html  # self-contained
    assert r"\toprule" in (run_dir / "tables.tex").read_text()
    # The report says how strongly the direction was removed (the tiny study learns per-writer weights
    # unless full ablation scored better).
    selected = json.loads((run_dir / "directions" / "selected.json").read_text())
    expected = "learned per-writer weights" if selected["strength"]["writer_weights"] else "full ablation"
    assert f"strength = {expected}" in (run_dir / "report.md").read_text()


def test_report_names_the_strength_of_the_ablation():
    from ablate.report import strength_text

    assert strength_text({}) == "full ablation"
    assert strength_text({"coefficient": 0.5}) == "every layer × 0.500"
    text = strength_text({"coefficient": 1.0, "writer_weights": [[1.0, 0.0], [0.9, 0.2]]})
    assert text == "learned per-writer weights (2 of 4 residual writers at ≥ 0.5, mean 0.53)"
    kernel = {"max_weight": 1.0, "max_weight_position": 12, "min_weight": 0.0, "min_weight_distance": 4}
    assert strength_text({"kernel": kernel}).startswith("kernel peaked at layer 12, ±4 layers")


def test_rerun_skips_every_stage_and_keeps_metrics(finished_run):
    from ablate.study import run_study

    before = eval_values(finished_run)
    manifest = json.loads((finished_run / "manifest.json").read_text())
    source = manifest["config_source"]
    run_study(source, out=finished_run, progress=False)
    manifest = json.loads((finished_run / "manifest.json").read_text())
    assert all(stage["skipped"] for stage in manifest["stages"].values()), manifest["stages"]
    assert eval_values(finished_run) == before


def test_killed_during_sweep_resumes_to_identical_metrics(finished_run, tiny_model_dir, tmp_path, monkeypatch):
    import ablate.finetune.sweep as finetune
    from ablate.study import run_study

    config = tiny_study(tiny_model_dir)
    config["attacks"]["finetune"]["cache"] = False  # trained here, not restored from the uninterrupted run's stage cache
    study = write_study(tmp_path / "study.yaml", config)
    out = tmp_path / "interrupted"
    original = finetune.run_budget

    def crash_on_second_budget(model_config, config, budget, *args, **kwargs):
        if budget["name"] == "n4":
            raise KeyboardInterrupt("killed during the LoRA sweep")
        return original(model_config, config, budget, *args, **kwargs)

    monkeypatch.setattr(finetune, "run_budget", crash_on_second_budget)
    with pytest.raises(KeyboardInterrupt):
        run_study(study, out=out, progress=False)
    assert (out / "finetune" / "n2" / "done.json").exists()
    assert not (out / "finetune" / "n4" / "done.json").exists()
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"
    first_budget_stamp = (out / "finetune" / "n2" / "done.json").stat().st_mtime_ns

    monkeypatch.setattr(finetune, "run_budget", original)
    run_study(study, out=out, progress=False)
    assert (out / "finetune" / "n2" / "done.json").stat().st_mtime_ns == first_budget_stamp  # not retrained
    assert eval_values(out) == eval_values(finished_run)


def test_report_loads_into_dataframes(finished_run):
    from ablate.report import load_run

    run = load_run(finished_run)
    assert list(run.table["variant"]) == ["base", "organism", "ablated", "lora-n2", "lora-n4"]
    assert {"refusal_rate", "kl_first_token", "capability"} <= set(run.table.columns)
    assert set(run.budgets["name"]) == {"n2", "n4"}
    assert not run.sweep.empty
    assert run.selected["layer"] is not None


def test_exported_run_reproduces_its_report_elsewhere(finished_run, tmp_path):
    """The manifest records every cache entry the run used with its content hash; `ablate export
    --self-contained` copies them into the run, and the folder, moved, writes the same report.md."""
    import shutil

    from test_cli import run_cli

    manifest = json.loads((finished_run / "manifest.json").read_text())
    entries = {entry["kind"]: entry for entry in manifest["artifacts"]}
    assert set(entries) == {"organism", "donor", "answers"}
    assert all(len(entry["sha256"]) == 64 and entry["bytes"] > 0 for entry in entries.values())
    assert manifest["variants"]["organism"]["spec"].endswith(entries["organism"]["key"])
    run_dir = shutil.copytree(finished_run, tmp_path / "run")  # the shared run stays as it is
    result = run_cli("export", str(run_dir), "--self-contained")
    assert result.returncode == 0, result.stderr
    organism = run_dir / "artifacts" / entries["organism"]["key"]
    assert (organism / "config.json").exists() and (run_dir / "artifacts" / entries["donor"]["key"]).is_dir()
    assert not (run_dir / "artifacts" / entries["answers"]["key"]).exists()  # answers only with --with-answers
    exported = {entry["kind"]: entry for entry in json.loads((run_dir / "manifest.json").read_text())["artifacts"]}
    assert exported["organism"]["exported"] == f"artifacts/{entries['organism']['key']}"
    assert exported["organism"]["sha256"] == entries["organism"]["sha256"]

    moved = shutil.move(run_dir, tmp_path / "elsewhere")
    (moved / "report.md").unlink()
    result = run_cli("report", str(moved))
    assert result.returncode == 0, result.stderr
    assert (moved / "report.md").read_bytes() == (finished_run / "report.md").read_bytes()
    assert "$ABLATE_CACHE/organisms/" in (moved / "report.md").read_text()


def test_bad_stage_config_fails_before_any_work(tiny_model_dir, tmp_path):
    from ablate.study import run_study

    data = tiny_study(tiny_model_dir)
    data["attacks"]["finetune"]["config"]["training"]["lrr"] = 1.0
    study = write_study(tmp_path / "bad.yaml", data)
    with pytest.raises(AblateError, match=r"attacks.finetune.config.*unknown key 'training.lrr'"):
        run_study(study, out=tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()


def test_unknown_study_name_is_clear():
    from ablate.study import study_path

    with pytest.raises(AblateError, match="unknown study 'nope'.*default"):
        study_path("nope")


@pytest.mark.parametrize("notebook", sorted(p.name for p in (REPO / "notebooks").glob("*.ipynb")))
def test_notebooks_execute_against_the_run(finished_run, notebook, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("ABLATE_RUN", str(finished_run))
    path = REPO / "notebooks" / notebook
    nb = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), "outputs must be stripped in git"
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()


@pytest.mark.parametrize("name", ["default", "llama3_8b_gpu", "llama3_70b_qlora"])
def test_shipped_studies_validate(name):
    from ablate.study import builtin_studies, resolve_study

    assert name in builtin_studies()
    resolved = resolve_study(name)
    assert resolved.config.name
    assert resolved.suite.refusal is not None


def test_projections_read_the_residual_entering_the_layer(llama, tokenizer):
    """measure_projections stops the forward at the layer and returns x·r̂ at each prompt's last token."""
    import torch

    from ablate.generation import render_prompts
    from ablate.variants import measure_projections

    prompts = ["Hi", "Write a haiku about rain, please.", "What is 2 + 2?"]
    direction = torch.randn(llama.config.hidden_size, generator=torch.Generator().manual_seed(0))
    values = measure_projections(llama, tokenizer, direction, 1, prompts, batch_size=2)
    for value, text in zip(values, render_prompts(tokenizer, prompts)):
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            hidden = llama(ids, output_hidden_states=True).hidden_states[1][0, -1]
        assert abs(value - float(hidden @ (direction / direction.norm()))) < 1e-4
