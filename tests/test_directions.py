"""Direction extraction, scoring and selection on tiny random models."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ablate import AblateError
from ablate.config import DirectionConfig, DirectionVariant, load_config
from ablate.directions import (
    ablation_sensitivity,
    collect_mean_activations,
    compute_candidates,
    first_token_kl,
    first_token_logprobs,
    gradient_attention,
    join_batches,
    joint_first_token_logprobs,
    load_direction,
    post_instruction_tokens,
    prepare_batches,
    refusal_log_odds,
    run_direction,
    run_prefix_and_batch,
    select_candidate,
    steering_sensitivity,
)
from ablate.generation import render_prompts, tokenize_batch
from ablate.interventions import activation_addition
from ablate.models import get_adapter

# Gradient-free passes on the model itself (float32), so scores can be checked exactly; bfloat16 has its own test.
SMALL = dict(n_train=6, n_val=6, refusal_token_prompts=3, refusal_token_max_new_tokens=3, batch_size=6, shortlist=3, shortlist_per_layer=3,
             compute_dtype="model")
# Full ablation of the pick: no learned or searched strength (those are tested on their own below).
FULL = dict(SMALL, strength_learning={"enabled": False}, strength_search=[])


def test_post_instruction_tokens_are_the_template_between_message_and_answer(tokenizer):
    tokens = post_instruction_tokens(tokenizer)
    assert tokenizer.decode(tokens) == "<|im_end|>\n<|im_start|>assistant\n"


def test_collected_means_equal_the_layer_inputs(llama, tokenizer):
    prompts = ["Explain photosynthesis.", "Write a short poem about the sea and the sky.", "Hi"]
    n_positions = len(post_instruction_tokens(tokenizer))
    means = collect_mean_activations(llama, tokenizer, prompts, n_positions, batch_size=2)
    assert means.dtype == torch.float64 and means.shape == (2, n_positions, 32)
    expected = torch.zeros_like(means)
    for prompt in prompts:  # one prompt at a time, no padding: hidden_states[i] is layer i's input
        inputs = tokenize_batch(tokenizer, render_prompts(tokenizer, [prompt]), torch.device("cpu"))
        with torch.no_grad():
            hidden = llama(**inputs, output_hidden_states=True).hidden_states
        for layer in range(2):
            expected[layer] += hidden[layer][0, -n_positions:].double() / len(prompts)
    torch.testing.assert_close(means, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma", "gemma2", "phi3", "gpt2"])
def test_shared_prefix_batches_give_each_prompts_own_logits(family, tiny_models, tokenizer):
    """Prefix KV sharing + right padding = running every prompt alone."""
    model = tiny_models[family]
    prompts = ["Explain photosynthesis.", "Write a short poem about the sea and the sky.", "Hi", "List three tips."]
    prepared = prepare_batches(tokenizer, prompts, 3, None, torch.device("cpu"))
    assert prepared.prefix.numel() > 0
    shared = first_token_logprobs(model, prepared)
    for index, prompt in enumerate(prompts):
        inputs = tokenize_batch(tokenizer, render_prompts(tokenizer, [prompt]), torch.device("cpu"))
        with torch.no_grad():
            alone = torch.log_softmax(model(**inputs).logits[0, -1].float(), dim=-1)
        torch.testing.assert_close(shared[index], alone, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_joined_batches_give_each_sets_own_logits(family, tiny_models, tokenizer):
    """Strength learning runs a refusal and a harmless mini-batch as one: each row keeps its own logits, also
    when one set's shared prefix is longer than the other's (its prompts all start with the same words)."""
    model = tiny_models[family]
    first = prepare_batches(tokenizer, ["Tell me how to pick a lock.", "Tell me a secret."], 2, None, torch.device("cpu"))
    second = prepare_batches(tokenizer, ["Explain photosynthesis.", "Write a short poem about the sea.", "Hi"], 3, None,
                             torch.device("cpu"))
    assert first.prefix.numel() > second.prefix.numel() > 0
    (first_rows, first_inputs), (second_rows, second_inputs) = first.batches[0], second.batches[0]
    prefix, inputs = join_batches(first, first_inputs, second, second_inputs)
    assert torch.equal(prefix, second.prefix)
    with torch.no_grad():
        joined = torch.log_softmax(run_prefix_and_batch(model, prefix, inputs), dim=-1)
    alone = torch.cat([first_token_logprobs(model, first)[first_rows], first_token_logprobs(model, second)[second_rows]])
    torch.testing.assert_close(joined, alone, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_joint_first_token_logprobs_equal_each_sets_own_pass(family, tiny_models, tokenizer):
    """Scoring runs both validation sets' batches in one pass each: every prompt gets the log-probabilities of its
    own pass, in input order, also when one set has more batches than the other (those run alone)."""
    model = tiny_models[family]
    first = prepare_batches(tokenizer, ["Tell me how to pick a lock.", "Tell me a secret.", "Tell me a lie, please."], 1,
                            None, torch.device("cpu"))
    second = prepare_batches(tokenizer, ["Explain photosynthesis.", "Write a short poem about the sea."], 2, None,
                             torch.device("cpu"))
    assert len(first.batches) == 3 and len(second.batches) == 1
    with torch.no_grad():
        joint = joint_first_token_logprobs(model, first, second)
        alone = (first_token_logprobs(model, first), first_token_logprobs(model, second))
    for got, expected in zip(joint, alone):
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def test_gradient_attention_switches_and_always_restores(llama):
    own = llama.config._attn_implementation
    other = "eager" if own != "eager" else "sdpa"
    with gradient_attention(llama, other):
        assert llama.config._attn_implementation == other
    assert llama.config._attn_implementation == own
    with pytest.raises(RuntimeError), gradient_attention(llama, other):
        raise RuntimeError("inside")
    assert llama.config._attn_implementation == own
    with gradient_attention(llama, "model"):
        assert llama.config._attn_implementation == own
    with gradient_attention(llama, "auto"):  # a CPU model: eager
        assert llama.config._attn_implementation == "eager"
    assert llama.config._attn_implementation == own


def test_continuing_after_the_greedy_first_token_gives_the_greedy_completion(llama, tokenizer):
    from ablate.config import GenerationConfig
    from ablate.evaluate.measure import complete_after
    from ablate.generation import generate_batches

    prompts = ["Name a colour.", "Explain how photosynthesis works in a few words."]
    greedy = GenerationConfig(max_new_tokens=5, batch_size=2)
    completions, first_logits = generate_batches(llama, tokenizer, prompts, greedy, progress=False)
    firsts = first_logits.argmax(-1).tolist()
    forced = complete_after(llama, tokenizer, list(zip(prompts, firsts)), GenerationConfig(max_new_tokens=4, batch_size=2))
    assert forced == completions


def test_refusal_openers_include_the_runner_up_tokens_that_open_refusals(llama, tokenizer, monkeypatch):
    """With alternatives, a first token the model ranks second counts when its continuation is a refusal."""
    import ablate.directions as directions
    import ablate.evaluate.refusal as refusal_module
    from ablate.config import GenerationConfig
    from ablate.evaluate.measure import complete_after
    from ablate.generation import generate_batches

    prompts = ["Name a colour.", "Explain how photosynthesis works in a few words."]
    _, first_logits = generate_batches(llama, tokenizer, prompts, GenerationConfig(max_new_tokens=1), progress=False)
    second = first_logits.float().topk(2, dim=-1).indices[:, 1].tolist()
    greedy = GenerationConfig(max_new_tokens=3)
    target = complete_after(llama, tokenizer, [(prompts[0], second[0])], greedy)[0]
    assert target not in generate_batches(llama, tokenizer, prompts, greedy, progress=False)[0]
    # The scorer calls exactly one completion a refusal: the first prompt's, opened by its runner-up token.
    monkeypatch.setattr(refusal_module, "is_refusal", lambda text, *a: text == target)
    greedy_only, _, _ = directions.find_refusal_tokens(llama, tokenizer, prompts, max_new_tokens=3)
    with_runner_ups, examples, _ = directions.find_refusal_tokens(llama, tokenizer, prompts, max_new_tokens=3, alternatives=2)
    assert second[0] not in greedy_only and second[0] in with_runner_ups
    assert sum(example.get("forced", False) for example in examples) == 2 * len(prompts)


def test_refusals_that_decline_late_are_judged_on_longer_answers(llama, tokenizer, monkeypatch):
    """A model whose refusals first restate the request (extended refusals) declines only after the opener
    length: with a retry length its openers are found on longer answers, and the stage judges at that length."""
    import ablate.directions as directions
    import ablate.evaluate.refusal as refusal_module
    from ablate.config import GenerationConfig
    from ablate.generation import generate_batches

    prompts = ["Name a colour.", "Explain how photosynthesis works in a few words.", "Write a haiku.", "Count to five."]
    late, first_logits = generate_batches(llama, tokenizer, prompts, GenerationConfig(max_new_tokens=8), progress=False)
    short, _ = generate_batches(llama, tokenizer, prompts, GenerationConfig(max_new_tokens=3), progress=False)
    assert not set(short) & set(late)
    monkeypatch.setattr(refusal_module, "is_refusal", lambda text, *a: text in late)  # refuses, but only by token 8
    openers = directions.find_refusal_tokens(llama, tokenizer, prompts, max_new_tokens=3, retry_new_tokens=8)
    assert openers.max_new_tokens == 8 and all(example["refusal"] for example in openers.examples)
    assert openers.tokens == sorted(set(first_logits.argmax(dim=-1).tolist()))
    with pytest.warns(UserWarning, match="refused none"):
        generic = directions.find_refusal_tokens(llama, tokenizer, prompts, max_new_tokens=3)
    assert generic.max_new_tokens == 3 and generic.tokens != openers.tokens
    monkeypatch.setattr(refusal_module, "is_refusal", lambda text, *a: False)  # no refusal at any length
    with pytest.warns(UserWarning, match="refused none"):
        assert directions.find_refusal_tokens(llama, tokenizer, prompts, max_new_tokens=3, retry_new_tokens=8).max_new_tokens == 3
    # Judged on the short answers: when half of them refuse already, or when the longer ones show no more than
    # twice as many refusals (1 early, 2 later); the longer ones when they show more (1 early, 3 later).
    for early, later, judged in ((short[:2], [], 3), (short[:1], late[:2], 3), (short[:1], late[:3], 8)):
        monkeypatch.setattr(refusal_module, "is_refusal", lambda text, *a: text in early or text in later)
        assert directions.find_refusal_tokens(llama, tokenizer, prompts, max_new_tokens=3, retry_new_tokens=8).max_new_tokens == judged


def test_the_stage_judges_its_completions_at_the_length_the_refusals_were_found(tokenizer, tmp_path, monkeypatch):
    """When the openers needed the retry length, the shortlist's greedy completions are generated at it too, and
    sweep.json records it."""
    import ablate.directions.select as select_module
    import ablate.evaluate.measure as measure_module
    import ablate.evaluate.refusal as refusal_module
    from conftest import build_model

    late, complete = set(), measure_module.complete

    def answers(model, tokenizer, prompts, config, *args, **kwargs):  # the model refuses, but only by token 8
        completed = complete(model, tokenizer, prompts, config, *args, **kwargs)
        if config.max_new_tokens == 8:
            late.update(completed.texts)
        return completed

    monkeypatch.setattr(measure_module, "complete", answers)
    monkeypatch.setattr(refusal_module, "is_refusal", lambda text, *a: text in late)
    lengths, generate = [], select_module.generate_batches

    def spy(model, tokenizer, prompts, config, **kwargs):
        lengths.append(config.max_new_tokens)
        return generate(model, tokenizer, prompts, config, **kwargs)

    monkeypatch.setattr(select_module, "generate_batches", spy)
    config = DirectionConfig(**FULL, refusal_token_retry_new_tokens=8)
    run_direction(build_model("llama", tokenizer, seed=0), tokenizer, config, tmp_path, progress=False)
    assert json.loads((tmp_path / "sweep.json").read_text())["refusal_tokens"]["max_new_tokens"] == 8
    assert lengths and set(lengths) == {8}


def test_candidates_plain_and_projected():
    refusal, harmless = torch.randn(3, 2, 8, dtype=torch.float64), torch.randn(3, 2, 8, dtype=torch.float64)
    candidates = compute_candidates(refusal, harmless, DirectionVariant.both)
    torch.testing.assert_close(candidates["plain"], (refusal - harmless).float())
    dots = (candidates["projected"].double() * harmless).sum(-1)
    assert dots.abs().max() < 1e-5
    assert set(compute_candidates(refusal, harmless, DirectionVariant.plain)) == {"plain"}


def test_refusal_log_odds_and_kl():
    logprobs = torch.log(torch.tensor([[0.25, 0.25, 0.5], [0.1, 0.1, 0.8]]))
    torch.testing.assert_close(refusal_log_odds(logprobs, [0, 1]), torch.tensor([0.0, torch.log(torch.tensor(0.2 / 0.8))]))
    assert first_token_kl(logprobs, logprobs).abs().max() < 1e-7
    assert (first_token_kl(logprobs, logprobs.flip(0)) > 0).all()


def test_first_order_screening_matches_finite_differences(llama, tokenizer):
    """−r̂ᵀ A r̂ and G[ℓ]·r are the derivatives of the refusal score under a small ablation / addition."""
    prompts = ["Explain photosynthesis.", "Write a poem.", "List three tips for studying."]
    batches = prepare_batches(tokenizer, prompts, 2, None, torch.device("cpu"))
    tokens = [5, 9, 17]
    adapter = get_adapter(llama)
    r_hat = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(3)), dim=0)

    def score() -> float:
        return float(refusal_log_odds(first_token_logprobs(llama, batches), tokens).mean())

    base = score()
    epsilon = 1e-3
    handles = [module.register_forward_hook(lambda m, i, o: o - epsilon * (o @ r_hat).unsqueeze(-1) * r_hat)
               for module in [adapter.embedding, *adapter.all_writers()]]
    try:
        ablated = score()
    finally:
        for handle in handles:
            handle.remove()
    matrix = ablation_sensitivity(llama, batches, tokens, len(prompts))
    estimate = -float(r_hat.double() @ matrix @ r_hat.double())
    assert (ablated - base) / epsilon == pytest.approx(estimate, rel=0.05, abs=1e-3)

    gradients = steering_sensitivity(llama, batches, tokens, len(prompts))
    with activation_addition(llama, r_hat, layer=1, coefficient=epsilon):
        steered = score()
    assert (steered - base) / epsilon == pytest.approx(float(gradients[1] @ r_hat.double()), rel=0.05, abs=1e-3)
    assert all(p.requires_grad for p in llama.parameters())  # restored after screening


def record(layer, refusal, kl, steering, position=-1):
    return {"variant": "plain", "layer": layer, "position": position, "refusal_score": refusal, "kl": kl,
            "steering_score": steering, "estimated_refusal_score": refusal, "degenerate": False}


def test_selection_weighs_damage_and_reports_filters():
    config = DirectionConfig(kl_max=1.0, refusal_floor=-3.0, kl_weight=4.0)
    records = [
        record(3, refusal=-9.0, kl=0.9, steering=2.0),   # lowest refusal, heavy damage
        record(2, refusal=-5.0, kl=0.2, steering=2.0),   # past the floor too, little damage: the pick
        record(1, refusal=-1.0, kl=0.01, steering=2.0),  # barely moves refusal
        record(4, refusal=-8.0, kl=0.1, steering=-1.0),  # steering does not induce refusal
        record(9, refusal=-9.0, kl=0.0, steering=5.0),   # late layer
        record(5, refusal=-9.0, kl=None, steering=None),  # not shortlisted
        {**record(6, refusal=-9.0, kl=None, steering=None),  # prescored on a few prompts, not kept
         "prescore": {"refusal_score": -1.0, "kl": 0.5, "objective": 1.0}},
    ]
    chosen, fallback, counts = select_candidate(records, config, n_layers=10)
    assert (chosen, fallback) == (1, False)
    # Ranked by objective: layer 4 (steering fails), then layer 2 (passes); two more were not needed.
    assert counts == {"candidates": 7, "late_layer": 1, "not_shortlisted": 1, "prescore_dropped": 1, "kl_above_max": 0,
                      "steering_not_above_min": 1, "steering_not_scored": 2, "passed": 1}
    strict = config.model_copy(update={"kl_max": 0.05, "steering_min": 3.0})
    chosen, fallback, counts = select_candidate(records, strict, n_layers=10)
    assert (chosen, fallback) == (3, True)  # the best objective among all scored
    assert counts["passed"] == 0 and counts["kl_above_max"] == 3 and counts["steering_not_above_min"] == 1
    # Relative steering: layer 4 takes the harmless log-odds from an unsteered -4 to -1 — it raises refusal, so it passes.
    relative = config.model_copy(update={"steering_relative": True})
    assert select_candidate(records, relative, n_layers=10, unsteered=-4.0)[:2] == (3, False)
    assert select_candidate(records, relative, n_layers=10, unsteered=0.5)[:2] == (1, False)  # -1 < 0.5: fails again


def test_selection_ranks_by_generated_refusals_when_measured():
    """A direction can meet the first-token score by suppressing the refusal openers while the model still
    refuses in other words: when greedy completions were scored, their objective ranks."""
    config = DirectionConfig(kl_max=1.0)
    openers_only = {**record(2, refusal=-6.0, kl=0.1, steering=2.0), "generated_objective": 1.5}
    answers = {**record(3, refusal=-4.0, kl=0.2, steering=2.0), "generated_objective": -2.2}
    assert select_candidate([openers_only, answers], config, n_layers=10)[:2] == (1, False)
    assert select_candidate([record(2, refusal=-6.0, kl=0.1, steering=2.0), record(3, refusal=-4.0, kl=0.2, steering=2.0)],
                            config, n_layers=10)[:2] == (0, False)  # first-token objective alone: the other way round


def test_config_refuses_test_splits_and_unknown_keys(tmp_path):
    with pytest.raises(Exception, match="test split is held out"):
        DirectionConfig(harmless_val="harmless:test")
    with pytest.raises(Exception, match="test split is held out"):
        DirectionConfig(harmless_train="harmless:train+harmless:test")
    path = tmp_path / "direction.yaml"
    path.write_text("n_train: 8\nkl_maximum: 0.3\n")
    with pytest.raises(AblateError, match="unknown key 'kl_maximum'"):
        load_config(path, DirectionConfig)
    path.write_text("refusal_val: refusal:test\n")
    with pytest.raises(AblateError, match="refusal_val"):
        load_config(path, DirectionConfig)


@pytest.fixture(scope="module")
def direction_run(tmp_path_factory, tokenizer):
    from conftest import build_model

    model = build_model("llama", tokenizer, seed=0)
    out = tmp_path_factory.mktemp("direction")
    calls = []
    import ablate.data

    original = ablate.data.load_prompt_set

    def recording(spec, *args, **kwargs):
        calls.append(spec)
        return original(spec, *args, **kwargs)

    ablate.data.load_prompt_set = recording
    try:
        with pytest.warns(UserWarning):  # a random model refuses nothing: the generic-refusal fallback warns
            selected = run_direction(model, tokenizer, DirectionConfig(**FULL), out, progress=False)
    finally:
        ablate.data.load_prompt_set = original
    return model, out, selected, calls


def test_run_direction_writes_every_artifact(direction_run):
    model, out, selected, calls = direction_run
    for name in ["candidates.pt", "candidates.json", "sweep.json", "sweep.png", "selected.json", "direction.pt",
                 "steer.pt", "done.json"]:
        assert (out / name).exists(), name
    assert (out / "done.json").stat().st_mtime_ns >= (out / "selected.json").stat().st_mtime_ns
    sweep = json.loads((out / "sweep.json").read_text())
    n_positions = len(json.loads((out / "candidates.json").read_text())["position_tokens"])
    assert len(sweep["candidates"]) == 2 * 2 * n_positions  # variants × layers × positions
    assert all(c["estimated_refusal_score"] is not None for c in sweep["candidates"])
    assert sum(c["kl"] is not None for c in sweep["candidates"]) == 3  # the shortlist
    for key in ["layer", "position", "refusal_score", "steering_score", "kl", "direction_path", "fallback",
                "filter_counts", "wall_seconds"]:
        assert key in selected
    direction, meta = load_direction(out)
    assert direction.shape == (32,) and meta["layer"] == selected["layer"]
    candidates = torch.load(out / "candidates.pt", weights_only=True)
    torch.testing.assert_close(direction, candidates[selected["variant"]][selected["layer"], selected["position"]])
    steer = torch.load(out / "steer.pt", weights_only=True)
    names = dict(model.named_modules())
    assert steer and all(name in names and spec["action"] == "clamp" for name, spec in steer.items())


def test_selection_never_touches_the_test_split(direction_run):
    _, _, _, calls = direction_run
    assert sorted(calls) == ["harmless:train", "harmless:val", "refusal:train", "refusal:val"]


def test_run_direction_is_deterministic_and_resumable(direction_run, tokenizer, tmp_path, monkeypatch):
    from conftest import build_model

    model, out, selected, _ = direction_run
    again = run_direction(build_model("llama", tokenizer, seed=0), tokenizer, DirectionConfig(**FULL), tmp_path,
                          progress=False)
    first, second = (json.loads((d / "sweep.json").read_text())["candidates"] for d in (out, tmp_path))
    assert first == second
    assert {k: again[k] for k in ("layer", "position", "variant", "kl")} == {k: selected[k] for k in ("layer", "position", "variant", "kl")}
    # done.json matches: nothing is recomputed.
    import ablate.directions

    monkeypatch.setattr(ablate.directions.stage, "collect_mean_activations", lambda *a, **k: pytest.fail("recomputed"))
    assert run_direction(model, tokenizer, DirectionConfig(**FULL), out, progress=False)["layer"] == selected["layer"]


def test_prescore_keeps_the_best_on_a_few_prompts_for_the_exact_score(tokenizer, tmp_path):
    """Successive halving: every shortlisted candidate is scored on the first prescore_prompts prompts of
    each validation set, the best prescore_keep by the objective there get the exact score, and the pick
    is among them; the others are counted as prescore_dropped."""
    from conftest import build_model

    from ablate.directions import prepare_batches

    config = DirectionConfig(**{**SMALL, "shortlist": 4}, prescore_prompts=2, prescore_keep=2,
                             strength_learning={"enabled": False}, strength_search=[])
    model = build_model("llama", tokenizer, seed=0)
    with pytest.warns(UserWarning):
        selected = run_direction(model, tokenizer, config, tmp_path, progress=False)
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    records = sweep["candidates"]
    prescored = [i for i, r in enumerate(records) if "prescore" in r]
    assert sorted(prescored) == sorted(sweep["shortlist"]) and len(prescored) == 4
    best = sorted(prescored, key=lambda i: (records[i]["prescore"]["objective"], i))[:2]
    assert sorted(sweep["exactly_scored"]) == sorted(best)
    assert sorted(i for i, r in enumerate(records) if r["kl"] is not None) == sorted(best)
    assert sweep["selected_index"] in best and selected["filter_counts"]["prescore_dropped"] == 2
    # Exactly scored candidates are also scored by greedy completions (score_by_generation, the default).
    for index in best:
        scores = records[index]
        refused = round(scores["generated_refusal_rate"] * config.n_val)
        assert scores["generated_refusal_score"] == pytest.approx(math.log((refused + 0.5) / (config.n_val - refused + 0.5)))
        assert scores["generated_objective"] == pytest.approx(
            max(scores["generated_refusal_score"], config.refusal_floor) + config.kl_weight * scores["kl"])
    # The prescore is the exact score on the first two prompts of each set.
    from ablate.directions import first_token_kl, first_token_logprobs, load_sets, refusal_log_odds
    from ablate.interventions import directional_ablation

    sets, record = load_sets(config), records[best[0]]
    few = {name: prepare_batches(tokenizer, sets[name].prompts[:2], 8, None, torch.device("cpu"))
           for name in ("refusal_val", "harmless_val")}
    base = first_token_logprobs(model, few["harmless_val"])
    direction = torch.load(tmp_path / "candidates.pt", weights_only=True)[record["variant"]][record["layer"], record["position"]]
    with directional_ablation(model, direction):
        refusal = refusal_log_odds(first_token_logprobs(model, few["refusal_val"]), sweep["refusal_tokens"]["ids"]).mean()
        kl = first_token_kl(base, first_token_logprobs(model, few["harmless_val"])).mean()
    assert record["prescore"]["refusal_score"] == pytest.approx(float(refusal), abs=1e-5)
    assert record["prescore"]["kl"] == pytest.approx(float(kl), abs=1e-6)


def test_screen_runs_on_the_first_screen_prompts(tokenizer, tmp_path):
    """The first-order screen (it only ranks candidates for the shortlist) runs on the first `screen_prompts` prompts
    of each validation set: every estimate equals the one from those prompts' sensitivity matrix, not all of them."""
    from conftest import build_model

    from ablate.directions import load_sets, prepare_batches

    config = DirectionConfig(**FULL, screen_prompts=3)
    model = build_model("llama", tokenizer, seed=0)
    with pytest.warns(UserWarning):
        run_direction(model, tokenizer, config, tmp_path, progress=False)
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    token_ids, sets = sweep["refusal_tokens"]["ids"], load_sets(config)
    candidates = torch.load(tmp_path / "candidates.pt", weights_only=True)
    record = next(r for r in sweep["candidates"] if not r["degenerate"])
    r_hat = candidates[record["variant"]][record["layer"], record["position"]].double()
    r_hat = r_hat / r_hat.norm()

    def estimate(n: int) -> float:
        batches = prepare_batches(tokenizer, sets["refusal_val"].prompts[:n], config.batch_size, None, torch.device("cpu"))
        matrix = ablation_sensitivity(model, batches, token_ids, n)
        return sweep["base"]["refusal_score_refusal_val"] - float(r_hat @ ((matrix + matrix.T) / 2) @ r_hat)

    assert record["estimated_refusal_score"] == pytest.approx(estimate(3), abs=1e-6)
    assert record["estimated_refusal_score"] != pytest.approx(estimate(config.n_val), abs=1e-6)


