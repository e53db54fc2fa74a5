"""Forward hooks: one context manager registers them and removes them in `finally`, and the small tensor
edits they make.

    with hooks(forward=[(module, hook)], pre=[(layer, pre_hook)]):
        model(**inputs)

Every place that hooks a model (directional ablation, activation addition, activation collection, the
direction stage's sensitivities and learned strengths, the study's projections) goes through `hooks`, so a
hook never outlives its context, also when the body raises. Pre-hooks are registered `with_kwargs=True`:
a decoder layer may receive `hidden_states` positionally or by keyword (`hidden_from`, `replace_hidden`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ablate import AblateError

Hook = tuple[nn.Module, Callable]


class StopForward(Exception):
    """Raised by a hook once it has what it needs: nothing after that module is computed."""


@contextmanager
def hooks(forward: Iterable[Hook] = (), pre: Iterable[Hook] = ()) -> Iterator[None]:
    """Register forward hooks (module, hook(module, inputs, output)) and forward pre-hooks
    (module, hook(module, args, kwargs)) while the context is open; all are removed in `finally`."""
    handles = []
    try:
        for module, hook in pre:
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        for module, hook in forward:
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Parameters stop requiring gradients while the context is open (gradients flow to activations only)."""
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def project_out(x: torch.Tensor, r_hat: torch.Tensor, weight: float | torch.Tensor = 1.0) -> torch.Tensor:
    """x − w (x·r̂) r̂ along the last axis, in x's dtype."""
    r_hat = r_hat.to(device=x.device, dtype=x.dtype)
    return x - weight * (x @ r_hat).unsqueeze(-1) * r_hat


def hidden_from(args: tuple, kwargs: dict) -> torch.Tensor:
    """A decoder layer's `hidden_states` input, passed positionally or by keyword."""
    return args[0] if args else kwargs["hidden_states"]


def replace_hidden(args: tuple, kwargs: dict, function: Callable) -> tuple[tuple, dict]:
    """Apply `function` to a decoder layer's `hidden_states`, passed positionally or by keyword."""
    if args:
        return (function(args[0]), *args[1:]), kwargs
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": function(kwargs["hidden_states"])}
    raise AblateError("cannot find hidden_states among a decoder layer's inputs")


def replace_output(output, function: Callable):
    """Modules return a tensor or a tuple whose first item is the tensor that is added to the residual."""
    if isinstance(output, tuple):
        return (function(output[0]), *output[1:])
    return function(output)
