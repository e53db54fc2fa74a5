"""Config of a whole study: model, optional hardening, the attacks and the evaluation (ablate/study.py)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from ablate.config.loading import StrictModel
from ablate.config.model import ModelConfig


# A stage config inside a study is either a path to a YAML file (relative to the study file's folder,
# then to the current directory) or the config's fields written inline.
StageConfigSource = str | dict[str, Any] | None


class HardenStage(StrictModel):
    """Optional hardening: fine-tune the model into a safety-tuned organism before attacking it."""

    enabled: bool = Field(False, description="Harden the model first (needed for models that do not refuse, like the embedded one).")
    config: StageConfigSource = Field(None, description="Fine-tuning recipe (path or inline); None = the shipped organism recipe.")
    evaluate_base: bool = Field(True, description="Also evaluate the un-hardened base model, to show what hardening added.")


class DirectionStage(StrictModel):
    """Attack A: refusal-direction ablation."""

    enabled: bool = Field(True, description="Run the direction attack.")
    config: StageConfigSource = Field(None, description="Direction config (path, inline, or a shipped preset's name such as 'arditi2024'); None = defaults.")
    save_model: bool = Field(False, description="Save the orthogonalised model under models/ablated (safetensors, loadable by transformers).")
    cache: bool = Field(True, description="Restore directions/ from the stage cache when the same model, config, prompt sets, seed and code computed it before (ablate/stage_cache.py).")


class FinetuneStage(StrictModel):
    """Attack B: a LoRA fine-tuning budget sweep."""

    enabled: bool = Field(True, description="Run the fine-tuning attack.")
    config: StageConfigSource = Field(None, description="Fine-tuning attack recipe (path or inline, usually a budget sweep).")
    cache: bool = Field(True, description="Restore finetune/ (every budget) from the stage cache when the same model, recipe, data, donor direction, seed and code trained it before (ablate/stage_cache.py).")


class AttackStages(StrictModel):
    direction: DirectionStage = Field(default_factory=DirectionStage, description="Refusal-direction ablation.")
    finetune: FinetuneStage = Field(default_factory=FinetuneStage, description="LoRA fine-tuning attack.")


class EvalStage(StrictModel):
    suite: StageConfigSource = Field("default", description="Eval suite: 'default', 'paper', a YAML path, or inline fields.")
    overrides: list[str] = Field(default_factory=list, description="KEY.PATH=VALUE changes to the suite, e.g. 'refusal.n=48' (a study can shrink a suite without copying it).")
    redact: bool = Field(False, description="Drop completions of refusal-eliciting prompts from generations/ (scores are kept).")
    cache: bool = Field(True, description="Reuse the stored evaluation of a variant whose weights, KL reference, suite and code are unchanged (ablate/evaluate/cache.py) instead of evaluating it again.")


class StudyConfig(StrictModel):
    """A whole study: model → [harden] → attacks → evaluation of every variant → report."""

    name: str = Field("study", pattern=r"^[A-Za-z0-9_.-]+$", description="Study name, used for the run directory.")
    description: str = Field("", description="The study's question, printed at the top of the report.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The model under study.")
    harden: HardenStage = Field(default_factory=HardenStage, description="Optional hardening into a model organism.")
    attacks: AttackStages = Field(default_factory=AttackStages, description="The attacks to run against the (hardened) model.")
    eval: EvalStage = Field(default_factory=EvalStage, description="How every model variant is evaluated.")
    seed: int = Field(0, description="Global seed (torch, python) for every stage.")
    output_dir: str = Field("runs", description="Parent folder of run directories (runs/<name>-<timestamp>/).")
