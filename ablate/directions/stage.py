"""The direction stage, `run_direction`: compute model, prompt sets and input fingerprint, then the steps of
the package docstring in order."""

from __future__ import annotations

import math
import time
import warnings
from itertools import islice
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ablate import AblateError
from ablate.artifacts import fingerprint, is_done, mark_done, read_json, write_json
from ablate.config import DirectionConfig, KernelConfig, StrengthConfig
from ablate.directions.batches import (
    PromptBatches,
    joint_first_token_logprobs,
    model_device,
    post_instruction_tokens,
    prepare_batches,
    refusal_log_odds,
)
from ablate.directions.candidates import collect_mean_activations, compute_candidates, find_refusal_tokens
from ablate.directions.learn import learn_strength
from ablate.directions.output import export_steered, plot_sweep, save_tensor
from ablate.directions.screen import ablation_sensitivity, gradient_attention, steering_sensitivity
from ablate.directions.select import (
    GENERATED_FIELDS,
    ValidationScorer,
    max_layer_allowed,
    objective,
    ranking_objective,
    select_candidate,
    shortlist_candidates,
    steering_threshold,
)
from ablate.interventions import layer_weights
from ablate.models import get_adapter


def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 in hardware: a CUDA GPU that supports it, or a CPU with AMX or
    AVX512-BF16 (an AVX2-only CPU emulates it: a SmolLM2 matmul ran 5x slower than in float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def resolve_compute_dtype(compute_dtype: str, device: torch.device) -> str:
    """`compute_dtype` with "auto" resolved for `device`: bfloat16 where it is native, float32 elsewhere."""
    if compute_dtype != "auto":
        return compute_dtype
    return "bfloat16" if native_bfloat16(device) else "float32"


def compute_model(model: nn.Module, compute_dtype: str) -> nn.Module:
    """The model the stage's passes run on: `model` itself for "model", its own dtype or a quantised model
    (bitsandbytes weights have no other dtype), else a copy in that dtype ("auto": `resolve_compute_dtype`)."""
    if (compute_dtype == "model" or getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None)
            or getattr(model, "hf_device_map", None)):  # a sharded model is not copied either
        return model
    dtype = getattr(torch, resolve_compute_dtype(compute_dtype, next(model.parameters()).device))
    if next(model.parameters()).dtype == dtype:
        return model
    import copy

    return copy.deepcopy(model).to(dtype)


def model_fingerprint(model: nn.Module) -> str:
    """A cheap content fingerprint: name, class and the float64 sum of every parameter."""
    sums = [float(parameter.detach().double().sum()) for parameter in model.parameters()]
    name = getattr(getattr(model, "config", None), "_name_or_path", "")
    return fingerprint({"class": type(model).__name__, "name": name, "sums": sums})


def inputs_fingerprint(model, tokenizer, config: DirectionConfig, sets: dict) -> str:
    return fingerprint({
        "config": config.model_dump(mode="json"),
        "compute_dtype": resolve_compute_dtype(config.compute_dtype, next(model.parameters()).device),
        "model": model_fingerprint(model),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "sets": {name: prompt_set.fingerprint for name, prompt_set in sets.items()},
        "version": 1,
    })


def load_sets(config: DirectionConfig) -> dict:
    """The four prompt sets (seeded samples), never a test split."""
    from ablate.data import load_prompt_set

    def draw(spec: str, n: int, offset: int):
        prompt_set = load_prompt_set(spec)
        if len(prompt_set) < 2:
            raise AblateError(f"prompt set '{spec}': needs at least 2 prompts, has {len(prompt_set)}")
        return prompt_set.sample(n, seed=config.seed + offset)

    return {
        "refusal_train": draw(config.refusal_train, config.n_train, 0),
        "harmless_train": draw(config.harmless_train, config.n_train, 1),
        "refusal_val": draw(config.refusal_val, config.n_val, 2),
        "harmless_val": draw(config.harmless_val, config.n_val, 3),
    }


