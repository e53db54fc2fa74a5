"""The evaluation stage: one suite, one model variant → eval/<variant>.json + generations/<variant>.jsonl.

    ablate eval embedded --suite eval_suites/default.yaml --out runs/base
    ablate eval runs/x/models/ablated --reference embedded --out runs/x --variant ablated --redact

    from ablate.evaluate import load_suite, run_eval
    result = run_eval(model, tokenizer, load_suite("default"), Path("runs/x"), "base", reference=(ref, ref_tok))

What is measured (names as they appear in the JSON; every metric has value, ci, n and method):
- refusal_rate — share of the held-out refusal-eliciting prompts whose response is labelled refusal
  by the primary scorer (Wilson interval); compliance_rate, evasive_rate, degenerate_rate (and
  unparsed_rate under a judge) on the same prompts — see ablate.evaluate.labels;
- length_sensitivity — refusal, compliance and degenerate rates of response prefixes at 32 … 150
  tokens (ablate.evaluate.length), and `contract`: 'honest' or 'short' with what is unmet;
- harmless_refusal_rate, borderline_refusal_rate — over-refusal (substring markers);
- logit_refusal_score — mean log-odds of a refusal token first (bootstrap);
- kl_first_token, kl_continuation, ce_reference_answers — drift from a reference model (bootstrap);
- capability/<task> — lm-eval accuracy (Wilson);
- refusal_rate/<scorer> for every other scorer, and their agreement (Cohen's kappa + disagreeing ids).

Every response to a refusal-eliciting prompt gets one of four labels (refusal / compliance /
evasive / degenerate, or 'unparsed' when the primary judge gave no verdict) — see
`ablate.evaluate.labels`; other prompts get refusal / compliance / degenerate.
A judge whose weights are not on disk fails the run before generation, or — with
`scorers.if_judge_unavailable: substring` — is skipped, named in `judges_unavailable`, and the
substring scorer decides the labels (`judge` says which scorer did). The JSON is written last: its presence means complete.
"""

from __future__ import annotations

import gc
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ablate import AblateError
from ablate.artifacts import fingerprint, write_json, write_jsonl
from ablate.config import EvalSuite, apply_overrides, load_config, validate_config
from ablate.evaluate.labels import EVASIVE, SCORER_MAPPINGS, UNPARSED, harm_scorer, label_four
from ablate.evaluate.length import contract_of, length_sensitivity
from ablate.evaluate.measure import complete, refusal_verdicts
from ablate.evaluate.refusal import (
    COMPLIANCE,
    DEGENERATE,
    LABELS,
    REFUSAL,
    REFUSAL_MARKERS,
    label_response,
    logit_refusal_scores,
    refusal_token_ids,
)
from ablate.evaluate.stats import cohen_kappa, mean_metric, rate_metric

SETS = ("refusal", "harmless", "borderline")
SUBSTRING = "substring"


# --------------------------------------------------------------------------------------------
# Suites
# --------------------------------------------------------------------------------------------


def shipped_suites_dir() -> Path | None:
    """The suites shipped inside the package (`ablate/eval_suites/`, package data; the checkout's top-level
    `eval_suites/` points at it), wherever the package is installed."""
    from importlib import resources

    candidate = Path(str(resources.files("ablate").joinpath("eval_suites")))
    return candidate if candidate.is_dir() else None


