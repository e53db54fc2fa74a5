"""Reports from a run directory written here by hand (no model): one table model behind the three files,
the interval level read from the suite, and the figures a paper can use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

VARIANTS = {  # name -> (kind, refusal rate, capability per task)
    "base": ("base", 0.10, (0.70, 0.50)),
    "organism": ("organism", 0.95, (0.68, 0.48)),
    "ablated": ("direction", 0.05, (0.66, 0.47)),
    "lora-n1": ("finetune", 0.60, (0.69, 0.49)),
    "lora-n4": ("finetune", 0.20, (0.67, 0.48)),
    "lora-n8": ("finetune", 0.02, (0.66, 0.46)),
}


def write_run(run_dir: Path, confidence: float = 0.9) -> Path:
    """A run directory with the files `ablate report` reads: manifest, eval results, budget metrics."""
    run_dir.mkdir(parents=True)
    manifest = {"study": "handmade", "description": "A run written by the test.", "status": "complete",
                "variants": {name: {"kind": kind, "spec": "embedded"} for name, (kind, _, _) in VARIANTS.items()},
                "config_resolved": {"study": {"model": {"spec": "embedded"}}, "suite": {"name": "s", "confidence": confidence}}}
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    (run_dir / "eval").mkdir()
    for name, (_, refusal, tasks) in VARIANTS.items():
        metrics = {"refusal_rate": {"value": refusal, "ci": [max(0, refusal - 0.1), min(1, refusal + 0.1)], "n": 64,
                                    "method": "wilson"}}
        for task, value in zip(("a", "b"), tasks):
            metrics[f"capability/{task}"] = {"value": value, "ci": [value - 0.15, value + 0.12], "n": 30, "method": "wilson"}
        (run_dir / "eval" / f"{name}.json").write_text(json.dumps({"metrics": metrics}))
    for n in (1, 4, 8):
        (run_dir / "finetune" / f"n{n}").mkdir(parents=True)
        (run_dir / "finetune" / f"n{n}" / "metrics.json").write_text(json.dumps(
            {"name": f"n{n}", "n_examples": n, "steps": 8 * n, "train_flops": 3.1e13 * n, "wall_seconds": 10.0 * n}))
    return run_dir


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from ablate.report import write_report

    run_dir = write_run(tmp_path_factory.mktemp("report") / "run")
    return run_dir, write_report(run_dir)


def test_the_three_renderings_hold_the_same_cells(report):
    from ablate.report import load_run, main_table

    run_dir, _ = report
    table = main_table(load_run(run_dir))
    markdown, page, tex = ((run_dir / name).read_text() for name in ("report.md", "report.html", "tables.tex"))
    for cells in table.rows:
        assert "| " + cells[0] in markdown
        for cell in cells[1:]:
            assert cell in markdown and cell in page, cell
            assert cell.replace("%", r"\%").replace("–", "--") in tex, cell
    assert r"\toprule" in tex and r"\label{tab:ablate-main}" in tex and r"\label{tab:ablate-budgets}" in tex


def test_the_interval_level_comes_from_the_suite(report):
    run_dir, _ = report
    markdown = (run_dir / "report.md").read_text()
    assert "[90% CI]" in markdown and "with 90% Wilson intervals" in markdown
    assert "95%" not in markdown


def test_figures_are_rendered_with_capability_intervals(report):
    from PIL import Image

    from ablate.report import load_run

    run_dir, paths = report
    for name in ("refusal_vs_budget", "capability_vs_refusal"):
        with Image.open(paths[f"figure:{name}"]) as image:
            assert image.size[0] > 600 and image.size[1] > 300
    table = load_run(run_dir).table.set_index("variant")
    # Two tasks: the mean of their bounds (at least as wide as the interval of the mean).
    assert table.loc["base", "capability"] == pytest.approx(0.60)
    assert table.loc["base", "capability_ci_low"] == pytest.approx(0.45)
    assert table.loc["base", "capability_ci_high"] == pytest.approx(0.72)


@pytest.mark.parametrize("values", [(2.19e7, 4.81e7), (3.1e13, 2.5e14), (1e10, 5e15), (7.0e12, 7.2e12)])
def test_flops_ticks_are_round_distinct_and_at_least_two(values):
    import pandas as pd

    from ablate.figures import _log_ticks, _pyplot

    figure, axis = _pyplot().subplots()
    axis.set_xscale("log")
    _log_ticks(axis, pd.Series(values))
    ticks = [t for t in axis.get_xticks() if axis.get_xlim()[0] <= t <= axis.get_xlim()[1]]
    labels = [axis.xaxis.get_major_formatter()(t) for t in ticks]
    _pyplot().close(figure)
    assert 2 <= len(labels) <= 9 and len(set(labels)) == len(labels), labels
