"""Typed configs for every YAML the toolkit reads, validated once at the edge, one module per stage.

    loading     StrictModel, load_config / validate_config / apply_overrides / dump_config (one-line errors)
    model       ModelConfig, GenerationConfig
    finetune    FinetuneConfig and its parts, DefenceConfig, ORGANISM_RECIPE
    directions  DirectionConfig and its strength settings, the shipped direction presets
    evaluate    EvalSuite, its prompt sets, scorers, judges, capability tasks and KL
    stages      HardenRun, DirectionRun, FinetuneRun, EvalRun: the configs of the stage entry points (ablate.stages)
    study       StudyConfig and its stage sections

Every name is re-exported here, so `from ablate.config import FinetuneConfig` is the way to import one.
"""

from ablate.config.directions import (
    DirectionConfig,
    DirectionVariant,
    KernelConfig,
    SearchKernel,
    StrengthConfig,
    StrengthLearning,
    direction_preset_path,
    direction_presets,
)
from ablate.config.evaluate import (
    JUDGE_FIELD_ALIASES,
    JUDGE_TEMPLATE_FIELDS,
    CapabilityConfig,
    CapabilityTaskConfig,
    DegenerateConfig,
    EvalPromptSet,
    EvalSuite,
    JudgeConfig,
    JudgeDecision,
    JudgeKind,
    JudgeTemplateKind,
    KLConfig,
    LengthConfig,
    ScorersConfig,
    judge_template_fields,
)
from ablate.config.finetune import (
    ORGANISM_RECIPE,
    DefenceConfig,
    DefenceKind,
    FinetuneBudget,
    FinetuneConfig,
    FinetuneDataConfig,
    FinetuneEvalConfig,
    FinetuneMode,
    FinetuneTrainingConfig,
    HarmlessSelection,
    LoraSettings,
    TrainingLoss,
)
from ablate.config.loading import (
    ConfigT,
    StrictModel,
    apply_overrides,
    dump_config,
    format_validation_error,
    load_config,
    read_yaml,
    validate_config,
)
from ablate.config.model import DType, GenerationConfig, ModelConfig, PromptTooLong, Quantization
from ablate.config.stages import DirectionRun, EvalRun, FinetuneRun, HardenRun
from ablate.config.study import (
    AttackStages,
    DirectionStage,
    EvalStage,
    FinetuneStage,
    HardenStage,
    StageConfigSource,
    StudyConfig,
)

__all__ = [
    "JUDGE_FIELD_ALIASES", "JUDGE_TEMPLATE_FIELDS", "ORGANISM_RECIPE", "AttackStages", "CapabilityConfig",
    "CapabilityTaskConfig", "ConfigT", "DType", "DefenceConfig", "DefenceKind", "DegenerateConfig", "DirectionConfig",
    "DirectionRun", "DirectionStage", "DirectionVariant", "EvalPromptSet", "EvalRun", "EvalStage", "EvalSuite", "FinetuneBudget", "FinetuneConfig",
    "FinetuneDataConfig", "FinetuneEvalConfig", "FinetuneMode", "FinetuneRun", "FinetuneStage", "FinetuneTrainingConfig",
    "GenerationConfig", "HardenRun", "HardenStage", "HarmlessSelection", "JudgeConfig", "JudgeDecision", "JudgeKind",
    "JudgeTemplateKind", "KLConfig", "KernelConfig", "LengthConfig", "LoraSettings", "ModelConfig", "PromptTooLong",
    "Quantization", "ScorersConfig", "SearchKernel", "StageConfigSource", "StrengthConfig", "StrengthLearning",
    "StrictModel", "StudyConfig", "TrainingLoss", "apply_overrides", "direction_preset_path", "direction_presets",
    "dump_config", "format_validation_error", "judge_template_fields", "load_config", "read_yaml", "validate_config",
]
