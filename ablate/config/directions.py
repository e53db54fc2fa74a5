"""Configs of refusal directions: extraction, selection and strength (ablate/directions/), and the shipped presets."""

from __future__ import annotations

import math
from enum import Enum
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ablate import AblateError
from ablate.config.loading import StrictModel
from ablate.data import spec_parts, unfiltered



class DirectionVariant(str, Enum):
    plain = "plain"
    projected = "projected"
    both = "both"


class KernelConfig(StrictModel):
    """Per-layer ablation weights (heretic's parameterisation): a peak that falls off linearly."""

    max_weight: float = Field(1.0, ge=0, description="Ablation weight at the peak layer (1 = remove the whole component).")
    max_weight_position: float = Field(..., ge=0, description="Layer index of the peak.")
    min_weight: float = Field(0.0, ge=0, description="Weight at `min_weight_distance` layers from the peak; 0 beyond it.")
    min_weight_distance: float = Field(..., gt=0, description="How many layers either side of the peak the kernel reaches.")


class StrengthConfig(StrictModel):
    """How strongly the selected direction is removed (default: fully, at every layer)."""

    coefficient: float = Field(1.0, ge=0, description="Global multiplier on the ablation weights; 1 with no kernel = full directional ablation.")
    kernel: KernelConfig | None = Field(None, description="Per-layer weights; None = every layer (and the embedding) fully ablated.")
    writer_weights: list[list[float]] | None = Field(None, description="Explicit weights per layer and per residual writer of that layer ([attention out, MLP out]), as strength learning writes them; exclusive with `kernel`.")

    @model_validator(mode="after")
    def _one_kind_of_weights(self) -> "StrengthConfig":
        if self.kernel is not None and self.writer_weights is not None:
            raise ValueError("give either kernel or writer_weights, not both")
        for row in self.writer_weights or []:
            if not row or any(not math.isfinite(w) or w < 0 for w in row):
                raise ValueError(f"writer_weights: every layer needs finite weights >= 0, got {row}")
        return self


class StrengthLearning(StrictModel):
    """Learn per-writer ablation weights for the selected direction by gradient descent on the validation prompts."""

    enabled: bool = Field(True, description="Learn a weight in [0, max_weight] for every residual writer of every layer by minimising a smooth form of the selection objective.")
    steps: int = Field(16, ge=1, description="Adam steps, each one forward and backward pass over the next mini-batch of both validation sets joined into one batch.")
    batch_size: int = Field(8, ge=1, description="Prompts of each validation set per step.")
    candidates: int = Field(1, ge=1, description="Learn weights for the pick and the next best inducing candidates, this many in all, by successive halving; the best learned result wins.")
    halving_steps: int = Field(8, ge=1, description="Successive halving over the candidates: each learns this many steps, is scored exactly, and only the best goes on to `steps`.")
    lr: float = Field(0.5, gt=0, description="Adam learning rate on the weights' logits (weights start at max_weight / 2).")
    warmup_steps: int = Field(0, ge=0, description="Both learning rates rise linearly over this many first steps; 0 = full rate from the first step.")
    direction_lr: float = Field(0.02, ge=0, description="Adam learning rate on a change δ to the direction (the ablated direction is unit(r̂ + δ), δ starting at 0); 0 keeps the candidate's direction.")
    distill_weight: float = Field(1.0, ge=0, description="Weight of the first-token KL(start candidate's full ablation ‖ learned) on the refusal prompts in the loss; 0 = the floored refusal score alone.")
    max_weight: float = Field(1.0, gt=0, description="Upper bound of every learned weight (1 = remove the writer's whole component).")
    select_by_generation: bool = Field(True, description="Rank the learned results (and the pick they must beat) by the refusals of greedy validation completions instead of the first-token score.")


class SearchKernel(StrictModel):
    """One strength tried around the selected layer: a kernel peaked at that layer."""

    distance: float = Field(..., gt=0, description="Layers either side of the selected layer that the kernel reaches.")
    min_weight: float = Field(0.0, ge=0, description="Weight at `distance` layers from the peak; 0 beyond it.")
    max_weight: float = Field(1.0, ge=0, description="Weight at the selected layer.")


