"""The docs stay references: config tables in step with the models, named files that exist, and no words about
how the project was developed (or paths of one machine) in any tracked file."""

from __future__ import annotations

import inspect
import re
import subprocess
from pathlib import Path

import pytest
from pydantic import BaseModel

from ablate import config as config_models
from ablate.docs import BLOCK, render

ROOT = Path(__file__).resolve().parent.parent
STAGE_TABLES = {"directions.md": "DirectionConfig", "finetune.md": "FinetuneConfig", "evaluation.md": "EvalSuite",
                "study.md": "StudyConfig", "robustness.md": "RobustnessConfig"}


def tracked_files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / name for name in listed.decode().split("\0") if name and (ROOT / name).is_file()]


def text_of(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data[:4096]:
        return None
    return data.decode("utf-8", errors="replace")


@pytest.mark.parametrize("doc, model", sorted(STAGE_TABLES.items()))
def test_each_stage_doc_has_its_config_table_in_step_with_the_model(doc, model):
    text = (ROOT / "docs" / doc).read_text(encoding="utf-8")
    assert model in [match.group(2) for match in BLOCK.finditer(text)], f"docs/{doc} has no config table of {model}"
    assert render(text) == text, f"docs/{doc}: config table out of date; run `python -m ablate.docs`"


def test_a_changed_description_makes_the_table_stale(monkeypatch):
    text = (ROOT / "docs" / "directions.md").read_text(encoding="utf-8")
    field = config_models.DirectionConfig.model_fields["kl_max"]
    monkeypatch.setattr(field, "description", "Changed.")
    assert render(text) != text


def test_every_doc_is_a_reference_of_at_most_300_lines():
    docs = sorted((ROOT / "docs").glob("*.md"))
    assert {doc.name for doc in docs} >= set(STAGE_TABLES)
    for doc in docs:
        lines = doc.read_text(encoding="utf-8").count("\n")
        assert lines <= 300, f"docs/{doc.name}: {lines} lines"


def config_fields():
    from ablate import matrix_config

    for module in (config_models, matrix_config):
        for name, model in vars(module).items():
            if inspect.isclass(model) and issubclass(model, BaseModel) and model.__module__.startswith(module.__name__):
                for field_name, field in model.model_fields.items():
                    yield f"{name}.{field_name}", field.description or ""


def test_every_config_field_has_a_one_sentence_description():
    fields = list(config_fields())
    assert len(fields) > 150 and any(key.startswith("EvalRun.") for key, _ in fields)  # every module of ablate/config
    for key, description in fields:
        assert description, f"{key}: no description"
        assert len(description) <= 200, f"{key}: {len(description)} characters; longer explanations go in the docs"
        assert not re.search(r"[.!?] [A-Z]", description.rstrip(".")), f"{key}: more than one sentence: {description}"
        assert not re.search(r"\d(\.\d+)? ?s\b(?! of)", description), f"{key}: a timing belongs in the docs: {description}"


NAMED_PATH = re.compile(r"(?<![\w/.-])((?:finetune_configs|eval_suites|ablate|benchmarks|notebooks|docs|tests)/"
                        r"[A-Za-z0-9_./-]*[A-Za-z0-9_]\.(?:yaml|md|py|ipynb|jsonl|sh|txt))")


def test_every_file_the_docs_and_shipped_configs_name_exists():
    sources = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for folder in ("finetune_configs", "eval_suites", "ablate/studies", "ablate/presets", "benchmarks"):
        sources += sorted((ROOT / folder).glob("*.yaml"))
    missing = []
    for source in sources:
        for match in NAMED_PATH.finditer(source.read_text(encoding="utf-8")):
            if not (ROOT / match.group(1)).exists():
                missing.append(f"{source.relative_to(ROOT)} names {match.group(1)}")
    assert not missing, "; ".join(missing)


PROCESS_WORDS = [
    re.compile(r"\b[Ss]essions? ?\d+"),  # "session 21", "sessions 15–17"
    re.compile(r"\b[Ii]nvocations? ?\d+"),
    re.compile(r"\b[Tt]he (?:lead|filer)\b"),
    re.compile(r"(?<![\w&/:#-])#\d+\b"),  # an issue number such as "#3" (not a CSS colour or a repo#issue link)
    re.compile(r"(?<![\w.~-])/(?:work|root|home|Users|tmp)/"),  # a path of one machine
]
DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")  # a dated figure, in prose and configs


def test_no_words_about_how_the_project_was_developed():
    this_file = Path(__file__).resolve()
    found = []
    for path in tracked_files():
        if path.resolve() == this_file:
            continue
        text = text_of(path)
        if text is None:
            continue
        patterns = PROCESS_WORDS + ([DATE] if path.suffix in (".md", ".yaml", ".yml") else [])
        for number, line in enumerate(text.splitlines(), 1):
            for pattern in patterns:
                match = pattern.search(line)
                if match:
                    found.append(f"{path.relative_to(ROOT)}:{number}: {match.group(0)!r}")
    assert not found, f"{len(found)} lines speak of the development, not the project:\n" + "\n".join(found[:40])


@pytest.mark.parametrize("line", ["figures of session 21", "Invocation 14 on C", "asked the filer", "#3's bound",
                                  "ABLATE_CACHE=/work/cache", "see /home/me/x"])
def test_the_process_word_patterns_catch_what_they_should(line):
    assert any(pattern.search(line) for pattern in PROCESS_WORDS)


@pytest.mark.parametrize("line", ["color:#222", "huggingface/accelerate#2492", "~/.cache/ablate", "# 3 epochs"])
def test_the_process_word_patterns_leave_ordinary_text_alone(line):
    assert not any(pattern.search(line) for pattern in PROCESS_WORDS)
