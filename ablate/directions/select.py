"""Steps 5–6 of the direction stage: exact validation scores of the shortlisted candidates (`ValidationScorer`),
the objective, the filters and the pick."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from ablate import AblateError
from ablate.config import DirectionConfig, GenerationConfig
from ablate.directions.batches import (
    PromptBatches,
    first_token_kl,
    first_token_logprobs,
    joint_first_token_logprobs,
    refusal_log_odds,
)
from ablate.generation import generate_batches
from ablate.interventions import activation_addition, directional_ablation


def objective(record: dict, config: DirectionConfig) -> float:
    """Lower is better: max(refusal score, refusal_floor) + kl_weight · KL."""
    return max(record["refusal_score"], config.refusal_floor) + config.kl_weight * record["kl"]


def ranking_objective(record: dict, config: DirectionConfig) -> float:
    """The objective that ranks: with the refusals of greedy completions in place of the first-token score when
    they were measured (`generated_objective`), else `objective`."""
    for key in ("generated_objective", "objective"):
        if record.get(key) is not None:
            return record[key]
    return objective(record, config)


def shortlist_candidates(records: list[dict], config: DirectionConfig, max_layer: int) -> list[int]:
    """Indices of the candidates to score exactly.

    Sites (layer, position) are taken in order of their best estimated ablation refusal score, at most
    `shortlist_per_layer` sites per layer and only layers < max_layer; every variant at a chosen site is
    scored (the projected variant often refuses as little at a lower KL), up to `shortlist` candidates.
    """
    by_site: dict[tuple[int, int], list[int]] = {}
    for index, record in enumerate(records):
        if record["layer"] < max_layer and not record["degenerate"]:
            by_site.setdefault((record["layer"], record["position"]), []).append(index)
    sites = sorted(by_site, key=lambda site: (min(records[i]["estimated_refusal_score"] for i in by_site[site]), site))
    chosen, per_layer = [], Counter()
    for site in sites:
        if per_layer[site[0]] >= config.shortlist_per_layer:
            continue
        per_layer[site[0]] += 1
        for index in sorted(by_site[site], key=lambda i: records[i]["estimated_refusal_score"]):
            if len(chosen) < config.shortlist:
                chosen.append(index)
        if len(chosen) >= config.shortlist:
            break
    return chosen


def select_candidate(records: list[dict], config: DirectionConfig, n_layers: int,
                     steering=None, unsteered: float = 0.0) -> tuple[int, bool, dict]:
    """Apply the filters and the objective to the exactly-scored records.

    Returns (index of the chosen record, fallback used, filter counts). Filters apply in order (late
    layer, shortlist, prescore, KL, steering); each count is how many that filter removed of those left. The
    steering score is needed only down to the pick, so survivors of the KL filter are visited in
    objective order and `steering(index)` (default: the record's stored score) is asked lazily;
    those ranked below the pick are counted as `steering_not_scored`. With `steering_relative` the
    steering threshold is `unsteered` (the harmless prompts' own refusal score) + steering_min.
    """
    steering = steering or (lambda index: records[index]["steering_score"])
    threshold = steering_threshold(config, unsteered)
    max_layer = max_layer_allowed(n_layers, config.exclude_last_fraction)
    counts = {"candidates": len(records)}
    left = [i for i in range(len(records)) if records[i]["layer"] < max_layer]
    counts["late_layer"] = len(records) - len(left)
    scored = [i for i in left if records[i].get("kl") is not None]
    dropped = sum(1 for i in left if records[i].get("kl") is None and "prescore" in records[i])
    counts["not_shortlisted"] = len(left) - len(scored) - dropped
    counts["prescore_dropped"] = dropped
    left = [i for i in scored if records[i]["kl"] <= config.kl_max]
    counts["kl_above_max"] = len(scored) - len(left)
    ranked = sorted(left, key=lambda i: (ranking_objective(records[i], config), i))
    counts["steering_not_above_min"] = 0
    for rank, index in enumerate(ranked):
        if steering(index) > threshold:
            counts["steering_not_scored"] = len(ranked) - rank - 1
            counts["passed"] = 1
            return index, False, counts
        counts["steering_not_above_min"] += 1
    counts["steering_not_scored"], counts["passed"] = 0, 0
    if not scored:
        raise AblateError("no candidate was scored (shortlist empty: every layer excluded by exclude_last_fraction?)")
    chosen = min(scored, key=lambda i: (ranking_objective(records[i], config), i))
    steering(chosen)
    return chosen, True, counts


def steering_threshold(config: DirectionConfig, unsteered: float) -> float:
    """The steering score a candidate must exceed: steering_min, plus the unsteered score when relative."""
    return config.steering_min + (unsteered if config.steering_relative else 0.0)


def max_layer_allowed(n_layers: int, exclude_last_fraction: float) -> int:
    """Layers ≥ this are excluded; at least layer 0 stays allowed."""
    return max(1, n_layers - int(math.floor(n_layers * exclude_last_fraction + 1e-9)))


@dataclass
class ValidationScorer:
    """An intervention measured on the validation prompts (never a test split): the first-token refusal score
    and KL(base ‖ intervened), the steering score, and the refusals of greedy completions."""

    model: nn.Module
    tokenizer: object
    config: DirectionConfig
    sets: dict
    token_ids: list[int]
    refusal: PromptBatches
    harmless: PromptBatches
    base_harmless: torch.Tensor
    judge_new_tokens: int | None = None  # greedy completions' length; None = config.refusal_token_max_new_tokens

    def ablated_logprobs(self, direction: torch.Tensor, weights, refusal: PromptBatches | None = None,
                         harmless: PromptBatches | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """First-token log-probabilities of the refusal and the harmless prompts under the ablation."""
        with directional_ablation(self.model, direction, weights):
            return joint_first_token_logprobs(self.model, refusal or self.refusal, harmless or self.harmless)

    def scores(self, refusal_logprobs: torch.Tensor, harmless_logprobs: torch.Tensor) -> tuple[float, float]:
        """(mean refusal log-odds on the refusal prompts, mean first-token KL on the harmless prompts); the
        harmless rows are the first len(harmless_logprobs) validation prompts (all of them, or a prescore's)."""
        base = self.base_harmless[: harmless_logprobs.shape[0]]
        return (float(refusal_log_odds(refusal_logprobs, self.token_ids).mean()),
                float(first_token_kl(base, harmless_logprobs).mean()))

    def ablated(self, direction: torch.Tensor, weights, refusal: PromptBatches | None = None,
                harmless: PromptBatches | None = None) -> tuple[float, float]:
        """`scores` of the ablation on the validation prompts (or on the first few of each: a prescore's)."""
        return self.scores(*self.ablated_logprobs(direction, weights, refusal, harmless))

    def steering(self, direction: torch.Tensor, layer: int) -> float:
        """Refusal log-odds on harmless prompts with `direction` added at `layer`'s input."""
        with activation_addition(self.model, direction, layer, self.config.steering_coefficient):
            steered = first_token_logprobs(self.model, self.harmless)
        return float(refusal_log_odds(steered, self.token_ids).mean())

    def measure(self, direction: torch.Tensor, weights, generate: bool) -> tuple[dict, torch.Tensor]:
        """The ablation's refusal score, KL and objective, and with `generate` the refusals of greedy completions
        of the refusal prompts (`generated_fields`; the first-token scores then come from the same pass).
        Returns (scores, the refusal prompts' first-token log-probabilities)."""
        if not generate:
            refusal_logprobs, harmless_logprobs = self.ablated_logprobs(direction, weights)
            refused = n = None
        else:
            from ablate.evaluate.refusal import is_refusal

            greedy = GenerationConfig(max_new_tokens=self.judge_new_tokens or self.config.refusal_token_max_new_tokens,
                                      batch_size=self.config.generation_batch_size, system_prompt=self.config.system_prompt)
            with directional_ablation(self.model, direction, weights):
                completions, first_logits = generate_batches(self.model, self.tokenizer, self.sets["refusal_val"].prompts,
                                                             greedy, progress=False)
                harmless_logprobs = first_token_logprobs(self.model, self.harmless)
            refusal_logprobs = torch.log_softmax(first_logits.float(), dim=-1).cpu()
            refused, n = sum(bool(text) and is_refusal(text) for text in completions), len(completions)
        refusal_score, kl = self.scores(refusal_logprobs, harmless_logprobs)
        scores = {"refusal_score": refusal_score, "kl": kl,
                  "objective": objective({"refusal_score": refusal_score, "kl": kl}, self.config)}
        if refused is not None:
            scores.update(generated_fields(refused, n, kl, self.config))
        return scores, refusal_logprobs


GENERATED_FIELDS = ("generated_refusal_rate", "generated_refusal_score", "generated_objective")


def generated_fields(refused: int, n: int, kl: float, config: DirectionConfig) -> dict:
    """Refusals of greedy completions (the substring scorer, as evaluation counts them) as a rate and as smoothed
    log-odds log((k + ½) / (n − k + ½)), and the objective with those log-odds in place of the first-token score:
    a direction can meet the first-token score by suppressing the refusal openers alone while the model still
    refuses in other words — the completions count the refusals."""
    score = math.log((refused + 0.5) / (n - refused + 0.5))
    return {"generated_refusal_rate": refused / n, "generated_refusal_score": score,
            "generated_objective": objective({"refusal_score": score, "kl": kl}, config)}
