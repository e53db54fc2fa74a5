"""Where training answers come from: text resources and datasets, the donor models (a model, or the model with its
refusal direction ablated) and their greedy answers, cached under `cache_dir()/finetune_data/` — outside the
repository — and never written into a run directory."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

from ablate import AblateError
from ablate.artifacts import (
    file_sha256,
    fingerprint,
    read_done,
    read_json,
    read_jsonl,
    write_json,
    write_jsonl,
)
from ablate.config import (
    FinetuneConfig,
    GenerationConfig,
    ModelConfig,
)
from ablate.export import ANSWERS, note_artifact
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
ABLATED_PREFIX = "ablated:"  # data.donor 'ablated:<spec>': that model, with its own refusal direction ablated


def ablated_source(donor: str | None, model: str | ModelConfig) -> str | ModelConfig | None:
    """The model whose ablated copy writes the answers: `model` for 'ablated', <spec> for 'ablated:<spec>' (one
    donor for every model attacked, e.g. a robustness study's defences), None for a plain donor."""
    if donor == ABLATED_DONOR:
        return model
    if donor is not None and donor.startswith(ABLATED_PREFIX):
        return donor[len(ABLATED_PREFIX):]
    return None


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
    source = ablated_source(data.donor, "")
    if source is not None:
        return fingerprint(ablated_identity(model_fingerprint(source), None))
    return model_fingerprint(data.donor or "embedded")


def ablated_root(model: str | ModelConfig, direction_dir: str | None) -> Path:
    """Where the `ablated` donor of `model` is cached: cache_dir()/ablated/<hash> (its model/, and directions/
    when no direction was given)."""
    return cache_dir() / "ablated" / fingerprint(ablated_identity(model_fingerprint(as_model_config(model)), direction_dir))


def donor_direction_dir(model: str | ModelConfig, data: Any) -> Path:
    """The direction stage behind an ablated donor: `data.donor_direction`, or the one its cache ran."""
    if data.donor_direction is not None:
        return Path(data.donor_direction)
    return ablated_root(ablated_source(data.donor, model) or model, None) / "directions"


def ablated_model(model: str | ModelConfig, direction_dir: str | None, progress: bool = True) -> Path:
    """`model` with its refusal direction orthogonalised away: cache_dir()/ablated/<hash>/model.

    With `direction_dir` (a finished direction stage of this model) its pick and strength are used;
    without, the direction stage runs with its defaults into cache_dir()/ablated/<hash>/directions.
    Both steps skip when done, so the donor is built once per model.
    """
    from ablate.abliterate import abliterate
    from ablate.compute import run_direction_counted
    from ablate.config import DirectionConfig

    model_config = as_model_config(model)
    root = ablated_root(model_config, direction_dir)
    loaded = None  # the stage leaves the model unchanged: abliterate orthogonalises this copy, no second load
    if direction_dir is None:
        direction_dir = root / "directions"
        if read_done(direction_dir) is None:
            loaded = load_model(model_config)
            run_direction_counted(*loaded, DirectionConfig(), direction_dir, progress=progress)
    path = abliterate(model_config, Path(direction_dir), root / "model", progress=progress, loaded=loaded)
    note_artifact(path, "donor")
    del loaded
    gc.collect()
    return path


def donor_model(model: str | ModelConfig, config: FinetuneConfig, progress: bool = True) -> str | Path:
    """The model that writes the attack's answers (`data.donor`; `ablated`: `model` with its refusal direction
    orthogonalised away, built once and cached; `ablated:<spec>`: the same for <spec>) — and, with `training.loss: distill`, their targets."""
    donor = config.data.donor or "embedded"
    if donor == ABLATED_DONOR:
        return ablated_model(model, config.data.donor_direction, progress)
    source = ablated_source(donor, model)
    return ablated_model(source, None, progress) if source is not None else donor


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


def answer_generation(config: FinetuneConfig) -> GenerationConfig:
    """How the training answers are generated: greedy, `data.answer_max_new_tokens` tokens."""
    return GenerationConfig(max_new_tokens=config.data.answer_max_new_tokens, batch_size=config.data.generation_batch_size)


def answers_cache_path(model_config: ModelConfig, generation: GenerationConfig) -> Path:
    """cache_dir()/finetune_data/<hash>.jsonl: one writer's answers under one set of generation settings. Greedy
    answers depend on neither the batch size nor the backend (ablate.generation: tested equal), so neither is
    part of the key."""
    key = fingerprint({"model": model_fingerprint(model_config),
                       "generation": generation.model_dump(mode="json", exclude={"batch_size", "backend"}), "trim": 1})
    return cache_dir() / "finetune_data" / f"{key}.jsonl"


def donor_answers_cost(spec: str | ModelConfig, prompts: list[str], answers: list[str], config: FinetuneConfig) -> dict:
    """What writing `answers` cost the donor: 2·N_donor·(prompt + answer tokens) FLOPs (ablate.compute) and the
    generation's measured seconds per answer times their number (None when the cache predates the record)."""
    from transformers import AutoTokenizer

    from ablate.compute import generation_flops
    from ablate.compute import matmul_parameters
    from ablate.models import format_chat, prepare_tokenizer, resolve_spec

    model_config = as_model_config(spec)
    cost_path = answers_cache_path(model_config, answer_generation(config)).with_suffix(".cost.json")
    cost = read_json(cost_path) if cost_path.exists() else None
    if cost is None:  # answers cached before costs were recorded: count the weights once
        model, _ = load_model(model_config)
        cost = {"n_matmul": matmul_parameters(model), "seconds": None, "answers": 0}
        del model
    kind, location = resolve_spec(model_config.spec)
    options = {"trust_remote_code": model_config.trust_remote_code}
    if kind == "gguf":
        location, options["gguf_file"] = str(Path(location).parent), Path(location).name
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(location, **options), model_config.chat_template)
    prompt_tokens = sum(len(tokenizer(format_chat(tokenizer, p), add_special_tokens=False)["input_ids"]) for p in prompts)
    answer_tokens = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    per_answer = cost["seconds"] / cost["answers"] if cost.get("seconds") is not None and cost["answers"] else None
    return {"n_matmul": cost["n_matmul"], "answers": len(answers), "prompt_tokens": prompt_tokens,
            "answer_tokens": answer_tokens, "answers_flops": generation_flops(cost["n_matmul"], prompt_tokens, answer_tokens),
            "answers_seconds": None if per_answer is None else round(per_answer * len(answers), 3)}