@dataclass
class DirectionSearch:
    """What the steps of one run of the direction stage share: the model and the compute copy every pass runs on,
    the prompt sets, the template positions, and what each step adds (candidates, refusal openers, base scores,
    records, the validation scorer)."""

    model: nn.Module
    compute: nn.Module
    tokenizer: object
    config: DirectionConfig
    sets: dict
    template_tokens: list[int]
    position_labels: list[str]
    n_layers: int
    d_model: int
    timings: dict = field(default_factory=dict)
    clock: float = field(default_factory=time.perf_counter)
    # collect_candidates
    refusal_mean: torch.Tensor | None = None
    harmless_mean: torch.Tensor | None = None
    candidates: dict = field(default_factory=dict)
    # measure_base
    token_ids: list[int] = field(default_factory=list)
    token_examples: list[dict] = field(default_factory=list)
    judge_new_tokens: int = 0  # the answer length refusals were recognised at (the stage's greedy completions' too)
    refusal_batches: PromptBatches | None = None
    harmless_batches: PromptBatches | None = None
    base_harmless: torch.Tensor | None = None
    base_refusal_score: float = 0.0
    base_harmless_score: float = 0.0
    # screen_candidates, score_shortlist
    records: list[dict] = field(default_factory=list)
    max_layer: int = 0
    shortlist: list[int] = field(default_factory=list)
    exact: list[int] = field(default_factory=list)
    ablated_refusal: dict = field(default_factory=dict)  # each exactly scored candidate's refusal log-probabilities
    scorer: ValidationScorer | None = None

    @property
    def n_positions(self) -> int:
        return len(self.template_tokens)

    @property
    def variants(self) -> list[str]:
        return list(self.candidates)

    def lap(self, name: str) -> None:
        """Record the seconds since the previous lap under `name`."""
        now = time.perf_counter()
        self.timings[name] = round(now - self.clock, 2)
        self.clock = now

    def direction_of(self, record: dict) -> torch.Tensor:
        return self.candidates[record["variant"]][record["layer"], record["position"] + self.n_positions]

    def steering_score(self, index: int) -> float:
        """The candidate's steering score, computed once."""
        record = self.records[index]
        if record["steering_score"] is None:
            record["steering_score"] = self.scorer.steering(self.direction_of(record), record["layer"])
        return record["steering_score"]


@dataclass
class Pick:
    """The selection as the steps after scoring refine it: the chosen record's index, its scores, the direction
    and strength, and whether it is a fallback (no candidate passed the filters)."""

    index: int
    record: dict
    direction: torch.Tensor
    strength: StrengthConfig
    fallback: bool
    filter_counts: dict
    searched: list[dict] = field(default_factory=list)
    learned: dict | None = None
    warning: str | None = None


def run_direction(model: nn.Module, tokenizer, config: DirectionConfig, out_dir: Path, progress: bool = True) -> dict:
    """Extract, screen, score and select the refusal direction; write the artifacts; return the pick.

    Skips (returns the stored selection) when `out_dir/done.json` matches these inputs.
    """
    out_dir = Path(out_dir)
    sets = load_sets(config)
    key = inputs_fingerprint(model, tokenizer, config, sets)
    if is_done(out_dir, key) and (out_dir / "selected.json").exists():
        return read_json(out_dir / "selected.json")
    started = time.perf_counter()
    search = start_search(model, tokenizer, config, sets)
    search.clock = started  # the first lap counts the compute copy too
    collect_candidates(search, progress)
    search.lap("collect")
    measure_base(search)
    search.lap("refusal_tokens")
    screen_candidates(search)
    search.lap("screen")
    score_shortlist(search, progress)
    search.lap("score")
    pick = select_pick(search)
    search.lap("select")
    if pick.record["kl"] > config.kl_max and config.strength_search and not config.strength_learning.enabled:
        search_strength(search, pick, progress)
        search.lap("strength_search")
    if config.strength_learning.enabled:
        learn_pick_strength(search, pick, progress)
        search.lap("strength_learning")
    warn_on_fallback(pick)
    return write_direction(search, pick, out_dir, key, started)


