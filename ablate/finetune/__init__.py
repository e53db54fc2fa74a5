"""Supervised fine-tuning: harden a model into a safety-tuned organism, and LoRA/QLoRA attacks.

Two uses of one SFT routine (trl's `SFTTrainer` + a peft LoRA adapter, loss on the assistant's
answer only):

- `harden(model)`: refusal-eliciting prompts → short refusals (ablate/data/refusals.txt), plus
  harmless and borderline prompts → the model's *own* greedy answers (self-distillation, so the
  model keeps its capability and does not learn to refuse everything). The merged model is cached
  under `cache_dir()/organisms/<hash>/`; a second call with the same inputs is instant.
- `run_finetune(model, config, out_dir)`: the fine-tuning attack (Lermen et al. 2023, Qi et al.
  2023) as a budget sweep. Attack data modes: `harmful` (refusal prompts → compliant answers
  generated at run time by a donor model, refusals filtered out), `dataset` (a user's file or hub
  set), `benign` (harmless prompts only), `identity_shift` (an obedient persona, no harmful text).
  Each budget gets its own folder with metrics.json (wall time, steps, tokens, FLOPs, peak memory,
  loss curve, refusal rate), the adapter and the merged model; done.json is written last.

    ablate harden embedded --out organism/
    ablate finetune organism/ --config finetune_configs/lora_attack_sweep.yaml --out runs/attack

Assistant-only loss: examples are given to trl as conversational prompt/completion pairs, so trl
tokenises the prompt (chat template with the generation prompt) and the full conversation, and puts
loss only on the completion tokens — the answer and its end-of-turn token. This works with any
chat template, including SmolLM2's, which has no `{% generation %}` markers.

Compute accounting (`estimate_train_flops`): with N the weights of every matrix multiply (all
linear layers including the output head; embedding look-ups are free) and T the training tokens,
a forward pass costs 2·N·T FLOPs and the backward pass to the activations another 2·N·T. Full
fine-tuning also computes every weight gradient (2·N·T): 6·N·T in all. LoRA computes weight
gradients only for the adapter (N_lora ≪ N), whose own forward and backward add 4·N_lora·T:
4·N·T + 6·N_lora·T in all. A distillation loss (`training.loss: distill`) adds the donor's forward
passes, 2·N_donor·T. Attention-score FLOPs (∝ T·context) are left out; for short SFT sequences they
are a few percent.

Answers that a model writes (self-distillation, donor answers) are cached under
`cache_dir()/finetune_data/` — outside the repository — and never written into a run directory.

Modules: `recipe` (budgets and cache keys), `checks` (the config before any work), `answers`
(text resources, donor models and their cached answers), `training_data` (the examples), `loss` (the supervised loss), `trainer` (one budget's training), `measure` (refusal
and capability figures of a trained model), `sweep` (the stage, `run_finetune`), `organism` (`harden`
and its cache).
"""

from ablate.compute import matmul_parameters  # the N of the FLOPs formulas (re-exported)
from ablate.finetune.checks import check_config, pool_capacity
from ablate.finetune.loss import (accepts_logits_to_keep, first_answer_tokens, keep_answer_openings, packed_attention_mask,
                                  packed_forward, shared_prompt_prefix, supervised_head_loss)
from ablate.finetune.measure import (before_training, capability_answers, capability_baseline, capability_metrics,
                                     evaluate_refusal, is_main_process, read_before, write_before)
from ablate.finetune.organism import harden, organism_key, organism_metrics, score_organism
from ablate.finetune.recipe import (as_model_config, budget_fingerprint, data_fingerprint, default_config,
                                    model_fingerprint, recipe_fields, resolve_budgets)
from ablate.finetune.sweep import run_budget, run_finetune
from ablate.finetune.trainer import (TokenCounter, build_trainer, estimate_train_flops, flops_formula, gather_distributed,
                                     linear_module_names, load_for_training, peak_memory_bytes,
                                     save_model_dir, train_budget)
from ablate.finetune.answers import (ABLATED_DONOR, ablated_identity, ablated_model, donor_fingerprint, donor_model,
                                     generate_answers, load_dataset_examples, load_donor, read_identity_rows,
                                     read_text_resource, trim_truncated)
from ablate.finetune.training_data import balanced_order, build_examples, to_conversations

__all__ = [
    "ABLATED_DONOR", "TokenCounter", "ablated_identity", "ablated_model", "accepts_logits_to_keep", "as_model_config",
    "balanced_order", "before_training", "budget_fingerprint", "build_examples", "build_trainer", "capability_answers",
    "capability_baseline", "capability_metrics", "check_config", "data_fingerprint", "default_config", "donor_fingerprint", "donor_model",
    "estimate_train_flops", "evaluate_refusal", "first_answer_tokens", "flops_formula", "gather_distributed",
    "generate_answers", "harden", "is_main_process", "keep_answer_openings", "linear_module_names", "load_dataset_examples",
    "load_donor", "load_for_training", "matmul_parameters", "model_fingerprint", "organism_key", "organism_metrics",
    "packed_attention_mask", "packed_forward", "peak_memory_bytes", "pool_capacity", "read_before", "read_identity_rows",
    "read_text_resource", "recipe_fields", "resolve_budgets", "run_budget", "run_finetune", "save_model_dir",
    "score_organism", "shared_prompt_prefix", "supervised_head_loss", "to_conversations", "train_budget", "trim_truncated",
    "write_before",
]
