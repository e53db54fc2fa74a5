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
"""

from __future__ import annotations

import gc
import inspect
import math
import os
import random
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ablate import AblateError, __version__
from ablate.artifacts import (
    file_sha256,
    fingerprint,
    is_done,
    mark_done,
    read_done,
    read_json,
    read_jsonl,
    write_json,
    write_jsonl,
)
from ablate.config import (
    FinetuneBudget,
    FinetuneConfig,
    FinetuneEvalConfig,
    FinetuneMode,
    ORGANISM_RECIPE,
    GenerationConfig,
    HarmlessSelection,
    ModelConfig,
    TrainingLoss,
    dump_config,
)
from ablate.models import cache_dir, drop_gguf_marker, load_model, pick_device, pick_dtype, resolve_spec


# --------------------------------------------------------------------------------------------
# Inputs: model fingerprints, config checks
# --------------------------------------------------------------------------------------------

_FINGERPRINTS: dict[tuple, str] = {}


def model_fingerprint(model: str | ModelConfig) -> str:
    """Content hash of a model: its config and weight files (a hub id: the id and revision).

    Hashing reads every weight file once per process (about a second for 135M parameters); the
    result is memoised on (path, size, mtime).
    """
    config = as_model_config(model)
    kind, location = resolve_spec(config.spec)
    if kind == "hub":
        return fingerprint({"hub": config.spec, "revision": config.revision})
    path = Path(location)
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir() if p.suffix in (".safetensors", ".json", ".bin", ".model", ".gguf", ".jinja")
    )
    key = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = fingerprint({p.name: file_sha256(p) for p in files})
    return fingerprint({"weights": _FINGERPRINTS[key], "chat_template": config.chat_template})


def as_model_config(model: str | Path | ModelConfig) -> ModelConfig:
    return model if isinstance(model, ModelConfig) else ModelConfig(spec=str(model))


def default_config() -> FinetuneConfig:
    """The shipped organism recipe: the FinetuneConfig defaults with `ORGANISM_RECIPE` on top
    (finetune_configs/harden_organism.yaml mirrors it)."""
    return FinetuneConfig.model_validate(ORGANISM_RECIPE)


def resolve_budgets(config: FinetuneConfig) -> list[dict]:
    """Each budget with every field filled in from `training` / `lora`, and its folder name."""
    budgets = config.budgets or [FinetuneBudget()]
    resolved, names = [], set()
    for budget in budgets:
        max_steps = budget.max_steps if budget.max_steps is not None else (
            None if budget.epochs is not None else config.training.max_steps)
        epochs = budget.epochs if budget.epochs is not None else config.training.epochs
        rank = budget.rank or config.lora.rank
        lr = budget.lr or config.training.lr
        schedule = f"s{max_steps}" if max_steps else f"e{epochs:g}"
        rank_part = "full" if config.training.full_finetune else f"r{rank}"
        name = budget.name or f"n{budget.n_examples or 'all'}-{schedule}-{rank_part}-lr{lr:g}"
        if name in names:
            raise AblateError(f"budgets: two budgets share the folder name '{name}'; give them distinct names")
        names.add(name)
        resolved.append({"name": name, "n_examples": budget.n_examples, "epochs": epochs, "max_steps": max_steps,
                         "rank": rank, "alpha": config.lora.alpha * rank / config.lora.rank, "lr": lr})
    return resolved


def check_config(model: str | ModelConfig, config: FinetuneConfig) -> None:
    """Everything that can be checked before loading a model or generating data; one-line errors."""
    training, data = config.training, config.data
    if training.qlora:
        if training.full_finetune:
            raise AblateError("training.qlora: QLoRA trains a LoRA adapter; it cannot be combined with training.full_finetune")
        if not torch.cuda.is_available():
            raise AblateError("training.qlora: QLoRA (4-bit bitsandbytes) needs a CUDA GPU and none is available; "
                              "set training.qlora: false to train LoRA in full precision")
    if training.scheduler not in ("linear", "cosine", "constant"):
        raise AblateError(f"training.scheduler: expected linear, cosine or constant (got {training.scheduler!r})")
    if training.device != "auto" and training.device.startswith("cuda") and not torch.cuda.is_available():
        raise AblateError(f"training.device: '{training.device}' requested but no CUDA GPU is available")
    if config.mode is FinetuneMode.dataset and not data.dataset:
        raise AblateError("data.dataset: mode 'dataset' needs a file path or hf:<id> with prompt/response columns")
    if config.eval.enabled and not config.eval.prompt_sets:
        raise AblateError("eval.prompt_sets: empty; list at least one prompt set or set eval.enabled: false")
    resolve_spec(as_model_config(model).spec)
    if data.donor_direction is not None and data.donor != ABLATED_DONOR:
        raise AblateError(f"data.donor_direction: only used with donor: {ABLATED_DONOR} (donor is {data.donor!r})")
    if config.donor_writes_answers:
        if data.donor == ABLATED_DONOR:
            if data.donor_direction is not None:
                from ablate.directions import load_direction

                try:
                    load_direction(Path(data.donor_direction))
                except AblateError as error:
                    raise AblateError(f"data.donor_direction: {error}") from None
        else:
            try:
                resolve_spec(data.donor or "embedded")
            except AblateError as error:
                raise AblateError(f"data.donor: {error}") from None
    if config.eval.enabled:
        from ablate.data import load_prompt_set

        for spec in config.eval.prompt_sets:
            try:
                load_prompt_set(spec, limit=1)
            except AblateError as error:
                raise AblateError(f"eval.prompt_sets: {error}") from None
        if config.eval.capability_prompts is not None:
            try:
                load_prompt_set(config.eval.capability_prompts, limit=1)
            except AblateError as error:
                raise AblateError(f"eval.capability_prompts: {error}") from None
        if config.eval.capability_reference is not None:
            try:
                resolve_spec(config.eval.capability_reference)
            except AblateError as error:
                raise AblateError(f"eval.capability_reference: {error}") from None
    budgets = resolve_budgets(config)
    capacity = pool_capacity(config)
    for budget in budgets:
        if budget["n_examples"] is not None and budget["n_examples"] > capacity:
            raise AblateError(f"budgets: '{budget['name']}' asks for n_examples={budget['n_examples']} but the "
                              f"{config.mode.value} data holds at most {capacity} examples")


def pool_capacity(config: FinetuneConfig) -> int:
    """How many training examples the configured data can hold (before dropping donor refusals)."""
    from ablate.data import load_prompt_set

    data = config.data

    def count(spec: str | None, limit: int | None, key: str) -> int:
        if not spec or limit == 0:
            return 0
        available = len(load_prompt_set(spec))
        if limit is not None and limit > available:
            raise AblateError(f"data.{key}: {limit} requested but '{spec}' holds {available} prompts")
        return available if limit is None else limit

    if config.mode is FinetuneMode.harden:
        return (count(data.refusal_prompts, data.n_refusal, "n_refusal")
                + count(data.harmless_prompts, data.n_harmless, "n_harmless")
                + count(data.borderline_prompts, data.n_borderline, "n_borderline"))
    if config.mode is FinetuneMode.harmful:
        return count(data.refusal_prompts, data.n_refusal, "n_refusal")
    if config.mode is FinetuneMode.benign:
        if data.dataset:
            return count(data.dataset, data.n_harmless, "n_harmless")
        return count(data.harmless_prompts, data.n_harmless, "n_harmless")
    if config.mode is FinetuneMode.dataset:
        return len(load_dataset_examples(config))
    return len(read_identity_rows(data.identity_file))


# --------------------------------------------------------------------------------------------
# Training data
# --------------------------------------------------------------------------------------------


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
    from ablate.config import DirectionConfig
    from ablate.directions import run_direction
    from ablate.interventions import abliterate

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
    # Greedy answers do not depend on the batch size (ablate.generation.decode), so it is not part of the key.
    key = fingerprint({"model": model_fingerprint(model_config),
                       "generation": generation.model_dump(mode="json", exclude={"batch_size"}), "trim": 1})
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


def legacy_cache_key(model_fp: str, prompts: list[str], generation: GenerationConfig) -> str:
    return fingerprint({"model": model_fp, "prompts": prompts, "generation": generation.model_dump(mode="json"), "trim": 1})


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


# --------------------------------------------------------------------------------------------
# Training one budget
# --------------------------------------------------------------------------------------------


def matmul_parameters(model) -> int:
    """Weights of every linear layer including the output head (what a forward pass multiplies by)."""
    from torch import nn

    total = 0
    for name, module in model.named_modules():
        if "lora_" in name:  # the adapter's own matrices are counted as N_lora
            continue
        if isinstance(module, nn.Linear) or type(module).__name__ in ("Conv1D", "Linear4bit", "Linear8bitLt"):
            weight = module.weight
            total += weight.numel() if not hasattr(weight, "quant_state") else math.prod(weight.quant_state.shape)
    return total


def estimate_train_flops(n_matmul: int, n_trainable: int, tokens: int, full_finetune: bool, n_teacher: int = 0) -> int:
    """Training FLOPs: 6·N·T (full) or 4·N·T + 6·N_lora·T (LoRA), plus 2·N_donor·T for the donor's forward
    passes when it is the teacher (`training.loss: distill`); see the module docstring."""
    teacher = 2 * n_teacher * tokens
    if full_finetune:
        return 6 * n_matmul * tokens + teacher
    return 4 * n_matmul * tokens + 6 * n_trainable * tokens + teacher


def flops_formula(full_finetune: bool, teacher: bool) -> str:
    return ("6*N*T" if full_finetune else "4*N*T + 6*N_lora*T") + (" + 2*N_donor*T" if teacher else "")


def linear_module_names(model) -> list[str]:
    """Names of the linear layers peft's 'all-linear' adapts: every Linear (and GPT-2 Conv1D) but the output head."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head})


