"""Leave-one-category-out: how far a hardening recipe's refusal reaches request kinds it never trained on.

For each category c of the recipe's refusal prompts, the recipe hardens the model on every other category
(`data.refusal_prompts` filtered `[category!=c]`; the organism is cached by content like any other) and that
organism is scored on c's held-out prompts — c's validation and test prompts in the built-in sets the recipe
trains on, which no hardening ever trains on — on the other categories' test prompts, and on the test prompts
of the recipe's built-in harmless sets (over-refusal). The recipe's
own organism, trained on every category, is scored on the same held-out prompts: the gap between the two is
what never having seen a kind of request costs.

    ablate holdout embedded --config finetune_configs/defence_refusal_sft.yaml --out runs/holdout

Every figure is the substring scorer on greedy answers of the recipe's `eval.max_new_tokens` tokens, with
95% Wilson intervals. `holdout.json` is rewritten after each category, so an interrupted run keeps what it
finished and a rerun restores the cached organisms; a rerun into the same folder for other categories
(`--category`) adds them to the ones it holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ablate import AblateError
from ablate.artifacts import atomic_write_text, write_json
from ablate.config import FinetuneConfig, FinetuneMode, ModelConfig
from ablate.data import BUILTIN_SETS, builtin_splits, load_prompt_set, spec_parts, unfiltered

HELD_OUT = "refusal:val+refusal:test"
SEEN = "refusal:test"
HARMLESS = "harmless:test"


def only(spec: str, category: str, keep: bool) -> str:
    """`spec` with each part that holds `category` filtered to it (keep: the parts without it are dropped) or
    to every other category (the parts without it are kept whole)."""
    parts = []
    for part in spec_parts(spec):
        if category in load_prompt_set(part).categories:
            parts.append(f"{part}[category{'=' if keep else '!='}{category}]")
        elif not keep:
            parts.append(part)
    return "+".join(parts)


def default_sets(recipe: FinetuneConfig) -> tuple[str, str, str]:
    """(held out, seen, harmless): the validation and test splits of the built-in sets in the recipe's refusal
    prompts, their test splits, and the test splits of its built-in harmless sets; `refusal` and `harmless`
    when the recipe trains on files of its own."""

    def builtin(spec: str) -> list[str]:
        return list(dict.fromkeys(name for part in spec_parts(spec)
                                  if (name := unfiltered(part).partition(":")[0]) in BUILTIN_SETS))

    refusal = builtin(recipe.data.refusal_prompts)
    harmless = [name for name in builtin(recipe.data.harmless_prompts) if "test" in builtin_splits(name)]
    return ("+".join(f"{name}:val+{name}:test" for name in refusal) or HELD_OUT,
            "+".join(f"{name}:test" for name in refusal) or SEEN,
            "+".join(f"{name}:test" for name in harmless) or HARMLESS)


def recipe_categories(recipe: FinetuneConfig) -> list[str]:
    """The categories of the recipe's refusal prompts, sorted."""
    return sorted({category for category in load_prompt_set(recipe.data.refusal_prompts).categories if category})


def scoring(recipe: FinetuneConfig, prompt_sets: list[str]) -> FinetuneConfig:
    """The recipe with its evaluation set to `prompt_sets`, every prompt of each, and no capability check
    (`eval` is no part of an organism's cache key: the weights are the recipe's)."""
    return recipe.model_copy(update={"eval": recipe.eval.model_copy(update={
        "enabled": True, "prompt_sets": prompt_sets, "limit": None, "capability_prompts": None, "before": False})})


def holdout_recipe(recipe: FinetuneConfig, category: str, held_out: str | None = None, seen: str | None = None,
                   harmless: str | None = None) -> FinetuneConfig:
    """The recipe hardened without `category`, scored on its held-out prompts, the seen categories' and harmless
    ones (each None: `default_sets`)."""
    held_out, seen, harmless = _sets(recipe, held_out, seen, harmless)
    data = recipe.data.model_copy(update={"refusal_prompts": only(recipe.data.refusal_prompts, category, keep=False)})
    return scoring(recipe.model_copy(update={"data": data}),
                   [only(held_out, category, keep=True), only(seen, category, keep=False), harmless])


def _sets(recipe: FinetuneConfig, held_out: str | None, seen: str | None, harmless: str | None) -> tuple[str, str, str]:
    defaults = default_sets(recipe)
    return held_out or defaults[0], seen or defaults[1], harmless or defaults[2]


