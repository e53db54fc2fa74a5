"""The package carries its suites, recipes and studies: every shipped file is package data, the checkout's
top-level folders are links to it (one source of truth), and lookups go through the installed package.
(The built wheel itself is installed and run outside the checkout by `.ci/wheel_smoke`.)"""

from __future__ import annotations

import fnmatch
import os
import tomllib
from pathlib import Path

import pytest

import ablate

REPO = Path(__file__).resolve().parents[1]
PACKAGE = Path(ablate.__file__).resolve().parent
SHIPPED = ("eval_suites", "finetune_configs", "studies", "data")


def package_data_globs() -> list[str]:
    with open(REPO / "pyproject.toml", "rb") as handle:
        return tomllib.load(handle)["tool"]["setuptools"]["package-data"]["ablate"]


@pytest.mark.parametrize("folder", SHIPPED)
def test_every_shipped_file_is_package_data(folder):
    globs = package_data_globs()
    files = [path.relative_to(PACKAGE).as_posix() for path in (PACKAGE / folder).rglob("*")
             if path.is_file() and "__pycache__" not in path.parts]
    assert files, folder
    missing = [name for name in files if not any(fnmatch.fnmatch(name, pattern) and
                                                 name.count("/") == pattern.count("/") for pattern in globs)]
    assert not missing, f"not in [tool.setuptools.package-data] of pyproject.toml, so not in the wheel: {missing}"


@pytest.mark.parametrize("folder", ["eval_suites", "finetune_configs"])
def test_top_level_folders_are_links_to_the_package_data(folder):
    top = REPO / folder
    assert top.is_symlink(), f"{folder}/ must be a link to ablate/{folder}/ (one source of truth)"
    assert os.readlink(top) == f"ablate/{folder}"
    assert top.resolve() == (PACKAGE / folder).resolve()


def test_suites_and_recipes_are_found_from_the_package(tmp_path, monkeypatch):
    from ablate.evaluate.run import load_suite, shipped_suites_dir
    from ablate.study import resolve_study

    monkeypatch.chdir(tmp_path)  # no eval_suites/ or finetune_configs/ here
    assert shipped_suites_dir() == PACKAGE / "eval_suites"
    suite = load_suite("default")
    assert Path(suite.source_dir) == PACKAGE / "eval_suites"
    assert (Path(suite.source_dir) / suite.capability.include_path / "everyday_mc.yaml").is_file()
    study = tmp_path / "study.yaml"
    study.write_text("name: s\nattacks:\n  finetune:\n    config: finetune_configs/lora_attack.yaml\n")
    resolved = resolve_study(study)
    assert resolved.finetune is not None and resolved.finetune.mode.value == "harmful"