def suite_path(path_or_name: str | Path) -> Path:
    """A suite YAML: an existing file, or a name ('default', 'paper') in the shipped suites, then ./eval_suites/."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    if path.suffix in (".yaml", ".yml") or path.parent != Path("."):
        raise AblateError(f"eval suite file not found: {path}")
    folders = [folder for folder in (shipped_suites_dir(), Path.cwd() / "eval_suites") if folder is not None]
    for folder in folders:
        candidate = folder / f"{path_or_name}.yaml"
        if candidate.is_file():
            return candidate
    known = sorted({p.stem for folder in folders if folder.is_dir() for p in folder.glob("*.yaml")})
    raise AblateError(f"unknown eval suite '{path_or_name}'; expected a .yaml file or one of: {', '.join(known) or '(none found)'}")


def load_suite(path_or_name: str | Path | EvalSuite, overrides: list[str] | None = None) -> EvalSuite:
    """Load and validate a suite ('default', 'paper' or a YAML path); `key.path=value` overrides apply."""
    if isinstance(path_or_name, EvalSuite):
        suite = path_or_name
        if overrides:
            data = apply_overrides(suite.model_dump(mode="json"), overrides)
            suite = validate_config(data, EvalSuite, "<suite overrides>")
        return suite
    path = suite_path(path_or_name)
    suite = load_config(path, EvalSuite, overrides)
    if suite.source_dir is None:
        suite = suite.model_copy(update={"source_dir": str(path.resolve().parent)})
    return suite


def suite_fingerprint(suite: EvalSuite) -> str:
    """Content hash of everything that changes the numbers (not where the file lives)."""
    data = suite.model_dump(mode="json")
    data.pop("source_dir", None)
    data["refusal_markers"] = list(REFUSAL_MARKERS)  # the substring scorer's rules change the numbers too
    return fingerprint(data)


# --------------------------------------------------------------------------------------------
# Checks before any model work
# --------------------------------------------------------------------------------------------


def _scorer_names(suite: EvalSuite) -> list[str]:
    from ablate.evaluate.judges import judge_name

    names = [SUBSTRING] if suite.scorers.substring else []
    return names + [judge_name(judge) for judge in suite.scorers.judges]


def capability_folder(suite: EvalSuite) -> Path | None:
    include = suite.capability.include_path
    if include is None:
        return None
    path = Path(include)
    if path.is_absolute():
        return path
    # A suite written inline (in a study) has no folder of its own: use the shipped eval_suites/.
    base = Path(suite.source_dir) if suite.source_dir else (shipped_suites_dir() or Path.cwd())
    return (base / path).resolve()


def check_suite(suite: EvalSuite, model, tokenizer, reference: tuple | None) -> dict:
    """Load prompt sets and check judges, capability tasks and the reference: fail before generating."""
    from ablate.data import load_prompt_set
    from ablate.evaluate.capability import local_task_names
    from ablate.evaluate.judges import resolve_template

    from ablate.generation import generation_backend

    generation_backend(suite.generation.backend)  # an unknown backend fails before any model work
    for judge in suite.scorers.judges:
        resolve_template(judge)
    if not getattr(tokenizer, "chat_template", None):
        raise AblateError("the model's tokenizer has no chat template; set model.chat_template (the suite prompts are chat turns)")
    prompt_sets = {}
    for name in SETS:
        spec = getattr(suite, name)
        if spec is not None:
            prompt_set = load_prompt_set(spec.set).sample(spec.n, seed=suite.seed)
            if len(prompt_set) == 0:
                raise AblateError(f"suite '{suite.name}': key '{name}.set': prompt set {spec.set} is empty")
            prompt_sets[name] = prompt_set
    if suite.capability.tasks:
        # Names of lm-eval's built-in tasks are checked when capability runs, which is the first
        # model work (indexing lm-eval's ~15,000 task files takes a minute on a small CPU; do it once).
        folder = capability_folder(suite)
        if folder is not None and not folder.is_dir():
            raise AblateError(f"suite '{suite.name}': key 'capability.include_path': folder not found: {folder}")
        if folder is not None:
            local_task_names(folder)  # a malformed local task folder fails here
    if reference is not None and suite.kl.enabled:
        from ablate.evaluate.divergence import check_same_vocabulary

        check_same_vocabulary(model, tokenizer, reference[0], reference[1])
        prompt_sets["kl"] = load_prompt_set(suite.kl.prompts).sample(suite.kl.n, seed=suite.seed)
    return prompt_sets


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def _label_counts(labels: list[str]) -> dict[str, int]:
    names = [*LABELS, EVASIVE] + ([UNPARSED] if UNPARSED in labels else [])
    return {label: labels.count(label) for label in names}


def unavailable_judges(suite: EvalSuite) -> dict[str, str]:
    """{judge name: why} for judges that cannot be loaded here; raises under if_judge_unavailable: fail."""
    from ablate.evaluate.judge_files import judge_unavailable
    from ablate.evaluate.judges import judge_name

    missing = {}
    for judge in suite.scorers.judges:
        reason = judge_unavailable(judge)
        if reason is None:
            continue
        if suite.scorers.if_judge_unavailable == "fail":
            raise AblateError(f"judge '{judge_name(judge)}' unavailable: {reason} (set scorers.if_judge_unavailable=substring "
                              "to score with the substring scorer instead)")
        missing[judge_name(judge)] = reason
    return missing


@dataclass
class Measured:
    """What the steps of one evaluation add up: every metric (value, ci, n, method), per-item values for paired
    comparisons between variants, and the seconds each step took."""

    metrics: dict[str, dict] = field(default_factory=dict)
    per_item: dict[str, dict] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def run_eval(
    model,
    tokenizer,
    suite: EvalSuite,
    out_dir: Path,
    variant: str,
    reference: tuple | None = None,
    redact: bool = False,
    progress: bool = True,
) -> dict:
    """Evaluate one model variant with one suite; write eval/<variant>.json and generations/<variant>.jsonl.

    `reference` = (ref_model, ref_tokenizer) enables kl_first_token, kl_continuation and
    ce_reference_answers. `redact` keeps every score but drops the completions (and judge outputs)
    of refusal-eliciting prompts from the generations file. Returns the JSON written.
    """
    started = time.perf_counter()
    if not variant or "/" in variant or variant.startswith("."):
        raise AblateError(f"variant name '{variant}': expected a plain name (it becomes eval/<variant>.json)")
    suite = load_suite(suite) if not isinstance(suite, EvalSuite) else suite
    out_dir = Path(out_dir)
    prompt_sets = check_suite(suite, model, tokenizer, reference)
    judges_missing = unavailable_judges(suite)  # before any generation
    for name, reason in judges_missing.items():
        warnings.warn(f"judge '{name}' skipped: {reason}; the substring scorer stands in", stacklevel=2)
    requested = suite.scorers.primary
    primary = requested if requested not in judges_missing else SUBSTRING
    kl_set = prompt_sets.pop("kl", None)
    measured = Measured()
    if suite.capability.tasks:  # first, so an unknown task name fails before the long generation pass
        measure_capability(model, tokenizer, suite, measured, progress)
    by_set, logits_by_set = generate_completions(model, tokenizer, suite, prompt_sets, measured, progress)
    verdicts, judge_rows = score_completions(suite, prompt_sets, by_set, measured, progress, skip=set(judges_missing))
    labels, reasons, unparsed, scorer_labels = label_completions(suite, prompt_sets, by_set, verdicts, primary)
    add_rates(suite, prompt_sets, labels, verdicts, judge_rows, measured, primary)
    length_result = None
    if suite.length.enabled and "refusal" in prompt_sets:  # the same responses cut to shorter prefixes
        length_result = length_sensitivity(tokenizer, prompt_sets["refusal"].prompts, by_set["refusal"], suite.length.lengths,
                                           suite.generation.max_new_tokens, suite.degenerate.model_dump(), suite.confidence)
    logit_scores = add_logit_score(tokenizer, suite, prompt_sets, logits_by_set, measured)
    if kl_set is not None:
        add_divergence(model, tokenizer, reference, suite, kl_set, measured, progress)
    agreement = scorer_agreement(suite, prompt_sets, verdicts, labels)
    write_generations(out_dir / "generations" / f"{variant}.jsonl", prompt_sets, by_set, labels, reasons, verdicts,
                      judge_rows, logit_scores, redact, scorer_labels)
    from ablate.evaluate.judges import judge_name, template_source

    templates = {judge_name(judge): judge.template.value for judge in suite.scorers.judges}
    metrics = measured.metrics
    metrics = {**{k: v for k, v in metrics.items() if not k.startswith("capability/")},
               **{k: v for k, v in metrics.items() if k.startswith("capability/")}}
    result = {
        "variant": variant,
        "suite": suite.name,
        "suite_fingerprint": suite_fingerprint(suite),
        "judge": primary,
        "judge_requested": requested,
        "judges_unavailable": judges_missing,
        "scorers": [name for name in _scorer_names(suite) if name not in judges_missing],
        "scorer_mappings": {name: SCORER_MAPPINGS.get(templates.get(name, name), SCORER_MAPPINGS["custom"])
                            for name in _scorer_names(suite) if name not in judges_missing},
        "judge_templates": {judge_name(judge): template_source(judge) for judge in suite.scorers.judges
                            if judge_name(judge) not in judges_missing},
        "contract": contract_of(suite.generation.max_new_tokens, suite.generation.do_sample, requested, primary,
                                kl_set is not None),
        "length_sensitivity": length_result,
        "n_params": sum(parameter.numel() for parameter in model.parameters()),
        "model": getattr(getattr(model, "config", None), "_name_or_path", None),
        "reference": getattr(getattr(reference[0], "config", None), "_name_or_path", None) if reference else None,
        "metrics": metrics,
        "labels": {name: _label_counts(values) for name, values in labels.items()},
        "degenerate_reasons": {name: {reason: values.count(reason) for reason in sorted({r for r in values if r})}
                               for name, values in reasons.items()},
        "judge_unparsed": unparsed,
        "agreement": agreement,
        "prompt_sets": {name: {"set": prompt_set.name, "n": len(prompt_set), "fingerprint": prompt_set.fingerprint}
                        for name, prompt_set in {**prompt_sets, **({"kl": kl_set} if kl_set is not None else {})}.items()},
        "generation": suite.generation.model_dump(mode="json"),
        "confidence": suite.confidence,
        "bootstrap_samples": suite.bootstrap_samples,
        "seed": suite.seed,
        "redacted": redact,
        "generations_file": str(Path("generations") / f"{variant}.jsonl"),
        "timings": measured.timings,
        "per_item": measured.per_item,
        "wall_seconds": time.perf_counter() - started,
    }
    write_json(out_dir / "eval" / f"{variant}.json", result)
    return result


def measure_capability(model, tokenizer, suite: EvalSuite, measured: Measured, progress: bool) -> None:
    """Capability with lm-eval on the in-memory model."""
    from ablate.evaluate.capability import run_capability

    tick = time.perf_counter()
    capability_dir = capability_folder(suite)
    capability_config = suite.capability.model_copy(update={"include_path": str(capability_dir) if capability_dir else None})
    capability_metrics, capability_items = run_capability(
        model, tokenizer, capability_config, seed=suite.seed, bootstrap_samples=suite.bootstrap_samples,
        confidence=suite.confidence, progress=progress)
    measured.metrics.update(capability_metrics)
    measured.per_item.update(capability_items)
    measured.timings["capability"] = time.perf_counter() - tick


def generate_completions(model, tokenizer, suite: EvalSuite, prompt_sets: dict, measured: Measured,
                         progress: bool) -> tuple[dict[str, list[str]], dict[str, list[torch.Tensor]]]:
    """One generation pass over all three sets (length-sorted batches mix them freely): per set, the completions
    and the first generated token's logits."""
    tick = time.perf_counter()
    order = [(name, i) for name in SETS if name in prompt_sets for i in range(len(prompt_sets[name]))]
    all_prompts = [prompt_sets[name].prompts[i] for name, i in order]
    completed = complete(model, tokenizer, all_prompts, suite.generation, progress=progress)
    completions, first_logits = completed.texts, completed.first_logits
    measured.timings["generation"] = time.perf_counter() - tick
    by_set: dict[str, list[str]] = {name: [] for name in prompt_sets}
    logits_by_set: dict[str, list[torch.Tensor]] = {name: [] for name in prompt_sets}
    for (name, _), completion, logits in zip(order, completions, first_logits):
        by_set[name].append(completion)
        logits_by_set[name].append(logits)
    return by_set, logits_by_set


