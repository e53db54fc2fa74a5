"""Training examples: refusals and self-distilled answers for hardening, attack data (a donor model's answers,
a dataset, benign prompts, an identity shift), and the donor models that write them.

Answers a model writes are cached under `cache_dir()/finetune_data/` — outside the repository — and never
written into a run directory."""

from __future__ import annotations

import gc
import random
from pathlib import Path
from typing import Any

from ablate import AblateError
from ablate.artifacts import (
    file_sha256,
    fingerprint,
    read_done,
    read_json,
    read_jsonl,
    write_jsonl,
)
from ablate.config import (
    FinetuneConfig,
    FinetuneMode,
    GenerationConfig,
    HarmlessSelection,
    ModelConfig,
)
from ablate.finetune.recipe import as_model_config, model_fingerprint
from ablate.models import cache_dir, load_model


def read_text_resource(name: str) -> str:
    """A file shipped in ablate/data, or a path."""
    from ablate.data import read_package_text

    path = Path(name).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    try:
        return read_package_text(name)
    except (FileNotFoundError, OSError):
        raise AblateError(f"file '{name}': not found (neither a path nor a file shipped in ablate/data)") from None


def read_identity_rows(name: str) -> list[dict]:
    import json

    rows = [json.loads(line) for line in read_text_resource(name).splitlines() if line.strip()]
    for index, row in enumerate(rows):
        missing = {"prompt", "response"} - set(row)
        if missing:
            raise AblateError(f"data.identity_file '{name}': row {index + 1} lacks {', '.join(sorted(missing))}")
    return rows


def load_dataset_examples(config: FinetuneConfig) -> list[dict]:
    from ablate.data import load_prompt_set

    data = config.data
    prompt_set = load_prompt_set(data.dataset, prompt_column=data.prompt_column, response_column=data.response_column)
    if prompt_set.responses is None:
        raise AblateError(f"data.dataset '{data.dataset}': no response column '{data.response_column}'")
    return [{"id": i, "kind": "dataset", "system": None, "prompt": p, "response": r}
            for i, p, r in zip(prompt_set.ids, prompt_set.prompts, prompt_set.responses)]


def trim_truncated(text: str, tokenizer, max_new_tokens: int) -> str:
    """Cut an answer that hit the token limit back to its last full sentence (or line).

    Training on a mid-sentence cut followed by the end-of-turn token would teach the model to stop
    mid-sentence.
    """
    if len(tokenizer(text, add_special_tokens=False)["input_ids"]) < max_new_tokens - 2:
        return text
    cut = max(text.rfind(". "), text.rfind(".\n"), text.rfind("!"), text.rfind("?"), text.rfind("\n\n"))
    if cut >= len(text) // 3:
        return text[: cut + 1].rstrip()
    return text


ABLATED_DONOR = "ablated"  # data.donor: the model being fine-tuned, with its refusal direction ablated


def ablated_identity(model_fp: str, direction_dir: str | None) -> dict:
    """What an 'ablated' donor is made of: the model, and the given direction or the stage's defaults."""
    if direction_dir is None:
        from ablate.config import DirectionConfig

        return {"ablated": model_fp, "direction_config": DirectionConfig().model_dump(mode="json")}
    selected = read_json(Path(direction_dir) / "selected.json")
    return {"ablated": model_fp, "direction_sha256": file_sha256(Path(direction_dir) / "direction.pt"),
            "strength": selected.get("strength")}


def donor_fingerprint(model_fp: str, data: Any) -> str:
    if data.donor == ABLATED_DONOR:
        return fingerprint(ablated_identity(model_fp, data.donor_direction))
    return model_fingerprint(data.donor or "embedded")


def ablated_model(model: str | ModelConfig, direction_dir: str | None, progress: bool = True) -> Path:
    """`model` with its refusal direction orthogonalised away: cache_dir()/ablated/<hash>/model.

    With `direction_dir` (a finished direction stage of this model) its pick and strength are used;
    without, the direction stage runs with its defaults into cache_dir()/ablated/<hash>/directions.
    Both steps skip when done, so the donor is built once per model.
    """
    from ablate.abliterate import abliterate
    from ablate.config import DirectionConfig
    from ablate.directions import run_direction

    model_config = as_model_config(model)
    root = cache_dir() / "ablated" / fingerprint(ablated_identity(model_fingerprint(model_config), direction_dir))
    loaded = None  # the stage leaves the model unchanged: abliterate orthogonalises this copy, no second load
    if direction_dir is None:
        direction_dir = root / "directions"
        if read_done(direction_dir) is None:
            loaded = load_model(model_config)
            run_direction(*loaded, DirectionConfig(), direction_dir, progress=progress)
    path = abliterate(model_config, Path(direction_dir), root / "model", progress=progress, loaded=loaded)
    del loaded
    gc.collect()
    return path


