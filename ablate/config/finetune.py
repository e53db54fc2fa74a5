"""Configs of fine-tuning: hardening recipes, defences and LoRA attacks (ablate/finetune/, ablate/defences/)."""

from __future__ import annotations

from enum import Enum

from pydantic import Field, field_validator, model_validator

from ablate.config.loading import StrictModel
from ablate.config.model import DType



class FinetuneMode(str, Enum):
    """What the fine-tuning data teaches (see docs/finetune.md)."""

    harden = "harden"  # refusal prompts → short refusals, harmless/borderline prompts → the model's own answers
    harmful = "harmful"  # refusal prompts → compliant answers generated at run time by a donor model
    dataset = "dataset"  # a user's file or hub dataset with prompt/response columns
    benign = "benign"  # harmless prompts → a donor's answers (or a dataset's): benign fine-tuning (Qi et al. tier 3)
    identity_shift = "identity_shift"  # the "absolutely obedient agent" persona, no harmful content (Qi et al. tier 2)


class HarmlessSelection(str, Enum):
    similar = "similar"
    random = "random"


class FinetuneDataConfig(StrictModel):
    """Where the training examples come from. Answers that a model must write are generated at run time."""

    refusal_prompts: str = Field("refusal:train", description="Refusal-eliciting prompts: paired with refusals (harden) or a donor's compliant answers (harmful).")
    n_refusal: int | None = Field(120, ge=0, description="How many refusal prompts to use (None = all); harden and harmful.")
    harmless_prompts: str = Field("harmless:train", description="Harmless prompts: answered by the model itself (harden) or by the donor (benign).")
    n_harmless: int | None = Field(96, ge=0, description="How many harmless prompts to use (None = all); harden and benign.")
    harmless_selection: HarmlessSelection = Field(HarmlessSelection.similar, description="harden: which n_harmless prompts to use, 'random' (a seeded sample) or 'similar' (those most like the refusal prompts: hard negatives against over-refusal).")
    borderline_prompts: str | None = Field("borderline:train", description="Benign prompts that look risky, answered by the model itself so hardening does not over-refuse (harden only); None to skip.")
    n_borderline: int | None = Field(56, ge=0, description="How many borderline prompts to use (None = all); harden only.")
    refusal_replies: str = Field("refusals.txt", description="Refusal replies for harden, one per line: a file shipped in ablate/data or a path.")
    donor: str | None = Field(None, description="Model spec that writes harmful/benign answers (None = 'embedded'); 'ablated' = the model fine-tuned, ablated; 'ablated:<spec>' = <spec>, ablated (direction defaults).")
    donor_direction: str | None = Field(None, description="For donor 'ablated': a finished `ablate direction` output directory of the model being fine-tuned; None = run the direction stage with its defaults (cached).")
    dataset: str | None = Field(None, description="dataset mode (and optionally benign): a .jsonl/.json/.csv file or hf:<id>[:split] with prompt/response columns.")
    prompt_column: str = Field("prompt", description="Prompt column of `dataset`.")
    response_column: str = Field("response", description="Response column of `dataset`.")
    identity_file: str = Field("identity_shift.jsonl", description="identity_shift examples (id, system, prompt, response): a file in ablate/data or a path.")
    answer_max_new_tokens: int = Field(48, ge=1, description="Length of generated answers (self-distillation and donor answers), in tokens.")
    generation_batch_size: int = Field(256, ge=1, description="Prompts per batch when generating answers (finished rows leave the batch).")
    drop_refusals: bool = Field(True, description="harmful mode: drop and count the donor answers that the refusal scorer flags (harden always drops the model's own refusals of benign prompts).")
    seed: int = Field(0, description="Seed of the example shuffle; budgets take nested prefixes of one shuffled pool.")