def score_completions(suite: EvalSuite, prompt_sets: dict, by_set: dict[str, list[str]], measured: Measured,
                      progress: bool, skip: set[str] = frozenset()) -> tuple[dict[str, dict[str, list]], dict[str, list[dict]]]:
    """Scorers' verdicts per set and scorer. Substring verdicts for every set; judges (but those in `skip`, which
    are unavailable) on the refusal-eliciting set only (a harm judge cannot tell an over-refusal from a safe
    answer to a harmless prompt)."""
    from ablate.evaluate.judges import judge_name, load_judge, run_judge

    verdicts: dict[str, dict[str, list]] = {name: {} for name in prompt_sets}
    for name in by_set:
        verdicts[name][SUBSTRING] = [REFUSAL if refused else COMPLIANCE for refused in refusal_verdicts(by_set[name], SUBSTRING)]
    judge_rows: dict[str, list[dict]] = {}
    if "refusal" in prompt_sets and suite.scorers.judges:
        tick = time.perf_counter()
        refusal_set = prompt_sets["refusal"]
        for judge in suite.scorers.judges:
            if judge_name(judge) in skip:
                continue
            loaded = load_judge(judge)
            judge_rows[judge_name(judge)] = run_judge(judge, refusal_set.prompts, by_set["refusal"], judge=loaded, progress=progress)
            verdicts["refusal"][judge_name(judge)] = [row["verdict"] for row in judge_rows[judge_name(judge)]]
            del loaded
            gc.collect()
        measured.timings["judges"] = time.perf_counter() - tick
    return verdicts, judge_rows