def load_for_training(model_config: ModelConfig, config: FinetuneConfig, rank: int, alpha: float):
    """Load the base model (4-bit for QLoRA) and wrap it in a LoRA adapter unless full fine-tuning."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    training = config.training
    device = pick_device(training.device)
    dtype = pick_dtype(training.dtype, device)
    kind, location = resolve_spec(model_config.spec)
    kwargs: dict = {"trust_remote_code": model_config.trust_remote_code, "dtype": dtype}
    if kind == "gguf":
        path = Path(location)
        location, kwargs["gguf_file"] = str(path.parent), path.name
    if kind == "hub" and model_config.revision:
        kwargs["revision"] = model_config.revision
    if training.qlora:
        from transformers import BitsAndBytesConfig

        compute = dtype if dtype != torch.float32 else torch.bfloat16
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **{k: v for k, v in kwargs.items() if k in ("trust_remote_code", "gguf_file", "revision")})
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as error:
        raise AblateError(f"model spec '{model_config.spec}' ({kind}): cannot load: {str(error).strip().splitlines()[0]}") from None
    drop_gguf_marker(model)
    if not training.qlora:
        model.to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model_config.chat_template:
        tokenizer.chat_template = model_config.chat_template
    if training.full_finetune:
        return model, tokenizer
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if training.qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=training.gradient_checkpointing)
    layers = config.lora.layers
    n_layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    if layers is not None and n_layers is not None and max(layers) >= n_layers:
        raise AblateError(f"lora.layers: layer {max(layers)} does not exist; '{model_config.spec}' has layers 0-{n_layers - 1}")
    targets = config.lora.target_modules
    if layers is not None and targets == "all-linear":  # peft takes layers_to_transform with module names only
        targets = linear_module_names(model)
    lora = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=config.lora.dropout, bias="none",
                      target_modules=targets, task_type="CAUSAL_LM", layers_to_transform=layers)
    return get_peft_model(model, lora), tokenizer


def keep_answer_openings(batch: dict, tokens: int) -> dict:
    """A collated batch whose rows end after their answer's first `tokens` supervised tokens: every later
    position loses its label (-100) and its attention (0), so it is neither learnt nor computed (the packed
    loss skips masked positions) and the Trainer's token count, which divides the loss, counts the kept
    labels only. Rows with shorter answers are unchanged."""
    labels = batch["labels"]
    supervised = labels != -100
    seen = supervised.long().cumsum(dim=1)  # supervised tokens up to and including each position
    keep = (seen < tokens) | ((seen == tokens) & supervised)
    batch["labels"] = labels.masked_fill(~keep, -100)
    mask = batch.get("attention_mask")
    batch["attention_mask"] = (torch.ones_like(labels) if mask is None else mask).masked_fill(~keep, 0)
    return batch


class _TokenCounter:
    """Wraps a data collator and counts the real (non-padding) tokens of every batch it builds; with
    `answer_tokens`, it first cuts each answer to its opening (`keep_answer_openings`)."""

    def __init__(self, collator, answer_tokens: int | None = None):
        self.collator, self.answer_tokens, self.tokens, self.supervised = collator, answer_tokens, 0, 0

    def __call__(self, features):
        batch = self.collator(features)
        if self.answer_tokens is not None and "labels" in batch:
            batch = keep_answer_openings(batch, self.answer_tokens)
        mask = batch.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        if "labels" in batch:
            self.supervised += int((batch["labels"] != -100).sum())
        return batch


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory on CUDA; on CPU the process's peak resident set (ru_maxrss)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def shared_prompt_prefix(inputs: dict, labels: torch.Tensor) -> int:
    """How many leading tokens every row of a right-padded batch shares without a label (the chat
    template's system prompt and user header), leaving each row's first supervised position its own."""
    input_ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    if input_ids.shape[0] < 2 or not (labels != -100).any(dim=1).all():
        return 0
    same = (input_ids == input_ids[:1]).all(dim=0) & (labels == -100).all(dim=0)
    if mask is not None:
        same &= (mask == 1).all(dim=0)
    leading = int(same.long().cumprod(dim=0).sum())
    first_label = int((labels != -100).long().argmax(dim=1).min())
    return max(0, min(leading, first_label - 1))


def packed_attention_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive (1, 1, T, T) causal mask for sequences packed one after another: a token sees the earlier
    tokens of its own segment and of segment -1 (the prefix every row shares), nothing else."""
    same = (segments.unsqueeze(1) == segments.unsqueeze(0)) | (segments == -1).unsqueeze(0)
    allowed = same & torch.ones_like(same).tril()
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


def first_answer_tokens(shifted: torch.Tensor) -> torch.Tensor:
    """Boolean mask over shifted labels: each row's first supervised target (the answer's first token)."""
    supervised = shifted != -100
    first = torch.zeros_like(supervised)
    rows = supervised.any(dim=1).nonzero().squeeze(-1)
    first[rows, supervised[rows].long().argmax(dim=1)] = True
    return first


def packed_forward(model, input_ids: torch.Tensor, mask: torch.Tensor, shifted: torch.Tensor, shared: int,
                   weights: torch.Tensor | None = None):
    """Logits and targets of a right-padded batch's supervised positions, from one padding-free pass
    (and `weights`, a tensor shaped like `shifted`, gathered at the same positions, when given).

    One sequence holds the prompt tokens every row starts with (`shared`, once) and then each row's own
    tokens at their own positions; a block-diagonal causal mask lets a row see the prefix and itself
    only. Padding is never computed and the output head covers the supervised positions only.
    """
    own = mask[:, shared:].bool()
    lengths = own.sum(1)
    rows = torch.arange(len(lengths), device=lengths.device)
    segments = torch.cat([torch.full((shared,), -1, device=lengths.device), torch.repeat_interleave(rows, lengths)])
    starts = torch.cumsum(lengths, 0) - lengths
    offsets = torch.arange(segments.numel() - shared, device=lengths.device) - starts[segments[shared:]]
    positions = torch.cat([torch.arange(shared, device=lengths.device), shared + offsets])

    def pack(values: torch.Tensor, pad) -> torch.Tensor:  # the shared prefix once, then each row's own tokens
        rest = torch.nn.functional.pad(values[:, shared:], (0, own.shape[1] - values.shape[1] + shared), value=pad)
        return torch.cat([values[0, :shared], rest[own]])

    tokens = pack(input_ids, 0)
    targets = pack(shifted, -100)  # shifted labels are one shorter: the last position has no target
    keep = (targets != -100).nonzero().squeeze(-1)
    logits = model(input_ids=tokens.unsqueeze(0), position_ids=positions.unsqueeze(0), use_cache=False,
                   attention_mask=packed_attention_mask(segments, next(model.parameters()).dtype),
                   logits_to_keep=keep).logits
    if weights is None:
        return logits[0], targets[keep]
    return logits[0], targets[keep], pack(weights, 0.0)[keep]


def activation_checkpointing(model) -> bool:
    """Whether the model recomputes activations in its backward pass (transformers 5's name, then the old one)."""
    value = getattr(model, "is_activation_checkpointing", None)
    return bool(getattr(model, "is_gradient_checkpointing", False) if value is None else value)


def supervised_head_loss(model, inputs: dict, num_items_in_batch=None, pack: bool = True,
                         first_token_weight: float = 1.0, teacher=None) -> torch.Tensor:
    """Next-token cross-entropy with the output head applied only to supervised positions — or, with a
    `teacher` (`training.loss: distill`), KL(teacher ‖ model) of the next-token distributions there: the
    teacher's whole distribution at each answer token in place of the one token the answer has.

    The loss is summed over supervised tokens and divided by `num_items_in_batch` (every micro-batch's
    supervised tokens, as the Trainer counts them) or by this batch's own count. `first_token_weight`
    multiplies the loss of each answer's first token — where a chat model decides to refuse or to
    answer — and leaves the divisor alone (1 = trl's loss).

    Most models take `packed_forward`: the chat template's system prompt and user header (a quarter of
    a short chat example) run once, and the rows' own tokens run after it in the same sequence, without
    padding (30% of the hardening batches' positions). Gradients flow back through the shared prefix
    exactly as if each row had computed it (tested against trl's loss and gradients). Models with a
    sliding-window attention (a custom mask would bypass the window) and activation checkpointing take
    one padded pass whose `logits_to_keep` leaves out the positions no row supervises (`pack=False` forces
    it: `benchmarks/bench_training.py` compares the two).
    """
    from ablate.generation import plain_cache_layers

    labels = inputs.pop("labels")
    shifted = labels[:, 1:]
    weights = 1.0 + (first_token_weight - 1.0) * first_answer_tokens(shifted).float()
    plain_inputs = set(inputs) <= {"input_ids", "attention_mask"}
    if pack and plain_inputs and not activation_checkpointing(model) and plain_cache_layers(model):
        input_ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else mask
        shared = shared_prompt_prefix(inputs, labels)
        logits, targets, weights = packed_forward(model, input_ids, mask, shifted, shared, weights)
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = packed_forward(teacher, input_ids, mask, shifted, shared)[0]
    else:
        keep = (shifted != -100).any(dim=0).nonzero().squeeze(-1)
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits.flatten(0, 1)
        targets, weights = shifted[:, keep].flatten(), weights[:, keep].flatten()
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(**inputs, use_cache=False, logits_to_keep=keep).logits.flatten(0, 1)
    if teacher is None:
        losses = torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="none")
    else:
        log_q = torch.log_softmax(teacher_logits.float().to(logits.device), dim=-1)
        kl = (log_q.exp() * (log_q - torch.log_softmax(logits.float(), dim=-1))).sum(-1)
        losses = kl * (targets != -100)
    total = (losses * weights.to(losses.device)).sum()
    count = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum()
    return total / torch.as_tensor(count, device=total.device).clamp(min=1)


