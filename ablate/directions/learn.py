"""Step 8 of the direction stage: per-writer ablation weights (and a change to the direction) learned by Adam
on the validation prompts, by successive halving over the best candidates."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ablate import AblateError
from ablate.config import DirectionConfig
from ablate.directions.batches import (
    PromptBatches,
    first_token_kl,
    join_batches,
    model_device,
    prepare_batches,
    refusal_log_odds,
    run_prefix_and_batch,
)
from ablate.directions.screen import gradient_attention
from ablate.directions.select import ValidationScorer, ranking_objective
from ablate.hooks import frozen, hooks, project_out, replace_output
from ablate.interventions import unit
from ablate.models import get_adapter


@contextmanager
def learnable_ablation(model: nn.Module, direction: torch.Tensor, logits: torch.Tensor, max_weight: float,
                        delta: torch.Tensor | None = None):
    """o ← o − w (o·r̂) r̂ on every residual writer, w = max_weight · sigmoid(logits[layer, writer]),
    r̂ = unit(unit(direction) + delta) when `delta` is given (the direction is learned too).

    The weights and r̂ are computed inside each hook from the leaves `logits` and `delta`, so every
    forward pass builds its own graph and gradients reach them. Hooks are removed in `finally`.
    """
    r_start = unit(direction).to(model_device(model))

    def make_hook(layer: int, writer: int):
        def hook(module, inputs, output):
            weight = max_weight * torch.sigmoid(logits[layer, writer])
            r_hat = r_start if delta is None else (r_start + delta) / (r_start + delta).norm()  # differentiable
            return replace_output(output, lambda x: project_out(x, r_hat, weight.to(x.dtype)))

        return hook

    with hooks(forward=[(module, make_hook(layer, writer)) for layer, writers in enumerate(get_adapter(model).writers)
                        for writer, module in enumerate(writers)]):
        yield


@dataclass
class LearningState:
    """Where a run of strength learning stands: the weights' logits, the change to the direction (None when
    the direction is fixed), their optimiser, the next step and the per-step history."""

    logits: torch.Tensor
    delta: torch.Tensor | None
    optimizer: torch.optim.Optimizer
    step: int = 0
    history: list[dict] = field(default_factory=list)


def learned_direction(direction: torch.Tensor, state: LearningState) -> torch.Tensor:
    """The direction a learning run ablates, at the norm of the one it started from (ablation uses only r̂;
    activation addition and the steering score use the norm)."""
    if state.delta is None:
        return direction.clone()
    r_hat = unit(unit(direction.float()) + state.delta.detach().to(direction.device))
    return (r_hat * direction.float().norm()).to(direction.dtype)


def learn_writer_weights(model: nn.Module, direction: torch.Tensor, refusal: PromptBatches, harmless: PromptBatches,
                         base_harmless: torch.Tensor, token_ids: list[int], config: DirectionConfig,
                         progress: bool = False, steps: int | None = None, state: LearningState | None = None,
                         target_refusal: torch.Tensor | None = None) -> tuple[list[list[float]], LearningState]:
    """Per-writer ablation weights in [0, max_weight] (and, with `direction_lr` > 0, a change to the direction)
    that minimise the selection objective on validation prompts.

    Loss = mean over refusal prompts of floor + softplus(score − floor) (a smooth max(score, floor): refusal
    pushed past `refusal_floor` earns nothing more) + kl_weight · mean first-token KL(base ‖ ablated) over
    harmless prompts; with `target_refusal` (first-token log-probabilities of the refusal prompts, input
    order: the start candidate's full ablation) also + distill_weight · mean KL(target ‖ ablated) over the
    refusal prompts — the learned ablation must answer them as full ablation does, not merely avoid the
    refusal openers (which a learned direction can do while the model still refuses in other words).
    Adam on the weights' logits (start 0: every weight max_weight / 2) and on δ, where the ablated
    direction is unit(r̂ + δ) (start 0: the candidate itself); each step takes the next batch of each
    validation set in turn (mini-batches as `refusal` and `harmless` are batched), joined into one pass
    (`join_batches`), the model frozen and its attention `config.gradient_attention`. Runs
    `steps` steps (default `strength_learning.steps`) from `state` (default: a fresh start), so a run can be
    continued exactly where it stopped. Deterministic for the same inputs.
    Returns (weights, state); `state.history` has one entry per step, `learned_direction` reads the direction.
    """
    settings = config.strength_learning
    rows = [len(writers) for writers in get_adapter(model).writers]
    if len(set(rows)) != 1:
        raise AblateError(f"strength_learning needs the same number of residual writers in every layer, got {sorted(set(rows))}")
    if state is None:
        logits = torch.zeros(len(rows), rows[0], requires_grad=True)
        groups = [{"params": [logits], "lr": settings.lr}]
        delta = None
        if settings.direction_lr > 0:
            delta = torch.zeros(direction.shape[-1], device=model_device(model), requires_grad=True)
            groups.append({"params": [delta], "lr": settings.direction_lr})
        state = LearningState(logits, delta, torch.optim.Adam(groups))
    logits, optimizer, floor = state.logits, state.optimizer, config.refusal_floor
    steps = settings.steps if steps is None else steps
    with frozen(model), gradient_attention(model, config.gradient_attention), \
            learnable_ablation(model, direction, logits, settings.max_weight, state.delta):
        for step in tqdm(range(state.step, state.step + steps), desc="strength learning", unit="step",
                         disable=not progress, leave=False):
            optimizer.zero_grad()
            refusal_rows, refusal_inputs = refusal.batches[step % len(refusal.batches)]
            harmless_rows, harmless_inputs = harmless.batches[step % len(harmless.batches)]
            # Both sets' mini-batches in one pass: rows [0, n) are the refusal prompts, the rest the harmless ones.
            prefix, inputs = join_batches(refusal, refusal_inputs, harmless, harmless_inputs)
            logprobs = torch.log_softmax(run_prefix_and_batch(model, prefix, inputs), dim=-1)
            n = len(refusal_rows)
            refusal_loss = (floor + nn.functional.softplus(refusal_log_odds(logprobs[:n], token_ids) - floor)).mean()
            distill = torch.zeros(())
            if target_refusal is not None and settings.distill_weight > 0:
                distill = first_token_kl(target_refusal[refusal_rows].to(logprobs.device), logprobs[:n]).mean()
                refusal_loss = refusal_loss + settings.distill_weight * distill
            kl = first_token_kl(base_harmless[harmless_rows].to(logprobs.device), logprobs[n:]).mean()
            loss = refusal_loss + config.kl_weight * kl
            loss.backward()
            ramp = min(1.0, (step + 1) / settings.warmup_steps) if settings.warmup_steps else 1.0
            for group, rate in zip(optimizer.param_groups, (settings.lr, settings.direction_lr)):
                group["lr"] = rate * ramp
            optimizer.step()
            state.history.append({"step": step, "refusal_loss": round(float(refusal_loss.detach()), 4),
                                  "distill_kl": round(float(distill.detach()), 4), "kl": round(float(kl.detach()), 4),
                                  "loss": round(float(loss.detach()), 4)})
    state.step += steps
    weights = (settings.max_weight * torch.sigmoid(logits.detach())).tolist()
    return [[round(w, 4) for w in row] for row in weights], state


def learn_strength(model: nn.Module, scorer: ValidationScorer, starts: list[tuple[int, torch.Tensor, torch.Tensor | None]],
                   progress: bool = False) -> tuple[dict, list[dict]]:
    """Strength learning (`learn_writer_weights`) on `model` from each start — (candidate index, direction,
    distillation target or None) — by successive halving: with several starts each learns `halving_steps`
    steps and is scored, and only the best by the ranking (generated refusals, then the objective, then start
    order) goes on to `steps`; when its second half ranks worse, the halfway weights and direction are kept.

    Returns (best, runs): best = {index, weights, direction, state, scores}; runs = each start's scores after
    its first rung (index, steps, scores).
    """
    config, settings = scorer.config, scorer.config.strength_learning
    device = model_device(model)
    batches = {name: prepare_batches(scorer.tokenizer, scorer.sets[f"{name}_val"].prompts, settings.batch_size,
                                     config.system_prompt, device) for name in ("refusal", "harmless")}
    first_steps = settings.steps if len(starts) == 1 else min(settings.halving_steps, settings.steps)

    def learn(direction, target, steps, state=None):
        return learn_writer_weights(model, direction, batches["refusal"], batches["harmless"], scorer.base_harmless,
                                    scorer.token_ids, config, progress, steps=steps, state=state, target_refusal=target)

    def scored(start: torch.Tensor, weights, state: LearningState) -> dict:
        direction = learned_direction(start, state)
        scores, _ = scorer.measure(direction, weights, generate=settings.select_by_generation)
        return {**scores, "direction_cosine": float(nn.functional.cosine_similarity(direction.float(), start.float(), dim=0))}

    runs = []
    for order, (index, start, target) in enumerate(starts):
        weights, state = learn(start, target, first_steps)
        runs.append({"order": order, "index": index, "steps": first_steps, "scores": scored(start, weights, state),
                     "weights": weights, "state": state})
    best_run = min(runs, key=lambda run: (ranking_objective(run["scores"], config), run["scores"]["objective"], run["order"]))
    index, start, target = starts[best_run["order"]]
    best = {"index": index, "weights": best_run["weights"], "state": best_run["state"], "scores": best_run["scores"],
            "direction": learned_direction(start, best_run["state"])}
    if first_steps < settings.steps:
        halfway = dict(best)
        weights, state = learn(start, target, settings.steps - first_steps, best["state"])
        best = {**best, "weights": weights, "state": state, "scores": scored(start, weights, state),
                "direction": learned_direction(start, state)}
        if ranking_objective(best["scores"], config) > ranking_objective(halfway["scores"], config):  # the second half made it worse
            best = {**halfway, "state": state, "scores": {**halfway["scores"], "kept_halfway": True}}
    return best, [{"index": run["index"], "steps": run["steps"], **run["scores"]} for run in runs]