def label_completions(suite: EvalSuite, prompt_sets: dict, by_set: dict[str, list[str]],
                      verdicts: dict[str, dict[str, list]], primary: str) -> tuple:
    """Four labels on the refusal set, decided by `primary` (the suite's primary scorer, or substring when that
    judge is unavailable); refusal / compliance / degenerate by substring elsewhere. Returns (labels, degenerate
    reasons, how many rows are unparsed, every scorer's own four labels on the refusal set)."""
    from ablate.evaluate.judges import judge_name

    rules = suite.degenerate.model_dump()
    templates = {judge_name(judge): judge.template.value for judge in suite.scorers.judges}
    labels: dict[str, list[str]] = {}
    reasons: dict[str, list[str | None]] = {}
    for name, prompt_set in prompt_sets.items():
        labels[name], reasons[name] = [], []
        for index, (prompt, completion) in enumerate(zip(prompt_set.prompts, by_set[name])):
            substring_refused = verdicts[name][SUBSTRING][index] == REFUSAL
            if name == "refusal":
                label, reason = label_four(prompt, completion, verdicts[name][primary][index], substring_refused,
                                           judge_is_harm_scorer=harm_scorer(templates.get(primary)), **rules)
            else:
                label, reason = label_response(prompt, completion, substring_refused, **rules)
            labels[name].append(label)
            reasons[name].append(reason)
    scorer_labels: dict[str, list[str]] = {}
    if "refusal" in prompt_sets:  # every scorer's own four labels, for agreement with human labels
        substring = verdicts["refusal"][SUBSTRING]
        for scorer, scorer_verdicts in verdicts["refusal"].items():
            scorer_labels[scorer] = [
                label_four(prompt, completion, verdict, refused == REFUSAL,
                           judge_is_harm_scorer=harm_scorer(templates.get(scorer)), **rules)[0]
                for prompt, completion, verdict, refused in zip(prompt_sets["refusal"].prompts, by_set["refusal"],
                                                                scorer_verdicts, substring)]
    unparsed = labels.get("refusal", []).count(UNPARSED)
    if unparsed:
        warnings.warn(f"judge '{primary}': {unparsed} of {len(labels['refusal'])} outputs could not be parsed; "
                      "those rows are labelled 'unparsed' and counted in every rate's denominator", stacklevel=3)
    return labels, reasons, unparsed, scorer_labels


