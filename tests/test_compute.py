"""One compute axis on tiny random models: the counted FLOPs are the formula's (2·N·T forward, 2·N·T backward
to the activations, 6·N·T / 4·N·T + 6·N_lora·T training), the direction stage records its compute, and an
attack whose answers a donor writes is charged for them and for the donor's own direction stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ablate import finetune as ft
from ablate.compute import attack_compute, count_flops, generation_flops, matmul_weights
from ablate.config import FinetuneConfig, validate_config


def test_a_forward_pass_counts_two_n_t_and_a_backward_pass_two_n_t_more(llama, tokenizer):
    inputs = tokenizer(["Write a poem about the sea.", "Explain photosynthesis."], return_tensors="pt", padding=True)
    B, T = inputs["input_ids"].shape
    N = matmul_weights(llama)
    assert N == ft.matmul_parameters(llama) > 0
    with torch.no_grad(), count_flops(llama) as counted:
        llama(**inputs)
    assert counted.forward_flops == 2 * N * B * T and counted.backward_flops == 0
    assert counted.forward_positions == B * T
    # Gradients flowing back to the activations (the direction stage's screen): one backward pass more.
    embeddings = llama.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_(True)
    with count_flops(llama) as counted:
        llama(inputs_embeds=embeddings, attention_mask=inputs["attention_mask"]).logits.sum().backward()
    assert counted.forward_flops == 2 * N * B * T and counted.backward_flops == 2 * N * B * T
    # The output head on the last position only: the head's weights count once per row, not per position.
    head = matmul_weights(llama.lm_head)
    with torch.no_grad(), count_flops(llama) as counted:
        llama(**inputs, logits_to_keep=1)
    assert counted.forward_flops == 2 * (N - head) * B * T + 2 * head * B


def test_generation_is_counted_one_decoding_step_at_a_time(llama, tokenizer):
    from ablate.generation import generate

    N = matmul_weights(llama)
    with count_flops(llama) as counted:
        [answer] = generate(llama, tokenizer, ["Write a poem about the sea."], max_new_tokens=6, progress=False)
    from ablate.models import format_chat

    prompt = len(tokenizer(format_chat(tokenizer, "Write a poem about the sea."), add_special_tokens=False)["input_ids"])
    # The prompt once, then each new token but the last one through the KV cache; the output head only on each
    # pass's last position.
    new = counted.forward_positions - prompt
    head = matmul_weights(llama.lm_head)
    assert 0 <= new <= 6 and counted.backward_flops == 0
    assert counted.forward_flops == 2 * (N - head) * (prompt + new) + 2 * head * (new + 1)


def test_the_direction_stage_records_its_compute(tiny_dir, tmp_path):
    from ablate.compute import run_direction_counted
    from ablate.config import DirectionConfig
    from ablate.models import load_model

    model, tokenizer = load_model(str(tiny_dir))
    config = validate_config({"n_train": 4, "n_val": 4, "shortlist": 2, "refusal_token_prompts": 2,
                              "refusal_token_alternatives": 0, "strength_learning": {"steps": 1, "halving_steps": 1},
                              "compute_dtype": "model", "screen_prompts": 4, "prescore_prompts": None},
                             DirectionConfig, "<test>")
    run_direction_counted(model, tokenizer, config, tmp_path / "directions", progress=False)
    compute = json.loads((tmp_path / "directions" / "compute.json").read_text())
    assert compute["forward_flops"] > 0 and compute["backward_flops"] > 0  # the screen's gradients
    assert compute["flops"] == compute["forward_flops"] + compute["backward_flops"] and compute["wall_seconds"] > 0
    # A second call skips the finished stage and keeps the record of the run that did the work.
    run_direction_counted(model, tokenizer, config, tmp_path / "directions", progress=False)
    assert json.loads((tmp_path / "directions" / "compute.json").read_text()) == compute


def test_a_harmful_attack_is_charged_for_the_donors_answers_and_direction(tiny_dir, donor_dir, tmp_path, tokenizer):
    from ablate.data import load_prompt_set
    from ablate.models import format_chat, load_model

    config = validate_config({
        "mode": "harmful",
        "data": {"donor": str(donor_dir), "n_refusal": 6, "drop_refusals": False, "answer_max_new_tokens": 6,
                 "generation_batch_size": 8},
        "lora": {"rank": 4, "alpha": 8},
        "training": {"lr": 1e-2, "max_steps": 1, "batch_size": 2, "max_length": 512, "device": "cpu"},
        "budgets": [{"name": "n3", "n_examples": 3}],
        "eval": {"enabled": False},
    }, FinetuneConfig, "<test>")
    [metrics] = ft.run_finetune(str(tiny_dir), config, tmp_path / "attack", progress=False)
    compute = metrics["attack_compute"]
    prompts = load_prompt_set("refusal:train").sample(6, seed=0).prompts
    answers = ft.generate_answers(str(donor_dir), prompts, config, False, "check")
    prompt_tokens = sum(len(tokenizer(format_chat(tokenizer, p), add_special_tokens=False)["input_ids"]) for p in prompts)
    answer_tokens = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    n_donor = ft.matmul_parameters(load_model(str(donor_dir))[0])
    pool_answers = generation_flops(n_donor, prompt_tokens, answer_tokens)
    assert compute["donor_answers_flops"] == round(pool_answers * 3 / metrics["pool"])
    assert compute["train_flops"] == metrics["train_flops"] == ft.estimate_train_flops(
        metrics["matmul_parameters"], metrics["trainable_parameters"], metrics["train_tokens"], False)
    assert compute["flops"] == compute["train_flops"] + compute["donor_answers_flops"]
    assert compute["donor_answers_seconds"] > 0 and compute["wall_seconds"] > compute["train_seconds"]


def test_the_ablated_donors_direction_stage_is_charged_in_full():
    donor = {"answers_flops": 1000, "answers_seconds": 10.0,
             "direction": {"flops": 5000, "wall_seconds": 30.0}}
    compute = attack_compute({"train_flops": 200, "wall_seconds": 2.0}, donor, n_examples=4, pool=8)
    assert compute["donor_answers_flops"] == 500 and compute["donor_direction_flops"] == 5000
    assert compute["flops"] == 200 + 500 + 5000
    assert compute["wall_seconds"] == pytest.approx(2.0 + 5.0 + 30.0)
    # No donor (a dataset attack): training alone.
    assert attack_compute({"train_flops": 200, "wall_seconds": 2.0}, None, 4, 8)["flops"] == 200


def test_the_report_shows_the_direction_attacks_compute(tmp_path):
    from ablate.report import _attack_compute

    (tmp_path / "directions").mkdir()
    (tmp_path / "directions" / "compute.json").write_text(json.dumps({"flops": 1234, "wall_seconds": 5.0}))
    import pandas as pd

    assert _attack_compute(tmp_path, {"kind": "direction", "variant": "ablated"}, pd.DataFrame()) == \
        {"attack_flops": 1234, "attack_seconds": 5.0}
    budgets = pd.DataFrame([{"name": "n8", "train_flops": 10, "wall_seconds": 1.0,
                             "attack_compute": {"flops": 99, "wall_seconds": 3.0}}])
    assert _attack_compute(tmp_path, {"kind": "finetune", "variant": "lora-n8"}, budgets) == \
        {"attack_flops": 99, "attack_seconds": 3.0}
