"""Refusal directions (Arditi et al. 2024): collect activations, form candidates, select one.

    ablate direction embedded --out runs/x/directions
    # or: from ablate.directions import run_direction; run_direction(model, tokenizer, DirectionConfig(), out)

1. **Collect.** One forward pass per batch of train prompts records the residual stream at every decoder
   layer's input, at the post-instruction positions (the chat-template tokens between the end of the
   user's message and the start of the assistant's answer). Means accumulate in float64; no activation
   is kept. The pass stops at the last layer's input (the output head is never run).
2. **Candidates.** r[layer, position] = mean(refusal) − mean(harmless); optionally the *projected*
   variant r − (r·μ̂_h) μ̂_h, orthogonal to the harmless mean μ_h at that site (heretic, grimjim).
3. **Refusal tokens.** A few refusal validation prompts are answered greedily; the first tokens of the
   answers that `is_refusal` scores as refusals are the model's own refusal openers R. The refusal
   score of a prompt is the log-odds of R at the first generated position,
   log p(R) − log(1 − p(R)) — positive when the model is about to refuse.
4. **Screen** (cheap, every candidate). One forward+backward pass gives a first-order estimate for all
   candidates at once. Ablation removes o ← o − (o·r̂) r̂ from every residual source o (embedding and
   writers), so the refusal score changes by ΔM ≈ −Σ (∂M/∂o · r̂)(o · r̂) = −r̂ᵀ A r̂ with
   A = Σ_sources,positions (∂M/∂o) oᵀ, a d_model × d_model matrix; adding r at layer ℓ to harmless
   prompts changes it by ≈ (Σ_positions ∂M/∂x_ℓ) · r. Only the best few (spread over layers) go on.
5. **Score exactly** (shortlist, validation split only): refusal score under ablation (refusal prompts,
   lower is better), steering score under activation addition (harmless prompts, must be > 0) and
   first-token KL(base ‖ ablated) on harmless prompts (damage). Successive halving: the whole shortlist on
   a few prompts first (`prescore_prompts`), the best `prescore_keep` on all of them, where the refusal
   prompts are also answered greedily (`score_by_generation`) and their refusals counted.
6. **Select.** Filters: not in the last `exclude_last_fraction` of layers, KL ≤ `kl_max`, steering >
   `steering_min`. Among the survivors the lowest max(refusal, refusal_floor) + kl_weight · KL wins, so
   damage counts and refusal past the floor earns nothing more; the refusal term is the log-odds of the
   generated refusals when they were counted (a direction can meet the first-token score by suppressing
   the refusal openers alone while the model still refuses in other words). When none survives: the best by the
   same objective, with a warning that says how many each filter removed.
7. **Strength search.** When full ablation of the pick exceeds `kl_max`, kernels peaked at its layer
   (`strength_search`) are scored the same way; the best within `kl_max` becomes the selected strength.
8. **Strength learning** (`strength_learning.enabled`, instead of the search). One weight per residual
   writer (attention out, MLP out of every layer), w = max_weight · sigmoid(θ), and a change δ to the
   direction (unit(r̂ + δ)), learned by Adam on the validation prompts against a smooth form of the
   objective plus a distillation term (first-token KL to the pick's full ablation on the refusal prompts),
   for the pick (or, by successive halving, the next best candidates too: `learn_strength`). The result is
   ranked by the refusals of greedy completions like the candidates; it replaces the pick and full
   ablation when it ranks better, and `orthogonalize_weights` bakes it in like any other strength.

Every pass runs on a copy of the model in `compute_dtype` ("auto": bfloat16 where the hardware computes it
natively — half the forward time on a CPU with AMX — float32 elsewhere); means are float64, the direction and weights float32, the model itself is never modified.

Artifacts (out_dir): candidates.pt + candidates.json, sweep.json (every candidate's scores), sweep.png,
selected.json, direction.pt, steer.pt (full ablation only: lm-eval `steered` model format, `--model steered
--model_args pretrained=MODEL,steer_path=steer.pt`), done.json last.

Modules, one per job: `batches` (post-instruction positions, prompt batches, first-token scores),
`candidates` (steps 1–3), `screen` (step 4), `select` (steps 5–6, `ValidationScorer`), `learn` (step 8),
`output` (artifacts, `load_direction`), `stage` (`run_direction`: the steps in order, and step 7).
Generated completions and their refusal verdicts come from `ablate.evaluate.measure`.
"""

from ablate.directions.batches import (PromptBatches, first_token_kl, first_token_logprobs, join_batches,
                                       joint_first_token_logprobs, model_device, post_instruction_tokens, prepare_batches,
                                       refusal_log_odds, run_prefix_and_batch)
from ablate.directions.candidates import RefusalOpeners, collect_mean_activations, compute_candidates, find_refusal_tokens
from ablate.directions.learn import LearningState, learn_strength, learn_writer_weights, learned_direction
from ablate.directions.output import export_steered, load_direction, plot_sweep
from ablate.directions.screen import ablation_sensitivity, gradient_attention, steering_sensitivity
from ablate.directions.select import (GENERATED_FIELDS, ValidationScorer, generated_fields, max_layer_allowed, objective,
                                      ranking_objective, select_candidate, shortlist_candidates, steering_threshold)
from ablate.directions.stage import compute_model, load_sets, native_bfloat16, resolve_compute_dtype, run_direction

__all__ = [
    "GENERATED_FIELDS", "LearningState", "PromptBatches", "ValidationScorer", "ablation_sensitivity", "collect_mean_activations",
    "RefusalOpeners", "compute_candidates", "compute_model", "export_steered", "find_refusal_tokens", "first_token_kl",
    "first_token_logprobs", "generated_fields", "gradient_attention", "join_batches", "joint_first_token_logprobs",
    "learn_strength", "learn_writer_weights", "learned_direction", "load_direction", "load_sets", "max_layer_allowed",
    "model_device", "native_bfloat16", "objective", "plot_sweep", "post_instruction_tokens", "prepare_batches",
    "ranking_objective", "refusal_log_odds", "resolve_compute_dtype", "run_direction", "run_prefix_and_batch",
    "select_candidate", "shortlist_candidates", "steering_sensitivity", "steering_threshold",
]
