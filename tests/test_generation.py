import torch

from ablate.config import GenerationConfig
import ablate.generation
from ablate.generation import (decode, generate, last_position_logits, length_sorted_batches, prefill, render_prompts,
                              shared_prefix_length, tokenize_batch)

PROMPTS = [
    "Hi",
    "Explain how photosynthesis works in simple terms, please, with an example.",
    "Write a poem.",
    "List three tips for studying for an exam next week.",
    "Translate good morning.",
]


def test_length_sorted_batches_cover_every_index_once():
    lengths = [5, 1, 9, 3, 7, 2]
    batches = list(length_sorted_batches(lengths, 4))
    assert sorted(i for batch in batches for i in batch) == list(range(6))
    assert [lengths[i] for i in batches[0]] == [9, 7, 5, 3]


def test_batched_greedy_equals_unbatched_and_keeps_order(tiny_models, tokenizer):
    for family in ("llama", "gpt2", "qwen2"):
        model = tiny_models[family]
        batched = generate(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=5, progress=False)
        single = [generate(model, tokenizer, [p], max_new_tokens=8, batch_size=1, progress=False)[0] for p in PROMPTS]
        assert batched == single, family


def test_sampling_is_seeded(tiny_models, tokenizer):
    model = tiny_models["llama"]
    first = generate(model, tokenizer, PROMPTS, max_new_tokens=8, do_sample=True, seed=3, progress=False)
    second = generate(model, tokenizer, PROMPTS, max_new_tokens=8, do_sample=True, seed=3, progress=False)
    assert first == second


def test_last_position_logits_match_unpadded_forward(tiny_models, tokenizer):
    from ablate.generation import render_prompts

    model = tiny_models["llama"]
    logits = last_position_logits(model, tokenizer, PROMPTS, batch_size=3)
    assert logits.shape == (len(PROMPTS), len(tokenizer))
    for index, text in enumerate(render_prompts(tokenizer, PROMPTS)):
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            expected = model(ids).logits[0, -1]
        assert torch.allclose(logits[index], expected, atol=1e-4)


def test_first_generated_token_is_argmax_of_last_position_logits(tiny_models, tokenizer):
    model = tiny_models["qwen2"]
    logits = last_position_logits(model, tokenizer, PROMPTS)
    completions = generate(model, tokenizer, PROMPTS, max_new_tokens=1, progress=False)
    for row, completion in zip(logits, completions):
        expected = tokenizer.decode([int(row.argmax())], skip_special_tokens=True).strip()
        assert completion == expected


def test_decode_drops_finished_rows_and_equals_model_generate(tiny_models, tokenizer):
    """Rows leave the batch when they emit an ending token; every row's tokens stay those of
    transformers' own greedy generate, which keeps the whole batch to the end."""
    config = GenerationConfig(max_new_tokens=10)
    for family in ("llama", "gpt2", "qwen2", "gemma2", "phi3"):
        model = tiny_models[family]
        inputs = tokenize_batch(tokenizer, render_prompts(tokenizer, PROMPTS), torch.device("cpu"))
        width = inputs["input_ids"].shape[1]
        with torch.no_grad():
            free = model.generate(**inputs, max_new_tokens=10, do_sample=False, eos_token_id=None,
                                  pad_token_id=tokenizer.pad_token_id)[:, width:]
        # End tokens that stop some rows early (at different steps) and not others.
        stop = sorted({int(free[0, 2]), int(free[3, 5])})
        tokens, first_logits = decode(model, inputs["input_ids"], inputs["attention_mask"], config, stop)
        expected = []
        for row in free.tolist():
            ends = [step for step, token in enumerate(row) if token in stop]
            expected.append(row[: ends[0] + 1] if ends else row)
        assert tokens == expected, family
        # A GPU looks at which rows ended every few steps (no wait on the device each step): the same answers.
        for every in (3, 20):
            assert decode(model, inputs["input_ids"], inputs["attention_mask"], config, stop, check_every=every)[0] == expected, (family, every)
        assert len(tokens[0]) <= 3 and len(tokens[3]) <= 6
        assert any(len(row) == 10 for row in tokens) or all(len(row) < 10 for row in expected)
        assert torch.equal(first_logits.argmax(-1), free[:, 0])