def start_search(model: nn.Module, tokenizer, config: DirectionConfig, sets: dict) -> DirectionSearch:
    """The template positions and the compute model of a run.

    Every pass of the stage runs on `compute`: the model itself, or a copy in `compute_dtype` (bfloat16
    halves the forward passes' time on a CPU with AMX; "auto" takes it only where it is native).
    Means, directions and weights stay float32/64.
    """
    adapter = get_adapter(model)
    template_tokens = post_instruction_tokens(tokenizer, config.system_prompt)
    if config.positions is not None:
        template_tokens = template_tokens[-config.positions:]
    position_labels = [repr(tokenizer.decode([token])) for token in template_tokens]
    return DirectionSearch(model=model, compute=compute_model(model, config.compute_dtype), tokenizer=tokenizer,
                           config=config, sets=sets, template_tokens=template_tokens, position_labels=position_labels,
                           n_layers=adapter.n_layers, d_model=adapter.d_model)


def collect_candidates(search: DirectionSearch, progress: bool) -> None:
    """Steps 1–2: the mean activations of the train sets and the difference-in-means candidates."""
    config, compute, tokenizer = search.config, search.compute, search.tokenizer
    search.refusal_mean = collect_mean_activations(
        compute, tokenizer, search.sets["refusal_train"].prompts, search.n_positions, system=config.system_prompt,
        batch_size=config.batch_size, progress=progress, description="refusal activations")
    search.harmless_mean = collect_mean_activations(
        compute, tokenizer, search.sets["harmless_train"].prompts, search.n_positions, system=config.system_prompt,
        batch_size=config.batch_size, progress=progress, description="harmless activations")
    search.candidates = compute_candidates(search.refusal_mean, search.harmless_mean, config.variant)


def measure_base(search: DirectionSearch) -> None:
    """Step 3: the refusal openers, the validation batches and the base model's validation scores."""
    config, compute, tokenizer, sets = search.config, search.compute, search.tokenizer, search.sets
    system, device = config.system_prompt, model_device(search.model)
    search.token_ids, search.token_examples, search.judge_new_tokens = find_refusal_tokens(
        compute, tokenizer, sets["refusal_val"].prompts[: config.refusal_token_prompts],
        max_new_tokens=config.refusal_token_max_new_tokens, system=system, batch_size=config.generation_batch_size,
        alternatives=config.refusal_token_alternatives, retry_new_tokens=config.refusal_token_retry_new_tokens)
    search.refusal_batches = prepare_batches(tokenizer, sets["refusal_val"].prompts, config.batch_size, system, device)
    search.harmless_batches = prepare_batches(tokenizer, sets["harmless_val"].prompts, config.batch_size, system, device)
    base_refusal, search.base_harmless = joint_first_token_logprobs(compute, search.refusal_batches, search.harmless_batches)
    search.base_refusal_score = float(refusal_log_odds(base_refusal, search.token_ids).mean())
    search.base_harmless_score = float(refusal_log_odds(search.base_harmless, search.token_ids).mean())