def accepts_logits_to_keep(model) -> bool:
    """Whether the (peft-wrapped) model's forward can slice its logits (transformers' own causal LMs can)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def build_trainer(model, tokenizer, config: FinetuneConfig, budget: dict, examples: list[dict], work_dir: Path,
                  progress: bool = True, teacher=None):
    """trl's SFTTrainer over `examples` as prompt/completion conversations (loss on the answers only).

    On a CPU the loss is `supervised_head_loss`: trl's fused output head (per-token log-probabilities
    without full logits) has no Triton kernel there and falls back to per-tile torch ops, which took
    3.3 s of an 8.4 s hardening step on SmolLM2-135M; one matrix multiply over the answer positions
    gives the same loss in 4.7 s per step (docs/finetune.md). CUDA keeps trl's memory-saving kernel
    unless `training.first_token_weight` asks for a weighted loss or a `teacher` (the donor of
    `training.loss: distill`) for a distillation loss, which only ours computes.
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    first_token_weight = config.training.first_token_weight

    class HeadLossSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if return_outputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = supervised_head_loss(model, inputs, num_items_in_batch, first_token_weight=first_token_weight,
                                        teacher=teacher)
            # As trl does: num_items_in_batch counts every rank's tokens, and DDP averages the gradients.
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            return loss

    training = config.training
    device = next(model.parameters()).device
    tokenizer.padding_side = "right"
    use_bf16 = device.type == "cuda" and pick_dtype(training.dtype, device) == torch.bfloat16
    args = SFTConfig(
        output_dir=str(work_dir / "trainer"), per_device_train_batch_size=training.batch_size,
        gradient_accumulation_steps=training.grad_accum, learning_rate=budget["lr"],
        num_train_epochs=budget["epochs"], max_steps=budget["max_steps"] or -1, lr_scheduler_type=training.scheduler,
        warmup_steps=float(training.warmup_ratio), weight_decay=training.weight_decay, seed=training.seed,
        data_seed=training.seed, max_length=training.max_length, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=not progress, activation_checkpointing=training.gradient_checkpointing,
        bf16=use_bf16, use_cpu=device.type == "cpu", completion_only_loss=True, packing=False,
    )
    slices_logits = accepts_logits_to_keep(model)
    if first_token_weight != 1.0 and not slices_logits:
        raise AblateError(f"training.first_token_weight={first_token_weight}: this model's forward takes no "
                         "logits_to_keep, which the weighted loss needs; expected 1.0 for it")
    if teacher is not None and not slices_logits:
        raise AblateError("training.loss: distill: this model's forward takes no logits_to_keep, which the "
                          "distillation loss needs; expected sft for it")
    own_loss = (device.type == "cpu" or first_token_weight != 1.0 or teacher is not None) and slices_logits
    trainer_class = HeadLossSFTTrainer if own_loss else SFTTrainer
    return trainer_class(model=model, args=args, train_dataset=Dataset.from_list(to_conversations(examples)),
                         processing_class=tokenizer)


