"""Typed configs for every YAML the toolkit reads, validated once at the edge.

Every model forbids unknown keys (`extra="forbid"`), so a typo is an error, never a silent default.
`load_config(path, Model)` reads YAML with `yaml.safe_load` and turns any problem into a one-line
`AblateError` that names the file, the key path, the value and what was expected, e.g.

    finetune_configs/x.yaml: key 'lora.rank': Input should be a valid integer (got 'sixteen')

Precedence is CLI override > YAML > defaults: `apply_overrides` takes `key.path=value` strings.
Each stage's config lives in its own section below.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

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
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise AblateError(f"{path}:{where}: malformed YAML: {problem}") from None


def load_config(path: str | Path, model: type[ConfigT], overrides: list[str] | None = None) -> ConfigT:
    """Read `path` (YAML), apply `key.path=value` overrides, validate against `model`."""
    data = read_yaml(path) or {}
    if overrides:
        data = apply_overrides(data, overrides, source=str(path))
    return validate_config(data, model, source=str(path))


def apply_overrides(data: dict, overrides: list[str], source: str = "<cli>") -> dict:
    """Return a copy of `data` with each `a.b.c=value` applied; the value is parsed as YAML."""
    import copy

    result = copy.deepcopy(data) if data else {}
    for override in overrides:
        if "=" not in override:
            raise AblateError(f"override '{override}': expected KEY.PATH=VALUE")
        key, raw = override.split("=", 1)
        value = yaml.safe_load(raw) if raw else None
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


# --------------------------------------------------------------------------------------------
# Models and generation (foundation)
# --------------------------------------------------------------------------------------------


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class ModelConfig(StrictModel):
    """Which model to load and how."""

    spec: str = Field("embedded", description="'embedded', a hub id, a local model directory, or a .gguf file.")
    device: str = Field("auto", description="'auto' (CUDA, then MPS, then CPU), or a torch device such as 'cpu' or 'cuda:0'.")
    dtype: DType = Field(DType.auto, description="Weight dtype; 'auto' = bfloat16 on CUDA, float32 elsewhere.")
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the hub; off unless you trust the repository.")
    chat_template: str | None = Field(None, description="A Jinja chat template to use when the tokenizer has none (or to replace its own).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for a hub id.")


class GenerationConfig(StrictModel):
    """How completions are generated."""

    max_new_tokens: int = Field(64, ge=1, description="Tokens generated per prompt.")
    batch_size: int = Field(16, ge=1, description="Prompts per forward pass (length-sorted batches).")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (only when do_sample).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (only when do_sample).")
    seed: int = Field(0, description="Random seed for sampling.")
    system_prompt: str | None = Field(None, description="System message placed before every prompt; None keeps the template's default.")


# --------------------------------------------------------------------------------------------
# Fine-tuning (hardening and LoRA attacks) — ablate/finetune.py
# --------------------------------------------------------------------------------------------

# (section owned by the fine-tuning stage)

# --------------------------------------------------------------------------------------------
# Refusal directions — ablate/directions.py, ablate/interventions.py
# --------------------------------------------------------------------------------------------

# (section owned by the direction stage)

# --------------------------------------------------------------------------------------------
# Evaluation — ablate/evaluate/
# --------------------------------------------------------------------------------------------

# (section owned by the evaluation stage)

# --------------------------------------------------------------------------------------------
# Studies — ablate/study.py
# --------------------------------------------------------------------------------------------

# (section owned by the study stage)
