"""Loading and validating configs: YAML read with `yaml.safe_load`, `key.path=value` overrides, one-line errors.

Every config model derives from `StrictModel` and forbids unknown keys (`extra="forbid"`), so a typo is an error,
never a silent default. `load_config(path, Model)` turns any problem into a one-line `AblateError` that names the
file, the key path, the value and what was expected, e.g.

    finetune_configs/x.yaml: key 'lora.rank': Input should be a valid integer (got 'sixteen')

Precedence is CLI override > YAML > defaults: `apply_overrides` takes `key.path=value` strings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from ablate import AblateError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of every config: unknown keys are errors; values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def format_validation_error(error: ValidationError, source: str) -> str:
    """One line naming the source, the first bad key path, the problem and the value given."""
    problems = error.errors()
    first = problems[0]
    key = ".".join(str(part) for part in first["loc"]) or "<root>"
    if first["type"] == "extra_forbidden":
        message = f"{source}: unknown key '{key}'"
        parent = first["loc"][:-1]
        allowed = _allowed_keys(error.title, parent)
        if allowed:
            message += f" (allowed: {', '.join(allowed)})"
    else:
        value = first.get("input")
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        message = f"{source}: key '{key}': {first['msg']} (got {shown})"
    if len(problems) > 1:
        message += f"; and {len(problems) - 1} more problem(s)"
    return message


_MODELS_BY_NAME: dict[str, type[BaseModel]] = {}


def _allowed_keys(title: str, parent: tuple) -> list[str]:
    model = _MODELS_BY_NAME.get(title)
    for part in parent:
        if model is None or not isinstance(part, str):
            return []
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        model = _nested_model(annotation)
    return sorted(model.model_fields) if model is not None else []


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in getattr(annotation, "__args__", ()) or ():
        found = _nested_model(argument)
        if found is not None:
            return found
    return None


def validate_config(data: Any, model: type[ConfigT], source: str = "<config>") -> ConfigT:
    """Validate a plain dict against `model`; errors become one-line `AblateError`s."""
    _MODELS_BY_NAME[model.__name__] = model
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise AblateError(f"{source}: expected a mapping of keys at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise AblateError(format_validation_error(error, source)) from None


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise AblateError(f"config file not found: {path}")
    if path.is_dir():
        raise AblateError(f"{path}: is a folder; expected a YAML config file")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise AblateError(f"{path}: not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start}); "
                          "expected a YAML config file") from None
    except OSError as error:
        raise AblateError(f"{path}: cannot read: {error.strerror}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise AblateError(f"{path}:{where}: malformed YAML: {problem}") from None


def load_config(path: str | Path, model: type[ConfigT], overrides: list[str] | None = None) -> ConfigT:
    """Read `path` (YAML), apply `key.path=value` overrides, validate against `model`.

    An empty file is an error: it would silently run every default (say what you want, even one key).
    """
    data = read_yaml(path)
    if (data is None or data == {}) and not overrides:
        raise AblateError(f"{path}: the config file is empty; write at least one key (an empty file would "
                          f"silently run every default, e.g. the full default suite)")
    if overrides:
        data = apply_overrides(data or {}, overrides, source=str(path))
    return validate_config(data, model, source=str(path))


def apply_overrides(data: dict, overrides: list[str], source: str = "<cli>") -> dict:
    """Return a copy of `data` with each `a.b.c=value` applied; the value is parsed as YAML."""
    import copy

    result = copy.deepcopy(data) if data else {}
    for override in overrides:
        if "=" not in override:
            raise AblateError(f"override '{override}': expected KEY.PATH=VALUE")
        key, raw = override.split("=", 1)
        if not key.strip() or any(not part for part in key.strip().split(".")):
            raise AblateError(f"override '{override}': expected KEY.PATH=VALUE with a non-empty key")
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError as error:
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise AblateError(f"override '{override}': the value is not valid YAML ({problem}); quote it, "
                              f"e.g. {key}='\"text\"'") from None
        node = result
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise AblateError(f"override '{override}': '{part}' is not a mapping in {source}")
        node[parts[-1]] = value
    return result


def dump_config(config: BaseModel) -> str:
    """The resolved config as YAML (what the stage actually used)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)