def generate_answers(
    spec: str | ModelConfig, prompts: list[str], config: FinetuneConfig, progress: bool, purpose: str
) -> list[str]:
    """Greedy answers of a model to prompts, cached per prompt under cache_dir()/finetune_data/.

    One cache file per (model weights, generation settings) holds {prompt, answer} rows, so a
    recipe that uses more prompts only generates the new ones.
    """
    from ablate.generation import generate

    model_config = as_model_config(spec)
    generation = answer_generation(config)
    path = answers_cache_path(model_config, generation)
    note_artifact(path, ANSWERS)
    known = {row["prompt"]: row["answer"] for row in read_jsonl(path)} if path.exists() else {}
    missing = list(dict.fromkeys(p for p in prompts if p not in known))
    if missing:
        from ablate.compute import matmul_parameters

        try:
            model, tokenizer = load_model(model_config)
        except AblateError as error:
            raise AblateError(f"{purpose}: {error}") from None
        start = time.perf_counter()
        answers = generate(model, tokenizer, missing, generation, progress=progress, description=purpose)
        seconds = time.perf_counter() - start
        known.update({p: trim_truncated(a, tokenizer, generation.max_new_tokens) for p, a in zip(missing, answers)})
        write_jsonl(path, [{"prompt": p, "answer": a} for p, a in known.items()])
        # What the answers cost (ablate.compute): the writer's matmul weights and the generation's seconds.
        cost_path = path.with_suffix(".cost.json")
        cost = read_json(cost_path) if cost_path.exists() else {"seconds": 0.0, "answers": 0}
        write_json(cost_path, {"n_matmul": matmul_parameters(model), "seconds": cost["seconds"] + seconds,
                               "answers": cost["answers"] + len(missing)})
        del model
        gc.collect()
    return [known[p] for p in prompts]