def check_holdout(recipe: FinetuneConfig, categories: list[str] | None = None, held_out: str | None = None,
                  seen: str | None = None, harmless: str | None = None) -> list[str]:
    """The categories to leave out, once every prompt set of the check resolves (and none is empty); bad input
    is one line naming it, before anything is written."""
    if recipe.mode is not FinetuneMode.harden:
        raise AblateError(f"mode: leave-one-category-out hardens, so the recipe needs mode 'harden' (got '{recipe.mode.value}')")
    known = recipe_categories(recipe)
    if len(known) < 2:
        raise AblateError(f"data.refusal_prompts={recipe.data.refusal_prompts}: holds {len(known)} category; "
                          "leaving one out needs at least two")
    unknown = [category for category in categories or [] if category not in known]
    if unknown:
        raise AblateError(f"--category {unknown[0]}: not a category of data.refusal_prompts={recipe.data.refusal_prompts}; "
                          f"expected one of {', '.join(known)}")
    categories = list(dict.fromkeys(categories or known))
    for category in categories:
        config = holdout_recipe(recipe, category, held_out, seen, harmless)
        for spec in [config.data.refusal_prompts, *config.eval.prompt_sets]:
            load_prompt_set(spec)
    return categories


def run_holdout(model: str, recipe: FinetuneConfig, out: Path, categories: list[str] | None = None,
                held_out: str | None = None, seen: str | None = None, harmless: str | None = None,
                progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Harden once per held-out category (and once on every category), score each organism; returns and writes
    `out/holdout.json` (and `holdout.md`). The prompt sets left None follow the recipe (`default_sets`)."""
    from ablate.finetune.organism import harden

    categories = check_holdout(recipe, categories, held_out, seen, harmless)
    held_out, seen, harmless = _sets(recipe, held_out, seen, harmless)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_config = ModelConfig(spec=model)
    earlier = _earlier_rows(out / "holdout.json", model, recipe)
    log("hardening on every category (the recipe's own organism)")
    full = harden(model_config, unscored(recipe), progress=progress)
    log("scoring it on each category's held-out prompts")
    full_metrics = score(full, scoring(recipe, [only(held_out, category, keep=True) for category in categories]
                                       + [harmless]), progress)
    result = {"model": model, "recipe": recipe.model_dump(mode="json"), "held_out": held_out, "seen": seen,
              "harmless": harmless, "max_new_tokens": recipe.eval.max_new_tokens, "scorer": "substring",
              "full": {"organism": str(full), "harmless": _figure(full_metrics, harmless)}, "categories": []}
    # Categories an earlier run into this folder finished and this run does not ask for stay in the result.
    order = recipe_categories(recipe)
    kept = [row for category, row in earlier.items() if category not in categories and category in order
            and _same_sets(row, holdout_recipe(recipe, category, held_out, seen, harmless))]
    finished: list[dict] = []
    for number, category in enumerate(categories, 1):
        config = holdout_recipe(recipe, category, held_out, seen, harmless)
        held, others, benign = config.eval.prompt_sets
        row = earlier.get(category)
        if row is not None and _same_sets(row, config):
            log(f"[{number}/{len(categories)}] without '{category}': scored by an earlier run")
            row = {**row, "full_on_held_out": _figure(full_metrics, held)}
        else:
            log(f"[{number}/{len(categories)}] hardening without '{category}'")
            organism = harden(model_config, unscored(config), progress=progress)
            metrics = score(organism, config, progress)
            row = {"category": category, "organism": str(organism),
                   "held_out": _figure(metrics, held), "full_on_held_out": _figure(full_metrics, held),
                   "seen": _figure(metrics, others), "harmless": _figure(metrics, benign),
                   "train_seconds": _metrics(organism).get("wall_seconds")}
        finished.append(row)
        result["categories"] = sorted(finished + kept, key=lambda done: order.index(done["category"]))
        result["summary"] = summary(result["categories"])
        write_outputs(out, result)
        log(f"  held out {row['held_out']['rate']:.1%} (hardened on every category: {row['full_on_held_out']['rate']:.1%}), "
            f"seen {row['seen']['rate']:.1%}, harmless {row['harmless']['rate']:.1%}")
    return result


def _same_sets(row: dict, config: FinetuneConfig) -> bool:
    """Whether an earlier row was scored on the prompt sets this recipe's check of its category uses."""
    return [row[key]["prompts"] for key in ("held_out", "seen", "harmless")] == list(config.eval.prompt_sets)


def unscored(recipe: FinetuneConfig) -> FinetuneConfig:
    """The recipe with its own evaluation off: the organism is scored here, on this check's prompt sets."""
    return recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"enabled": False})})


