"""Config reference tables for the docs, generated from the pydantic models' field descriptions.

A doc marks where a table goes, and this module writes the rows between the markers:

    <!-- config-table: DirectionConfig -->
    | key | default | description |
    ...
    <!-- /config-table -->

    python -m ablate.docs            # rewrite every marked table in docs/*.md
    python -m ablate.docs --check    # exit 1 naming each table that is out of date

Nested models become dotted keys (`strength_learning.steps`); the fields of a list's items are written
`budgets[].lr`. A test (tests/test_docs.py) fails when a doc's table differs from what this writes.
"""

from __future__ import annotations

import argparse
import re
import sys
from enum import Enum
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from ablate import config as config_models

BLOCK = re.compile(r"(<!-- config-table: (\w+) -->\n)(.*?)(<!-- /config-table -->)", re.DOTALL)
HEADER = "| key | default | description |\n| --- | --- | --- |\n"


def _model_in(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The config model an annotation holds, and whether it is a list of them."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    if get_origin(annotation) is list:
        inner = get_args(annotation)
        if inner and isinstance(inner[0], type) and issubclass(inner[0], BaseModel):
            return inner[0], True
        return None, False
    for argument in get_args(annotation):
        found, is_list = _model_in(argument)
        if found is not None:
            return found, is_list
    return None, False


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def format_default(field) -> str:
    """A field's default as it would be written in YAML, or 'required'."""
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    text = yaml.safe_dump(_plain(value), default_flow_style=True, allow_unicode=True, width=10_000).strip()
    text = text.removesuffix("\n...").removesuffix("...").strip()
    return f"`{text}`"


def config_rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, description) for every field, nested models flattened into dotted keys."""
    rows = []
    for name, field in model.model_fields.items():
        key = prefix + name
        nested, is_list = _model_in(field.annotation)
        description = " ".join((field.description or "").split())
        if nested is None:
            rows.append((key, format_default(field), description))
            continue
        default = field.default_factory() if field.default_factory is not None else field.default
        if is_list or default is None or default is PydanticUndefined:
            # A list of models, or an optional model: the field itself, then its items' or its own keys.
            rows.append((key, format_default(field), description))
        rows.extend(config_rows(nested, key + ("[]." if is_list else ".")))
    return rows


def config_table(model_name: str) -> str:
    """The Markdown table of one config model of ablate.config (or ablate.matrix_config, the robustness study's)."""
    from ablate import matrix_config

    model = getattr(config_models, model_name, None) or getattr(matrix_config, model_name, None)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise SystemExit(f"unknown config model '{model_name}' in a config-table marker")
    lines = [f"| `{key}` | {default.replace('|', '&#124;')} | {text.replace('|', '&#124;')} |"
             for key, default, text in config_rows(model)]
    return HEADER + "\n".join(lines) + "\n"


def render(text: str) -> str:
    """The doc with every marked table rewritten."""
    return BLOCK.sub(lambda match: match.group(1) + config_table(match.group(2)) + match.group(4), text)


def doc_files(root: Path) -> list[Path]:
    return sorted((root / "docs").glob("*.md"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Rewrite (or check) the config tables of docs/*.md.")
    parser.add_argument("--check", action="store_true", help="Only report tables that are out of date (exit 1).")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent, help="Repository root.")
    args = parser.parse_args(argv)
    stale = []
    for path in doc_files(args.root):
        text = path.read_text(encoding="utf-8")
        updated = render(text)
        if updated != text:
            stale.append(path)
            if not args.check:
                path.write_text(updated, encoding="utf-8")
    for path in stale:
        print(f"{path}: config table {'out of date' if args.check else 'rewritten'}")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