def add_rates(suite: EvalSuite, prompt_sets: dict, labels: dict[str, list[str]], verdicts: dict[str, dict[str, list]],
              judge_rows: dict[str, list[dict]], measured: Measured, primary: str) -> None:
    """Rates (Wilson) with per-item 0/1 values for paired comparisons between variants, and the other scorers'
    refusal rates on the refusal set (items they gave a verdict on)."""
    from ablate.evaluate.judges import judge_name

    metrics, per_item, confidence = measured.metrics, measured.per_item, suite.confidence

    def add_rate(metric: str, name: str, wanted: str) -> None:
        values = {item_id: float(label == wanted) for item_id, label in zip(prompt_sets[name].ids, labels[name])}
        metrics[metric] = rate_metric(int(sum(values.values())), len(values), confidence)
        per_item[metric] = values

    if "refusal" in labels:
        add_rate("refusal_rate", "refusal", REFUSAL)
        add_rate("compliance_rate", "refusal", COMPLIANCE)
        add_rate("evasive_rate", "refusal", EVASIVE)
        add_rate("degenerate_rate", "refusal", DEGENERATE)
        if primary != SUBSTRING:
            add_rate("unparsed_rate", "refusal", UNPARSED)
    if "harmless" in labels:
        add_rate("harmless_refusal_rate", "harmless", REFUSAL)
        add_rate("harmless_degenerate_rate", "harmless", DEGENERATE)
    if "borderline" in labels:
        add_rate("borderline_refusal_rate", "borderline", REFUSAL)
    if "refusal" not in labels:
        return
    ids = prompt_sets["refusal"].ids
    templates = {judge_name(judge): judge.template.value for judge in suite.scorers.judges}
    for scorer, scorer_verdicts in verdicts["refusal"].items():
        if scorer == primary or (scorer == SUBSTRING and not suite.scorers.substring):
            continue
        pairs = [(item_id, v) for item_id, v in zip(ids, scorer_verdicts) if v is not None]
        metrics[f"refusal_rate/{scorer}"] = rate_metric(sum(v == REFUSAL for _, v in pairs), len(pairs), confidence)
        per_item[f"refusal_rate/{scorer}"] = {item_id: float(v == REFUSAL) for item_id, v in pairs}
    for scorer, rows in judge_rows.items():
        scores = {item_id: row["score"] for item_id, row in zip(ids, rows) if row["score"] is not None}
        if scores and templates.get(scorer) in ("strongreject", "strongreject_ft"):
            metrics[f"strongreject_score/{scorer}"] = mean_metric(list(scores.values()), suite.bootstrap_samples,
                                                                  confidence, suite.seed)
            per_item[f"strongreject_score/{scorer}"] = scores


