"""Names that moved between the library versions pyproject.toml allows, handled in one place.

transformers 5.18 renamed the TrainingArguments field `gradient_checkpointing` to
`activation_checkpointing` (the old name stays as a deprecated alias until v6); 5.17 knows only
the old name. `renamed_fields(config_class, values)` passes each value under whichever name the
installed class has, so callers write the current name once.
"""

from __future__ import annotations

import dataclasses

# current name -> names it had in older releases still inside pyproject.toml's range
RENAMED = {
    "activation_checkpointing": ("gradient_checkpointing",),
    "activation_checkpointing_kwargs": ("gradient_checkpointing_kwargs",),
}


def renamed_fields(config_class: type, values: dict) -> dict:
    """`values` with every key the installed `config_class` lacks replaced by an older name it has."""
    names = {field.name for field in dataclasses.fields(config_class)}
    resolved = {}
    for key, value in values.items():
        if key not in names:
            key = next((old for old in RENAMED.get(key, ()) if old in names), key)
        resolved[key] = value
    return resolved
