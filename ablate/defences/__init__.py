"""Defences as hardening recipes: each is a `defence:` block of a harden config (finetune_configs/defence_*.yaml),
built and cached by `ablate harden MODEL --config …` like the organism (the defence is part of its cache key).

    ablate harden embedded --config finetune_configs/defence_refat.yaml --out defended/

| kind | paper | what changes in the hardening run |
|---|---|---|
| refusal_sft | (the organism) | nothing: refusal SFT with self-distilled harmless answers |
| deep_alignment | Qi et al. 2024, arXiv:2406.05946 | + safety-recovery examples: a donor's compliant opening, then a refusal (`data.py`) |
| extended_refusal | Abu Shairah et al. 2025, arXiv:2505.19056 | refusals become overview + refusal + rationale (`data.py`) |
| refat | Yu et al. 2024, arXiv:2409.20089 | the refusal feature ablated in part of the harmful rows, recomputed as training goes (`training.py`) |
| rerouting | Zou et al. 2024, arXiv:2406.04313 | on the refusal-SFT organism, a circuit-breaker loss: compliant representations rerouted, refusals and harmless ones retained (`training.py`) |
| vaccine | Huang et al. 2024, arXiv:2402.01109 | perturbation-aware SFT against harmful fine-tuning (`training.py`) |

The data-level defences act in `augment_examples` (called by the hardening run's example building), the
training-level ones in `attach` (called on the built Trainer). docs/defences.md describes each.
"""

from __future__ import annotations

from typing import Any

from ablate import AblateError
from ablate.config import DefenceKind, FinetuneConfig, ModelConfig
from ablate.defences.fields import DEFENCE_FIELDS  # noqa: F401  (the defences' cache-key fields, re-exported)

PAPERS = {
    DefenceKind.refusal_sft: "refusal SFT, the shipped organism (the baseline)",
    DefenceKind.deep_alignment: "Qi et al. 2024, Safety Alignment Should Be Made More Than Just a Few Tokens Deep (arXiv:2406.05946)",
    DefenceKind.extended_refusal: "Abu Shairah et al. 2025, An Embarrassingly Simple Defense Against LLM Abliteration Attacks (arXiv:2505.19056)",
    DefenceKind.refat: "Yu et al. 2024, Robust LLM safeguarding via refusal feature adversarial training (arXiv:2409.20089)",
    DefenceKind.rerouting: "Zou et al. 2024, Improving Alignment and Robustness with Circuit Breakers (arXiv:2406.04313)",
    DefenceKind.vaccine: "Huang et al. 2024, Vaccine: Perturbation-aware Alignment for LLMs against Harmful Fine-tuning (arXiv:2402.01109)",
}

def augment_examples(model: ModelConfig, config: FinetuneConfig, examples: list[dict],
                     progress: bool = True) -> tuple[list[dict], dict[str, Any]]:
    """The hardening examples as the defence wants them, and what it did ({"kind", ...counts})."""
    from ablate.defences.data import extend_refusals, recovery_examples, rerouted_examples

    kind = config.defence.kind
    stats: dict[str, Any] = {"kind": kind.value}
    if kind is DefenceKind.extended_refusal:
        examples = extend_refusals(examples, config)
        stats["extended_refusals"] = sum(e["kind"] == "refusal" for e in examples)
    elif kind in (DefenceKind.deep_alignment, DefenceKind.rerouting):
        build = recovery_examples if kind is DefenceKind.deep_alignment else rerouted_examples
        added, counts = build(model, config, examples, progress)
        if not added:
            raise AblateError(f"defence.donor '{config.defence.donor}': wrote no compliant answer "
                              f"({counts['dropped_donor_refusals']} refusals); {kind.value} needs a donor that answers")
        examples = examples + added
        stats.update(counts)
    return examples, stats


def attach(trainer, config: FinetuneConfig, examples: list[dict], tokenizer):
    """The training-level defence on a built Trainer (see ablate.defences.training.attach)."""
    from ablate.defences.training import attach as attach_training

    return attach_training(trainer, config, examples, tokenizer)


def render_prefilled(tokenizer, messages: list[dict], prefill: str, response: str) -> dict:
    """A text prompt/completion row: prompt = the chat up to the assistant's turn + `prefill`; completion =
    `response` and the template's end of turn (up to the end-of-turn token, which trl would add otherwise)."""
    if tokenizer is None:
        raise AblateError("examples with a prefill need the tokenizer's chat template to be rendered")
    head = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": prefill + response}],
                                         tokenize=False)
    if not full.startswith(head + prefill):
        raise AblateError("chat template: the assistant's turn does not start with its content as given, so a "
                          "prefilled opening cannot be placed in the prompt")
    completion = full[len(head) + len(prefill):]
    eos = tokenizer.eos_token
    if eos and eos in completion[len(response):]:
        completion = completion[: completion.index(eos, len(response)) + len(eos)]
    return {"prompt": head + prefill, "completion": completion}
