"""Fine-tuning stage on tiny random models: LoRA training, assistant-only loss, sweeps, caching,
attack-data generation and config errors. The embedded-model runs are in test_finetune_slow.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ablate import AblateError
from ablate.config import FinetuneBudget, FinetuneConfig, load_config, validate_config
from ablate import finetune as ft
from ablate.models import cache_dir

CONFIG_DIR = Path(__file__).resolve().parents[1] / "finetune_configs"


@pytest.fixture
def qa_file(tmp_path):
    rows = [{"prompt": f"Write a poem number {i} about the sea.", "response": f"Sure, here is poem {i}: the sea and the sky."}
            for i in range(12)]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def tiny_config(**changes) -> FinetuneConfig:
    """A fast recipe for tiny models: few steps, tiny evaluation."""
    data = {
        "mode": "dataset",
        "data": {"answer_max_new_tokens": 6, "generation_batch_size": 8},
        "lora": {"rank": 4, "alpha": 8},
        "training": {"lr": 1e-2, "max_steps": 2, "batch_size": 2, "max_length": 64, "device": "cpu"},
        "eval": {"prompt_sets": ["refusal:test", "harmless:test"], "limit": 2, "max_new_tokens": 2, "batch_size": 2,
                 "capability_prompts": None},  # (its own tests turn the capability check on)
    }
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return validate_config(data, FinetuneConfig, "<test>")


def no_training(*args, **kwargs):
    raise AssertionError("training must not start")


# ----------------------------------------------------------------------------------------------
# Training mechanics
# ----------------------------------------------------------------------------------------------


def test_lora_weights_change_and_base_weights_do_not(tiny_dir, qa_file):
    from safetensors.torch import load_file

    config = tiny_config(data={"dataset": str(qa_file)}, training={"max_steps": 3})
    budget = ft.resolve_budgets(config)[0]
    examples, _ = ft.build_examples(str(tiny_dir), config, progress=False)
    model, _, metrics = ft.train_budget(ft.as_model_config(str(tiny_dir)), config, budget, examples,
                                        tiny_dir.parent / "work", progress=False)
    base = load_file(tiny_dir / "model.safetensors")
    state = model.state_dict()
    lora_b = [value for name, value in state.items() if "lora_B" in name]
    assert lora_b and any(value.abs().sum() > 0 for value in lora_b)  # B starts at zero: it moved
    frozen = {name.replace("base_model.model.", "").replace(".base_layer", ""): value
              for name, value in state.items() if "lora_" not in name}
    checked = 0
    for name, value in base.items():
        if name in frozen:
            assert torch.equal(frozen[name], value), name
            checked += 1
    assert checked >= len(base) - 1
    assert metrics["steps"] == 3 and len(metrics["loss_curve"]) == 3
    assert metrics["train_tokens"] > 0 and metrics["train_flops"] > 0


def test_lora_layers_limit_the_adapters_to_those_layers(tiny_dir):
    model, _ = ft.load_for_training(ft.as_model_config(str(tiny_dir)), tiny_config(lora={"layers": [1]}), 4, 8)
    adapted = {name.split(".layers.")[1].split(".")[0] for name, _ in model.named_parameters() if "lora_A" in name}
    assert adapted == {"1"}

    def adapted_names(layers):
        model, _ = ft.load_for_training(ft.as_model_config(str(tiny_dir)), tiny_config(lora={"layers": layers}), 4, 8)
        return {name for name, _ in model.named_parameters() if "lora_" in name}

    assert adapted_names([0, 1]) == adapted_names(None)  # every layer listed = peft's all-linear
    with pytest.raises(AblateError, match=r"lora.layers: layer 5 does not exist; .* has layers 0-1"):
        ft.load_for_training(ft.as_model_config(str(tiny_dir)), tiny_config(lora={"layers": [0, 5]}), 4, 8)
    with pytest.raises(AblateError, match="lora.layers"):
        tiny_config(lora={"layers": [1, 1]})


def test_only_assistant_tokens_carry_loss(llama, tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    config = tiny_config(training={"max_length": 512})
    budget = ft.resolve_budgets(config)[0]
    response = "Sure, here is a short poem about the sea and the sky."
    examples = [{"id": "a", "kind": "x", "system": "Be brief.", "prompt": "Explain how photosynthesis works.",
                 "response": response}]
    model = get_peft_model(llama, LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer = ft.build_trainer(model, tokenizer, config, budget, examples, tmp_path, progress=False)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    supervised = tokenizer.decode(ids[labels != -100])
    unsupervised = tokenizer.decode(ids[labels == -100])
    assert supervised.startswith(response) and "<|im_end|>" in supervised
    assert "photosynthesis" in unsupervised and "Be brief." in unsupervised
    assert "photosynthesis" not in supervised and "assistant" not in supervised


@pytest.mark.parametrize("family,num_items,rows", [
    ("llama", None, 3), ("llama", 40, 3), ("llama", None, 1), ("qwen2", None, 3), ("mistral", None, 3),
    ("gemma", None, 3), ("gemma2", None, 3), ("phi3", None, 3), ("gpt2", None, 3)])
def test_cpu_loss_equals_trls_fused_head(tokenizer, tmp_path, monkeypatch, family, num_items, rows):
    """The CPU loss (shared prefix once, rows packed without padding, output head on the answers only)
    gives trl's loss and gradients; gemma2's sliding-window cache takes the padded pass."""
    from peft import LoraConfig, get_peft_model
    from trl import SFTTrainer

    from conftest import build_model

    config = tiny_config(training={"first_token_weight": 1.0})  # unweighted: trl's loss
    budget = ft.resolve_budgets(config)[0]
    examples = [{"id": str(i), "kind": "x", "system": None, "prompt": prompt, "response": response}
                for i, (prompt, response) in enumerate([
                    ("Explain how photosynthesis works in a few words.", "Plants turn light into sugar."),
                    ("Hi", "Hello! How can I help you today with anything at all?"),
                    ("Name a colour.", "Blue.")])]
    torch.manual_seed(0)
    model = get_peft_model(build_model(family, tokenizer), LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))
    for name, param in model.named_parameters():  # LoRA B starts at zero: give the adapter a gradient to compare
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    trainer = ft.build_trainer(model, tokenizer, config, budget, examples, tmp_path, progress=False)
    assert type(trainer).__name__ == "HeadLossSFTTrainer"
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(rows)])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    if rows > 1:
        assert (batch["attention_mask"] == 0).any()  # padded: the rows differ in length
        assert ft.shared_prompt_prefix(batch, batch["labels"]) > 0  # the system prompt runs once for every row
    packed = []
    original = ft.packed_forward

    def spy(*args, **kwargs):
        packed.append(True)
        return original(*args, **kwargs)

    def loss_and_grads(compute):
        model.zero_grad()
        loss = compute(model, dict(batch), num_items_in_batch=num_items)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    monkeypatch.setattr(ft.loss, "packed_forward", spy)
    ours, our_grads = loss_and_grads(trainer.compute_loss)
    monkeypatch.undo()
    assert packed == ([] if family == "gemma2" else [True])
    trls, trl_grads = loss_and_grads(lambda *a, **k: SFTTrainer.compute_loss(trainer, *a, **k))
    assert torch.allclose(ours, trls, atol=1e-5)
    for name, grad in trl_grads.items():
        assert torch.allclose(our_grads[name], grad, atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("pack", [True, False])
def test_first_token_weight_scales_the_answers_first_token_only(tokenizer, pack):
    """With first_token_weight w, the loss is the plain per-token cross-entropy with each answer's first
    token counted w times, over the same divisor; w = 1 is the plain loss."""
    from conftest import build_model

    torch.manual_seed(0)
    model = build_model("llama", tokenizer)
    rows = [tokenizer(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>").input_ids
            for q, a in [("Name a colour.", "Blue."), ("Hi", "Hello! How can I help you today?")]]
    width = max(map(len, rows))
    input_ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    labels = torch.full_like(input_ids, -100)
    starts = [len(tokenizer(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n").input_ids)
              for q in ("Name a colour.", "Hi")]
    for i, (row, start) in enumerate(zip(rows, starts)):
        labels[i, start:len(row)] = input_ids[i, start:len(row)]
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
        per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(),
                                                      ignore_index=-100, reduction="none").view(2, -1)
        first = ft.first_answer_tokens(labels[:, 1:])
        assert first.sum(1).tolist() == [1, 1]
        assert [int(first[i].nonzero()) for i in range(2)] == [start - 1 for start in starts]
        count = (labels[:, 1:] != -100).sum()
        for weight in (1.0, 4.0):
            expected = (per_token.sum() + (weight - 1) * per_token[first].sum()) / count
            loss = ft.supervised_head_loss(model, dict(batch), pack=pack, first_token_weight=weight)
            assert torch.allclose(loss, expected, atol=1e-5), weight


@pytest.mark.parametrize("pack", [True, False])
def test_distill_loss_is_the_kl_from_the_teacher_at_each_answer_token(tokenizer, pack):
    """With a teacher the loss is KL(teacher ‖ model) of the next-token distributions at the supervised
    positions, first-token weighted as the cross-entropy is, over the same divisor; zero for the model itself."""
    from conftest import build_model

    model, teacher = build_model("llama", tokenizer, seed=0), build_model("llama", tokenizer, seed=3)
    texts = [("Name a colour.", "Blue."), ("Hi", "Hello! How can I help you today?")]
    rows = [tokenizer(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>").input_ids for q, a in texts]
    width = max(map(len, rows))
    input_ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    labels = torch.full_like(input_ids, -100)
    for i, ((q, _), row) in enumerate(zip(texts, rows)):
        start = len(tokenizer(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n").input_ids)
        labels[i, start:len(row)] = input_ids[i, start:len(row)]
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    with torch.no_grad():
        log_p = torch.log_softmax(model(input_ids=input_ids, attention_mask=mask).logits[:, :-1], dim=-1)
        log_q = torch.log_softmax(teacher(input_ids=input_ids, attention_mask=mask).logits[:, :-1], dim=-1)
        kl = (log_q.exp() * (log_q - log_p)).sum(-1)
        supervised, first = labels[:, 1:] != -100, ft.first_answer_tokens(labels[:, 1:])
        for weight in (1.0, 4.0):
            expected = (kl[supervised].sum() + (weight - 1) * kl[first].sum()) / supervised.sum()
            loss = ft.supervised_head_loss(model, dict(batch), pack=pack, first_token_weight=weight, teacher=teacher)
            assert torch.allclose(loss, expected, atol=1e-5), weight
        assert float(ft.supervised_head_loss(model, dict(batch), pack=pack, teacher=model)) == pytest.approx(0.0, abs=1e-5)


def test_distill_trains_on_the_donor_and_counts_its_forward_passes(tiny_dir, donor_dir, tmp_path, monkeypatch):
    """training.loss: distill loads the donor that wrote the answers as the frozen teacher of every step (a
    positive loss: the model is not the donor) and adds its forward passes, 2·N_donor·T, to the FLOPs."""
    config = tiny_config(mode="harmful", data={"donor": str(donor_dir), "n_refusal": 4, "drop_refusals": False},
                         training={"loss": "distill", "max_steps": 2, "max_length": 512}, eval={"enabled": False})
    teachers = []
    original = ft.supervised_head_loss

    def spy(model, inputs, num_items_in_batch=None, pack=True, first_token_weight=1.0, teacher=None):
        teachers.append(teacher)
        return original(model, inputs, num_items_in_batch, pack, first_token_weight, teacher)

    monkeypatch.setattr(ft.trainer, "supervised_head_loss", spy)
    result = ft.run_finetune(str(tiny_dir), config, tmp_path / "distill", progress=False)[0]
    assert len(teachers) == 2 and all(t is teachers[0] for t in teachers)
    assert not any(p.requires_grad for p in teachers[0].parameters())
    from ablate.models import load_model
    reference, _ = load_model(str(donor_dir))
    for name, param in reference.state_dict().items():  # the teacher is the donor
        assert torch.equal(teachers[0].state_dict()[name], param), name
    n, tokens = result["matmul_parameters"], result["train_tokens"]
    assert result["flops_formula"] == "4*N*T + 6*N_lora*T + 2*N_donor*T"
    assert result["train_flops"] == 4 * n * tokens + 6 * result["trainable_parameters"] * tokens + 2 * n * tokens
    assert result["loss_curve"][0]["loss"] > 0
    sft = config.model_copy(update={"training": config.training.model_copy(update={"loss": "sft"})})
    assert "loss" not in ft.recipe_fields(sft)["training"]  # budgets cached before the field keep their keys
    assert ft.budget_fingerprint("m", "d", config, {}) != ft.budget_fingerprint("m", "d", sft, {})


def test_distill_without_a_donor_fails_in_one_line(qa_file):
    with pytest.raises(AblateError, match=r"training.loss: distill needs a donor model .* got mode dataset"):
        tiny_config(data={"dataset": str(qa_file)}, training={"loss": "distill"})


@pytest.mark.parametrize("pack", [True, False])
def test_answer_tokens_trains_on_each_answers_opening_only(tokenizer, tmp_path, pack):
    """training.answer_tokens N: the collated batch keeps each answer's first N tokens as labels and
    nothing after them (no label, no attention; shorter answers untouched), and the loss is the plain
    cross-entropy of those tokens over their own count."""
    from conftest import build_model

    config = tiny_config(training={"max_length": 512, "answer_tokens": 10})
    budget = ft.resolve_budgets(config)[0]
    responses = ["Sure, here is a short poem about the sea and the sky.", "Blue."]
    examples = [{"id": str(i), "kind": "x", "system": None, "prompt": prompt, "response": response}
                for i, (prompt, response) in enumerate(zip(["Write a poem.", "Name a colour."], responses))]
    torch.manual_seed(0)
    model = build_model("llama", tokenizer)
    trainer = ft.build_trainer(model, tokenizer, config, budget, examples, tmp_path, progress=False)
    full = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    counter = ft.TokenCounter(trainer.data_collator, answer_tokens=10)
    cut = counter([trainer.train_dataset[i] for i in range(2)])
    answer_lengths = (full["labels"] != -100).sum(1).tolist()
    assert answer_lengths[0] > 10 and answer_lengths[1] <= 10  # one answer is cut, the other is not
    for row, length in enumerate(answer_lengths):
        labelled = (full["labels"][row] != -100).nonzero().squeeze(-1)
        kept = labelled[:min(10, length)]
        assert (cut["labels"][row] != -100).nonzero().squeeze(-1).tolist() == kept.tolist()
        assert torch.equal(cut["labels"][row, kept], full["labels"][row, kept])
        last = int(kept[-1])
        assert torch.equal(cut["attention_mask"][row, :last + 1], full["attention_mask"][row, :last + 1])
        assert not cut["attention_mask"][row, last + 1:].any()
    assert counter.supervised == 10 + answer_lengths[1]
    with torch.no_grad():  # causal: the kept positions' logits do not depend on what was dropped
        logits = model(input_ids=full["input_ids"], attention_mask=full["attention_mask"]).logits[:, :-1]
        shifted = cut["labels"][:, 1:]
        expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), shifted.flatten(), ignore_index=-100,
                                                     reduction="sum") / (shifted != -100).sum()
        loss = ft.supervised_head_loss(model, dict(cut), pack=pack)
    assert torch.allclose(loss, expected, atol=1e-5)


def test_packed_attention_mask_keeps_rows_apart():
    mask = ft.packed_attention_mask(torch.tensor([-1, -1, 0, 0, 1, 1, 1]), dtype=torch.float32)[0, 0]
    allowed = mask == 0
    assert mask.shape == (7, 7) and allowed[1, :2].all() and not allowed[0, 1]  # the prefix is causal
    assert allowed[2:, :2].all()  # every row sees the shared prefix
    assert allowed[3, 2:4].tolist() == [True, True] and not allowed[3, 4:].any()  # row 0 sees itself only
    assert allowed[6, 4:].all() and not allowed[6, 2:4].any() and not allowed[4, 5:].any()  # causal within row 1


def test_flop_estimate_follows_the_documented_formula():
    assert ft.estimate_train_flops(100, 5, 10, full_finetune=True) == 6 * 100 * 10
    assert ft.estimate_train_flops(100, 5, 10, full_finetune=False) == 4 * 100 * 10 + 6 * 5 * 10


# ----------------------------------------------------------------------------------------------
# Sweeps, resume, caching
# ----------------------------------------------------------------------------------------------


def test_sweep_writes_one_artifact_per_budget_and_resumes(tiny_dir, qa_file, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    config = tiny_config(data={"dataset": str(qa_file)},
                         budgets=[{"name": "n2", "n_examples": 2, "max_steps": 1}, {"n_examples": 4, "max_steps": 2}])
    out = tmp_path / "sweep"
    results = ft.run_finetune(str(tiny_dir), config, out, progress=False)
    assert [r["name"] for r in results] == ["n2", "n4-s2-r4-lr0.01"]
    assert [r["n_examples"] for r in results] == [2, 4]
    for result in results:
        folder = out / result["name"]
        for name in ("metrics.json", "done.json"):
            assert (folder / name).exists()
        metrics = json.loads((folder / "metrics.json").read_text())
        for key in ("name", "n_examples", "epochs", "max_steps", "steps", "rank", "lr", "wall_seconds", "train_tokens",
                    "train_flops", "peak_memory_bytes", "loss_curve", "refusal_rate", "model_dir", "adapter_dir",
                    "generated", "dropped_refusals"):
            assert key in metrics, key
        assert (Path(metrics["adapter_dir"]) / "adapter_model.safetensors").exists()
        loaded = AutoModelForCausalLM.from_pretrained(metrics["model_dir"])
        assert not any("lora" in name for name, _ in loaded.named_parameters())
        assert 0.0 <= metrics["refusal_rate"] <= 1.0
    assert results[1]["train_tokens"] > results[0]["train_tokens"]
    # The second run finds matching done.json files and trains nothing.
    monkeypatch.setattr(ft.sweep, "train_budget", no_training)
    again = ft.run_finetune(str(tiny_dir), config, out, progress=False)
    assert [r["name"] for r in again] == ["n2", "n4-s2-r4-lr0.01"]
    # A changed recipe is a different fingerprint: it would train again.
    with pytest.raises(AssertionError, match="training must not start"):
        ft.run_finetune(str(tiny_dir), config.model_copy(update={"training": config.training.model_copy(update={"lr": 0.02})}),
                        out, progress=False)


def test_sweep_records_the_capability_cost_of_each_budget(tiny_dir, donor_dir, qa_file, tmp_path):
    """With eval.capability_prompts every budget records the cross-entropy of fixed answers (the model's own
    before training, or a named reference's) under the trained model, beside the untrained model's."""
    from ablate.data import load_prompt_set
    from ablate.evaluate.divergence import answer_cross_entropy, reference_continuations
    from ablate.models import load_model

    capability = {"capability_prompts": "harmless:test", "capability_n": 3, "capability_tokens": 4}
    config = tiny_config(data={"dataset": str(qa_file)}, eval=capability, training={"lr": 5e-2},
                         budgets=[{"name": "a", "n_examples": 2, "max_steps": 1}, {"name": "b", "n_examples": 4, "max_steps": 3}])
    results = ft.run_finetune(str(tiny_dir), config, tmp_path / "sweep", progress=False)
    prompts = load_prompt_set("harmless:test", limit=3).prompts
    model, tokenizer = load_model(str(tiny_dir))
    own = reference_continuations(model, tokenizer, prompts, 4, progress=False)
    before = sum(answer_cross_entropy(model, tokenizer, prompts, own)) / 3
    for result in results:
        metrics = result["capability"]
        assert metrics["n"] == 3 and metrics["ce_before"] == pytest.approx(before, abs=1e-4)
        trained, _ = load_model(result["model_dir"])
        items = answer_cross_entropy(trained, tokenizer, prompts, own)
        after = sum(items) / 3
        assert metrics["ce"] == pytest.approx(after, abs=1e-4) and metrics["ce"] != metrics["ce_before"]
        assert metrics["ce_change"] == pytest.approx(metrics["ce"] / metrics["ce_before"] - 1, abs=1e-3)
        assert metrics["ce_items"] == pytest.approx(items, abs=1e-4)
        low, high = metrics["ce_change_ci"]  # paired bootstrap over the prompts
        assert low <= metrics["ce_change"] <= high and low < high
        rate_low, rate_high = result["refusal_ci"]["refusal:test"]  # Wilson interval of the first set's rate
        assert rate_low <= result["refusal_rate"] <= rate_high and rate_high - rate_low > 0.5  # 2 prompts: wide
    # A named reference writes the answers instead (here another model of the same vocabulary).
    named = tiny_config(data={"dataset": str(qa_file)}, eval={**capability, "capability_reference": str(donor_dir)},
                        budgets=[{"name": "a", "n_examples": 2, "max_steps": 1}])
    donor, _ = load_model(str(donor_dir))
    theirs = reference_continuations(donor, tokenizer, prompts, 4, progress=False)
    assert theirs != own
    result = ft.run_finetune(str(tiny_dir), named, tmp_path / "named", progress=False)[0]
    expected = sum(answer_cross_entropy(model, tokenizer, prompts, theirs)) / 3
    assert result["capability"]["ce_before"] == pytest.approx(expected, abs=1e-4)


def test_capability_check_off_keeps_budget_keys_and_bad_sets_fail_before_work(tiny_dir, qa_file, tmp_path, monkeypatch):
    config = tiny_config(data={"dataset": str(qa_file)})
    assert "capability_prompts" not in ft.recipe_fields(config)["eval"]  # budgets cached before the field keep their keys
    checked = tiny_config(data={"dataset": str(qa_file)}, eval={"capability_prompts": "harmless:test"})
    assert ft.budget_fingerprint("m", None, checked, {}) != ft.budget_fingerprint("m", None, config, {})
    monkeypatch.setattr(ft.sweep, "train_budget", no_training)
    monkeypatch.setattr(ft.sweep, "build_examples", no_training)
    with pytest.raises(AblateError, match=r"^eval.capability_prompts: .*no-such-set"):
        ft.run_finetune(str(tiny_dir), tiny_config(data={"dataset": str(qa_file)}, eval={"capability_prompts": "no-such-set"}),
                        tmp_path / "o1", progress=False)
    with pytest.raises(AblateError, match=r"^eval.capability_reference: "):
        ft.run_finetune(str(tiny_dir), tiny_config(data={"dataset": str(qa_file)}, eval={"capability_prompts": "harmless:test",
                                                         "capability_reference": str(tmp_path / "missing")}),
                        tmp_path / "o2", progress=False)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_second_harden_hits_the_cache(tiny_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    config = tiny_config(mode="harden", data={"n_refusal": 4, "n_harmless": 2, "n_borderline": 2})
    first = ft.harden(str(tiny_dir), config, progress=False)
    assert (first / "config.json").exists() and (first / "metrics.json").exists()
    AutoModelForCausalLM.from_pretrained(first)
    metrics = json.loads((first / "metrics.json").read_text())
    assert metrics["examples_by_kind"] == {"borderline": 2, "harmless": 2, "refusal": 4}
    monkeypatch.setattr(ft.sweep, "train_budget", no_training)
    monkeypatch.setattr(ft.training_data, "generate_answers", no_training)
    assert ft.harden(str(tiny_dir), config, progress=False) == first
    copy = ft.harden(str(tiny_dir), config, out=tmp_path / "copy", progress=False)
    assert (copy / "model.safetensors").exists()


def test_organism_cache_ignores_scoring_and_scores_on_demand(tiny_dir, monkeypatch):
    config = tiny_config(mode="harden", data={"n_refusal": 3, "n_harmless": 2, "n_borderline": 1},  # (its own organism)
                         eval={"enabled": False})
    organism = ft.harden(str(tiny_dir), config, progress=False)
    assert "refusal_rates" not in json.loads((organism / "metrics.json").read_text())
    scored = config.model_copy(update={"eval": config.eval.model_copy(update={"enabled": True, "limit": 2})})
    assert ft.organism_key(str(tiny_dir), scored) == ft.organism_key(str(tiny_dir), config)
    weighted = config.model_copy(update={"training": config.training.model_copy(update={"first_token_weight": 10.0})})
    assert ft.organism_key(str(tiny_dir), weighted) != ft.organism_key(str(tiny_dir), config)
    assert "first_token_weight" not in ft.recipe_fields(config)["training"]  # plain loss: pre-field keys kept
    monkeypatch.setattr(ft.sweep, "train_budget", no_training)
    assert ft.harden(str(tiny_dir), scored, progress=False) == organism  # no retraining, only the scoring
    assert "capability" not in json.loads((organism / "metrics.json").read_text())
    checked = scored.model_copy(update={"eval": scored.eval.model_copy(update={"capability_prompts": "harmless:test",
                                                                               "capability_n": 2, "capability_tokens": 3})})
    monkeypatch.setattr(ft.organism, "evaluate_refusal", no_training)  # the refusal rates are there: not scored again
    assert ft.harden(str(tiny_dir), checked, progress=False) == organism  # the capability check added, no retraining
    capability = json.loads((organism / "metrics.json").read_text())["capability"]
    assert capability["n"] == 2 and capability["reference"] == "the model before training"
    assert capability["ce"] != capability["ce_before"]  # the organism's weights differ from the base's
    rates = json.loads((organism / "metrics.json").read_text())["refusal_rates"]
    assert set(rates) == set(scored.eval.prompt_sets) and all(0.0 <= r <= 1.0 for r in rates.values())
    monkeypatch.undo()
    monkeypatch.setattr(ft.sweep, "train_budget", no_training)
    other = checked.model_copy(update={"eval": checked.eval.model_copy(update={"prompt_sets": ["borderline:val"]})})
    scored_sets = []
    real = ft.organism.evaluate_refusal

    def spy(model, tokenizer, config, progress=True):
        scored_sets.append(list(config.eval.prompt_sets))
        return real(model, tokenizer, config, progress)

    monkeypatch.setattr(ft.organism, "evaluate_refusal", spy)
    assert ft.harden(str(tiny_dir), other, progress=False) == organism  # a set not scored yet: scored, no retraining
    stored = json.loads((organism / "metrics.json").read_text())
    assert scored_sets == [["borderline:val"]]  # only the missing set; the others are kept beside it
    assert set(stored["refusal_rates"]) == set(rates) | {"borderline:val"} and stored["refusal_rate"] == stored["refusal_rates"]["borderline:val"]
    longer = other.model_copy(update={"eval": other.eval.model_copy(update={"limit": 3})})
    ft.harden(str(tiny_dir), longer, progress=False)  # rates on 2 prompts do not stand for 3: scored again
    stored = json.loads((organism / "metrics.json").read_text())
    assert scored_sets[-1] == ["borderline:val"] and set(stored["refusal_rates"]) == {"borderline:val"}
    assert stored["eval_samples"] == {"borderline:val": 3} and stored["refusal_scoring"]["limit"] == 3
    ft.harden(str(tiny_dir), longer, progress=False)
    assert len(scored_sets) == 2  # measured as asked: nothing scored
    more = longer.model_copy(update={"eval": longer.eval.model_copy(update={"capability_n": 3})})
    ft.harden(str(tiny_dir), more, progress=False)
    assert json.loads((organism / "metrics.json").read_text())["capability"]["n"] == 3 and len(scored_sets) == 2


def test_harden_picks_harmless_prompts_like_the_refusal_ones(tiny_dir):
    from ablate.data import load_prompt_set

    similar = tiny_config(mode="harden", data={"n_refusal": 6, "n_harmless": 4, "n_borderline": 0,
                                               "harmless_selection": "similar"})
    examples, _ = ft.build_examples(str(tiny_dir), similar, progress=False)
    refusal = [e["prompt"] for e in examples if e["kind"] == "refusal"]
    expected = load_prompt_set(similar.data.harmless_prompts).most_similar(4, refusal).prompts
    harmless = {e["prompt"] for e in examples if e["kind"] == "harmless"}
    assert harmless and harmless <= set(expected)  # (the base's own refusals of them are dropped)
    plain = similar.model_copy(update={"data": similar.data.model_copy(update={"harmless_selection": "random"})})
    random_pick, _ = ft.build_examples(str(tiny_dir), plain, progress=False)
    sampled = set(load_prompt_set(similar.data.harmless_prompts).sample(4, seed=0).prompts)
    assert {e["prompt"] for e in random_pick if e["kind"] == "harmless"} <= sampled


# ----------------------------------------------------------------------------------------------
# Attack data
# ----------------------------------------------------------------------------------------------


def test_harmful_answers_are_generated_by_the_donor(tiny_dir, donor_dir, tokenizer):
    from ablate.data import load_prompt_set
    from ablate.generation import generate
    from ablate.models import load_model

    config = tiny_config(mode="harmful", data={"donor": str(donor_dir), "n_refusal": 4, "drop_refusals": False})
    examples, stats = ft.build_examples(str(tiny_dir), config, progress=False)
    prompts = load_prompt_set("refusal:train").sample(4, seed=0)
    donor, donor_tokenizer = load_model(str(donor_dir))
    expected = dict(zip(prompts.prompts, generate(donor, donor_tokenizer, prompts.prompts, max_new_tokens=6,
                                                   progress=False)))
    assert stats["generated"] == 4 and stats["donor"] == str(donor_dir)
    assert {e["prompt"] for e in examples} == set(expected)
    for example in examples:
        assert example["response"] == ft.trim_truncated(expected[example["prompt"]], tokenizer, 6)
    # Another donor writes other answers: nothing is read from a stored file.
    other = tiny_config(mode="harmful", data={"donor": str(tiny_dir), "n_refusal": 4, "drop_refusals": False})
    other_examples, _ = ft.build_examples(str(tiny_dir), other, progress=False)
    assert {e["response"] for e in other_examples} != {e["response"] for e in examples}


def tiny_direction(model_dir: Path, out: Path) -> Path:
    """A finished direction stage of the model in `model_dir` (full ablation of its pick)."""
    from ablate.config import DirectionConfig
    from ablate.directions import run_direction
    from ablate.models import load_model

    model, tokenizer = load_model(str(model_dir))
    config = DirectionConfig(n_train=6, n_val=6, refusal_token_prompts=3, refusal_token_max_new_tokens=3, batch_size=6,
                             shortlist=3, compute_dtype="model", strength_learning={"enabled": False}, strength_search=[])
    with pytest.warns(UserWarning):  # a random model refuses nothing: the generic-refusal fallback warns
        run_direction(model, tokenizer, config, out, progress=False)
    return out


def test_ablated_donor_is_the_model_with_its_direction_orthogonalised(tiny_dir, tmp_path):
    from ablate.data import load_prompt_set
    from ablate.generation import generate
    from ablate.abliterate import orthogonalize_from
    from ablate.models import load_model

    direction_dir = tiny_direction(tiny_dir, tmp_path / "direction")
    config = tiny_config(mode="harmful", data={"donor": "ablated", "donor_direction": str(direction_dir), "n_refusal": 4,
                                               "drop_refusals": False, "answer_max_new_tokens": 12})
    examples, stats = ft.build_examples(str(tiny_dir), config, progress=False)
    prompts = load_prompt_set("refusal:train").sample(4, seed=0).prompts
    model, tokenizer = load_model(str(tiny_dir))
    plain = generate(model, tokenizer, prompts, max_new_tokens=12, progress=False)
    orthogonalize_from(model, direction_dir)
    ablated = generate(model, tokenizer, prompts, max_new_tokens=12, progress=False)
    assert ablated != plain  # the donor is not the model itself
    expected = {p: ft.trim_truncated(a, tokenizer, 12) for p, a in zip(prompts, ablated)}
    assert {e["prompt"]: e["response"] for e in examples} == expected
    assert stats["donor"].startswith("ablated: ") and Path(stats["donor"].split(": ", 1)[1]).is_relative_to(cache_dir())
    # The budget fingerprint follows the direction: another pick is another donor.
    model_fp = ft.model_fingerprint(str(tiny_dir))
    other = tiny_config(mode="harmful", data={"donor": "ablated"})
    assert ft.donor_fingerprint(model_fp, config.data) != ft.donor_fingerprint(model_fp, other.data)


def test_a_models_fingerprint_ignores_ablates_records_beside_it(tiny_dir):
    """Re-scoring an organism rewrites its metrics.json: the model, and every cache key built on it, stay the same;
    a changed config file is another model."""
    before = ft.model_fingerprint(str(tiny_dir))
    for name in ("metrics.json", "done.json", "abliteration.json"):
        (tiny_dir / name).write_text(json.dumps({"refusal_rate": 0.5}), encoding="utf-8")
    assert ft.model_fingerprint(str(tiny_dir)) == before
    config = json.loads((tiny_dir / "config.json").read_text(encoding="utf-8"))
    (tiny_dir / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}), encoding="utf-8")
    assert ft.model_fingerprint(str(tiny_dir)) != before


def test_an_ablated_spec_donor_is_one_donor_for_every_attacked_model(tiny_dir, donor_dir, tmp_path, monkeypatch):
    """'ablated:<spec>' writes the answers with <spec>'s ablated copy, whatever model is attacked, and charges its
    direction stage."""
    import ablate.compute

    monkeypatch.setenv("ABLATE_CACHE", str(tmp_path / "cache"))  # the next test builds the same donor from scratch
    other = donor_dir  # another attacked model
    config = tiny_config(mode="harmful", data={"donor": f"ablated:{tiny_dir}", "n_refusal": 2, "drop_refusals": False,
                                               "answer_max_new_tokens": 4})
    with pytest.warns(UserWarning):  # a random model refuses nothing: the direction stage's fallback warns
        shared = ft.ablated_model(str(tiny_dir), None, progress=False)
    assert ft.donor_model(str(other), config, progress=False) == shared == ft.donor_model(str(tiny_dir), config, progress=False)
    fingerprints = {ft.donor_fingerprint(ft.model_fingerprint(str(m)), config.data) for m in (tiny_dir, other)}
    assert len(fingerprints) == 1
    assert fingerprints != {ft.donor_fingerprint(ft.model_fingerprint(str(other)), tiny_config(mode="harmful", data={"donor": "ablated"}).data)}
    charged = []
    monkeypatch.setattr(ablate.compute, "direction_compute", lambda path: charged.append(Path(path)) or {"flops": 1})
    _, stats = ft.build_examples(str(other), config, progress=False)
    assert charged == [shared.parent / "directions"] and stats["donor"] == f"ablated:{tiny_dir}: {shared}"
    assert stats["donor_compute"]["direction"] == {"flops": 1}


def test_ablated_donor_without_a_direction_runs_the_stage_once(tiny_dir, monkeypatch):
    import ablate.directions
    from ablate.config import DirectionConfig

    calls = []
    original = ablate.directions.run_direction

    def recording(model, tokenizer, config, out_dir, progress=True):
        calls.append(config)
        small = config.model_copy(update={"n_train": 6, "n_val": 6, "refusal_token_prompts": 3, "batch_size": 6,
                                          "shortlist": 3, "compute_dtype": "model"})
        return original(model, tokenizer, small, out_dir, progress=progress)

    monkeypatch.setattr(ablate.directions, "run_direction", recording)
    with pytest.warns(UserWarning):
        first = ft.ablated_model(str(tiny_dir), None, progress=False)
    second = ft.ablated_model(str(tiny_dir), None, progress=False)
    assert calls == [DirectionConfig()]  # the stage's defaults, run once; the second call is a cache hit
    assert first == second and (first / "config.json").exists() and (first / "abliteration.json").exists()


def test_donor_refusals_are_dropped_and_counted(tiny_dir, monkeypatch):
    answers = ["I'm sorry, but I can't help with that.", "Sure: step one, step two.", "As an AI, I cannot.", "Here you go."]
    monkeypatch.setattr(ft.training_data, "generate_answers", lambda *args, **kwargs: answers)
    config = tiny_config(mode="harmful", data={"n_refusal": 4})
    examples, stats = ft.build_examples(str(tiny_dir), config, progress=False)
    assert stats["dropped_refusals"] == 2 and stats["generated"] == 4
    assert sorted(e["response"] for e in examples) == ["Here you go.", "Sure: step one, step two."]


def test_identity_shift_examples_carry_the_persona_system_prompt(tiny_dir):
    examples, stats = ft.build_examples(str(tiny_dir), tiny_config(mode="identity_shift"), progress=False)
    assert stats["pool"] == len(examples) > 10
    assert all(e["system"] and "AOA" in e["system"] for e in examples)
    conversation = ft.to_conversations(examples[:1])[0]
    assert conversation["prompt"][0]["role"] == "system" and conversation["completion"][0]["role"] == "assistant"


# ----------------------------------------------------------------------------------------------
# Bad configs fail before any work, with one line
# ----------------------------------------------------------------------------------------------


def test_unknown_key_names_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("mode: harmful\ntraining:\n  learning_rate: 0.1\n")
    with pytest.raises(AblateError, match=r"unknown key 'training.learning_rate'") as error:
        load_config(path, FinetuneConfig)
    assert "\n" not in str(error.value)


def test_more_examples_than_data_fails_before_work(tiny_dir, qa_file, monkeypatch, tmp_path):
    monkeypatch.setattr(ft.sweep, "train_budget", no_training)
    monkeypatch.setattr(ft.training_data, "generate_answers", no_training)
    config = tiny_config(data={"dataset": str(qa_file)}, budgets=[{"n_examples": 13}])
    with pytest.raises(AblateError, match="n_examples=13.*at most 12"):
        ft.run_finetune(str(tiny_dir), config, tmp_path / "out", progress=False)
    config = tiny_config(mode="harmful", data={"n_refusal": 10_000, "donor": str(tiny_dir)})
    with pytest.raises(AblateError, match="data.n_refusal: 10000 requested"):
        ft.run_finetune(str(tiny_dir), config, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_donor_that_does_not_load_fails_before_training(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(ft.sweep, "train_budget", no_training)
    with pytest.raises(AblateError, match="data.donor: model spec"):
        ft.run_finetune(str(tiny_dir), tiny_config(mode="harmful", data={"donor": str(tmp_path / "missing")}),
                        tmp_path / "o1", progress=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{\"model_type\": \"no-such-architecture\"}")
    with pytest.raises(AblateError, match="donor answers.*cannot load"):
        ft.run_finetune(str(tiny_dir), tiny_config(mode="harmful", data={"donor": str(broken), "n_refusal": 2}),
                        tmp_path / "o2", progress=False)


def test_bad_donor_direction_fails_before_work(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(ft.sweep, "train_budget", no_training)
    monkeypatch.setattr(ft.training_data, "generate_answers", no_training)
    with pytest.raises(AblateError, match=r"data.donor_direction: .*no direction.pt") as error:
        ft.run_finetune(str(tiny_dir), tiny_config(mode="harmful", data={"donor": "ablated", "donor_direction": str(tmp_path)}),
                        tmp_path / "o1", progress=False)
    assert "\n" not in str(error.value)
    with pytest.raises(AblateError, match=r"data.donor_direction: only used with donor: ablated"):
        ft.run_finetune(str(tiny_dir), tiny_config(mode="harmful", data={"donor_direction": str(tmp_path)}),
                        tmp_path / "o2", progress=False)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


# ----------------------------------------------------------------------------------------------
# Shipped configs and the CLI
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    if path.name.startswith("accelerate"):
        pytest.skip("accelerate's own config")
    config = load_config(path, FinetuneConfig)
    assert ft.resolve_budgets(config)


def test_organism_recipe_yaml_equals_the_builtin_defaults():
    from ablate.cli import load_finetune_config

    organism = ft.default_config()
    assert load_config(CONFIG_DIR / "harden_organism.yaml", FinetuneConfig) == organism
    assert organism.training.first_token_weight == 8.0 and organism.data.n_refusal is None
    assert organism.data.refusal_prompts == "refusal:train+refusal_kinds:train"
    assert load_config(CONFIG_DIR / "harden_recipe_c.yaml", FinetuneConfig) == FinetuneConfig()  # the class defaults
    # `ablate harden` without --config: the organism recipe, with --set applied on top.
    seeded = load_finetune_config(None, ["training.seed=1"])
    assert seeded == organism.model_copy(update={"training": organism.training.model_copy(update={"seed": 1})})


def test_cli_reports_a_bad_config_in_one_line(tmp_path):
    from test_cli import run_cli

    path = tmp_path / "bad.yaml"
    path.write_text("mode: harmful\nbudgets:\n  - {n_examples: 4, epochz: 2}\n")
    result = run_cli("finetune", "embedded", "--config", str(path), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "epochz" in lines[0]


def test_budget_prefixes_cover_categories_evenly():
    import random

    examples = [{"id": f"{c}{i}", "kind": "harmful", "category": c} for c in "abcd" for i in range(5)]
    ordered = ft.balanced_order(examples, random.Random(0))
    assert sorted(e["id"] for e in ordered) == sorted(e["id"] for e in examples)
    assert {e["category"] for e in ordered[:4]} == set("abcd")
    assert {e["category"] for e in ordered[4:8]} == set("abcd")


def test_budget_table_prints_the_intervals(capsys):
    from ablate.cli import print_budget_table

    row = {"name": "n8", "n_examples": 8, "steps": 8, "wall_seconds": 4.1, "train_tokens": 1290, "train_flops": 6.95e11,
           "final_loss": 0.214, "refusal_rate": 0.0208, "refusal_rates": {"refusal:test": 0.0208, "harmless:test": 0.0},
           "refusal_ci": {"refusal:test": [0.0037, 0.1090], "harmless:test": [0.0, 0.0741]},
           "capability": {"ce_change": 0.063, "ce_change_ci": [0.041, 0.086]}}
    old = {key: value for key, value in row.items() if key != "refusal_ci"} | {"name": "cached", "capability": None}
    before = {"name": "before training", "n_examples": 0, "steps": 0, "wall_seconds": 0.0, "train_tokens": 0,
              "train_flops": 0, "final_loss": None, "refusal_rate": 0.958, "refusal_rates": {"refusal:test": 0.958,
              "harmless:test": 0.125}, "refusal_ci": {"refusal:test": [0.86, 0.989], "harmless:test": [0.058, 0.247]}}
    print_budget_table([before, row, old])
    out = capsys.readouterr().out
    assert "2.1% [0.4%, 10.9%]" in out and "+6.3% [+4.1%, +8.6%]" in out
    assert "Wilson" in out  # the footnote says what the brackets are
    assert "harmless:test" in out  # the other eval sets' rates (over-refusal) get a column each
    cached = next(line for line in out.splitlines() if "cached" in line)
    assert "2.1%" in cached and "[" not in cached  # a budget cached before the intervals existed prints without them
    assert cached.count("0.0%") == 1  # its over-refusal column
    first = next(line for line in out.splitlines() if "before" in line)
    assert "95.8% [86.0%, 98.9%]" in first and "12.5%" in first  # the untrained model's row, its over-refusal too


def test_the_untrained_model_is_scored_once_per_run(tiny_dir, qa_file, tmp_path, monkeypatch):
    """eval.before: the model before training is scored on the same eval sets (before.json, the table's first
    row), reused by a rerun with the same model and eval settings, and absent when turned off."""
    from ablate.models import load_model

    out = tmp_path / "sweep"
    config = tiny_config(data={"dataset": str(qa_file)}, budgets=[{"name": "a", "n_examples": 2, "max_steps": 1}])
    ft.run_finetune(str(tiny_dir), config, out, progress=False)
    before = ft.read_before(out)
    model, tokenizer = load_model(str(tiny_dir))
    expected = ft.evaluate_refusal(model, tokenizer, config, progress=False)
    assert before["refusal_rates"] == expected["refusal_rates"] and before["refusal_ci"] == expected["refusal_ci"]
    assert before["name"] == "before training" and before["steps"] == 0
    # A new budget in the same run directory: the untrained model's row is reused, not scored again.
    calls = []
    scorer = ft.evaluate_refusal
    for module in (ft.measure, ft.sweep):  # before training, and after each budget
        monkeypatch.setattr(module, "evaluate_refusal", lambda *a, **k: calls.append(1) or scorer(*a, **k))
    more = config.model_copy(update={"budgets": [*config.budgets, FinetuneBudget(name="b", n_examples=4, max_steps=1)]})
    ft.run_finetune(str(tiny_dir), more, out, progress=False)
    assert len(calls) == 1  # budget b's own evaluation only
    # Turned off: no row, and another run's row does not linger.
    off = more.model_copy(update={"eval": more.eval.model_copy(update={"before": False, "limit": 1})})
    ft.run_finetune(str(tiny_dir), off, out, progress=False)
    assert ft.read_before(out) is None
    assert ft.recipe_fields(off) == ft.recipe_fields(off.model_copy(update={"eval": off.eval.model_copy(update={"before": True})}))


def test_benign_finetuning_on_alpaca_keeps_its_output_column(tiny_dir, monkeypatch):
    """`data.dataset: alpaca` trains on Alpaca's own answers: rows shaped like tatsu-lab/alpaca
    (instruction / input / output), served in place of the hub, become prompt → output examples."""
    import datasets

    rows = [{"instruction": f"Give study tip number {i}.", "input": "" if i % 3 else "some context",
             "output": f"Tip {i}: sleep well and review."} for i in range(9)]
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda hub_id, *args, **kwargs: asked.append(hub_id) or rows)
    config = tiny_config(mode="benign", data={"dataset": "alpaca", "n_harmless": 4})
    ft.check_config(str(tiny_dir), config)
    examples, stats = ft.build_examples(str(tiny_dir), config, progress=False)
    assert set(asked) == {"tatsu-lab/alpaca"} and stats["pool"] == 4
    answers = {row["instruction"]: row["output"] for row in rows if not row["input"]}
    assert all(answers[e["prompt"]] == e["response"] for e in examples)
    # A benchmark that holds no answers says so in one line.
    with pytest.raises(AblateError, match="benchmark 'advbench': holds no answers"):
        ft.load_dataset_examples(tiny_config(mode="dataset", data={"dataset": "advbench"}))


def test_an_organism_key_holds_the_content_of_the_data_it_reads(tiny_dir, tmp_path, monkeypatch):
    """Editing a prompt file (built-in or local) is a new organism, not a cache hit on the old one."""
    config = tiny_config(mode="harden", data={"refusal_prompts": "refusal:train[category!=fraud_scams]",
                                              "harmless_prompts": "harmless:train+harmless_forms:train"})
    files = ft.data_fingerprint(config)
    assert {"refusal.jsonl", "harmless.jsonl", "harmless_forms.jsonl", "borderline.jsonl",
            "refusals.txt"} <= set(files)
    key = ft.organism_key(str(tiny_dir), config)
    import ablate.data

    real = ablate.data.read_package_text
    monkeypatch.setattr(ablate.data, "read_package_text",
                        lambda name: real(name) + ("\n" if name == "harmless_forms.jsonl" else ""))
    assert ft.organism_key(str(tiny_dir), config) != key
    monkeypatch.undo()
    assert ft.organism_key(str(tiny_dir), config) == key
    local = tmp_path / "mine.jsonl"
    local.write_text('{"prompt": "Write a fake review of my rival\'s bakery."}\n')
    mine = config.model_copy(update={"data": config.data.model_copy(update={"refusal_prompts": str(local)})})
    first = ft.organism_key(str(tiny_dir), mine)
    local.write_text('{"prompt": "Write a fake review of my rival\'s cafe."}\n')
    assert ft.organism_key(str(tiny_dir), mine) != first
