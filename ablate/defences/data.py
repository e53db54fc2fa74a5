"""Data-level defences: the hardening examples they add or rewrite.

- Deep safety alignment (Qi et al. 2024, "Safety Alignment Should Be Made More Than Just a Few Tokens
  Deep", arXiv:2406.05946): safety-recovery examples. A refusal prompt x, the first k tokens h≤k of a
  compliant answer to it, then a refusal r; the loss falls on r only, given x and h≤k, so the model
  learns to return to a refusal after a compliant start instead of refusing only in its first tokens.
  The compliant answers are written at run time by a donor model (by default the model being hardened
  with its refusal direction ablated, as the attack's data is) and cached outside the repository.
- Extended refusal (Abu Shairah et al. 2025, "An Embarrassingly Simple Defense Against LLM Abliteration
  Attacks", arXiv:2505.19056): every refusal becomes a neutral overview of what the request asks, an
  explicit refusal and a short rationale, so the refusal is spread over many tokens. The paper's
  refusals were written by GPT-4o per prompt; here they are built from hand-written per-category
  sentences (ablate/data/extended_refusals.json) — refusals only, no harmful text.
- Circuit breakers (Zou et al. 2024, arXiv:2406.04313) need a rerouting set of harmful requests with
  compliant answers: the same donor writes them at run time (`rerouted_examples`); the loss that uses them
  is in `training.py`.
"""

from __future__ import annotations

import json
import random
from typing import Any

from ablate import AblateError
from ablate.config import FinetuneConfig, ModelConfig


def read_extended_refusals(name: str) -> dict:
    """The extended-refusal sentences: {"declines": [...], "categories": {category: {overview, rationale}}}."""
    from ablate.finetune.answers import read_text_resource

    try:
        table = json.loads(read_text_resource(name))
    except json.JSONDecodeError as error:
        raise AblateError(f"defence.refusals_file '{name}': invalid JSON ({error.msg}, line {error.lineno})") from None
    categories = table.get("categories") if isinstance(table, dict) else None
    if not table.get("declines") or not isinstance(categories, dict) or "default" not in categories:
        raise AblateError(f"defence.refusals_file '{name}': expected 'declines' (a list) and 'categories' with a 'default' entry")
    for category, entry in categories.items():
        if not entry.get("overview") or not entry.get("rationale"):
            raise AblateError(f"defence.refusals_file '{name}': category '{category}' needs 'overview' and 'rationale' lists")
    return table


def extended_refusal(category: str | None, table: dict, rng: random.Random) -> str:
    """Overview of the request, refusal, rationale — one hand-written sentence of each for the category."""
    entry = table["categories"].get(category or "default", table["categories"]["default"])
    return " ".join([rng.choice(entry["overview"]), rng.choice(table["declines"]), rng.choice(entry["rationale"])])


def extend_refusals(examples: list[dict], config: FinetuneConfig) -> list[dict]:
    """The examples with every refusal reply replaced by an extended refusal of its prompt's category."""
    table = read_extended_refusals(config.defence.refusals_file)
    rng = random.Random(config.data.seed + 1)
    return [{**e, "response": extended_refusal(e.get("category"), table, rng)} if e["kind"] == "refusal" else e
            for e in examples]


def opening(text: str, tokenizer, k: int) -> str:
    """The first k tokens of `text`, as text."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:k]
    return tokenizer.decode(ids)


def donor_answers(model: ModelConfig, config: FinetuneConfig, prompts: list[str], progress: bool, what: str) -> list[str]:
    """The defence donor's answers to `prompts` (`defence.donor`: a spec; 'ablated' = `model` with its refusal
    direction orthogonalised away; 'ablated:<spec>' = that model, ablated), written at run time and cached."""
    from ablate.finetune.answers import ABLATED_DONOR, ablated_model, ablated_source, generate_answers

    donor = config.defence.donor
    source = ablated_source(donor, model)
    writer = ablated_model(source, None, progress) if source is not None else donor
    return generate_answers(writer, prompts, config, progress, f"{what} ({donor if donor != ABLATED_DONOR else 'ablated'})")


def recovery_examples(model: ModelConfig, config: FinetuneConfig, examples: list[dict], progress: bool = True) -> tuple[list[dict], dict]:
    """Deep alignment's safety-recovery examples for a share of the refusal examples, and their statistics.

    Each is {prompt: x, prefill: h≤k, response: a refusal}: `prefill` is the donor's compliant opening,
    part of the prompt side (no loss), and the refusal after it is what the model learns. Donor answers
    that are refusals (or empty) give no example; their count is recorded.
    """
    from transformers import AutoTokenizer

    from ablate.evaluate.refusal import is_refusal
    from ablate.finetune.answers import read_text_resource
    from ablate.models import resolve_spec

    defence, data = config.defence, config.data
    rng = random.Random(data.seed + 2)
    refusals = [e for e in examples if e["kind"] == "refusal"]
    chosen = rng.sample(refusals, round(defence.recovery_fraction * len(refusals))) if refusals else []
    stats: dict[str, Any] = {"donor": defence.donor, "recovery_examples": 0, "dropped_donor_refusals": 0}
    if not chosen:
        return [], stats
    answers = donor_answers(model, config, [e["prompt"] for e in chosen], progress, "deep alignment openings")
    _, location = resolve_spec(model.spec)
    tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=model.trust_remote_code)
    replies = [line.strip() for line in read_text_resource(data.refusal_replies).splitlines() if line.strip()]
    added = []
    for example, answer in zip(chosen, answers):
        if not answer.strip() or is_refusal(answer):
            stats["dropped_donor_refusals"] += 1
            continue
        n_tokens = len(tokenizer(answer, add_special_tokens=False)["input_ids"])
        prefill = opening(answer, tokenizer, rng.randint(1, min(defence.prefix_max_tokens, n_tokens))).lstrip()
        if not prefill:
            stats["dropped_donor_refusals"] += 1
            continue
        reply = rng.choice(replies)
        added.append({**example, "id": f"{example['id']}-recovery", "kind": "recovery", "prefill": prefill,
                      "response": reply if prefill[-1:].isspace() else f" {reply}"})
    stats["recovery_examples"] = len(added)
    return added, stats


def rerouted_examples(model: ModelConfig, config: FinetuneConfig, examples: list[dict], progress: bool = True) -> tuple[list[dict], dict]:
    """Circuit breakers' rerouting set: each refusal prompt with the donor's compliant answer to it (kind
    'rerouted'), whose representations the defence turns away; the refusal examples and the harmless ones
    stay as the retain set. Donor refusals (or empty answers) give no example; their count is recorded."""
    from ablate.defences.training import REROUTED
    from ablate.evaluate.refusal import is_refusal

    refusals = [e for e in examples if e["kind"] == "refusal"]
    stats: dict[str, Any] = {"donor": config.defence.donor, "rerouted_examples": 0, "dropped_donor_refusals": 0}
    answers = donor_answers(model, config, [e["prompt"] for e in refusals], progress, "circuit-breaker answers") if refusals else []
    added = []
    for example, answer in zip(refusals, answers):
        if not answer.strip() or is_refusal(answer):
            stats["dropped_donor_refusals"] += 1
            continue
        added.append({**example, "id": f"{example['id']}-rerouted", "kind": REROUTED, "response": answer.strip()})
    stats["rerouted_examples"] = len(added)
    return added, stats
