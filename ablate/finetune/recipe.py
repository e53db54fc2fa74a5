"""A fine-tuning recipe's identity: model fingerprints, the resolved budgets, and the cache keys that hash them."""

from __future__ import annotations

from pathlib import Path

from ablate import AblateError, __version__
from ablate.artifacts import (
    DONE_FILE,
    file_sha256,
    fingerprint,
)
from ablate.config import (
    ORGANISM_RECIPE,
    FinetuneBudget,
    FinetuneConfig,
    ModelConfig,
)
from ablate.models import resolve_spec

_FINGERPRINTS: dict[tuple, str] = {}
# What ablate records beside a model's files (the organism's scores, the cache marker, an export's provenance): not
# the model, so re-scoring an organism leaves every cache key built on it valid.
RECORD_FILES = frozenset({"metrics.json", DONE_FILE, "abliteration.json"})


def model_fingerprint(model: str | ModelConfig) -> str:
    """Content hash of a model: its config, tokenizer and weight files, not ablate's records beside them
    (`RECORD_FILES`); a hub id: the id and revision.

    Hashing reads every weight file once per process (about a second for 135M parameters); the
    result is memoised on (path, size, mtime).
    """
    config = as_model_config(model)
    kind, location = resolve_spec(config.spec)
    if kind == "hub":
        return fingerprint({"hub": config.spec, "revision": config.revision})
    path = Path(location)
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir()
        if p.suffix in (".safetensors", ".json", ".bin", ".model", ".gguf", ".jinja") and p.name not in RECORD_FILES
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
    if config.defence is None or config.defence.kind.value == "refusal_sft":
        recipe.pop("defence")  # plain refusal SFT is the organism: organisms cached before the field keep their keys
    else:  # only the fields the defence reads shape its weights
        from ablate.defences.fields import DEFENCE_FIELDS

        recipe["defence"] = {k: v for k, v in recipe["defence"].items() if k in DEFENCE_FIELDS[config.defence.kind]}
        if recipe["defence"].get("retain_weight") == 1.0:  # the loss before the field existed: its organisms keep their keys
            recipe["defence"].pop("retain_weight")
    recipe["eval"].pop("before")  # scores the untrained model only: no budget depends on it
    if recipe["eval"]["capability_prompts"] is None:  # no capability check: budgets cached before it keep their keys
        for name in ("capability_prompts", "capability_n", "capability_tokens", "capability_reference"):
            recipe["eval"].pop(name)
    return recipe


def budget_fingerprint(model_fp: str, donor_fp: str | None, config: FinetuneConfig, budget: dict) -> str:
    recipe = recipe_fields(config)
    recipe.pop("budgets")
    return fingerprint({"model": model_fp, "donor": donor_fp, "recipe": recipe, "budget": budget,
                        "data": data_fingerprint(config), "version": __version__})


def data_fingerprint(config: FinetuneConfig) -> dict[str, str]:
    """A content hash of every data file a recipe reads ({name: hash}): the built-in prompt sets its `data` and
    `defence` fields name (`refusal:train[category!=x]` → refusal.jsonl), the files it names that ship in
    ablate/data (refusals.txt, extended_refusals.json…) and local files. A recipe is its data too: an edited
    prompt file is a new organism, not a cache hit on the old one."""
    from ablate.data import BUILTIN_SETS, read_package_text, spec_parts, unfiltered

    found: dict[str, str] = {}
    fields = recipe_fields(config)  # the defence fields its kind reads (refusal SFT: none)
    for value in [*fields["data"].values(), *(fields.get("defence") or {}).values()]:
        if not isinstance(value, str) or not value:
            continue
        for part in spec_parts(value):
            name = unfiltered(part)
            packaged = f"{name.partition(':')[0]}.jsonl" if name.partition(":")[0] in BUILTIN_SETS else name
            if Path(name).expanduser().is_file():
                found[name] = file_sha256(Path(name).expanduser())
                continue
            try:
                text = read_package_text(packaged)
            except (FileNotFoundError, OSError, ValueError):
                continue  # not a file: a hub dataset, a model spec, a mode name
            found[packaged] = fingerprint({"text": text})
    return dict(sorted(found.items()))