def train_budget(
    model_config: ModelConfig, config: FinetuneConfig, budget: dict, examples: list[dict], work_dir: Path,
    progress: bool = True,
) -> tuple[Any, Any, dict]:
    """Train one budget; returns (trained model — a peft model unless full fine-tuning —, tokenizer, metrics)."""
    training = config.training
    model, tokenizer = load_for_training(model_config, config, budget["rank"], budget["alpha"])
    device = next(model.parameters()).device
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_matmul = matmul_parameters(model)
    teacher = load_donor(model_config, config, model, tokenizer, progress) if training.loss is TrainingLoss.distill else None
    n_teacher = matmul_parameters(teacher) if teacher is not None else 0
    trainer = build_trainer(model, tokenizer, config, budget, examples, work_dir, progress, teacher)
    if teacher is not None:  # on this process's device, where the Trainer puts the model (a launch: cuda:<rank>)
        teacher.to(trainer.args.device)
    counter = _TokenCounter(trainer.data_collator, training.answer_tokens)
    trainer.data_collator = counter
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    if trainer.accelerator.num_processes > 1:  # every process counted its own batches: sum them
        counts = torch.tensor([counter.tokens, counter.supervised], device=trainer.accelerator.device)
        counter.tokens, counter.supervised = (int(x) for x in trainer.accelerator.reduce(counts, reduction="sum"))
    loss_curve = [{"step": int(entry["step"]), "loss": float(entry["loss"])}
                  for entry in trainer.state.log_history if "loss" in entry and "step" in entry]
    metrics = {
        "steps": int(trainer.state.global_step), "epochs_completed": float(trainer.state.epoch or 0.0),
        "wall_seconds": round(wall, 2), "train_tokens": counter.tokens, "supervised_tokens": counter.supervised,
        "trainable_parameters": n_trainable, "matmul_parameters": n_matmul,
        "train_flops": estimate_train_flops(n_matmul, n_trainable, counter.tokens, training.full_finetune, n_teacher),
        "flops_formula": flops_formula(training.full_finetune, teacher is not None),
        "peak_memory_bytes": peak_memory_bytes(device),
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_max_rss",
        "loss_curve": loss_curve, "final_loss": loss_curve[-1]["loss"] if loss_curve else None,
        "device": str(device),
    }
    trained = trainer.model
    del teacher
    if trainer.accelerator.num_processes > 1:
        trained = gather_distributed(trainer, model_config, config, work_dir)
    del trainer
    return trained, tokenizer, metrics


