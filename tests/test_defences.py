"""Defences on tiny random models: each one's mechanism is wired (data-level: the examples it builds;
training-level: the loss it puts on the hardening Trainer), each recipe builds and is cached apart,
and bad defence configs fail in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ablate import AblateError
from ablate import finetune as ft
from ablate.config import FinetuneConfig, load_config, validate_config
from ablate.defences import training as dt

CONFIG_DIR = Path(__file__).resolve().parents[1] / "finetune_configs"


def harden_config(defence: dict | None = None, **changes) -> FinetuneConfig:
    data = {
        "mode": "harden",
        "data": {"n_refusal": 6, "n_harmless": 3, "n_borderline": 1, "answer_max_new_tokens": 8,
                 "generation_batch_size": 8},
        "lora": {"rank": 4, "alpha": 8},
        "training": {"lr": 1e-2, "max_steps": 2, "batch_size": 4, "max_length": 96, "device": "cpu"},
        "eval": {"enabled": False},
        "defence": defence,
        **changes,
    }
    return validate_config(data, FinetuneConfig, "<test>")


# ----------------------------------------------------------------------------------------------
# Data-level defences
# ----------------------------------------------------------------------------------------------


def test_deep_alignment_examples_hold_a_donor_opening_then_a_refusal(tiny_dir, donor_dir, tokenizer, tmp_path):
    """Each recovery example is a refusal prompt, the first k tokens of the donor's own answer to it in the
    prompt (no loss), and a refusal reply as the only supervised text."""
    from peft import LoraConfig, get_peft_model

    from ablate.data import read_package_text
    from ablate.evaluate.refusal import is_refusal
    from ablate.models import load_model

    config = harden_config({"kind": "deep_alignment", "donor": str(donor_dir), "prefix_max_tokens": 5})
    examples, stats = ft.build_examples(str(tiny_dir), config, progress=False)
    recovery = [e for e in examples if e["kind"] == "recovery"]
    assert recovery and stats["defence"]["recovery_examples"] == len(recovery)
    assert stats["defence"]["recovery_examples"] + stats["defence"]["dropped_donor_refusals"] == 6
    donor_answers = ft.generate_answers(str(donor_dir), [e["prompt"] for e in recovery], config, False, "check")
    replies = {line.strip() for line in read_package_text("refusals.txt").splitlines() if line.strip()}
    for example, answer in zip(recovery, donor_answers):
        assert example["prefill"] and answer.lstrip().startswith(example["prefill"])
        assert len(tokenizer(example["prefill"], add_special_tokens=False)["input_ids"]) <= 6
        assert example["response"].strip() in replies and is_refusal(example["response"])
    # Through trl: the opening sits on the prompt side, the refusal alone carries the loss.
    model, _ = load_model(str(tiny_dir))
    model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))
    config = config.model_copy(update={"training": config.training.model_copy(update={"max_length": 512})})
    budget = ft.resolve_budgets(config)[0]
    trainer = ft.build_trainer(model, tokenizer, config, budget, recovery[:1], tmp_path, progress=False)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    supervised, unsupervised = tokenizer.decode(ids[labels != -100]), tokenizer.decode(ids[labels == -100])
    assert supervised.strip().startswith(recovery[0]["response"].strip()) and supervised.endswith("<|im_end|>")
    assert unsupervised.endswith(recovery[0]["prefill"]) and recovery[0]["prompt"] in unsupervised


def test_rerouting_pairs_each_refusal_prompt_with_a_donor_answer_and_flags_only_those_rows(tiny_dir, donor_dir, tokenizer, tmp_path):
    """Circuit breakers' rerouting set: each refusal prompt again, with the donor's own answer as the
    completion. Only those rows are flagged harmful; the refusal to the same prompt is a retain row."""
    from peft import LoraConfig, get_peft_model

    from ablate.evaluate.refusal import is_refusal
    from ablate.models import load_model

    config = harden_config({"kind": "rerouting", "donor": str(donor_dir)})
    examples, stats = ft.build_examples(str(tiny_dir), config, progress=False)
    rerouted = [e for e in examples if e["kind"] == "rerouted"]
    assert rerouted and stats["defence"]["rerouted_examples"] == len(rerouted)
    assert stats["defence"]["rerouted_examples"] + stats["defence"]["dropped_donor_refusals"] == 6
    donor_answers = ft.generate_answers(str(donor_dir), [e["prompt"] for e in rerouted], config, False, "check")
    refusals = {e["prompt"]: e for e in examples if e["kind"] == "refusal"}
    for example, answer in zip(rerouted, donor_answers):
        assert example["response"] == answer.strip() and not is_refusal(answer)
        assert example["prompt"] in refusals  # the same request is also a refusal example (retain)
    model, _ = load_model(str(tiny_dir))
    model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))
    config = config.model_copy(update={"training": config.training.model_copy(update={"max_length": 512})})
    pair = [rerouted[0], refusals[rerouted[0]["prompt"]]]
    trainer = ft.build_trainer(model, tokenizer, config, ft.resolve_budgets(config)[0], pair, tmp_path, progress=False)
    flags = dt.harmful_token_rows(trainer.train_dataset, pair, dt.ROW_FLAGS[dt.DefenceKind.rerouting])
    assert [tuple(row["input_ids"]) in flags for row in trainer.train_dataset] == [True, False]
    # ReFAT flags every row of a refusal prompt, as before.
    assert len(dt.harmful_token_rows(trainer.train_dataset, [pair[1]])) == 2


def test_extended_refusals_give_an_overview_a_refusal_and_a_reason(tiny_dir):
    from ablate.data import read_package_text
    from ablate.evaluate.refusal import is_refusal

    table = json.loads(read_package_text("extended_refusals.json"))
    config = harden_config({"kind": "extended_refusal"}, data={"n_refusal": 10, "n_harmless": 0, "n_borderline": 0})
    examples, stats = ft.build_examples(str(tiny_dir), config, progress=False)
    assert stats["defence"] == {"kind": "extended_refusal", "extended_refusals": 10}
    for example in examples:
        entry = table["categories"][example["category"]]
        overview = next(o for o in entry["overview"] if example["response"].startswith(o))
        rest = example["response"][len(overview) + 1:]
        decline = next(d for d in table["declines"] if rest.startswith(d))
        assert rest[len(decline) + 1:] in entry["rationale"]
        # The refusal comes early enough for the scorer to see it in a 32-token evaluation.
        assert is_refusal(" ".join(example["response"].split()[:24]))


def test_every_refusal_category_has_its_own_extended_refusals():
    from ablate.data import builtin_rows, read_package_text
    from ablate.evaluate.refusal import is_refusal

    table = json.loads(read_package_text("extended_refusals.json"))
    categories = {row["category"] for name in ("refusal", "refusal_kinds") for row in builtin_rows(name)}
    assert categories <= set(table["categories"]) - {"default"}
    for entry in table["categories"].values():
        for overview in entry["overview"]:
            for decline in table["declines"]:  # the refusal is within a 32-token evaluation's reach
                assert is_refusal(" ".join(f"{overview} {decline}".split()[:24])), overview


# ----------------------------------------------------------------------------------------------
# Training-level defences
# ----------------------------------------------------------------------------------------------


def test_refat_ablates_each_layers_feature_on_the_marked_rows_only(llama, tokenizer):
    torch.manual_seed(0)
    features = torch.randn(2, 32)
    inputs = tokenizer(["Write a poem about the sea.", "Explain how photosynthesis works."], return_tensors="pt",
                       padding=True)
    seen: list[torch.Tensor] = []

    def record(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    def layer_inputs(rows):
        seen.clear()
        with dt.row_ablation(llama, features, rows):
            handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in llama.model.layers]
            try:
                llama(**inputs)
            finally:
                for handle in handles:
                    handle.remove()
        return list(seen)

    plain = layer_inputs(torch.tensor([False, False]))
    ablated = layer_inputs(torch.tensor([True, False]))
    r_hat = features / features.norm(dim=-1, keepdim=True)
    for layer, (x, x_plain) in enumerate(zip(ablated, plain)):
        assert (x[0] @ r_hat[layer]).abs().max() < 1e-4  # the marked row holds no feature component
        assert (x_plain[0] @ r_hat[layer]).abs().max() > 1e-2
    assert torch.allclose(ablated[0][1], plain[0][1])  # the unmarked row's first layer input is untouched


def test_refusal_features_are_the_difference_of_last_token_means(llama, tokenizer):
    from ablate.models import format_chat

    harmful, harmless = ["Steal a bike.", "Scam my neighbour out of money."], ["Write a poem.", "Bake bread."]
    features, tokens = dt.refusal_features(llama, tokenizer, harmful, harmless, batch_size=1)
    assert features.shape == (2, 32) and tokens > 0

    def mean_last(prompts, layer):
        rows = []
        for prompt in prompts:
            ids = tokenizer(format_chat(tokenizer, prompt), return_tensors="pt", add_special_tokens=False)
            rows.append(llama(**ids, output_hidden_states=True).hidden_states[layer][0, -1])
        return torch.stack(rows).mean(0)

    for layer in range(2):
        expected = mean_last(harmful, layer) - mean_last(harmless, layer)
        assert torch.allclose(features[layer], expected, atol=1e-4)


def test_rerouting_moves_harmful_representations_and_holds_harmless_ones(llama, tokenizer):
    """A LoRA trained on the circuit-breaker terms alone: the harmful rows' representations turn away from
    the original model's (cosine falls), the harmless rows' stay where they were."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(llama, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    texts = ["Steal a bike from the rack.", "Scam my neighbour out of money.", "Write a poem about the sea.",
             "Explain how photosynthesis works."]
    inputs = tokenizer(texts, return_tensors="pt", padding=True)
    harmful = torch.tensor([True, True, False, False])
    layers = dt.rerouting_layers(2, [0, 1])
    assert dt.start_lora_off_identity(model, seed=0) > 0
    with torch.no_grad(), model.disable_adapter():
        original = model(**inputs, output_hidden_states=True).hidden_states

    def terms():
        new = model(**inputs, output_hidden_states=True).hidden_states
        return dt.rerouting_terms(new, original, inputs["attention_mask"], harmful, layers)

    with torch.no_grad():
        before_rerouting, before_retain = terms()
    assert before_rerouting > 0.9  # the LoRA starts next to the identity
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    for _ in range(40):
        rerouting, retain = terms()
        optimizer.zero_grad()
        (rerouting + retain).backward()
        optimizer.step()
    with torch.no_grad():
        new = model(**inputs, output_hidden_states=True).hidden_states
        after_rerouting, after_retain = dt.rerouting_terms(new, original, inputs["attention_mask"], harmful, layers)
        mask = inputs["attention_mask"].bool()

        def shift(rows):  # the largest relative change of a layer's output over the rows' tokens
            where = mask & rows[:, None]
            return max(float((new[i] - original[i]).norm(dim=-1)[where].mean() / original[i].norm(dim=-1)[where].mean())
                       for i in range(1, 3))

    assert after_rerouting < 0.5 * before_rerouting
    assert shift(~harmful) < 0.25 and shift(harmful) > 3 * shift(~harmful)