def test_bfloat16_compute_copies_the_model_and_scores_close_to_float32(tokenizer, tmp_path):
    """compute_dtype bfloat16: the stage's passes run on a bfloat16 copy; the model itself is untouched (float32,
    same weights, no hooks), the saved direction is float32, and the scores are those of float32 within bfloat16's
    precision."""
    from conftest import build_model

    model = build_model("llama", tokenizer, seed=0)
    before = {name: parameter.clone() for name, parameter in model.state_dict().items()}
    runs = {}
    for dtype in ("model", "bfloat16"):
        with pytest.warns(UserWarning):
            run_direction(model, tokenizer, DirectionConfig(**{**FULL, "compute_dtype": dtype}), tmp_path / dtype, progress=False)
        runs[dtype] = json.loads((tmp_path / dtype / "sweep.json").read_text())
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())
    assert all(torch.equal(before[name], parameter) for name, parameter in model.state_dict().items())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0
    direction, _ = load_direction(tmp_path / "bfloat16")
    assert direction.dtype == torch.float32
    exact, low = runs["model"]["candidates"], runs["bfloat16"]["candidates"]
    both = set(runs["model"]["exactly_scored"]) & set(runs["bfloat16"]["exactly_scored"])
    assert both
    for index in both:
        assert low[index]["kl"] == pytest.approx(exact[index]["kl"], abs=0.02 + 0.05 * exact[index]["kl"])
        assert low[index]["refusal_score"] == pytest.approx(exact[index]["refusal_score"], abs=0.1)