def gather_distributed(trainer, model_config: ModelConfig, config: FinetuneConfig, work_dir: Path):
    """Under `accelerate launch` (DDP/FSDP): every process saves its part, the main one reloads it whole.

    `trainer.save_model` gathers sharded (FSDP) weights into one state dict on the main process.
    Returns the trained model on the main process and None on the others.
    """
    from transformers import AutoModelForCausalLM

    gathered = work_dir / "gathered"
    trainer.save_model(str(gathered))
    trainer.accelerator.wait_for_everyone()
    if not trainer.accelerator.is_main_process:
        return None
    if config.training.full_finetune:
        return AutoModelForCausalLM.from_pretrained(gathered)
    from peft import PeftModel

    base, _ = load_model(model_config, device=config.training.device)
    drop_gguf_marker(base)
    return PeftModel.from_pretrained(base, gathered)


def save_model_dir(model, tokenizer, target: Path) -> Path:
    """Write a plain-transformers model directory atomically (temp folder, then rename)."""
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def evaluate_refusal(model, tokenizer, config: FinetuneConfig, progress: bool = True) -> dict:
    """Refusal rate (substring scorer) of a model on each eval prompt set; per-set and the first as `refusal_rate`."""
    from ablate.data import load_prompt_set
    from ablate.evaluate.refusal import is_refusal
    from ablate.evaluate.stats import wilson_interval
    from ablate.generation import generate

    model.eval()
    tokenizer.padding_side = "left"
    generation = GenerationConfig(max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size,
                                  system_prompt=config.eval.system_prompt)
    rates, samples, intervals = {}, {}, {}
    for spec in config.eval.prompt_sets:
        prompt_set = load_prompt_set(spec, limit=config.eval.limit)
        completions = generate(model, tokenizer, prompt_set.prompts, generation, progress=progress,
                               description=f"eval {spec}")
        refused = sum(is_refusal(text) for text in completions)
        rates[spec] = round(refused / len(completions), 4) if completions else 0.0
        samples[spec] = len(completions)
        intervals[spec] = [round(bound, 4) for bound in wilson_interval(refused, len(completions))] if completions else None
    first = config.eval.prompt_sets[0]
    return {"refusal_rate": rates[first], "refusal_rates": rates, "eval_samples": samples, "refusal_ci": intervals}