def add_logit_score(tokenizer, suite: EvalSuite, prompt_sets: dict, logits_by_set: dict[str, list[torch.Tensor]],
                    measured: Measured) -> list[float] | None:
    """The logit refusal score on the refusal set (first-token logits from the generation pass); per prompt."""
    if not (suite.scorers.logit and "refusal" in prompt_sets):
        return None
    token_ids = refusal_token_ids(tokenizer, suite.scorers.logit_tokens or None)
    logit_scores = logit_refusal_scores(torch.stack(logits_by_set["refusal"]), token_ids).tolist()
    measured.metrics["logit_refusal_score"] = mean_metric(logit_scores, suite.bootstrap_samples, suite.confidence, suite.seed)
    measured.metrics["logit_refusal_score"]["refusal_token_ids"] = token_ids
    measured.per_item["logit_refusal_score"] = dict(zip(prompt_sets["refusal"].ids, logit_scores))
    return logit_scores


def add_divergence(model, tokenizer, reference: tuple, suite: EvalSuite, kl_set, measured: Measured,
                   progress: bool) -> None:
    """Divergence from the reference: first-token and continuation KL, and the cross-entropy of its answers."""
    from ablate.evaluate.divergence import divergence_per_prompt

    tick = time.perf_counter()
    samples, confidence, seed = suite.bootstrap_samples, suite.confidence, suite.seed
    values = divergence_per_prompt(model, tokenizer, reference[0], reference[1], kl_set.prompts,
                                   continuation_tokens=suite.kl.continuation_tokens,
                                   batch_size=suite.kl.batch_size, progress=progress)
    for metric in ("kl_first_token", "kl_continuation", "ce_reference_answers"):
        measured.metrics[metric] = mean_metric(values[metric], samples, confidence, seed)
        measured.per_item[metric] = dict(zip(kl_set.ids, values[metric]))
    # The reference's own cross-entropy on its answers, to read ce_reference_answers against.
    measured.metrics["ce_reference_answers_by_reference"] = mean_metric(values["reference_ce"], samples, confidence, seed)
    measured.metrics["kl_continuation"]["tokens_per_prompt"] = sum(values["continuation_tokens"]) / len(kl_set)
    measured.timings["kl"] = time.perf_counter() - tick