def screen_candidates(search: DirectionSearch) -> None:
    """Step 4: a first-order estimate of every candidate's scores (on the first `screen_prompts` of each
    validation set); one record per candidate."""
    config, tokenizer, sets = search.config, search.tokenizer, search.sets
    system, device = config.system_prompt, model_device(search.model)

    def screened(name: str, every: PromptBatches) -> PromptBatches:
        prompts, n = sets[name].prompts, config.screen_prompts
        return every if n is None or n >= len(prompts) else prepare_batches(tokenizer, prompts[:n], config.batch_size, system, device)

    screen_refusal = screened("refusal_val", search.refusal_batches)
    screen_harmless = screened("harmless_val", search.harmless_batches)
    with gradient_attention(search.compute, config.gradient_attention):
        ablation_matrix = ablation_sensitivity(search.compute, screen_refusal, search.token_ids, screen_refusal.n)
        steering_gradients = steering_sensitivity(search.compute, screen_harmless, search.token_ids, screen_harmless.n)
    symmetric = (ablation_matrix + ablation_matrix.T) / 2
    n_positions = search.n_positions
    for variant in search.variants:
        stack = search.candidates[variant].double()  # (n_layers, n_positions, d_model)
        r_hat = stack / stack.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        estimated_ablation = search.base_refusal_score - torch.einsum("lpd,de,lpe->lp", r_hat, symmetric, r_hat)
        estimated_steering = search.base_harmless_score + config.steering_coefficient * torch.einsum(
            "lpd,ld->lp", stack, steering_gradients)
        for layer in range(search.n_layers):
            for p in range(n_positions):
                search.records.append({
                    "variant": variant, "layer": layer, "position": p - n_positions,
                    "position_token": search.position_labels[p], "norm": float(stack[layer, p].norm()),
                    # Layer 0's input at a template token is that token's embedding, the same for every
                    # prompt: its difference in means is (numerically) zero and is never a candidate.
                    "degenerate": bool(stack[layer, p].norm() <= 1e-6 * search.harmless_mean[layer, p].norm()),
                    "estimated_refusal_score": float(estimated_ablation[layer, p]),
                    "estimated_steering_score": float(estimated_steering[layer, p]),
                    "refusal_score": None, "steering_score": None, "kl": None,
                })


def _check_finite(record: dict, scores: tuple[float, float]) -> None:
    if not all(math.isfinite(value) for value in scores):
        raise AblateError(f"candidate layer {record['layer']} position {record['position']}: non-finite score")


def score_shortlist(search: DirectionSearch, progress: bool) -> None:
    """Step 5: exact validation scores of the shortlist. Successive halving: the whole shortlist on the first
    `prescore_prompts` prompts of each set, then the best `prescore_keep` of them by the objective on every prompt."""
    config, records, tokenizer, sets = search.config, search.records, search.tokenizer, search.sets
    system, device = config.system_prompt, model_device(search.model)
    search.max_layer = max_layer_allowed(search.n_layers, config.exclude_last_fraction)
    search.shortlist = shortlist = shortlist_candidates(records, config, search.max_layer)
    strength = config.strength
    weights = layer_weights(search.n_layers, strength.coefficient, strength.kernel.model_dump() if strength.kernel else None,
                            strength.writer_weights)
    scorer = search.scorer = ValidationScorer(search.compute, tokenizer, config, sets, search.token_ids,
                                              search.refusal_batches, search.harmless_batches, search.base_harmless,
                                              search.judge_new_tokens)
    exact = shortlist
    n_prescore = config.prescore_prompts
    if n_prescore is not None and n_prescore < min(len(sets["refusal_val"]), len(sets["harmless_val"])) \
            and config.prescore_keep < len(shortlist):
        few_refusal = prepare_batches(tokenizer, sets["refusal_val"].prompts[:n_prescore], config.batch_size, system, device)
        few_harmless = prepare_batches(tokenizer, sets["harmless_val"].prompts[:n_prescore], config.batch_size, system, device)
        for index in tqdm(shortlist, desc="prescoring candidates", unit="candidate", disable=not progress, leave=False):
            record = records[index]
            scores = scorer.ablated(search.direction_of(record), weights, few_refusal, few_harmless)
            _check_finite(record, scores)
            record["prescore"] = {"refusal_score": scores[0], "kl": scores[1], "n_prompts": n_prescore,
                                  "objective": objective({"refusal_score": scores[0], "kl": scores[1]}, config)}
        exact = sorted(shortlist, key=lambda i: (records[i]["prescore"]["objective"], i))[: config.prescore_keep]
        search.lap("prescore")
    search.exact = exact
    for index in tqdm(exact, desc="scoring candidates", unit="candidate", disable=not progress, leave=False):
        record = records[index]
        scores, search.ablated_refusal[index] = scorer.measure(search.direction_of(record), weights,
                                                               generate=config.score_by_generation)
        _check_finite(record, (scores["refusal_score"], scores["kl"]))
        record.update(scores)


