"""Training examples: refusals and self-distilled answers for hardening, attack data (a donor model's answers,
a dataset, benign prompts, an identity shift), ordered so that every budget's prefix covers the categories, and
as trl's conversations. Where the answers come from (donors, the answer cache) is `ablate.finetune.answers`."""

from __future__ import annotations

import random
from typing import Any

from ablate import AblateError
from ablate.config import (
    FinetuneConfig,
    FinetuneMode,
    HarmlessSelection,
    ModelConfig,
)
from ablate.finetune.answers import (
    ablated_source,
    donor_answers_cost,
    donor_direction_dir,
    donor_model,
    generate_answers,
    load_dataset_examples,
    read_identity_rows,
    read_text_resource,
)
from ablate.finetune.recipe import as_model_config


def build_examples(model: str | ModelConfig, config: FinetuneConfig, progress: bool = True) -> tuple[list[dict], dict]:
    """The shuffled pool of training examples {id, kind, system, prompt, response} and its statistics.

    Budgets take prefixes of this pool, so a smaller budget's examples are a subset of a larger one's.
    """
    from ablate.data import load_prompt_set
    from ablate.evaluate.refusal import is_refusal

    data = config.data
    rng = random.Random(data.seed)
    stats: dict[str, Any] = {"generated": 0, "dropped_refusals": 0}
    examples: list[dict] = []

    def prompts_of(spec: str | None, limit: int | None, like: list[str] | None = None):
        """`limit` prompts of `spec`: a seeded sample, or the ones most like the prompts `like` (hard negatives)."""
        if not spec or limit == 0:
            return None
        prompts = load_prompt_set(spec)
        return prompts.most_similar(limit, like) if like is not None else prompts.sample(limit, seed=data.seed)

    if config.mode is FinetuneMode.harden:
        replies = [line.strip() for line in read_text_resource(data.refusal_replies).splitlines() if line.strip()]
        if not replies:
            raise AblateError(f"data.refusal_replies '{data.refusal_replies}': no replies in the file")
        refusal = prompts_of(data.refusal_prompts, data.n_refusal)
        if refusal is not None:
            examples += [{"id": i, "kind": "refusal", "category": c, "system": None, "prompt": p,
                          "response": rng.choice(replies)}
                         for i, p, c in zip(refusal.ids, refusal.prompts, refusal.categories)]
        own: list[tuple[str, str, str]] = []  # (kind, id, prompt): answered by the model itself
        for kind, spec, limit in (("harmless", data.harmless_prompts, data.n_harmless),
                                  ("borderline", data.borderline_prompts, data.n_borderline)):
            similar = kind == "harmless" and data.harmless_selection is HarmlessSelection.similar
            chosen = prompts_of(spec, limit, like=(refusal.prompts if refusal is not None else []) if similar else None)
            if chosen is not None:
                own += [(kind, i, p) for i, p in zip(chosen.ids, chosen.prompts)]
        # One generation call for both sets (length-sorted batches across them).
        answers = generate_answers(model, [p for _, _, p in own], config, progress, "self-distillation") if own else []
        stats["generated"] += len(answers)
        for (kind, i, p), a in zip(own, answers):
            # The base's own refusals and persona disclaimers on benign prompts would teach over-refusal.
            if not a.strip() or is_refusal(a):
                stats["dropped_refusals"] += 1
                continue
            examples.append({"id": i, "kind": kind, "system": None, "prompt": p, "response": a})
        if config.defence is not None:  # a defence recipe rewrites or adds examples (ablate.defences)
            from ablate.defences import augment_examples

            examples, stats["defence"] = augment_examples(as_model_config(model), config, examples, progress)
    elif config.donor_writes_answers:
        harmful = config.mode is FinetuneMode.harmful
        source = prompts_of(data.refusal_prompts if harmful else data.harmless_prompts,
                            data.n_refusal if harmful else data.n_harmless)
        donor = data.donor or "embedded"
        writer = donor_model(model, config, progress)
        answers = generate_answers(writer, source.prompts, config, progress, f"donor answers ({donor})")
        stats["generated"] = len(answers)
        from ablate.compute import direction_compute

        stats["donor_compute"] = donor_answers_cost(writer, source.prompts, answers, config)
        if ablated_source(donor, model) is not None:  # the donor's own direction stage is part of what the attack used
            stats["donor_compute"]["direction"] = direction_compute(donor_direction_dir(model, data))
            stats["donor"] = f"{donor}: {writer}"
        else:
            stats["donor"] = donor
        for i, p, c, a in zip(source.ids, source.prompts, source.categories, answers):
            if not a.strip() or (harmful and data.drop_refusals and is_refusal(a)):
                stats["dropped_refusals"] += 1
                continue
            examples.append({"id": i, "kind": config.mode.value, "category": c, "system": None, "prompt": p,
                             "response": a})
    elif config.mode in (FinetuneMode.dataset, FinetuneMode.benign):
        examples = load_dataset_examples(config)
        if config.mode is FinetuneMode.benign and data.n_harmless is not None:
            examples = examples[: data.n_harmless]
    else:
        examples = [{"id": row.get("id", str(k)), "kind": "identity_shift", "system": row.get("system"),
                     "prompt": row["prompt"], "response": row["response"]}
                    for k, row in enumerate(read_identity_rows(data.identity_file))]
    if config.mode is FinetuneMode.harden:
        rng.shuffle(examples)  # harden trains on the whole pool: a plain shuffle mixes the kinds in every batch
    else:
        examples = balanced_order(examples, rng)
    stats["pool"] = len(examples)
    stats["by_kind"] = {kind: sum(e["kind"] == kind for e in examples) for kind in sorted({e["kind"] for e in examples})}
    return examples, stats


def balanced_order(examples: list[dict], rng: random.Random) -> list[dict]:
    """Shuffle, then interleave categories round-robin, so every prefix (a budget) covers the categories evenly.

    With 10 harm categories, the 8-example budget holds 8 different categories instead of whatever a
    plain shuffle happens to pick.
    """
    groups: dict[str, list[dict]] = {}
    for example in examples:
        groups.setdefault(example.get("category") or example["kind"], []).append(example)
    names = sorted(groups)
    rng.shuffle(names)
    for name in names:
        rng.shuffle(groups[name])
    ordered = []
    for round_index in range(max((len(g) for g in groups.values()), default=0)):
        ordered += [groups[name][round_index] for name in names if round_index < len(groups[name])]
    return ordered


def to_conversations(examples: list[dict], tokenizer=None) -> list[dict]:
    """trl's conversational prompt/completion format: loss on the completion only.

    When an example has a `prefill` (the opening of the assistant's turn, given and not learnt: deep
    alignment's compliant openings, ablate.defences), every row is rendered to text with the chat template
    instead — prompt = the conversation up to the assistant's turn plus the prefill, completion = the rest
    of the turn up to its end-of-turn token — since a conversational row cannot split the assistant's turn.
    """
    rows = []
    for example in examples:
        prompt = [{"role": "system", "content": example["system"]}] if example.get("system") else []
        prompt.append({"role": "user", "content": example["prompt"]})
        rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": example["response"]}]})
    if not any(example.get("prefill") for example in examples):
        return rows
    from ablate.defences import render_prefilled

    return [render_prefilled(tokenizer, row["prompt"], example.get("prefill") or "", example["response"])
            for row, example in zip(rows, examples)]
