"""The same reduced robustness grid in this process, through submitit's local executor (a subprocess per cell)
and through a local Ray (both in [dev]) gives the same matrix (slow: a minute or two on 2 cores)."""

from __future__ import annotations

import json

import pytest

from test_matrix import matrix_model_dir, tiny_matrix, write_matrix  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow


def matrix_figures(run_dir) -> tuple[list[list[str]], dict]:
    from ablate.matrix_report import load_matrix, matrix_table

    matrix = load_matrix(run_dir)
    rows = {(cell["defence"], row["attack"], row["budget"]): (row["flops"], row["refusal_rate"], row["capability"])
            for cell in matrix["cells"] for row in cell["rows"]}
    return matrix_table(matrix, seconds=False).rows, rows


@pytest.mark.parametrize("executor", ["submitit", "ray"])
def test_executors_give_the_in_process_matrix(executor, matrix_model_dir, tmp_path_factory):  # noqa: F811
    from ablate.matrix import run_matrix

    folder = tmp_path_factory.mktemp(executor)
    data = tiny_matrix(matrix_model_dir, ["refusal_sft", "extended_refusal"])
    data["executor"] = {"cluster": "local", "parameters": {"timeout_min": 20}} if executor == "submitit" else {}
    study = write_matrix(folder / "matrix.yaml", data)
    in_process = run_matrix(study, out=folder / "local", progress=False)
    elsewhere = run_matrix(study, out=folder / executor, executor=executor, progress=False)
    assert matrix_figures(elsewhere) == matrix_figures(in_process)
    assert json.loads((elsewhere / "manifest.json").read_text())["cells_run"] == [
        "cells/refusal_sft/seed-0", "cells/extended_refusal/seed-0"]
    if executor == "submitit":
        assert list((elsewhere / "submitit").glob("*_result.pkl")) or list((elsewhere / "submitit").glob("*.out"))