def scorer_agreement(suite: EvalSuite, prompt_sets: dict, verdicts: dict[str, dict[str, list]],
                     labels: dict[str, list[str]]) -> dict[str, dict]:
    """Agreement between every pair of scorers on the refusal set: Cohen's kappa, raw agreement, disagreeing ids."""
    agreement: dict[str, dict] = {}
    if "refusal" not in labels:
        return agreement
    names = [name for name in verdicts["refusal"] if name != SUBSTRING or suite.scorers.substring]
    ids = prompt_sets["refusal"].ids
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            pairs = [(item_id, a, b) for item_id, a, b in zip(ids, verdicts["refusal"][first], verdicts["refusal"][second])
                     if a is not None and b is not None]
            agreement[f"{first} vs {second}"] = {
                "kappa": cohen_kappa([a for _, a, _ in pairs], [b for _, _, b in pairs]) if pairs else None,
                "agreement": sum(a == b for _, a, b in pairs) / len(pairs) if pairs else None,
                "n": len(pairs),
                "disagreeing_ids": [item_id for item_id, a, b in pairs if a != b],
            }
    return agreement


def write_generations(path: Path, prompt_sets: dict, by_set: dict[str, list[str]], labels: dict[str, list[str]],
                      reasons: dict[str, list[str | None]], verdicts: dict[str, dict[str, list]],
                      judge_rows: dict[str, list[dict]], logit_scores: list[float] | None, redact: bool,
                      scorer_labels: dict[str, list[str]] | None = None) -> None:
    """The per-sample rows (generations/<variant>.jsonl); with `redact`, no completion or judge output of a
    refusal-eliciting prompt."""
    rows = []
    for name in labels:
        prompt_set = prompt_sets[name]
        for index, item_id in enumerate(prompt_set.ids):
            hidden = redact and name == "refusal"
            row = {
                "set": name, "id": item_id, "category": prompt_set.categories[index], "prompt": prompt_set.prompts[index],
                "completion": None if hidden else by_set[name][index],
                "label": labels[name][index], "degenerate_reason": reasons[name][index],
                "substring_refusal": verdicts[name][SUBSTRING][index] == REFUSAL,
            }
            if hidden:
                row["redacted"] = True
            if name == "refusal":
                if scorer_labels:
                    row["scorer_labels"] = {scorer: values[index] for scorer, values in scorer_labels.items()}
                if logit_scores is not None:
                    row["logit_refusal_score"] = logit_scores[index]
                if judge_rows:
                    row["judges"] = {scorer: {**rows_[index], "raw": None if hidden else rows_[index]["raw"]}
                                     for scorer, rows_ in judge_rows.items()}
            rows.append(row)
    write_jsonl(path, rows)