# --------------------------------------------------------------------------------------------
# Stage functions
# --------------------------------------------------------------------------------------------


def capability_baseline(model_config: ModelConfig, config: FinetuneConfig, progress: bool = True) -> dict | None:
    """The capability check's fixed answers — greedy, `eval.capability_tokens` tokens, to the first
    `eval.capability_n` prompts of `eval.capability_prompts`, written by `eval.capability_reference` (None:
    the model before training) — and the untrained model's cross-entropy on them. None when the check is off."""
    return before_training(model_config, config, progress, refusal=False)["capability"]


def before_training(model_config: ModelConfig, config: FinetuneConfig, progress: bool = True, *,
                    refusal: bool) -> dict:
    """What a run measures on the model before training, loading it once: {"capability": the capability
    check's baseline (`capability_baseline`) or None, "refusal": with `refusal`, its `evaluate_refusal` on
    the eval sets, else None}. Nothing on a non-main process of a distributed launch."""
    settings = config.eval
    capability = settings.enabled and bool(settings.capability_prompts)
    refusal = refusal and settings.enabled
    if not (capability or refusal) or not is_main_process():
        return {"capability": None, "refusal": None}
    model, tokenizer = load_model(model_config)
    checks = {"capability": capability_answers(model, tokenizer, settings, progress) if capability else None,
              "refusal": evaluate_refusal(model, tokenizer, config, progress) if refusal else None}
    del model
    gc.collect()
    return checks


def capability_answers(model, tokenizer, settings: FinetuneEvalConfig, progress: bool) -> dict:
    """The capability check's answers (by `settings.capability_reference`, or by `model`) and `model`'s
    cross-entropy on them, per prompt and on average."""
    from ablate.data import load_prompt_set
    from ablate.evaluate.divergence import answer_cross_entropy, check_same_vocabulary, reference_continuations

    prompts = load_prompt_set(settings.capability_prompts, limit=settings.capability_n).prompts
    writer, writer_tokenizer = model, tokenizer
    if settings.capability_reference is not None:
        try:
            writer, writer_tokenizer = load_model(settings.capability_reference)
        except AblateError as error:
            raise AblateError(f"eval.capability_reference: {error}") from None
        check_same_vocabulary(model, tokenizer, writer, writer_tokenizer)
    answers = reference_continuations(writer, writer_tokenizer, prompts, settings.capability_tokens, progress=progress)
    ce = answer_cross_entropy(model, tokenizer, prompts, answers)
    return {"prompts": prompts, "answers": answers, "ce_before": sum(ce) / len(ce), "ce_before_items": ce}


def is_main_process() -> bool:
    """False on the non-main processes of a distributed launch (`accelerate launch` sets RANK): they train, and
    only the main one evaluates and reports."""
    return int(os.environ.get("RANK", "0")) == 0


def write_before(out_dir: Path, key: str, scored: dict) -> None:
    """out_dir/before.json: the untrained model's refusal rates as a row of the budget table."""
    write_json(out_dir / "before.json", {"name": "before training", "n_examples": 0, "steps": 0, "wall_seconds": 0.0,
                                         "train_tokens": 0, "train_flops": 0, "final_loss": None, **scored,
                                         "fingerprint": key})


def read_before(out_dir: Path) -> dict | None:
    """The 'before training' row a run wrote (None when it wrote none)."""
    path = Path(out_dir) / "before.json"
    return read_json(path) if path.exists() else None


def capability_metrics(model, tokenizer, baseline: dict, config: FinetuneConfig) -> dict:
    """Mean cross-entropy (nats/token) of the baseline's answers under the trained model, beside the
    untrained model's, and the relative change (ce / ce_before − 1) with its
    95% paired-bootstrap interval over the prompts (`ce_change_ci`: 48 prompts leave a few points either way)."""
    from ablate.evaluate.divergence import answer_cross_entropy
    from ablate.evaluate.stats import bootstrap_relative_change

    ce = answer_cross_entropy(model, tokenizer, baseline["prompts"], baseline["answers"])
    after = sum(ce) / len(ce)
    settings = config.eval
    interval = bootstrap_relative_change(baseline["ce_before_items"], ce)
    return {"prompts": settings.capability_prompts, "n": len(ce), "tokens": settings.capability_tokens,
            "reference": settings.capability_reference or "the model before training",
            "ce": round(after, 4), "ce_before": round(baseline["ce_before"], 4),
            "ce_change": round(after / baseline["ce_before"] - 1, 4),
            "ce_change_ci": [round(bound, 4) for bound in interval], "ce_items": [round(value, 4) for value in ce]}


