"""The DefenceConfig fields each defence reads: the others are left out of a hardened model's cache key
(`ablate.finetune.recipe.recipe_fields`)."""

from __future__ import annotations

from ablate.config import DefenceKind

# The DefenceConfig fields each kind reads (the others are left out of its cache key).
DEFENCE_FIELDS = {
    DefenceKind.refusal_sft: ("kind",),
    DefenceKind.deep_alignment: ("kind", "donor", "recovery_fraction", "prefix_max_tokens"),
    DefenceKind.extended_refusal: ("kind", "refusals_file"),
    DefenceKind.refat: ("kind", "probability", "refresh_steps", "feature_prompts"),
    DefenceKind.rerouting: ("kind", "alpha", "retain_weight", "layers", "donor"),
    DefenceKind.vaccine: ("kind", "rho"),
}