def test_nucleus_sampling_with_a_tiny_top_p_is_greedy(tiny_models, tokenizer):
    """top-p keeps the most likely token always; with top_p → 0 it is the only one left."""
    model = tiny_models["llama"]
    greedy = generate(model, tokenizer, PROMPTS, max_new_tokens=6, progress=False)
    nucleus = generate(model, tokenizer, PROMPTS, max_new_tokens=6, do_sample=True, top_p=1e-6, seed=1, progress=False)
    sampled = generate(model, tokenizer, PROMPTS, max_new_tokens=6, do_sample=True, temperature=5.0, seed=1, progress=False)
    assert nucleus == greedy
    assert sampled != greedy


def test_shared_prefix_chunked_prefill_matches_each_prompt_alone(tiny_models, tokenizer):
    """The prefix runs once, chunks of 2 rows are joined into one cache with padding in the middle:
    first-token logits and the next step's logits equal each prompt's own unpadded forward."""
    texts = render_prompts(tokenizer, PROMPTS)
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    shared = shared_prefix_length(rows)
    assert 0 < shared < min(len(row) for row in rows)
    for family in ("llama", "gpt2", "phi3"):
        model = tiny_models[family]
        with torch.no_grad():
            cache, mask, last, logits = prefill(model, rows, tokenizer.pad_token_id, torch.device("cpu"), chunk_rows=2)
            assert mask.shape[0] == len(rows) and mask.sum(1).tolist() == [len(row) for row in rows]
            assert last.squeeze(1).tolist() == [len(row) - 1 for row in rows]
            assert mask[:, :shared].all()  # padding sits after the shared prefix
            nxt = logits.argmax(-1)
            step_mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            step = model(input_ids=nxt[:, None], attention_mask=step_mask, position_ids=last + 1,
                         **{ablate.generation.cache_keyword(model): cache},
                         use_cache=True).logits[:, -1]
            for index, row in enumerate(rows):
                alone = model(torch.tensor([row + [int(nxt[index])]])).logits[0]
                assert torch.allclose(logits[index], alone[-2], atol=1e-4), family
                assert torch.allclose(step[index], alone[-1], atol=1e-4), family


def test_batched_greedy_equals_unbatched_across_prefill_chunks(tiny_models, tokenizer, monkeypatch):
    monkeypatch.setattr(ablate.generation, "PREFILL_CHUNK_ROWS", 2)
    for family in ("llama", "mistral", "gemma"):
        model = tiny_models[family]
        batched = generate(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=5, progress=False)
        single = [generate(model, tokenizer, [p], max_new_tokens=8, batch_size=1, progress=False)[0] for p in PROMPTS]
        assert batched == single, family


def test_every_backend_equals_the_hf_reference_on_greedy_completions(tiny_models, tokenizer):
    """Each registered generation backend gives `model.generate`'s greedy completions and first-token logits."""
    from ablate.generation import BACKENDS, generate_batches

    assert {"fast", "hf"} <= set(BACKENDS)
    for family in ("llama", "gpt2"):
        model = tiny_models[family]
        config = GenerationConfig(max_new_tokens=8, batch_size=3, backend="hf")
        reference, reference_logits = generate_batches(model, tokenizer, PROMPTS, config, progress=False)
        for name in sorted(set(BACKENDS) - {"hf", "vllm"}):  # vllm: tests/test_generation_vllm.py (a CUDA GPU)
            completions, logits = generate_batches(model, tokenizer, PROMPTS, config.model_copy(update={"backend": name}),
                                                   progress=False)
            assert completions == reference, (family, name)
            assert torch.allclose(logits, reference_logits, atol=1e-4), (family, name)


def test_an_unknown_backend_is_a_one_line_error(tiny_models, tokenizer):
    import pytest

    from ablate import AblateError

    with pytest.raises(AblateError, match="generation.backend: unknown backend 'nope'; expected one of: .*fast.*hf"):
        generate(tiny_models["llama"], tokenizer, PROMPTS, backend="nope", progress=False)