def select_pick(search: DirectionSearch) -> Pick:
    """Step 6: the filters and the objective choose one exactly-scored candidate."""
    chosen, fallback, filter_counts = select_candidate(search.records, search.config, search.n_layers,
                                                       search.steering_score, search.base_harmless_score)
    pick = search.records[chosen]
    return Pick(index=chosen, record=pick, direction=search.direction_of(pick).clone(), strength=search.config.strength,
                fallback=fallback, filter_counts=filter_counts)


def search_strength(search: DirectionSearch, pick: Pick, progress: bool) -> None:
    """Step 7: when full ablation of the pick is too damaging, try kernels peaked at the layer of the pick and of
    the next best scored candidates (a damaging direction may be the best one once it is removed from a few
    layers only)."""
    config, records, n_layers = search.config, search.records, search.n_layers
    chosen, strength = pick.index, pick.strength
    allowed = [i for i in search.exact if records[i]["layer"] < search.max_layer]
    searched_indices = [chosen] + sorted((i for i in allowed if i != chosen), key=lambda i: (records[i]["objective"], i))
    options = [(chosen, strength, pick.record["refusal_score"], pick.record["kl"])]
    total = len(config.strength_search) * len(searched_indices[: config.strength_candidates])
    with tqdm(total=total, desc="strength search", unit="kernel", disable=not progress, leave=False) as bar:
        for index in searched_indices[: config.strength_candidates]:
            record = records[index]
            for kernel in config.strength_search:
                option = StrengthConfig(coefficient=config.strength.coefficient, kernel=KernelConfig(
                    max_weight=kernel.max_weight, max_weight_position=record["layer"], min_weight=kernel.min_weight,
                    min_weight_distance=kernel.distance))
                refusal_score, kl = search.scorer.ablated(
                    search.direction_of(record), layer_weights(n_layers, option.coefficient, option.kernel.model_dump()))
                options.append((index, option, refusal_score, kl))
                pick.searched.append({"layer": record["layer"], "position": record["position"], "variant": record["variant"],
                                      "strength": option.model_dump(mode="json"), "refusal_score": refusal_score, "kl": kl,
                                      "objective": objective({"refusal_score": refusal_score, "kl": kl}, config)})
                bar.update(1)
    passing = [o for o in options if o[3] <= config.kl_max] or options
    # The search runs only for a pick that failed the KL filter (a fallback), so every option competes.
    best = min(passing, key=lambda o: (objective({"refusal_score": o[2], "kl": o[3]}, config), options.index(o)))
    if best[1] is not strength:
        pick.index, pick.strength = best[0], best[1]
        full = records[pick.index]
        pick.record = {**full, "refusal_score": best[2], "kl": best[3],
                       "objective": objective({"refusal_score": best[2], "kl": best[3]}, config),
                       "full_ablation": {"refusal_score": full["refusal_score"], "kl": full["kl"]}}
        pick.direction = search.direction_of(full).clone()
    pick.record["steering_score"] = search.steering_score(pick.index)
    if pick.fallback and pick.record["kl"] <= config.kl_max and pick.record["steering_score"] > _threshold(search):
        pick.fallback = False  # full ablation failed only the KL filter, and a weaker kernel passes it
        pick.filter_counts["passed_after_strength_search"] = 1


def _threshold(search: DirectionSearch) -> float:
    return steering_threshold(search.config, search.base_harmless_score)