def recipe_fields(config: FinetuneConfig) -> dict:
    """The recipe as cache keys hash it: `training.first_token_weight` 1, `training.answer_tokens` null and
    `training.loss` sft (the plain loss on whole answers, bit-identical to the loss before the fields existed)
    are left out, so organisms and budgets cached before them keep their keys."""
    recipe = config.model_dump(mode="json")
    if recipe["training"]["first_token_weight"] == 1.0:
        recipe["training"].pop("first_token_weight")
    if recipe["training"]["answer_tokens"] is None:  # the whole answer, as before the field existed
        recipe["training"].pop("answer_tokens")
    if recipe["training"]["loss"] == "sft":
        recipe["training"].pop("loss")
    recipe["eval"].pop("before")  # scores the untrained model only: no budget depends on it
    if recipe["eval"]["capability_prompts"] is None:  # no capability check: budgets cached before it keep their keys
        for name in ("capability_prompts", "capability_n", "capability_tokens", "capability_reference"):
            recipe["eval"].pop(name)
    return recipe


def budget_fingerprint(model_fp: str, donor_fp: str | None, config: FinetuneConfig, budget: dict) -> str:
    recipe = recipe_fields(config)
    recipe.pop("budgets")
    return fingerprint({"model": model_fp, "donor": donor_fp, "recipe": recipe, "budget": budget,
                        "version": __version__})


def run_finetune(model: str | ModelConfig, config: FinetuneConfig, out_dir: Path, progress: bool = True) -> list[dict]:
    """Train every budget of `config` on `model`; one folder per budget under `out_dir`.

    Returns one metrics dict per budget (also in out_dir/<budget>/metrics.json). A budget whose
    done.json matches its input fingerprint is skipped, so an interrupted sweep resumes.
    """
    model_config = as_model_config(model)
    out_dir = Path(out_dir)
    check_config(model_config, config)
    budgets = resolve_budgets(config)
    model_fp = model_fingerprint(model_config)
    needs_donor = config.mode in (FinetuneMode.harmful, FinetuneMode.benign) and not config.data.dataset
    donor_fp = donor_fingerprint(model_fp, config.data) if needs_donor else None
    fingerprints = {b["name"]: budget_fingerprint(model_fp, donor_fp, config, b) for b in budgets}
    results: dict[str, dict] = {}
    for budget in budgets:
        if is_done(out_dir / budget["name"], fingerprints[budget["name"]]):
            results[budget["name"]] = read_json(out_dir / budget["name"] / "metrics.json")
    pending = [b for b in budgets if b["name"] not in results]
    if pending:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "config.json", {"model": model_config.model_dump(mode="json"),
                                             "config": config.model_dump(mode="json")})
        (out_dir / "config.yaml").write_text(dump_config(config), encoding="utf-8")
        examples, data_stats = build_examples(model_config, config, progress)
        # The untrained model, once: the capability check's answers and, with eval.before, its refusal rates
        # (kept in before.json for a rerun with the same model and eval settings).
        before_key = fingerprint({"model": model_fp, "eval": config.eval.model_dump(mode="json")})
        previous = read_before(out_dir)
        current = previous is not None and previous.get("fingerprint") == before_key
        checks = before_training(model_config, config, progress, refusal=config.eval.before and not current)
        if checks["refusal"] is not None:
            write_before(out_dir, before_key, checks["refusal"])
        elif previous is not None and not (config.eval.before and current) and is_main_process():
            (out_dir / "before.json").unlink()  # another run's row (other model or eval settings), and none of this one
        baseline = checks["capability"]
        for budget in pending:
            n = budget["n_examples"] or len(examples)
            if n > len(examples):
                raise AblateError(f"budgets: '{budget['name']}' asks for {n} examples but only {len(examples)} remain "
                                  f"after dropping {data_stats['dropped_refusals']} donor refusals")
            results[budget["name"]] = run_budget(model_config, config, budget, examples[:n], data_stats,
                                                 out_dir / budget["name"], fingerprints[budget["name"]], progress,
                                                 baseline)
    return [results[b["name"]] for b in budgets]


def run_budget(model_config: ModelConfig, config: FinetuneConfig, budget: dict, examples: list[dict],
               data_stats: dict, budget_dir: Path, budget_fp: str, progress: bool, capability: dict | None = None) -> dict:
    """Train, save (adapter and/or merged model), evaluate (refusal; with `capability`, a `capability_baseline`,
    also the cross-entropy of its answers), write metrics.json, then done.json."""
    budget_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.training.seed)
    model, tokenizer, train_metrics = train_budget(model_config, config, budget, examples, budget_dir, progress)
    if model is None:  # a non-main process of a distributed launch: the main process saves and evaluates
        return {"name": budget["name"], **train_metrics}
    shutil.rmtree(budget_dir / "trainer", ignore_errors=True)
    shutil.rmtree(budget_dir / "gathered", ignore_errors=True)
    adapter_dir = model_dir = None
    is_peft = hasattr(model, "merge_and_unload")
    if is_peft and config.keep_adapter:
        adapter_dir = save_model_dir(model, tokenizer, budget_dir / "adapter")
    if is_peft:
        model = model.merge_and_unload() if not config.training.qlora else model
    if config.merge or not is_peft:
        if config.training.qlora:
            model_dir = None  # a 4-bit base cannot be merged losslessly; the adapter is the artifact
        else:
            model_dir = save_model_dir(model, tokenizer, budget_dir / "model")
    metrics = {
        "name": budget["name"], "mode": config.mode.value, "n_examples": len(examples),
        "epochs": budget["epochs"], "max_steps": budget["max_steps"], "rank": None if config.training.full_finetune else budget["rank"],
        "lr": budget["lr"], "full_finetune": config.training.full_finetune, "qlora": config.training.qlora,
        **train_metrics,
        "examples_by_kind": {k: sum(e["kind"] == k for e in examples) for k in sorted({e["kind"] for e in examples})},
        "example_ids": [e["id"] for e in examples],
        "generated": data_stats.get("generated", 0), "dropped_refusals": data_stats.get("dropped_refusals", 0),
        "donor": data_stats.get("donor"), "pool": data_stats.get("pool"),
        "model_dir": str(model_dir) if model_dir else None, "adapter_dir": str(adapter_dir) if adapter_dir else None,
        "refusal_rate": None,
    }
    if config.eval.enabled:
        metrics.update(evaluate_refusal(model, tokenizer, config, progress))
    if capability is not None:
        metrics["capability"] = capability_metrics(model, tokenizer, capability, config)
    write_json(budget_dir / "metrics.json", metrics)
    mark_done(budget_dir, budget_fp, refusal_rate=metrics["refusal_rate"], wall_seconds=metrics["wall_seconds"])
    del model
    gc.collect()
    return metrics