class DirectionConfig(StrictModel):
    """Refusal-direction extraction and selection (Arditi et al. 2024), see docs/directions.md."""

    refusal_train: str = Field("refusal:train", description="Prompt set the model should refuse, for the difference in means.")
    harmless_train: str = Field("harmless:train", description="Prompt set the model should answer, for the difference in means.")
    n_train: int = Field(64, ge=2, description="Prompts drawn (seeded sample) from each train set.")
    refusal_val: str = Field("refusal:val", description="Refusal prompts that score candidates (never a test split).")
    harmless_val: str = Field("harmless:val", description="Harmless prompts that score candidates (never a test split).")
    n_val: int = Field(32, ge=2, description="Prompts drawn (seeded sample) from each validation set.")
    system_prompt: str | None = Field(None, description="System message used for every prompt; None keeps the chat template's default, as evaluation does.")
    positions: int | None = Field(None, ge=1, description="Use the last N post-instruction template tokens; None = all of them.")
    variant: DirectionVariant = Field(DirectionVariant.both, description="Candidates: plain difference in means, 'projected' (orthogonalised against the harmless mean), or both.")
    exclude_last_fraction: float = Field(0.2, ge=0, lt=1, description="Candidates from the last fraction of layers are never selected (they act on the output, not on refusal).")
    shortlist: int = Field(10, ge=1, description="Candidates (best first-order screening estimate first, every variant of a site) whose exact refusal score and KL are computed.")
    shortlist_per_layer: int = Field(1, ge=1, description="At most this many shortlisted sites (positions) per layer, so the shortlist spans layers.")
    screen_prompts: int | None = Field(16, ge=1, description="Prompts of each validation set (the first N) that the first-order screen of every candidate runs on; None = all of them.")
    prescore_prompts: int | None = Field(8, ge=1, description="Successive halving: score the whole shortlist on this many prompts of each validation set first, and only the best `prescore_keep` on all; None = off.")
    prescore_keep: int = Field(2, ge=1, description="Candidates kept after the prescore for the exact score on the whole validation sets.")
    score_by_generation: bool = Field(True, description="Also count the refusals of greedy completions of the refusal validation prompts for each exactly scored candidate, and rank by them instead of the first-token score.")
    kl_max: float = Field(0.2, gt=0, description="Filter: first-token KL divergence on harmless validation prompts must not exceed this.")
    steering_min: float = Field(0.0, description="Filter: adding the direction to harmless prompts must raise the refusal score above this log-odds.")
    steering_relative: bool = Field(False, description="Read steering_min against the harmless prompts' unsteered refusal score instead of as an absolute log-odds (Arditi et al.: > 0).")
    refusal_floor: float = Field(-4.0, description="Refusal log-odds below this earn no further credit in the objective (and in the learning loss), so candidates past it are chosen by KL alone.")
    kl_weight: float = Field(8.0, ge=0, description="Selection objective = max(refusal score, refusal_floor) + kl_weight · KL; lowest wins.")
    steering_coefficient: float = Field(1.0, description="Multiplier on the direction when adding it for the steering score.")
    refusal_token_prompts: int = Field(16, ge=1, description="Refusal validation prompts generated greedily to find the model's own refusal-opening tokens.")
    refusal_token_alternatives: int = Field(4, ge=0, description="Also force each of those prompts' next N most likely first tokens and continue greedily, so lower-ranked refusal openers count too; 0 = greedy openers only.")
    refusal_token_max_new_tokens: int = Field(12, ge=1, description="Tokens generated per prompt when finding refusal-opening tokens (enough for the scorer to recognise a refusal).")
    refusal_token_retry_new_tokens: int | None = Field(64, ge=1, description="When under half of those answers refuse that early, judge answers this long if they show twice the refusals (refusals that decline late); null = never.")
    batch_size: int = Field(16, ge=1, description="Prompts per forward pass (length-sorted) for the means, the screen's gradients, the exact scores and the steering scores.")
    compute_dtype: Literal["auto", "model", "float32", "bfloat16", "float16"] = Field("auto", description="dtype of the stage's forward and backward passes, on a copy of the model when it differs; 'auto' = bfloat16 where the hardware computes it natively, else float32; 'model' = never copy.")
    gradient_attention: Literal["auto", "model", "eager", "sdpa"] = Field("auto", description="Attention implementation of the stage's backward passes, restored afterwards: 'auto' = eager on a CPU and the model's own elsewhere; 'model' = never change it.")
    generation_batch_size: int = Field(32, ge=1, description="Prompts per batch of greedy generation (refusal openers and generated refusals).")
    seed: int = Field(0, description="Seed for drawing the train and validation samples.")
    strength: StrengthConfig = Field(default_factory=StrengthConfig, description="How strongly the selected direction is removed (abliterate and the lm-eval export use it).")
    strength_search: list[SearchKernel] = Field(
        default_factory=lambda: [SearchKernel(distance=4), SearchKernel(distance=6), SearchKernel(distance=8),
                                 SearchKernel(distance=12, min_weight=0.3)],
        description="Kernels peaked at a candidate's layer, tried when the pick at `strength` exceeds kl_max and learning is off; the best that passes kl_max replaces `strength`; [] = no search.")
    strength_learning: StrengthLearning = Field(default_factory=StrengthLearning, description="Learn per-writer weights for the pick (the kernel search runs only when this is disabled); the result replaces the pick's strength when it scores better.")
    strength_candidates: int = Field(3, ge=1, description="The strength search tries its kernels on the pick and the next best exactly-scored candidates, this many in all.")

    @field_validator("refusal_train", "harmless_train", "refusal_val", "harmless_val")
    @classmethod
    def _never_test_split(cls, value: str) -> str:
        if any(unfiltered(part).lower().endswith(":test") for part in spec_parts(value.strip())):
            raise ValueError("directions are extracted and selected on train/val splits only; the test split is held out for evaluation")
        return value


def direction_presets() -> list[str]:
    """Names of the direction presets shipped in ablate/presets/ (e.g. 'arditi2024')."""
    from importlib import resources

    folder = resources.files("ablate").joinpath("presets")
    return sorted(item.name.removesuffix(".yaml") for item in folder.iterdir() if item.name.endswith(".yaml"))


def direction_preset_path(name: str) -> Path:
    """The YAML of a shipped direction preset; an unknown name is a one-line error listing the known ones."""
    from importlib import resources

    path = resources.files("ablate").joinpath("presets", f"{name}.yaml")
    if not path.is_file():
        raise AblateError(f"unknown direction preset '{name}'; expected one of: {', '.join(direction_presets())}")
    return Path(str(path))