def learn_pick_strength(search: DirectionSearch, pick: Pick, progress: bool) -> None:
    """Step 8 (`learn_strength`): per-writer weights and a change to the direction, learned on the validation
    prompts from the pick and the next best exactly-scored candidates. The result replaces the pick and its
    strength when it ranks better (within kl_max beats above it, then the ranking)."""
    config, records, scorer = search.config, search.records, search.scorer
    settings, threshold, chosen = config.strength_learning, _threshold(search), pick.index
    strength = config.strength
    weights = layer_weights(search.n_layers, strength.coefficient, strength.kernel.model_dump() if strength.kernel else None,
                            strength.writer_weights)
    pool = [chosen] + sorted((i for i in search.exact if i != chosen and records[i]["layer"] < search.max_layer),
                             key=lambda i: (ranking_objective(records[i], config), i))
    # Candidates whose addition does not induce refusal are no refusal direction: learned only when none does.
    # Steering scores are computed down the pool only until enough candidates pass (one forward pass each).
    inducing = list(islice((i for i in pool if search.steering_score(i) > threshold), settings.candidates))
    pool = inducing or pool[: settings.candidates]
    best, runs = learn_strength(search.compute, scorer, [(i, search.direction_of(records[i]), search.ablated_refusal.get(i))
                                                         for i in pool], progress)
    scores, writer_weights, state = best["scores"], best["weights"], best["state"]
    pick_scores = {key: pick.record[key] for key in ("objective", *GENERATED_FIELDS) if key in pick.record}
    if settings.select_by_generation and "generated_objective" not in pick_scores:
        pick_scores.update({key: value for key, value in scorer.measure(pick.direction, weights, generate=True)[0].items()
                            if key in GENERATED_FIELDS})
    chosen_learned = (scores["kl"] <= config.kl_max, -ranking_objective(scores, config)) > \
        (pick.record["kl"] <= config.kl_max, -ranking_objective(pick_scores, config))
    pick.learned = {
        **scores, "chosen": chosen_learned, "candidate_index": best["index"], "writer_weights": writer_weights,
        "history": state.history, "settings": settings.model_dump(mode="json"),
        "compared_with": {"index": chosen, "refusal_score": pick.record["refusal_score"], "kl": pick.record["kl"], **pick_scores},
        "candidates": [{"layer": records[run["index"]]["layer"], "position": records[run["index"]]["position"],
                        "variant": records[run["index"]]["variant"], **run} for run in runs]}
    if chosen_learned:
        pick.index = best["index"]
        full = records[pick.index]
        pick.direction = best["direction"]
        pick.strength = StrengthConfig(writer_weights=writer_weights)
        pick.record = {**full, **scores, "full_ablation": {"refusal_score": full["refusal_score"], "kl": full["kl"]}}
    # A learned direction has a steering score of its own (added at its candidate's layer).
    learned_direction_chosen = chosen_learned and state.delta is not None
    pick.record["steering_score"] = (scorer.steering(pick.direction, pick.record["layer"]) if learned_direction_chosen
                                     else search.steering_score(pick.index))
    if pick.fallback and pick.record["kl"] <= config.kl_max and pick.record["steering_score"] > threshold:
        pick.fallback = False  # full ablation failed only the KL filter, and the learned weights pass it
        pick.filter_counts["passed_after_strength_learning"] = 1


def warn_on_fallback(pick: Pick) -> None:
    """When no candidate passed the filters, say how many each filter removed."""
    if not pick.fallback:
        return
    counts = pick.filter_counts
    removed = ", ".join(f"{name}: {count}" for name, count in counts.items()
                        if name not in ("candidates", "passed", "steering_not_scored"))
    pick.warning = (f"no candidate passed the filters ({removed}; of {counts['candidates']}); falling back to "
                               f"the best by the objective — consider a larger kl_max or shortlist")
    warnings.warn(pick.warning, stacklevel=3)


