"""One compute axis: the FLOPs and wall time of everything an attack needs.

An attack is charged for every pass it made or used:

- the direction stage (the direction attack itself, and the `ablated` donor's own direction stage): measured
  by `count_flops`, which hooks every decoder layer and the output head. Each call of a module adds
  2·N_module·P forward FLOPs, N_module the weights of its matrix multiplies and P the positions it processed
  (padding included: it is computed; positions a pass skips — the output head's unkept logits, layers after an
  early stop — are not). A call made with gradients flowing (the screen's gradients, strength learning) is
  followed by one backward pass to the activations: another 2·N_module·P. Generation is counted the same way,
  one decoding step at a time with the KV cache;
- the donor's answers (harmful and benign attacks whose answers a donor writes): 2·N_donor·(prompt tokens +
  answer tokens) per answer — a forward pass over each token once, as decoding with a KV cache does —
  computed from the answers themselves, so answers read from the cache cost what generating them did; their
  wall time is the generation's measured seconds per answer. A budget is charged pro rata for the answers
  behind its examples: the pool's generated answers × n_examples / the pool's kept examples;
- training (`ablate.finetune.estimate_train_flops`): 6·N·T full, 4·N·T + 6·N_lora·T LoRA, + 2·N_donor·T for a
  distillation teacher.

Attention-score FLOPs (∝ positions × context) are left out everywhere, as in the training formula.

    with count_flops(model) as counted:
        model(**inputs)
    counted.forward_flops     # 2·N·B·T for one full forward pass
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

FORMULA = "2*N*P forward + 2*N*P_grad backward to the activations (per module: decoder layers and output head)"


@dataclass
class FlopCount:
    """FLOPs counted by `count_flops`: forward, backward (to the activations) and the positions the first
    decoder layer processed (a pass's token count), with the wall seconds of the counted block."""

    forward_flops: int = 0
    backward_flops: int = 0
    forward_positions: int = 0
    backward_positions: int = 0
    wall_seconds: float = 0.0

    @property
    def flops(self) -> int:
        return self.forward_flops + self.backward_flops

    def as_dict(self) -> dict:
        return {**asdict(self), "flops": self.flops, "formula": FORMULA}


def matmul_parameters(model) -> int:
    """Weights of every linear layer including the output head (what a forward pass multiplies by)."""
    total = 0
    for name, module in model.named_modules():
        if "lora_" in name:  # the adapter's own matrices are counted as N_lora
            continue
        if isinstance(module, nn.Linear) or type(module).__name__ in ("Conv1D", "Linear4bit", "Linear8bitLt"):
            weight = module.weight
            total += weight.numel() if not hasattr(weight, "quant_state") else math.prod(weight.quant_state.shape)
    return total


def matmul_weights(module: nn.Module) -> int:
    """Weights of every matrix multiply inside `module` (linear layers, GPT-2's Conv1D; not embeddings)."""
    return matmul_parameters(module)


@contextmanager
def count_flops(model: nn.Module) -> Iterator[FlopCount]:
    """Count the forward and backward FLOPs of every pass `model` makes inside the block (see the module
    docstring); the hooks (ablate.hooks) are removed on exit. A copy of the model made inside the block (a
    compute-dtype copy) carries the hooks and is counted too."""
    from ablate.hooks import hidden_from, hooks
    from ablate.models import get_adapter

    adapter = get_adapter(model)
    counted = FlopCount()

    def hook_for(module: nn.Module, first: bool):
        weights = matmul_weights(module)

        def hook(module, args, kwargs):
            hidden = hidden_from(args, kwargs)
            positions = int(hidden.numel() // hidden.shape[-1])
            counted.forward_flops += 2 * weights * positions
            # Gradients will flow back through this pass (to the activations, or to trainable weights).
            grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in module.parameters()))
            if grad:
                counted.backward_flops += 2 * weights * positions
            if first:
                counted.forward_positions += positions
                counted.backward_positions += positions if grad else 0
        return hook

    pre = [(layer, hook_for(layer, index == 0)) for index, layer in enumerate(adapter.layers)]
    pre.append((adapter.lm_head, hook_for(adapter.lm_head, False)))
    start = time.perf_counter()
    try:
        with hooks(pre=pre):
            yield counted
    finally:
        counted.wall_seconds = round(time.perf_counter() - start, 3)


def run_direction_counted(model: nn.Module, tokenizer, config, out_dir: Path, progress: bool = True) -> dict:
    """`ablate.directions.run_direction` with its compute counted into out_dir/compute.json (kept from the run
    that did the work when the stage is skipped as done)."""
    from ablate.artifacts import write_json
    from ablate.directions import run_direction

    with count_flops(model) as counted:
        selected = run_direction(model, tokenizer, config, out_dir, progress=progress)
    if counted.forward_positions > 0 or not (Path(out_dir) / "compute.json").exists():
        write_json(Path(out_dir) / "compute.json", {"stage": "direction", **counted.as_dict()})
    return selected


def direction_compute(direction_dir: str | Path | None) -> dict | None:
    """The compute.json a direction stage left (None when it left none)."""
    from ablate.artifacts import read_json

    if direction_dir is None:
        return None
    path = Path(direction_dir) / "compute.json"
    return read_json(path) if path.exists() else None


def generation_flops(n_matmul: int, prompt_tokens: int, answer_tokens: int) -> int:
    """2·N·(prompt + answer tokens): one forward pass over each token, as KV-cached decoding makes."""
    return 2 * n_matmul * (prompt_tokens + answer_tokens)


def attack_compute(train_metrics: dict, donor: dict | None, n_examples: int, pool: int | None) -> dict:
    """An attack budget's whole compute: its training, its share of the donor's answers and the donor's own
    direction stage (see the module docstring); FLOPs and wall seconds, each part named."""
    share = n_examples / pool if donor and pool else 0.0
    answers_flops = round(donor["answers_flops"] * share) if donor else 0
    answers_seconds = donor["answers_seconds"] * share if donor and donor.get("answers_seconds") is not None else 0.0
    direction = (donor or {}).get("direction") or {}
    direction_flops, direction_seconds = int(direction.get("flops", 0)), float(direction.get("wall_seconds", 0.0))
    train_flops, train_seconds = int(train_metrics.get("train_flops") or 0), float(train_metrics.get("wall_seconds") or 0)
    return {
        "train_flops": train_flops, "donor_answers_flops": answers_flops, "donor_direction_flops": direction_flops,
        "flops": train_flops + answers_flops + direction_flops,
        "train_seconds": train_seconds, "donor_answers_seconds": round(answers_seconds, 3),
        "donor_direction_seconds": direction_seconds,
        "wall_seconds": round(train_seconds + answers_seconds + direction_seconds, 3),
        "donor_answers_share": round(share, 4),
        "formula": "train + donor answers × n_examples / pool + donor direction stage",
    }