def test_compute_model_copies_only_when_the_dtype_differs(llama):
    from ablate.directions import compute_model

    assert compute_model(llama, "model") is llama and compute_model(llama, "float32") is llama
    copy = compute_model(llama, "bfloat16")
    assert copy is not llama and next(copy.parameters()).dtype == torch.bfloat16
    assert next(llama.parameters()).dtype == torch.float32
    llama.is_quantized = True  # bitsandbytes weights cannot be cast: the model itself is used
    try:
        assert compute_model(llama, "bfloat16") is llama
    finally:
        del llama.is_quantized


def test_auto_compute_dtype_takes_bfloat16_only_where_the_hardware_has_it(llama, monkeypatch):
    """"auto": bfloat16 on a CPU with AMX or AVX512-BF16, float32 on one without (emulated bfloat16 is slower)."""
    from ablate import directions

    cpu = torch.device("cpu")
    for amx, avx512_bf16, expected in ((True, False, "bfloat16"), (False, True, "bfloat16"), (False, False, "float32")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda flag=avx512_bf16: flag, raising=False)
        assert directions.resolve_compute_dtype("auto", cpu) == expected
        assert next(directions.compute_model(llama, "auto").parameters()).dtype == getattr(torch, expected)
        assert directions.resolve_compute_dtype("bfloat16", cpu) == "bfloat16"  # a named dtype is kept
    assert DirectionConfig().compute_dtype == "auto"