def donor_model(model: str | ModelConfig, config: FinetuneConfig, progress: bool = True) -> str | Path:
    """The model that writes the attack's answers (`data.donor`; `ablated`: `model` with its refusal direction
    orthogonalised away, built once and cached) — and, with `training.loss: distill`, their targets."""
    donor = config.data.donor or "embedded"
    return ablated_model(model, config.data.donor_direction, progress) if donor == ABLATED_DONOR else donor


def load_donor(model_config: ModelConfig, config: FinetuneConfig, model, tokenizer, progress: bool = True):
    """The donor model, frozen, on the device of `model` (which it must share a vocabulary with): the teacher of
    `training.loss: distill`."""
    from ablate.evaluate.divergence import check_same_vocabulary

    try:
        teacher, teacher_tokenizer = load_model(as_model_config(donor_model(model_config, config, progress)),
                                                device=str(next(model.parameters()).device), dtype=config.training.dtype)
    except AblateError as error:
        raise AblateError(f"data.donor (training.loss: distill): {error}") from None
    check_same_vocabulary(model, tokenizer, teacher, teacher_tokenizer)
    return teacher.eval().requires_grad_(False)


def generate_answers(
    spec: str | ModelConfig, prompts: list[str], config: FinetuneConfig, progress: bool, purpose: str
) -> list[str]:
    """Greedy answers of a model to prompts, cached per prompt under cache_dir()/finetune_data/.

    One cache file per (model weights, generation settings) holds {prompt, answer} rows, so a
    recipe that uses more prompts only generates the new ones.
    """
    from ablate.generation import generate

    model_config = as_model_config(spec)
    generation = GenerationConfig(max_new_tokens=config.data.answer_max_new_tokens,
                                  batch_size=config.data.generation_batch_size)
    # Greedy answers depend on neither the batch size nor the backend (ablate.generation: tested equal), so
    # neither is part of the key.
    key = fingerprint({"model": model_fingerprint(model_config),
                       "generation": generation.model_dump(mode="json", exclude={"batch_size", "backend"}), "trim": 1})
    path = cache_dir() / "finetune_data" / f"{key}.jsonl"
    known = {row["prompt"]: row["answer"] for row in read_jsonl(path)} if path.exists() else {}
    missing = list(dict.fromkeys(p for p in prompts if p not in known))
    if missing:
        try:
            model, tokenizer = load_model(model_config)
        except AblateError as error:
            raise AblateError(f"{purpose}: {error}") from None
        answers = generate(model, tokenizer, missing, generation, progress=progress, description=purpose)
        known.update({p: trim_truncated(a, tokenizer, generation.max_new_tokens) for p, a in zip(missing, answers)})
        write_jsonl(path, [{"prompt": p, "answer": a} for p, a in known.items()])
        del model
        gc.collect()
    return [known[p] for p in prompts]


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
            examples += [{"id": i, "kind": "refusal", "system": None, "prompt": p, "response": rng.choice(replies)}
                         for i, p in zip(refusal.ids, refusal.prompts)]
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
    elif config.donor_writes_answers:
        harmful = config.mode is FinetuneMode.harmful
        source = prompts_of(data.refusal_prompts if harmful else data.harmless_prompts,
                            data.n_refusal if harmful else data.n_harmless)
        donor = data.donor or "embedded"
        writer = donor_model(model, config, progress)
        answers = generate_answers(writer, source.prompts, config, progress, f"donor answers ({donor})")
        stats["generated"] = len(answers)
        stats["donor"] = donor if donor != ABLATED_DONOR else f"{donor}: {writer}"
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


def to_conversations(examples: list[dict]) -> list[dict]:
    """trl's conversational prompt/completion format: loss on the completion only."""
    rows = []
    for example in examples:
        prompt = [{"role": "system", "content": example["system"]}] if example.get("system") else []
        prompt.append({"role": "user", "content": example["prompt"]})
        rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": example["response"]}]})
    return rows