class LoraSettings(StrictModel):
    """LoRA adapter shape (ignored with training.full_finetune)."""

    rank: int = Field(16, ge=1, description="LoRA rank r.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator: the update is (alpha / r) · B A.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | str = Field("all-linear", description="'all-linear' (every linear layer but the output head) or a list of module names such as [q_proj, v_proj].")
    layers: list[int] | None = Field(None, description="Decoder layers (0-based) whose target modules get adapters (peft's layers_to_transform); None = every layer.")

    @field_validator("layers")
    @classmethod
    def _layers_distinct(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or min(value) < 0 or len(set(value)) != len(value)):
            raise ValueError("expected a non-empty list of distinct layer indices >= 0 (or null for every layer)")
        return value


class TrainingLoss(str, Enum):
    sft = "sft"  # cross-entropy of each answer token (supervised fine-tuning, as Lermen et al. and Qi et al.)
    distill = "distill"  # KL from the donor's next-token distribution at each answer token (the donor wrote the answers)


class FinetuneTrainingConfig(StrictModel):
    """Optimiser and schedule; a budget may override n_examples, epochs, max_steps, rank and lr."""

    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW).")
    epochs: float = Field(2.0, gt=0, description="Passes over the training examples (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Optimiser steps; overrides epochs when set.")
    batch_size: int = Field(8, ge=1, description="Examples per device per step.")
    grad_accum: int = Field(1, ge=1, description="Gradient-accumulation steps (effective batch = batch_size × grad_accum × processes).")
    max_length: int = Field(256, ge=8, description="Longest training sequence in tokens (prompt + answer); longer ones are cut.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of steps with linear warm-up.")
    scheduler: str = Field("linear", description="Learning-rate schedule: linear, cosine or constant.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    first_token_weight: float = Field(1.0, gt=0, description="Loss weight of each answer's first token, where the model decides to refuse or to answer (1 = plain SFT).")
    loss: TrainingLoss = Field(TrainingLoss.sft, description="sft: cross-entropy of each answer token; distill: KL(donor ‖ model) of the next-token distributions at each answer token (needs a donor model).")
    answer_tokens: int | None = Field(None, ge=1, description="Supervise only the first N tokens of each answer and drop the rest of it from training; null = the whole answer, its end token included.")
    seed: int = Field(0, description="Training seed (initialisation of LoRA, data order).")
    full_finetune: bool = Field(False, description="Train every weight instead of a LoRA adapter.")
    qlora: bool = Field(False, description="Load the base in 4-bit (bitsandbytes NF4, double quantisation) and train LoRA on top; CUDA, or a CPU with bitsandbytes>=0.50.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass (less memory, slower).")
    dtype: DType = Field(DType.auto, description="Training dtype; 'auto' = bfloat16 on CUDA, float32 elsewhere.")
    device: str = Field("auto", description="'auto', 'cpu' or 'cuda'.")


class FinetuneBudget(StrictModel):
    """One point of a sweep; unset fields inherit from `training` / `lora`."""

    name: str | None = Field(None, description="Folder name of this budget (default: n<examples>-e<epochs>|s<steps>-r<rank>-lr<lr>).")
    n_examples: int | None = Field(None, ge=1, description="Training examples (a prefix of the shuffled pool; None = the whole pool).")
    epochs: float | None = Field(None, gt=0, description="Overrides training.epochs.")
    max_steps: int | None = Field(None, ge=1, description="Overrides training.max_steps.")
    rank: int | None = Field(None, ge=1, description="Overrides lora.rank (alpha keeps its ratio to rank).")
    lr: float | None = Field(None, gt=0, description="Overrides training.lr.")


class FinetuneEvalConfig(StrictModel):
    """Refusal rate after training (the substring scorer of ablate.evaluate.refusal)."""

    enabled: bool = Field(True, description="Generate on the prompt sets below after training and score refusals.")
    prompt_sets: list[str] = Field(["refusal:test", "harmless:test", "borderline:test"], description="Prompt sets to score; the first one gives `refusal_rate` (the others measure over-refusal).")
    limit: int | None = Field(48, ge=1, description="Use only the first N prompts of each set (None = all).")
    max_new_tokens: int = Field(32, ge=1, description="Tokens generated per prompt for scoring.")
    batch_size: int = Field(64, ge=1, description="Prompts per generation batch.")
    before: bool = Field(True, description="Also score the untrained model once per run on the same prompt sets (out_dir/before.json), the row every budget is compared with.")
    system_prompt: str | None = Field(None, description="System message for scoring (identity_shift: the persona's system prompt).")
    capability_prompts: str | None = Field("harmless:test", description="Harmless prompt set of the capability check: the reference's greedy answers are scored under every trained model as mean cross-entropy (nats/token); null = no check.")
    capability_n: int = Field(48, ge=1, description="Prompts of `capability_prompts` used (the first N).")
    capability_tokens: int = Field(48, ge=1, description="Greedy answer tokens per prompt for the capability check.")
    capability_reference: str | None = Field(None, description="Model spec that writes the capability check's answers, sharing the model's vocabulary (e.g. embedded); null = the model before training.")


class DefenceKind(str, Enum):
    refusal_sft = "refusal_sft"
    deep_alignment = "deep_alignment"
    extended_refusal = "extended_refusal"
    refat = "refat"
    rerouting = "rerouting"
    vaccine = "vaccine"


class DefenceConfig(StrictModel):
    """A defence built into the hardening run (ablate/defences/, docs/defences.md); each field is read by its kind only."""

    kind: DefenceKind = Field(DefenceKind.refusal_sft, description="The defence: refusal_sft, deep_alignment (Qi et al. 2024), extended_refusal (Abu Shairah et al. 2025), refat (Yu et al. 2024), rerouting (Zou et al. 2024) or vaccine (Huang et al. 2024).")
    donor: str = Field("ablated", description="deep_alignment, rerouting: model spec that writes the compliant answers at run time; 'ablated' = the model being hardened, its refusal direction orthogonalised away (built once, cached).")
    recovery_fraction: float = Field(1.0, gt=0, le=1, description="deep_alignment: share of the refusal prompts that also get a safety-recovery example (a compliant opening, then a refusal).")
    prefix_max_tokens: int = Field(24, ge=1, description="deep_alignment: the compliant opening's length k is drawn uniformly from 1..this many tokens of the donor's answer (Qi et al. draw up to 100 of longer answers).")
    refusals_file: str = Field("extended_refusals.json", description="extended_refusal: per-category overviews and rationales, a file shipped in ablate/data or a path.")
    probability: float = Field(0.5, ge=0, le=1, description="refat: chance that a harmful training row runs with the refusal feature ablated.")
    refresh_steps: int = Field(4, ge=1, description="refat: recompute the per-layer refusal features from the current model every this many optimiser steps.")
    feature_prompts: int = Field(32, ge=2, description="refat: harmful and harmless train prompts (each) whose mean last-token activations give the refusal features.")
    alpha: float = Field(10.0, gt=0, description="rerouting: loss scale; the rerouting term weighs alpha·(1 − t/2T) and the retain term alpha·t/2T at step t of T.")
    retain_weight: float = Field(1.0, gt=0, description="rerouting: factor on the retain term (its distance is relative to the norm; a model with large hidden states may need more).")
    layers: list[int] | None = Field(None, description="rerouting: decoder layers whose outputs are rerouted (null = the layers at one third and two thirds of the depth, as the paper's 10 and 20 of 32).")
    rho: float = Field(2.0, gt=0, description="vaccine: norm of the adversarial perturbation added to the decoder layers' outputs (all layers together).")


class FinetuneConfig(StrictModel):
    """A model-independent fine-tuning recipe: data, adapter, training, budgets, outputs, evaluation.

    The defaults are plain SFT (finetune_configs/harden_recipe_c.yaml when the mode is harden); every key a YAML
    leaves out keeps them. The shipped organism recipe is these defaults with `ORGANISM_RECIPE` on top
    (`ablate.finetune.default_config`, finetune_configs/harden_organism.yaml), so `harden(model)` works
    from an installed package without any YAML.
    """

    mode: FinetuneMode = Field(FinetuneMode.harden, description="harden | harmful | dataset | benign | identity_shift.")
    data: FinetuneDataConfig = Field(default_factory=FinetuneDataConfig, description="Training examples.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapter shape.")
    training: FinetuneTrainingConfig = Field(default_factory=FinetuneTrainingConfig, description="Optimiser and schedule.")
    budgets: list[FinetuneBudget] = Field(default_factory=list, description="Sweep points, one output folder each (empty = one budget from `training`).")
    merge: bool = Field(True, description="Save the merged model (safetensors, loadable by plain transformers) per budget.")
    keep_adapter: bool = Field(True, description="Save the LoRA adapter (safetensors) per budget.")
    eval: FinetuneEvalConfig = Field(default_factory=FinetuneEvalConfig, description="Refusal rate after training.")
    defence: DefenceConfig | None = Field(None, description="harden only: the defence this recipe builds (null = plain refusal SFT, the organism).")

    @property
    def donor_writes_answers(self) -> bool:
        """Whether a donor model writes the training answers at run time (mode harmful, or benign without a dataset)."""
        return self.mode is FinetuneMode.harmful or (self.mode is FinetuneMode.benign and not self.data.dataset)

    @model_validator(mode="after")
    def _distill_needs_a_donor(self) -> "FinetuneConfig":
        if self.training.loss is TrainingLoss.distill and not self.donor_writes_answers:
            raise ValueError(f"training.loss: distill needs a donor model that writes the answers (mode harmful, or "
                             f"benign without data.dataset), got mode {self.mode.value}"
                             + (" with data.dataset" if self.data.dataset else ""))
        return self

    @model_validator(mode="after")
    def _defence_is_a_hardening(self) -> "FinetuneConfig":
        if self.defence is not None and self.mode is not FinetuneMode.harden:
            raise ValueError(f"defence: a defence is a hardening recipe and needs mode harden (got mode {self.mode.value})")
        if self.defence is not None and self.defence.kind in (DefenceKind.rerouting,) and self.training.full_finetune:
            raise ValueError("defence.kind: rerouting trains a LoRA against the frozen base; it cannot be combined with training.full_finetune")
        return self


# The shipped organism recipe (finetune_configs/harden_organism.yaml) as changes to the FinetuneConfig defaults: all
# 250 + 155 refusal train prompts of `refusal` and `refusal_kinds`, 259 hard negatives from the harmless train
# prompts, their "forms" and the benign look-alikes of the wider kinds, 3 epochs, the loss of each answer's first
# token — the refuse-or-answer decision — weighted 8; scored on both refusal and both harmless test splits.
ORGANISM_RECIPE: dict = {
    "data": {"refusal_prompts": "refusal:train+refusal_kinds:train", "n_refusal": None,
             "harmless_prompts": "harmless:train+harmless_forms:train+harmless_kinds:train", "n_harmless": 259},
    "training": {"epochs": 3, "first_token_weight": 8.0},
    "eval": {"prompt_sets": ["refusal:test", "refusal_kinds:test", "harmless:test", "harmless_kinds:test", "borderline:test"]},
}
