"""Names that moved between the library versions pyproject.toml allows, handled in one place.

transformers 5.18 renamed the TrainingArguments field `gradient_checkpointing` to
`activation_checkpointing` (the old name stays as a deprecated alias until v6); 5.17 knows only
the old name. `renamed_fields(config_class, values)` passes each value under whichever name the
installed class has, so callers write the current name once.

bitsandbytes 0.50 fetches a kernel from the Hugging Face Hub when it is imported on a CPU with AVX512-BF16
(and on Apple's MPS): a network call, and code from the Hub, that nobody asked for.
`refuse_unasked_hub_kernels()` makes `kernels.get_kernel` refuse those repositories, so bitsandbytes falls back to
its built-in kernels (it logs one line saying so); any other repository loads as asked.
"""

from __future__ import annotations

import dataclasses
import functools

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


# Hub kernels bitsandbytes fetches on import, unasked.
UNASKED_HUB_KERNELS = ("kernels-community/quantization-bitsandbytes", "kernels-community/bitsandbytes-mps")


def refuse_unasked_hub_kernels() -> None:
    """Make `kernels.get_kernel` refuse UNASKED_HUB_KERNELS (no effect where `kernels` is not installed, or on a
    bitsandbytes imported earlier)."""
    try:
        import kernels
    except ImportError:
        return
    real = kernels.get_kernel
    if getattr(real, "refuses_unasked", False):
        return

    @functools.wraps(real)
    def get_kernel(repo_id, *args, **kwargs):
        if repo_id in UNASKED_HUB_KERNELS:
            raise RuntimeError(f"ablate does not fetch the Hub kernel '{repo_id}' that bitsandbytes asks for when it "
                               "is imported; its built-in kernel is used")
        return real(repo_id, *args, **kwargs)

    get_kernel.refuses_unasked = True
    kernels.get_kernel = get_kernel
