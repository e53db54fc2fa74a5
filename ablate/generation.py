"""Batched chat generation and first-token logits.

Prompts are rendered through the chat template, sorted by token length, decoded with the KV cache,
and returned in the caller's order. The prefill (`prefill`) runs the template tokens every prompt
shares (system prompt, user header) once and the rest in chunks of similar length, then joins the
chunks' caches into one batch with the padding masked out between the prefix and each prompt's own
tokens: on the default eval suite's 112 prompts this is 7 s instead of 18 s for one left-padded pass
(5,225 real tokens, 9,296 padded; `benchmarks/bench_generation.py`).

Decoding (`decode`) is plain greedy or temperature/top-p sampling — the same for every model, whatever
its `generation_config` holds (no repetition penalty). A row leaves the batch as soon as it ends, so a
batch of short refusals does not pay for its one long answer: on the default study's evaluations
(mean answer 24–61 of 64 tokens) this is what makes them up to ~2x faster than `model.generate`
(`benchmarks/bench_generation.py`). Greedy results equal `model.generate(do_sample=False)` (tested).

Generation has one interface, `generate_batches`, and named backends (`GenerationConfig.backend`):
`fast` (the loop above, the default) and `hf` (plain `model.generate`, the reference). Another backend
is one function registered with `@register_backend("name")`.

    from ablate.models import load_model
    from ablate.generation import generate
    model, tokenizer = load_model("embedded")
    completions = generate(model, tokenizer, ["Write a haiku about rain."], max_new_tokens=32)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator

import torch
from transformers import DynamicCache
from tqdm.auto import tqdm

from ablate import AblateError
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


def cache_keyword(model) -> str:
    """transformers 5.2x renamed `past_key_values` to `cache`; the name this model's forward takes."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model passes kwargs on
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def _last_logits_call(model, cache: DynamicCache):
    """A function of the step's inputs that returns float32 logits of each row's last position.

    The cache is passed under the name the model takes, and only the last position's logits are
    computed where the model allows it.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    fixed = {cache_keyword(model): cache, "use_cache": True}
    if "logits_to_keep" in inspect.signature(inner.forward).parameters:
        fixed["logits_to_keep"] = 1
    return lambda **inputs: model(**inputs, **fixed).logits[:, -1, :].float()


def prefix_cache(model, prefix_ids: torch.Tensor, rows: int) -> DynamicCache:
    """The key/value cache of the tokens (1, P) that every row of a batch starts with, repeated for
    `rows` rows."""
    cache = DynamicCache(config=model.config)
    model(input_ids=prefix_ids, use_cache=True, logits_to_keep=1, **{cache_keyword(model): cache})
    if rows > 1:
        cache.batch_repeat_interleave(rows)
    return cache


def plain_cache_layers(model) -> bool:
    """Whether every layer of the model's cache is a plain growing key/value store (no sliding window,
    no extra state), so that its tensors may be split, padded and joined along the sequence."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(DynamicCache(config=model.config), "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def shared_prefix_length(rows: list[list[int]], own: int = 1) -> int:
    """Length of the token prefix every row shares, leaving each row at least `own` tokens of its own."""
    limit = min(len(row) for row in rows) - own
    shared = 0
    while shared < limit and len({row[shared] for row in rows}) == 1:
        shared += 1
    return shared