def test_no_candidate_passing_falls_back_with_a_warning(tokenizer, tmp_path):
    from conftest import build_model

    config = DirectionConfig(**SMALL, kl_max=1e-9, steering_min=1e9, strength_learning={"enabled": False})
    with pytest.warns(UserWarning, match="no candidate passed the filters"):
        selected = run_direction(build_model("llama", tokenizer, seed=0), tokenizer, config, tmp_path, progress=False)
    assert selected["fallback"] is True
    assert selected["filter_counts"]["passed"] == 0 and selected["filter_counts"]["kl_above_max"] == 3
    # Full ablation exceeded kl_max, so the kernels around the layers of the best scored candidates
    # were tried and recorded, and the pick is the best option of all by the objective.
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    scored = [c for c in sweep["candidates"] if c["kl"] is not None and c["layer"] < sweep["max_layer_allowed"]]
    searched_sites = {(row["layer"], row["position"], row["variant"]) for row in sweep["strength_search"]}
    assert len(searched_sites) == min(config.strength_candidates, len(scored)) >= 2
    assert len(sweep["strength_search"]) == len(config.strength_search) * len(searched_sites)
    assert all(row["strength"]["kernel"]["max_weight_position"] == row["layer"] for row in sweep["strength_search"])
    options = [row["objective"] for row in sweep["strength_search"]] + [c["objective"] for c in scored]
    assert selected["objective"] == pytest.approx(min(options))
    if selected["strength"]["kernel"] is not None:
        assert selected["strength"]["kernel"]["max_weight_position"] == selected["layer"]