def write_direction(search: DirectionSearch, pick: Pick, out_dir: Path, key: str, started: float) -> dict:
    """The artifacts: tensors first, small JSON beside them, done.json last. Returns selected.json's content."""
    config, tokenizer, records = search.config, search.tokenizer, search.records
    record, n_positions = pick.record, search.n_positions
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tensor({**{variant: tensor for variant, tensor in search.candidates.items()},
                 "refusal_mean": search.refusal_mean.float(), "harmless_mean": search.harmless_mean.float()},
                out_dir / "candidates.pt")
    write_json(out_dir / "candidates.json", {
        "shape": "(n_layers, n_positions, d_model) per variant; position p is token p − n_positions of the prompt",
        "variants": search.variants, "n_layers": search.n_layers, "n_positions": n_positions, "d_model": search.d_model,
        "position_tokens": search.position_labels, "template_token_ids": search.template_tokens,
        "sets": {name: {"name": s.name, "n": len(s), "fingerprint": s.fingerprint, "ids": s.ids} for name, s in search.sets.items()},
    })
    write_json(out_dir / "sweep.json", {
        "base": {"refusal_score_refusal_val": search.base_refusal_score, "refusal_score_harmless_val": search.base_harmless_score},
        "refusal_tokens": {"ids": search.token_ids, "text": [tokenizer.decode([t]) for t in search.token_ids],
                           "max_new_tokens": search.judge_new_tokens, "examples": search.token_examples},
        "max_layer_allowed": search.max_layer, "shortlist": search.shortlist, "exactly_scored": search.exact,
        "selected_index": pick.index, "strength_search": pick.searched, "strength_learning": pick.learned,
        "config": config.model_dump(mode="json"), "candidates": records,
    })
    save_tensor(pick.direction, out_dir / "direction.pt")
    strength = pick.strength
    steered_path = None
    if strength.kernel is None and strength.writer_weights is None and strength.coefficient == 1.0:  # clamp = full ablation
        steered_path = str(export_steered(search.model, pick.direction, out_dir / "steer.pt"))
    selected = {
        "variant": record["variant"], "layer": record["layer"], "position": record["position"],
        "position_token": record["position_token"], "refusal_score": record["refusal_score"],
        "steering_score": record["steering_score"], "kl": record["kl"], "objective": record["objective"], "norm": record["norm"],
        "base_refusal_score": search.base_refusal_score, "base_harmless_refusal_score": search.base_harmless_score,
        "direction_path": str(out_dir / "direction.pt"), "steered_path": steered_path,
        "fallback": pick.fallback, "warning": pick.warning, "filter_counts": pick.filter_counts,
        "strength": strength.model_dump(mode="json"), "full_ablation": record.get("full_ablation"),
        "direction_cosine": record.get("direction_cosine"), "generated_refusal_rate": record.get("generated_refusal_rate"),
        "refusal_tokens": [tokenizer.decode([t]) for t in search.token_ids],
        "n_layers": search.n_layers, "d_model": search.d_model, "timings": search.timings,
        "compute_dtype": str(next(search.compute.parameters()).dtype).removeprefix("torch."),
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    write_json(out_dir / "selected.json", selected)
    try:
        plot_sweep(records, search.variants, search.n_layers, search.position_labels, selected, search.max_layer,
                   out_dir / "sweep.png")
    except Exception as error:  # a figure must never lose a finished selection
        warnings.warn(f"sweep figure not written: {error}", stacklevel=2)
    selected["wall_seconds"] = round(time.perf_counter() - started, 2)
    write_json(out_dir / "selected.json", selected)
    mark_done(out_dir, key, layer=record["layer"], position=record["position"], variant=record["variant"],
              kl=record["kl"], refusal_score=record["refusal_score"], wall_seconds=selected["wall_seconds"])
    return selected
