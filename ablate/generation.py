"""Batched chat generation and first-token logits.

Prompts are rendered through the chat template, sorted by token length (so a batch wastes little
padding), left-padded (so every prompt ends at the same position and generation appends on the
right), generated with the KV cache, and returned in the caller's order.

    from ablate.models import load_model
    from ablate.generation import generate
    model, tokenizer = load_model("embedded")
    completions = generate(model, tokenizer, ["Write a haiku about rain."], max_new_tokens=32)
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from ablate.config import GenerationConfig
from ablate.models import format_chat


def render_prompts(tokenizer, prompts: list[str], system: str | None = None) -> list[str]:
    """Each prompt as chat-template text that ends where the assistant starts."""
    return [format_chat(tokenizer, prompt, system=system) for prompt in prompts]


def length_sorted_batches(lengths: list[int], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped into batches of similar length, longest first (peak memory shows up early)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def tokenize_batch(tokenizer, texts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """Left-padded token ids and attention mask; chat text already holds any special tokens."""
    tokenizer.padding_side = "left"
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return {key: value.to(device) for key, value in encoded.items()}


def _progress(total: int, description: str, enabled: bool):
    return tqdm(total=total, desc=description, unit="prompt", disable=not enabled or total == 0, leave=False)


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    config: GenerationConfig | None = None,
    *,
    progress: bool = True,
    description: str = "generating",
    **overrides,
) -> list[str]:
    """Completions (new text only, special tokens stripped) for each prompt, in input order.

    `config` fields can be overridden by keyword, e.g. `generate(m, t, prompts, max_new_tokens=32)`.
    """
    config = (config or GenerationConfig()).model_copy(update=overrides)
    if not prompts:
        return []
    texts = render_prompts(tokenizer, prompts, config.system_prompt)
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    device = next(model.parameters()).device
    outputs: list[str | None] = [None] * len(prompts)
    generator_kwargs = dict(max_new_tokens=config.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    if config.do_sample:
        generator_kwargs.update(do_sample=True, temperature=config.temperature, top_p=config.top_p, top_k=0)
        torch.manual_seed(config.seed)
    else:
        generator_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    with _progress(len(prompts), description, progress) as bar:
        for batch in length_sorted_batches(lengths, config.batch_size):
            inputs = tokenize_batch(tokenizer, [texts[i] for i in batch], device)
            generated = model.generate(**inputs, **generator_kwargs)
            new_tokens = generated[:, inputs["input_ids"].shape[1] :]
            for index, tokens in zip(batch, new_tokens):
                outputs[index] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            bar.update(len(batch))
    return outputs  # type: ignore[return-value]


@torch.inference_mode()
def last_position_logits(
    model,
    tokenizer,
    prompts: list[str],
    *,
    system: str | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> torch.Tensor:
    """Logits of the first generated token: shape (n_prompts, vocab), float32, on the CPU.

    One forward pass per batch; with left padding the last position is every prompt's last token.
    """
    texts = render_prompts(tokenizer, prompts, system)
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    device = next(model.parameters()).device
    result: list[torch.Tensor | None] = [None] * len(prompts)
    with _progress(len(prompts), "first-token logits", progress) as bar:
        for batch in length_sorted_batches(lengths, batch_size):
            inputs = tokenize_batch(tokenizer, [texts[i] for i in batch], device)
            logits = model(**inputs).logits[:, -1, :].float().cpu()
            for index, row in zip(batch, logits):
                result[index] = row
            bar.update(len(batch))
    return torch.stack(result)  # type: ignore[arg-type]