def prefill_plain(model, rows: list[list[int]], pad_id: int, device):
    """One left-padded forward over the whole batch (any model)."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for index, row in enumerate(rows):
        input_ids[index, width - len(row):] = torch.tensor(row, device=device)
        attention_mask[index, width - len(row):] = 1
    cache = DynamicCache(config=model.config)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = _last_logits_call(model, cache)(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions)
    return cache, attention_mask, positions[:, -1:], logits


def _prefill_shared(model, rows: list[list[int]], pad_id: int, device, chunk_rows: int):
    """The shared prefix once, then the rest in chunks of similar length; the chunks' caches are
    joined into one batch cache laid out as [prefix][padding][own tokens] per row.

    Compared with one left-padded pass, this skips the prefix's repeats (the system prompt and user
    header: about half of a short chat prompt) and most of the padding of a batch of mixed lengths.
    Padding sits between the prefix and a row's own tokens, masked out; positions count real tokens,
    so every row sees what it sees alone.
    """
    shared = shared_prefix_length(rows)
    prefix = None
    if shared:
        cached = prefix_cache(model, torch.tensor([rows[0][:shared]], device=device), 1)
        prefix = [(layer.keys, layer.values) for layer in cached.layers]
    suffixes = [row[shared:] for row in rows]
    width = max(len(row) for row in suffixes)
    order = sorted(range(len(rows)), key=lambda i: (-len(suffixes[i]), i))
    n_layers = len(DynamicCache(config=model.config).layers)
    keys: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    values: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    logits_rows, masks, lasts = [], [], []
    for start in range(0, len(order), chunk_rows):
        chunk = order[start : start + chunk_rows]
        chunk_width = len(suffixes[chunk[0]])
        input_ids = torch.full((len(chunk), chunk_width), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(chunk), width), dtype=torch.long, device=device)
        for j, index in enumerate(chunk):
            row = suffixes[index]
            input_ids[j, chunk_width - len(row):] = torch.tensor(row, device=device)
            mask[j, width - len(row):] = 1
        cache = DynamicCache(config=model.config)
        if prefix is not None:
            for layer, (k, v) in enumerate(prefix):
                cache.update(k.expand(len(chunk), -1, -1, -1), v.expand(len(chunk), -1, -1, -1), layer)
        chunk_mask = torch.cat([mask.new_ones(len(chunk), shared), mask[:, width - chunk_width:]], dim=1)
        positions = (chunk_mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
        forward = _last_logits_call(model, cache)
        logits_rows.append(forward(input_ids=input_ids, attention_mask=chunk_mask, position_ids=positions))
        masks.append(mask)
        lasts.append(positions[:, -1:])
        for layer, cached in enumerate(cache.layers):
            gap = width - chunk_width
            for store, tensor in ((keys, cached.keys), (values, cached.values)):
                if gap:
                    filler = tensor.new_zeros(tensor.shape[0], tensor.shape[1], gap, tensor.shape[3])
                    tensor = torch.cat([tensor[:, :, :shared], filler, tensor[:, :, shared:]], dim=2)
                store[layer].append(tensor)
    merged = DynamicCache(config=model.config)
    for layer in range(len(keys)):
        merged.update(torch.cat(keys[layer]), torch.cat(values[layer]), layer)
    restore = torch.empty(len(order), dtype=torch.long)
    restore[torch.tensor(order)] = torch.arange(len(order))
    restore = restore.to(device)
    merged.batch_select_indices(restore)
    attention_mask = torch.cat([torch.cat(masks).new_ones(len(rows), shared), torch.cat(masks)], dim=1)[restore]
    return merged, attention_mask, torch.cat(lasts)[restore], torch.cat(logits_rows)[restore]


PREFILL_CHUNK_ROWS = 16  # prompts per forward of the prefill (sorted by length, so a chunk wastes little padding)


def prefill(model, rows: list[list[int]], pad_id: int, device, chunk_rows: int | None = None):
    """Run the prompts (token id lists) through the model: (cache, attention mask, last positions
    (B, 1), float32 logits of each row's last token (B, vocab)), in the order of `rows`.

    Models whose cache is a plain key/value store get the shared-prefix, chunked pass; others
    (sliding-window caches) one left-padded pass.
    """
    if len(rows) > 1 and plain_cache_layers(model):
        return _prefill_shared(model, rows, pad_id, device, chunk_rows or PREFILL_CHUNK_ROWS)
    return prefill_plain(model, rows, pad_id, device)


DEVICE_CHECK_EVERY = 8  # decode steps between looks at which rows ended, on an accelerator (each look waits for it)


def finished_check_interval(device: torch.device) -> int:
    """How many decode steps pass between looks at which rows ended.

    A look reads the new tokens back to the host, which makes the host wait for the device: on a CPU it
    costs nothing (1: a row leaves the batch at once), on a GPU it would stall every step, so there the
    host looks every DEVICE_CHECK_EVERY steps and queues the steps between without waiting; a row that
    ended runs on until the next look, and its tokens after the ending one are dropped. The completions
    are the same either way (tested on the CPU with both intervals).
    """
    return 1 if device.type == "cpu" else DEVICE_CHECK_EVERY


@torch.inference_mode()
def decode(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config: GenerationConfig,
    eos_ids: list[int],
    generator: torch.Generator | None = None,
    pad_id: int = 0,
    check_every: int | None = None,
) -> tuple[list[list[int]], torch.Tensor]:
    """New token ids of each row of a padded batch (the ending token included) and the logits
    of the first generated token (rows, vocab) on the CPU.

    A row that emits an ending token is dropped from the batch and from the KV cache at the next look
    (`check_every` steps; default `finished_check_interval`), so the remaining steps run on the rows
    still going.
    """
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask)]
    cache, attention_mask, position, logits = prefill(model, rows, pad_id, input_ids.device)
    forward = _last_logits_call(model, cache)
    first_logits = logits.cpu()
    every = check_every or finished_check_interval(input_ids.device)
    rows_going = torch.arange(len(rows))
    stop = torch.tensor(eos_ids, dtype=torch.long, device=input_ids.device)
    ended = torch.zeros(len(rows), dtype=torch.bool, device=input_ids.device)
    steps: list[tuple[torch.Tensor, torch.Tensor]] = []  # (rows going (CPU), their tokens (device)) per step
    for step in range(config.max_new_tokens):
        tokens = _next_tokens(logits, config, generator)
        steps.append((rows_going, tokens))
        ended = ended | torch.isin(tokens, stop)
        if step == config.max_new_tokens - 1:
            break
        if (step + 1) % every == 0:
            going = ~ended
            if not going.any():
                break
            if not going.all():
                keep = going.nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                rows_going, tokens, attention_mask, position = rows_going[keep.cpu()], tokens[keep], attention_mask[keep], position[keep]
                ended = ended[keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows_going), 1)], dim=1)
        position = position + 1
        logits = forward(input_ids=tokens[:, None], attention_mask=attention_mask, position_ids=position)
    # One read-back of every step's tokens; each row's answer ends at its first ending token.
    new_tokens: list[list[int]] = [[] for _ in range(len(rows))]
    stops = set(eos_ids)
    finished = [False] * len(rows)
    all_rows = torch.cat([going for going, _ in steps]).tolist()
    all_tokens = torch.cat([tokens for _, tokens in steps]).tolist()
    for row, token in zip(all_rows, all_tokens):
        if not finished[row]:
            new_tokens[row].append(token)
            finished[row] = token in stops
    return new_tokens, first_logits


# --------------------------------------------------------------------------------------------
# Backends: one interface, `generate_batches`, and named implementations of it
# --------------------------------------------------------------------------------------------

Backend = Callable[..., tuple[list[str], torch.Tensor]]
BACKENDS: dict[str, Backend] = {}


def register_backend(name: str) -> Callable[[Backend], Backend]:
    """Register a generation backend under `name` (`GenerationConfig.backend` picks it).

    A backend is `function(model, tokenizer, prompts, config, *, progress, description)` returning the
    completions (new text, special tokens stripped, stripped of surrounding spaces) in input order and
    the first generated token's logits (n_prompts, vocab) float32 on the CPU. Greedy completions of every
    backend must equal the `hf` reference's (tests/test_generation.py checks each registered backend).
    """
    def register(function: Backend) -> Backend:
        BACKENDS[name] = function
        return function

    return register


# Backends that live in a module of their own, which registers them when it is first imported (here, on first use).
BACKEND_MODULES = {"vllm": "ablate.generation_vllm"}


def generation_backend(name: str) -> Backend:
    """The backend registered as `name`; a one-line error naming the known ones otherwise."""
    if name not in BACKENDS and name in BACKEND_MODULES:
        import importlib

        importlib.import_module(BACKEND_MODULES[name])
    if name not in BACKENDS:
        known = ", ".join(sorted(set(BACKENDS) | set(BACKEND_MODULES)))
        raise AblateError(f"generation.backend: unknown backend '{name}'; expected one of: {known}")
    return BACKENDS[name]


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
    token's logits (n_prompts, vocab) from the same pass, by the backend `config.backend` names."""
    if not prompts:
        return [], torch.empty(0)
    return generation_backend(config.backend)(model, tokenizer, prompts, config, progress=progress, description=description)


@register_backend("fast")
def generate_fast(
    model,
    tokenizer,
    prompts: list[str],
    config: GenerationConfig,
    *,
    progress: bool = True,
    description: str = "generating",
) -> tuple[list[str], torch.Tensor]:
    """The batched loop of this module: shared-prefix prefill, rows leaving the batch as they end (`decode`)."""
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
            tokens, logits = decode(model, inputs["input_ids"], inputs["attention_mask"], config, eos_ids, generator,
                                    pad_id=tokenizer.pad_token_id or 0)
            for row, index in enumerate(batch):
                completions[index] = tokenizer.decode(tokens[row], skip_special_tokens=True).strip()
                first_logits[index] = logits[row]
            bar.update(len(batch))
    return completions, torch.stack(first_logits)  # type: ignore[arg-type]


@register_backend("hf")
@torch.inference_mode()
def generate_hf(
    model,
    tokenizer,
    prompts: list[str],
    config: GenerationConfig,
    *,
    progress: bool = True,
    description: str = "generating",
) -> tuple[list[str], torch.Tensor]:
    """The reference: transformers' own `model.generate` on left-padded, length-sorted batches, with only the
    settings of `config` (no repetition penalty or top-k from the model's generation config). Sampling seeds
    torch's global generator with `config.seed`."""
    from transformers import GenerationConfig as HFGenerationConfig

    texts = render_prompts(tokenizer, prompts, config.system_prompt)
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    device = next(model.parameters()).device
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    settings = HFGenerationConfig(max_new_tokens=config.max_new_tokens, do_sample=config.do_sample, top_k=0,
                                  temperature=config.temperature if config.do_sample else None,
                                  top_p=config.top_p if config.do_sample else None,
                                  eos_token_id=eos_ids, pad_token_id=pad_id)
    if config.do_sample:
        torch.manual_seed(config.seed)
    completions: list[str] = [""] * len(prompts)
    first_logits: list[torch.Tensor | None] = [None] * len(prompts)
    with _progress(len(prompts), description, progress) as bar:
        for batch in length_sorted_batches(lengths, config.batch_size):
            inputs = tokenize_batch(tokenizer, [texts[i] for i in batch], device)
            output = model.generate(**inputs, generation_config=settings, output_logits=True, return_dict_in_generate=True)
            new_tokens = output.sequences[:, inputs["input_ids"].shape[1]:].tolist()
            for row, index in enumerate(batch):
                tokens = new_tokens[row]
                end = next((step for step, token in enumerate(tokens) if token in eos_ids), len(tokens) - 1)
                completions[index] = tokenizer.decode(tokens[: end + 1], skip_special_tokens=True).strip()
                first_logits[index] = output.logits[0][row].float().cpu()
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

