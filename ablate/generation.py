"""Batched chat generation and first-token logits.

Prompts are rendered through the chat template, sorted by token length (so a batch wastes little
padding), left-padded (so every prompt ends at the same position and generation appends on the
right), decoded with the KV cache, and returned in the caller's order.

Decoding (`decode`) is plain greedy or temperature/top-p sampling — the same for every model, whatever
its `generation_config` holds (no repetition penalty). A row leaves the batch as soon as it ends, so a
batch of short refusals does not pay for its one long answer: on the default study's evaluations
(mean answer 24–61 of 64 tokens) this is what makes them up to ~2x faster than `model.generate`
(`benchmarks/bench_generation.py`). Greedy results equal `model.generate(do_sample=False)` (tested).

    from ablate.models import load_model
    from ablate.generation import generate
    model, tokenizer = load_model("embedded")
    completions = generate(model, tokenizer, ["Write a haiku about rain."], max_new_tokens=32)
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import torch
from transformers import DynamicCache
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


def eos_token_ids(model, tokenizer) -> list[int]:
    """Token ids that end an answer: the model's generation config's and the tokenizer's EOS."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, (list, tuple)) else [configured]
    return sorted({int(i) for i in [*ids, tokenizer.eos_token_id] if i is not None})


def _next_tokens(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Greedy argmax, or a sample after temperature and nucleus (top-p) filtering."""
    if not config.do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / config.temperature, dim=-1)
    if config.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > config.top_p  # the top token always stays
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)


def _last_logits_call(model, cache: DynamicCache):
    """A function of the step's inputs that returns float32 logits of each row's last position.

    transformers 5.2x renamed `past_key_values` to `cache`; either is passed, as the model takes it,
    and only the last position's logits are computed where the model allows it.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model passes kwargs on
    parameters = inspect.signature(inner.forward).parameters
    fixed = {"cache" if "cache" in parameters else "past_key_values": cache, "use_cache": True}
    if "logits_to_keep" in parameters:
        fixed["logits_to_keep"] = 1
    return lambda **inputs: model(**inputs, **fixed).logits[:, -1, :].float()


@torch.inference_mode()
def decode(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config: GenerationConfig,
    eos_ids: list[int],
    generator: torch.Generator | None = None,
) -> tuple[list[list[int]], torch.Tensor]:
    """New token ids of each row of a left-padded batch (the ending token included) and the logits
    of the first generated token (rows, vocab) on the CPU.

    A row that emits an ending token is dropped from the batch and from the KV cache, so the
    remaining steps run on the rows still going.
    """
    cache = DynamicCache(config=model.config)
    forward = _last_logits_call(model, cache)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions)
    first_logits = logits.cpu()
    new_tokens: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    rows = torch.arange(input_ids.shape[0])
    position = positions[:, -1:]
    stop = torch.tensor(eos_ids, dtype=torch.long, device=input_ids.device)
    for step in range(config.max_new_tokens):
        tokens = _next_tokens(logits, config, generator)
        for row, token in zip(rows.tolist(), tokens.tolist()):
            new_tokens[row].append(token)
        going = ~torch.isin(tokens, stop)
        if step == config.max_new_tokens - 1 or not going.any():
            break
        if not going.all():
            keep = going.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, tokens, attention_mask, position = rows[keep.cpu()], tokens[keep], attention_mask[keep], position[keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=1)
        position = position + 1
        logits = forward(input_ids=tokens[:, None], attention_mask=attention_mask, position_ids=position)
    return new_tokens, first_logits


def generate_batches(
    model,
    tokenizer,
    prompts: list[str],
    config: GenerationConfig,
    *,
    progress: bool = True,
    description: str = "generating",
) -> tuple[list[str], torch.Tensor]:
    """Completions (new text, special tokens stripped) in input order, and the first generated
    token's logits (n_prompts, vocab) from the same pass."""
    if not prompts:
        return [], torch.empty(0)
    texts = render_prompts(tokenizer, prompts, config.system_prompt)
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    device = next(model.parameters()).device
    eos_ids = eos_token_ids(model, tokenizer)
    generator = torch.Generator().manual_seed(config.seed) if config.do_sample else None
    completions: list[str] = [""] * len(prompts)
    first_logits: list[torch.Tensor | None] = [None] * len(prompts)
    with _progress(len(prompts), description, progress) as bar:
        for batch in length_sorted_batches(lengths, config.batch_size):
            inputs = tokenize_batch(tokenizer, [texts[i] for i in batch], device)
            tokens, logits = decode(model, inputs["input_ids"], inputs["attention_mask"], config, eos_ids, generator)
            for row, index in enumerate(batch):
                completions[index] = tokenizer.decode(tokens[row], skip_special_tokens=True).strip()
                first_logits[index] = logits[row]
            bar.update(len(batch))
    return completions, torch.stack(first_logits)  # type: ignore[arg-type]


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
    return generate_batches(model, tokenizer, prompts, config, progress=progress, description=description)[0]


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