def organism_key(model: str | ModelConfig, config: FinetuneConfig) -> str:
    """Cache key of a hardened organism: the base model and every recipe field that shapes the weights
    (`eval` only scores the result, so `ablate harden` and a study that skips that scoring share one organism)."""
    recipe = recipe_fields(config)
    recipe.pop("eval")
    recipe["data"].pop("generation_batch_size")  # greedy answers are the same for any batch size
    recipe["data"].pop("donor_direction")  # hardening has no donor (popped so existing organisms keep their keys)
    return fingerprint({"model": model_fingerprint(model), "config": recipe, "kind": "organism",
                        "version": __version__})


def harden(
    model: str | ModelConfig = "embedded", config: FinetuneConfig | None = None, out: Path | None = None,
    progress: bool = True,
) -> Path:
    """Harden a model into a safety-tuned organism; returns its model directory (cached by content hash).

    The directory holds safetensors + config + tokenizer (plain transformers loads it) and
    `metrics.json` (training figures and refusal rates). `out`, when given, receives a copy.
    """
    config = config or default_config()
    if config.mode is not FinetuneMode.harden:
        raise AblateError(f"mode: harden needs mode 'harden' (got '{config.mode.value}'); use `ablate finetune` for attacks")
    if len(config.budgets) > 1:
        raise AblateError("budgets: harden trains one model; give at most one budget")
    model_config = as_model_config(model)
    check_config(model_config, config)
    key = organism_key(model_config, config)
    target = cache_dir() / "organisms" / key
    if not is_done(target, key):
        # The organism is what harden reports: no 'before training' row of the base.
        results = run_finetune(model_config, config.model_copy(update={
            "merge": True, "keep_adapter": False, "eval": config.eval.model_copy(update={"before": False})}),
            target / "train", progress=progress)
        metrics = results[0]
        source = Path(metrics["model_dir"])
        if source.is_dir():  # (absent when a crash came after the move: the files are already in place)
            for item in source.iterdir():
                os.replace(item, target / item.name)
            shutil.rmtree(source, ignore_errors=True)
        metrics = {**metrics, "model_dir": str(target), "base_model": model_config.spec, "organism_key": key}
        metrics.pop("example_ids", None)
        write_json(target / "metrics.json", metrics)
        mark_done(target, key, refusal_rates=metrics.get("refusal_rates"))
    elif config.eval.enabled and not _scored(organism_metrics(target) or {}, config):
        score_organism(target, config, model_config, progress)  # cached by a run that skipped (some of) the scoring
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for item in target.iterdir():
            if item.is_file() and item.name != "done.json":
                shutil.copy2(item, out / item.name)
        return out
    return target


def _rates_cover(metrics: dict, config: FinetuneConfig) -> bool:
    """Whether an organism's metrics hold a refusal rate for every prompt set `config.eval` asks for."""
    rates = metrics.get("refusal_rates") or {}
    return all(spec in rates for spec in config.eval.prompt_sets)


def _scored(metrics: dict, config: FinetuneConfig) -> bool:
    """Whether an organism's metrics hold everything `config.eval` asks for."""
    return _rates_cover(metrics, config) and (not config.eval.capability_prompts or "capability" in metrics)


def score_organism(model_dir: Path, config: FinetuneConfig, base: ModelConfig | None = None, progress: bool = True) -> dict:
    """Score a cached organism with `config.eval` and add the refusal rates (and, given the `base` it was
    hardened from, the capability check) to its metrics.json."""
    metrics = organism_metrics(model_dir) or {}
    baseline = capability_baseline(base, config, progress) if base is not None and "capability" not in metrics else None
    model, tokenizer = load_model(str(model_dir), device=config.training.device)
    if not _rates_cover(metrics, config):  # scored already when only the capability check is missing
        metrics = {**metrics, **evaluate_refusal(model, tokenizer, config, progress)}
    if baseline is not None:
        metrics["capability"] = capability_metrics(model, tokenizer, baseline, config)
    write_json(Path(model_dir) / "metrics.json", metrics)
    return metrics


def organism_metrics(model_dir: Path) -> dict | None:
    """The metrics.json of a hardened organism directory (None when absent)."""
    path = Path(model_dir) / "metrics.json"
    return read_json(path) if path.exists() else None
