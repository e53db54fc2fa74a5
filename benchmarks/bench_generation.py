"""Evaluation decoding: `ablate.generation.decode` (rows leave the batch when they end) against
transformers' `model.generate` (the whole batch runs to the longest answer), in one process.

    python benchmarks/bench_generation.py                       # the embedded model
    python benchmarks/bench_generation.py --model ORGANISM_DIR  # e.g. a hardened organism

The prompts are the default eval suite's (64 refusal + 24 harmless + 24 borderline test prompts,
seeded draw), greedy, the suite's new tokens (48) — what every variant of the default study generates. Four runs:
`model.generate` at the old suite batch size (32), `decode` at the same batch size (the gain from
dropping finished rows alone), `decode` at the suite's batch size (128: all prompts in one batch) with
one left-padded prefill pass, and the same with the shared-prefix, chunked prefill that `decode` uses.
Prints wall seconds, ratios against the first, the mean answer length, and how many completions
differ from the baseline's (greedy: expected 0, up to float ties).
"""

from __future__ import annotations

import argparse
import time

import torch

from ablate.evaluate.run import load_suite
from ablate.data import load_prompt_set
import ablate.generation
from ablate.generation import generate, length_sorted_batches, prefill_plain, render_prompts, tokenize_batch
from ablate.models import load_model


@torch.inference_mode()
def transformers_generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """The baseline: the same batches through `model.generate`."""
    texts = render_prompts(tokenizer, prompts)
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    outputs = [""] * len(prompts)
    for batch in length_sorted_batches(lengths, batch_size):
        inputs = tokenize_batch(tokenizer, [texts[i] for i in batch], torch.device("cpu"))
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                   top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)
        for index, tokens in zip(batch, generated[:, inputs["input_ids"].shape[1]:]):
            outputs[index] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--suite", default="default")
    parser.add_argument("--baseline-batch", type=int, default=32, help="batch size of the transformers baseline")
    args = parser.parse_args()
    suite = load_suite(args.suite)
    prompts: list[str] = []
    for section in (suite.refusal, suite.harmless, suite.borderline):
        prompts += load_prompt_set(section.set).sample(section.n, seed=suite.seed).prompts
    model, tokenizer = load_model(args.model)
    config = suite.generation
    tick = time.perf_counter()
    baseline = transformers_generate(model, tokenizer, prompts, config.max_new_tokens, args.baseline_batch)
    baseline_s = time.perf_counter() - tick
    mean_tokens = sum(len(tokenizer(text)["input_ids"]) for text in baseline) / len(baseline)
    print(f"model {args.model}: {len(prompts)} prompts, {config.max_new_tokens} new tokens, mean answer "
          f"{mean_tokens:.1f} tokens, {torch.get_num_threads()} threads")
    print(f"{'transformers generate':<22} batch {args.baseline_batch:<4}{baseline_s:8.1f} s")
    shared_prefill = ablate.generation.prefill
    plain_prefill = lambda model, rows, pad_id, device, chunk_rows=None: prefill_plain(model, rows, pad_id, device)  # noqa: E731
    runs = [("decode, padded prefill", args.baseline_batch, plain_prefill),
            ("decode, padded prefill", config.batch_size, plain_prefill),
            ("decode, shared prefill", config.batch_size, shared_prefill)]
    for label, batch_size, prefill in runs:
        ablate.generation.prefill = prefill
        try:
            tick = time.perf_counter()
            ours = generate(model, tokenizer, prompts, config, progress=False, batch_size=batch_size)
            seconds = time.perf_counter() - tick
        finally:
            ablate.generation.prefill = shared_prefill
        differ = sum(a != b for a, b in zip(baseline, ours))
        print(f"{label:<22} batch {batch_size:<4}{seconds:8.1f} s  {baseline_s / seconds:5.2f}x faster, "
              f"{differ} of {len(prompts)} completions differ")


if __name__ == "__main__":
    main()