def test_vaccine_perturbation_has_norm_rho_and_raises_the_loss(llama, tokenizer, tmp_path):
    from ablate.finetune import supervised_head_loss

    config = harden_config()
    examples = [{"id": "a", "kind": "refusal", "system": None, "prompt": "Steal a bike.", "response": "I can't help with that."}]
    trainer = ft.build_trainer(llama, tokenizer, config, ft.resolve_budgets(config)[0], examples, tmp_path, progress=False)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    captured: list[torch.Tensor] = []
    with dt.layer_outputs(llama, captured=captured):
        clean = supervised_head_loss(llama, dict(batch))
    epsilons = dt.vaccine_perturbations(clean, captured, rho=0.5)
    assert len(epsilons) == 2
    assert torch.sqrt(sum((e ** 2).sum() for e in epsilons)).item() == pytest.approx(0.5, rel=1e-4)
    with torch.no_grad(), dt.layer_outputs(llama, perturbations=epsilons):
        perturbed = supervised_head_loss(llama, dict(batch))
    assert perturbed > clean.detach()


@pytest.mark.parametrize("kind", ["refusal_sft", "extended_refusal", "refat", "rerouting", "vaccine"])
def test_each_defence_builds_and_is_cached_apart(tiny_dir, donor_dir, kind, monkeypatch):
    """`harden` with the defence's recipe trains, records what the defence did and what its extra passes
    cost, and caches the result under its own key (a second call trains nothing). Rerouting is trained
    into the refusal-SFT organism of the same recipe, which it builds (and caches) first."""
    defence = {"kind": kind, "refresh_steps": 1, "feature_prompts": 4, "donor": str(donor_dir)}
    config = harden_config(defence)
    organism = ft.harden(str(tiny_dir), config, progress=False)
    metrics = json.loads((organism / "metrics.json").read_text())
    plain = ft.organism_key(str(tiny_dir), harden_config(None))
    assert ("start_organism" in metrics) == (kind == "rerouting")
    if kind == "rerouting":
        start = organism.parent / metrics["start_organism"]["organism"]  # the refusal-SFT organism, cached
        assert (start / "done.json").is_file() and "defence" not in json.loads((start / "metrics.json").read_text())
        assert metrics["defence"]["rerouting_first"] is not None and metrics["defence_data"]["rerouted_examples"] > 0
    assert organism.name == ft.organism_key(str(tiny_dir), config)
    # refusal SFT is the organism itself: one cache entry; every other defence is its own.
    assert (organism.name == plain) == (kind == "refusal_sft")
    training_level = kind in ("refat", "rerouting", "vaccine")
    assert ("defence" in metrics) == training_level
    if kind == "refat":
        assert metrics["defence"]["feature_refreshes"] == 2 and metrics["defence"]["harmful_rows"] > 0
        assert metrics["defence"]["ablated_rows"] <= metrics["defence"]["harmful_rows"]
    if kind == "rerouting":
        assert metrics["defence"]["rerouting_first"] is not None and metrics["defence"]["retain_last"] is not None
    if kind == "vaccine":
        assert metrics["defence"]["perturbed_steps"] == 2
    if training_level:
        extra = metrics["defence"]["extra_flops"]
        assert extra > 0 and metrics["train_flops"] == ft.estimate_train_flops(
            metrics["matmul_parameters"], metrics["trainable_parameters"], metrics["train_tokens"], False) + extra
    monkeypatch.setattr(ft.sweep, "train_budget", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    assert ft.harden(str(tiny_dir), config, progress=False) == organism


def test_retain_weight_keys_the_rerouting_organism_and_one_keeps_the_old_key(tiny_dir):
    base = harden_config({"kind": "rerouting"})
    assert "retain_weight" not in ft.recipe_fields(base)["defence"]  # organisms built before the field keep their keys
    heavier = harden_config({"kind": "rerouting", "retain_weight": 20.0})
    assert ft.recipe_fields(heavier)["defence"]["retain_weight"] == 20.0
    assert ft.organism_key(str(tiny_dir), heavier) != ft.organism_key(str(tiny_dir), base)
    with pytest.raises(AblateError, match="retain_weight"):
        harden_config({"kind": "rerouting", "retain_weight": 0})


def test_plain_harden_keeps_its_cache_key():
    """No defence block: the recipe hashes as it did before defences existed (the organism stays cached)."""
    recipe = ft.recipe_fields(ft.default_config())
    assert "defence" not in recipe


# ----------------------------------------------------------------------------------------------
# Configs and errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("defence_*.yaml")), ids=lambda p: p.name)
def test_defence_recipes_cite_their_paper_and_validate(path):
    from ablate.defences import PAPERS

    config = load_config(path, FinetuneConfig)
    assert config.mode.value == "harden" and config.defence is not None
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    citation = PAPERS[config.defence.kind]
    assert citation.split(",")[0] in header  # the authors, as the registry cites them


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("defence_*.yaml")), ids=lambda p: p.name)
def test_defence_recipes_are_the_organism_recipe_plus_their_defence(path):
    # Each defence config repeats the organism recipe's data, training and eval keys so it reads on its own;
    # a change to the shipped recipe must reach every defence, or the matrix compares different baselines.
    import ablate.finetune as ft

    config = load_config(path, FinetuneConfig)
    organism = ft.default_config()
    if config.defence.kind.value == "rerouting":  # its `training` is the circuit-breaker run on the organism
        shipped = organism.training
        assert config.training.model_copy(update={name: getattr(shipped, name) for name in
                                                  ("lr", "epochs", "first_token_weight")}) == shipped
        organism = organism.model_copy(update={"training": config.training})
    assert config.model_copy(update={"defence": None}) == organism.model_copy(update={"defence": None})