def test_strength_learning_lowers_its_objective_and_is_baked_into_the_weights(tokenizer, tmp_path):
    """Learned per-writer weights: recorded with their history, the loss falls, the kernel search is
    skipped, the better of full ablation and the learned weights is picked by the exact objective, and
    the orthogonalised model reproduces the hooks at the learned weights."""
    import copy

    from conftest import build_model

    from ablate.abliterate import orthogonalize_from
    from ablate.interventions import directional_ablation, weights_for

    model = build_model("llama", tokenizer, seed=0)
    config = DirectionConfig(**SMALL, kl_max=1e-9, strength_learning={"steps": 6, "halving_steps": 3, "candidates": 4})  # enabled by default
    with pytest.warns(UserWarning):
        selected = run_direction(model, tokenizer, config, tmp_path, progress=False)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    learned = sweep["strength_learning"]
    assert sweep["strength_search"] == []  # learning replaces the kernel search
    weights = learned["writer_weights"]
    assert len(weights) == 2 and all(len(row) == 2 and all(0 <= w <= 1 for w in row) for row in weights)
    history = learned["history"]
    assert len(history) == 6 and history[-1]["loss"] < history[0]["loss"]
    # Successive halving: every candidate learned halving_steps (3), the best of them went on to 6 steps.
    runs = learned["candidates"]
    assert len(runs) == min(config.strength_learning.candidates, len(sweep["exactly_scored"])) >= 2
    assert runs[0]["index"] == learned["compared_with"]["index"]  # the pick comes first
    assert all(run["steps"] == 3 for run in runs)  # scored exactly after 3 steps each
    # Ranked by the objective with the refusals of greedy completions in place of the first-token score.
    for scores in [*runs, learned, learned["compared_with"]]:
        refused = round(scores["generated_refusal_rate"] * config.n_val)
        assert scores["generated_refusal_score"] == pytest.approx(math.log((refused + 0.5) / (config.n_val - refused + 0.5)))
        assert scores["generated_objective"] == pytest.approx(
            max(scores["generated_refusal_score"], config.refusal_floor) + config.kl_weight * scores["kl"])
    assert min(runs, key=lambda run: run["generated_objective"])["index"] == learned["candidate_index"]
    assert [h["step"] for h in history] == list(range(6))
    assert learned["chosen"] == (learned["generated_objective"] < learned["compared_with"]["generated_objective"])
    assert selected["objective"] == pytest.approx(learned["objective"] if learned["chosen"] else learned["compared_with"]["objective"])
    if learned["chosen"]:
        pick = sweep["candidates"][sweep["selected_index"]]
        assert sweep["selected_index"] == learned["candidate_index"]
        assert selected["strength"]["writer_weights"] == weights
        assert selected["full_ablation"] == {"refusal_score": pick["refusal_score"], "kl": pick["kl"]}
    direction, _ = load_direction(tmp_path)
    candidates = torch.load(tmp_path / "candidates.pt", weights_only=True)
    start = candidates[selected["variant"]][selected["layer"], selected["position"]]
    if learned["chosen"]:  # the direction was learned too: recorded by its cosine to the candidate, at its norm
        cosine = float(torch.nn.functional.cosine_similarity(direction, start, dim=0))
        assert selected["direction_cosine"] == pytest.approx(cosine, abs=1e-5) and cosine < 0.9999
        assert float(direction.norm()) == pytest.approx(float(start.norm()), rel=1e-5)
        assert not (tmp_path / "steer.pt").exists()  # lm-eval's clamp cannot express the learned weights
    else:
        torch.testing.assert_close(direction, start)
    inputs = tokenize_batch(tokenizer, render_prompts(tokenizer, ["Write a poem.", "Name a river."]), torch.device("cpu"))
    with torch.no_grad(), directional_ablation(model, direction, weights_for(model, selected)):
        hooked = model(**inputs).logits
    edited = copy.deepcopy(model)
    orthogonalize_from(edited, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(edited(**inputs).logits, hooked, atol=2e-4, rtol=1e-4)


def test_distillation_pulls_the_learned_ablation_towards_full_ablation(tokenizer):
    """With a target (the start candidate's full ablation on the refusal prompts), the loss has the first-token
    KL(target ‖ learned) in it: alone in the loss, learning drives it down; with distill_weight 0 it is not used."""
    from conftest import build_model

    from ablate.directions import learn_writer_weights
    from ablate.interventions import directional_ablation

    model = build_model("llama", tokenizer, seed=0)
    prompts = ["Write a poem.", "Name a river.", "Explain rain.", "List three fruits."]
    batches = prepare_batches(tokenizer, prompts, 2, None, torch.device("cpu"))
    base = first_token_logprobs(model, batches)
    direction = torch.randn(32, generator=torch.Generator().manual_seed(0))
    with directional_ablation(model, direction):
        target = first_token_logprobs(model, batches)
    # No reward for refusal (floor far above any score) and no harmless KL: the distillation term alone.
    config = DirectionConfig(refusal_floor=50.0, kl_weight=0.0, strength_learning={"lr": 0.5, "direction_lr": 0.0})
    _, state = learn_writer_weights(model, direction, batches, batches, base, [5, 6], config, steps=24, target_refusal=target)
    distilled = [entry["distill_kl"] for entry in state.history]
    assert distilled[0] > 0 and sum(distilled[-2:]) < 0.5 * sum(distilled[:2])
    off = config.model_copy(update={"strength_learning": config.strength_learning.model_copy(update={"distill_weight": 0.0})})
    _, state = learn_writer_weights(model, direction, batches, batches, base, [5, 6], off, steps=2, target_refusal=target)
    assert all(entry["distill_kl"] == 0 for entry in state.history)


def test_warmup_ramps_both_learning_rates_and_resumes_on_the_same_ramp(tokenizer):
    from conftest import build_model

    from ablate.directions import learn_writer_weights

    model = build_model("llama", tokenizer, seed=0)
    batches = prepare_batches(tokenizer, ["Write a poem.", "Name a river."], 2, None, torch.device("cpu"))
    base = first_token_logprobs(model, batches)
    config = DirectionConfig(strength_learning={"lr": 0.4, "direction_lr": 0.02, "warmup_steps": 4})
    direction = torch.randn(32, generator=torch.Generator().manual_seed(0))
    _, state = learn_writer_weights(model, direction, batches, batches, base, [5, 6], config, steps=1)
    assert [group["lr"] for group in state.optimizer.param_groups] == pytest.approx([0.1, 0.005])
    _, state = learn_writer_weights(model, direction, batches, batches, base, [5, 6], config, steps=4, state=state)
    assert [group["lr"] for group in state.optimizer.param_groups] == pytest.approx([0.4, 0.02])  # full rate from step 4


def test_strength_learning_with_a_fixed_direction_keeps_the_candidate(tokenizer, tmp_path):
    from conftest import build_model

    config = DirectionConfig(**SMALL, kl_max=1e-9, strength_learning={"steps": 4, "halving_steps": 2, "direction_lr": 0.0,
                                                                      "candidates": 4})
    with pytest.warns(UserWarning):
        selected = run_direction(build_model("llama", tokenizer, seed=0), tokenizer, config, tmp_path, progress=False)
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert all(run["direction_cosine"] == pytest.approx(1.0) for run in sweep["strength_learning"]["candidates"])
    direction, _ = load_direction(tmp_path)
    candidates = torch.load(tmp_path / "candidates.pt", weights_only=True)
    torch.testing.assert_close(direction, candidates[selected["variant"]][selected["layer"], selected["position"]])


def test_load_direction_requires_a_finished_stage(tmp_path):
    with pytest.raises(AblateError, match="run `ablate direction` first"):
        load_direction(tmp_path)


def test_cli_direction_and_abliterate_through_the_entry_point(llama, tokenizer, tmp_path):
    """`ablate direction` then `ablate abliterate` on a tiny saved model; a bad key is one line, exit 2."""
    from test_cli import run_cli
    from transformers import AutoModelForCausalLM

    source = tmp_path / "tiny"
    llama.save_pretrained(source)
    tokenizer.save_pretrained(source)
    config = tmp_path / "direction.yaml"
    config.write_text("".join(f"{key}: {value}\n" for key, value in SMALL.items()))

    run = run_cli  # through `ablate.cli.main`, what the console script calls, in this process
    bad = tmp_path / "bad.yaml"
    bad.write_text("kl_maximum: 1\n")
    result = run("direction", str(source), "--config", str(bad), "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "kl_maximum" in result.stderr and "Traceback" not in result.stderr
    result = run("direction", str(source), "--harmless", "harmless:test", "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "test split" in result.stderr

    # Full ablation (no learned strength): the saved model must come untied.
    result = run("direction", str(source), "--config", str(config), "--set", "kl_max=5", "--set",
                 "strength_learning.enabled=false", "--out", str(tmp_path / "dir"))
    assert result.returncode == 0, result.stderr
    assert "selected" in result.stdout and (tmp_path / "dir" / "done.json").exists()
    result = run("abliterate", str(source), "--direction", str(tmp_path / "dir"), "--out", str(tmp_path / "model"))
    assert result.returncode == 0, result.stderr
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert loaded.config.tie_word_embeddings is False
