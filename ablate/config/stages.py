"""Configs of the stage entry points (`ablate.stages`): each names its model and the stage's own config.

A study builds these from its YAML; each command of the command line builds one from its options; a script
can write one directly:

    from ablate.config import DirectionRun, ModelConfig
    from ablate.stages import run_direction
    run_direction(DirectionRun(model=ModelConfig(spec="embedded")), "runs/mine")
"""

from __future__ import annotations

from pydantic import Field

from ablate.config.directions import DirectionConfig
from ablate.config.evaluate import EvalSuite
from ablate.config.finetune import FinetuneConfig
from ablate.config.loading import StrictModel
from ablate.config.model import ModelConfig


class HardenRun(StrictModel):
    """The harden stage: a model fine-tuned into a safety-tuned organism (cached by content hash)."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="The model to harden.")
    recipe: FinetuneConfig | None = Field(None, description="Hardening recipe (mode harden, or a defence); null = the shipped organism recipe.")
    score: bool = Field(True, description="Score the organism's refusal rates and capability check after training (a study leaves this to its eval suite).")


class DirectionRun(StrictModel):
    """The direction stage: the refusal direction of a model, selected on validation prompts."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="The model whose refusal direction is found.")
    direction: DirectionConfig = Field(default_factory=DirectionConfig, description="How the direction is extracted, selected and weighted.")
    folder: str = Field("directions", description="Folder of the run directory that receives the artifacts ('.' = the run directory itself, as `ablate direction --out` does).")
    cache: bool = Field(True, description="Restore the folder from the stage cache when the same model, config, prompts, seed and code computed it before (ablate/stage_cache.py); never for folder '.'.")


class FinetuneRun(StrictModel):
    """The fine-tuning stage: a budget sweep (LoRA, QLoRA or full) on a model, one folder per budget."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="The model to fine-tune.")
    recipe: FinetuneConfig = Field(..., description="Fine-tuning recipe: data, adapter, training, budgets, evaluation.")
    folder: str = Field("finetune", description="Folder of the run directory that receives one folder per budget ('.' = the run directory itself, as `ablate finetune --out` does).")
    cache: bool = Field(True, description="Restore the folder from the stage cache when the same model, recipe, data, seed and code trained it before (ablate/stage_cache.py); never for folder '.'.")


class EvalRun(StrictModel):
    """The eval stage: one model variant scored with one suite, into eval/<variant>.json and generations/<variant>.jsonl."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="The model evaluated (with `direction` or `adapter` applied, when given).")
    variant: str = Field(..., description="Variant name: the file names under eval/ and generations/, and the report's row.")
    suite: EvalSuite = Field(default_factory=EvalSuite, description="The eval suite (load one by name or path with ablate.evaluate.load_suite).")
    reference: ModelConfig | None = Field(None, description="KL reference model (kl_first_token, kl_continuation, ce_reference_answers); null = no divergence metrics.")
    direction: str | None = Field(None, description="A finished direction folder whose ablation is applied to the model: orthogonalised weights, or hooks on a quantised model.")
    adapter: str | None = Field(None, description="A LoRA adapter folder attached to the model (a QLoRA budget: on its 4-bit base).")
    redact: bool = Field(False, description="Drop completions of refusal-eliciting prompts from generations/ (scores are kept).")
    cache: bool = Field(True, description="Reuse the stored evaluation of the same weights, reference, suite and code (ablate/evaluate/cache.py).")