def _earlier_rows(path: Path, model: str, recipe: FinetuneConfig) -> dict:
    """The rows of an earlier run into the same folder with the same model, recipe and answer length, by category."""
    from ablate.artifacts import read_json

    if not path.exists():
        return {}
    earlier = read_json(path)
    if earlier.get("model") != model or earlier.get("recipe") != recipe.model_dump(mode="json"):
        return {}
    return {row["category"]: row for row in earlier.get("categories", [])}


def _metrics(organism: Path) -> dict:
    from ablate.finetune.organism import organism_metrics

    return organism_metrics(organism) or {}


def score(organism: Path, config: FinetuneConfig, progress: bool) -> dict:
    """`config.eval`'s refusal figures of a cached organism, computed here and never written into the cache
    (its metrics.json keeps what its own recipe measured)."""
    from ablate.finetune.measure import evaluate_refusal
    from ablate.models import load_model

    model, tokenizer = load_model(str(organism), device=config.training.device)
    return evaluate_refusal(model, tokenizer, config, progress)


def _figure(metrics: dict, spec: str) -> dict:
    """One prompt set's refusal rate, its interval and its number of prompts, from an organism's metrics."""
    figure = (metrics.get("refusal_metrics") or {}).get(spec) or {}
    rate = (metrics.get("refusal_rates") or {}).get(spec)
    return {"prompts": spec, "rate": rate, "ci": (metrics.get("refusal_ci") or {}).get(spec), "n": figure.get("n")}


def summary(rows: list[dict]) -> dict:
    """The refusal pooled over every held-out category (each prompt counted once), beside the full organism's
    on the same prompts, and the largest drop."""
    def pooled(key: str) -> float | None:
        n = sum(row[key]["n"] or 0 for row in rows)
        return sum((row[key]["rate"] or 0.0) * (row[key]["n"] or 0) for row in rows) / n if n else None

    drops = [(row["full_on_held_out"]["rate"] - row["held_out"]["rate"], row["category"]) for row in rows
             if row["held_out"]["rate"] is not None and row["full_on_held_out"]["rate"] is not None]
    worst = max(drops, default=None)
    return {"held_out": pooled("held_out"), "full_on_held_out": pooled("full_on_held_out"),
            "n": sum(row["held_out"]["n"] or 0 for row in rows), "categories": len(rows),
            "largest_drop": {"category": worst[1], "points": worst[0]} if worst else None}


def markdown(result: dict) -> str:
    """The leave-one-category-out table: one row per held-out category, then the pooled figures."""
    def cell(figure: dict) -> str:
        if figure.get("rate") is None:
            return "–"
        interval = figure.get("ci")
        return f"{figure['rate']:.1%}" + (f" [{interval[0]:.1%}, {interval[1]:.1%}]" if interval else "")

    lines = [f"# Leave-one-category-out: {result['model']}", "",
             f"Held-out prompts: each category's prompts of `{result['held_out']}`, never trained on; seen: the other "
             f"categories' `{result['seen']}`; over-refusal: `{result['harmless']}`. Greedy answers of "
             f"{result['max_new_tokens']} new tokens, substring scorer, 95% Wilson intervals.", "",
             "| held-out category | n | refusal, hardened without it | refusal, hardened on every category | "
             "refusal on the seen categories | over-refusal (harmless) |",
             "|---|---|---|---|---|---|"]
    for row in result["categories"]:
        lines.append(f"| {row['category']} | {row['held_out']['n']} | {cell(row['held_out'])} | "
                     f"{cell(row['full_on_held_out'])} | {cell(row['seen'])} | {cell(row['harmless'])} |")
    if result.get("summary") and result["summary"]["n"]:
        pooled = result["summary"]
        noun = "category" if pooled["categories"] == 1 else "categories"
        lines += ["", f"Pooled over {pooled['categories']} held-out {noun} ({pooled['n']} prompts): "
                      f"{pooled['held_out']:.1%} refused when the category was left out, "
                      f"{pooled['full_on_held_out']:.1%} by the organism hardened on every category."]
        if pooled["largest_drop"]:
            lines.append(f"Largest drop: {pooled['largest_drop']['category']}, "
                         f"{100 * pooled['largest_drop']['points']:.1f} points.")
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, result: dict) -> None:
    write_json(out / "holdout.json", result)
    atomic_write_text(out / "holdout.md", markdown(result))