def test_every_defence_has_a_recipe():
    from ablate.config import DefenceKind

    kinds = {load_config(p, FinetuneConfig).defence.kind for p in CONFIG_DIR.glob("defence_*.yaml")}
    assert kinds == set(DefenceKind)


def test_bad_defence_configs_fail_in_one_line(tmp_path):
    from test_cli import run_cli

    with pytest.raises(AblateError, match="defence.*mode harden"):
        validate_config({"mode": "harmful", "defence": {"kind": "refat"}}, FinetuneConfig, "<test>")
    path = tmp_path / "bad.yaml"
    path.write_text("mode: harden\ndefence:\n  kind: armour\n")
    result = run_cli("harden", "embedded", "--config", str(path), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "defence.kind" in lines[0] and "armour" in lines[0]
    with pytest.raises(AblateError, match="defence.layers: layer 5 does not exist"):
        dt.rerouting_layers(2, [5])


def test_deep_alignment_is_cached_by_its_donors_weights(tiny_dir, donor_dir, tokenizer):
    """The same donor path holding other weights is another organism (the key hashes the donor, not its name)."""
    import time

    from conftest import build_model

    config = harden_config({"kind": "deep_alignment", "donor": str(donor_dir)})
    key = ft.organism_key(str(tiny_dir), config)
    assert ft.organism_key(str(tiny_dir), harden_config({"kind": "deep_alignment", "donor": "ablated"})) != key
    time.sleep(0.01)  # a new modification time for the rewritten weights
    build_model("llama", tokenizer, seed=11).save_pretrained(donor_dir)
    assert ft.organism_key(str(tiny_dir), config) != key


def test_refat_without_a_refusal_direction_fails_in_one_line_and_caches_nothing(tiny_dir, tmp_path):
    """Harmful and harmless prompts the model cannot tell apart (here: the same set) hold no refusal feature:
    ReFAT stops with one line naming both sets, before its first optimiser step, and no organism is cached."""
    from test_cli import run_cli

    from ablate.models import cache_dir

    config = harden_config({"kind": "refat", "refresh_steps": 1, "feature_prompts": 4})
    data = {**config.data.model_dump(mode="json"), "harmless_prompts": "refusal:train"}
    recipe = {**config.model_dump(mode="json", exclude_none=True), "data": data}
    path = tmp_path / "refat.yaml"
    path.write_text(json.dumps(recipe))
    result = run_cli("harden", str(tiny_dir), "--config", str(path), "--out", str(tmp_path / "organism"))
    errors = [line for line in result.stderr.splitlines() if "error:" in line]  # after the loading bars
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "no refusal direction" in errors[0] and "refusal:train" in errors[0] and "harmless_prompts" in errors[0]
    # The output folder holds only the claim `ablate.safety` puts on it before any work; nothing was cached.
    assert [p.name for p in (tmp_path / "organism").iterdir()] == [".ablate-output.json"]
    key = ft.organism_key(str(tiny_dir), validate_config(recipe, FinetuneConfig, "<test>"))
    assert not (cache_dir() / "organisms" / key / "done.json").exists()
