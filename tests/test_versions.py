"""The lower bounds in pyproject.toml are exactly the versions ci/lowest.txt pins (and .ci/run tests)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from ablate.compat import renamed_fields

ROOT = Path(__file__).resolve().parents[1]


def _lower_bounds() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["dev"]
    bounds = {}
    for requirement in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)(,<[0-9.]+)?", requirement)
        assert match, f"pyproject.toml: '{requirement}' has no lower bound"
        bounds[match.group(1).lower()] = match.group(2)
    return bounds


def test_every_lower_bound_is_pinned_in_the_lowest_versions_file():
    pins = dict(line.split("==") for line in (ROOT / "ci" / "lowest.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    bounds = _lower_bounds()
    bounds.pop("torch")  # pinned on the command line: .ci/run installs torch==2.11.0 for the lowest-versions job
    assert bounds == {name.lower(): version for name, version in pins.items()}
    lowest_job = (ROOT / ".ci" / "run").read_text().split(".venv-lowest", 1)[1]
    assert _lower_bounds()["torch"] == "2.11" and "torch==2.11.0" in lowest_job


def test_renamed_training_argument_goes_under_the_installed_name():
    from dataclasses import dataclass

    @dataclass
    class Old:  # transformers 5.17's TrainingArguments knows only gradient_checkpointing
        gradient_checkpointing: bool = False
        learning_rate: float = 1e-3

    @dataclass
    class New:
        activation_checkpointing: bool = False
        gradient_checkpointing: bool = False

    assert renamed_fields(Old, {"activation_checkpointing": True, "learning_rate": 0.1}) == {
        "gradient_checkpointing": True, "learning_rate": 0.1}
    assert renamed_fields(New, {"activation_checkpointing": True}) == {"activation_checkpointing": True}
    from trl import SFTConfig  # the installed transformers accepts what the compat function passes

    config = SFTConfig(output_dir="unused", report_to="none", use_cpu=True, bf16=False, **renamed_fields(SFTConfig, {"activation_checkpointing": True}))
    assert getattr(config, "activation_checkpointing", None) or config.gradient_checkpointing
