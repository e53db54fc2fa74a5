"""How far a model drifted from a reference on harmless prompts: KL divergence and cross-entropy.

For each harmless prompt the reference model writes a greedy continuation of T tokens. Both models
then read prompt + continuation in one teacher-forced forward pass per batch, and at each position
t that predicts a continuation token we compare the next-token distributions:

    KL_t = Σ_v p_ref(v | x_<t) · (log p_ref(v | x_<t) − log p_model(v | x_<t))      (nats)

- `kl_first_token`:  KL at the first generated position (what refusal-direction papers report);
- `kl_continuation`: KL averaged over the T positions of the reference's own continuation, so a
  model that agrees on the first token but drifts afterwards is caught;
- `ce_reference_answers`: cross-entropy −(1/T) Σ_t log p_model(y_t | x_<t) of the reference's
  answer tokens y under the model (nats/token) — compare it with the reference's own value (a
  sharper model can score below it, so KL, not CE, is the drift measure).

All three are per-prompt values (averaged over tokens first), so their intervals are over prompts.
Both models must share a vocabulary (variants of one base model do).
"""

from __future__ import annotations

import weakref

import torch

from ablate import AblateError
from ablate.config import GenerationConfig
from ablate.generation import (cache_keyword, decode, eos_token_ids, length_sorted_batches, plain_cache_layers, prefix_cache,
                               render_prompts, shared_prefix_length, tokenize_batch)

# Reference continuations, and the reference's log-probabilities on them, are the same for every variant
# evaluated against one reference model; a study evaluates many variants in one process, so they are
# computed once per model object. The log-probabilities are (B, T+1, V) float32 per batch: kept while
# they total at most REFERENCE_LOG_PROBS_BYTES (16 prompts × 33 positions of a 49,152-token vocabulary:
# 104 MB), recomputed beyond it.
_CONTINUATIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_REFERENCE_LOG_PROBS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
REFERENCE_LOG_PROBS_BYTES = 1 << 30


def check_same_vocabulary(model, tokenizer, reference, reference_tokenizer) -> None:
    """KL needs one vocabulary: same logits width and the same ids for the same text."""
    width = model.get_output_embeddings().weight.shape[0]
    reference_width = reference.get_output_embeddings().weight.shape[0]
    probe = "The quick brown fox: 1, 2, 3. I'm sorry!"
    if width != reference_width or tokenizer(probe)["input_ids"] != reference_tokenizer(probe)["input_ids"]:
        raise AblateError(
            f"reference model has a different vocabulary (logits {reference_width} vs {width}); "
            "KL and cross-entropy need variants of the same base model"
        )


@torch.inference_mode()
def reference_continuations(
    reference, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16, progress: bool = True
) -> list[list[int]]:
    """The reference's greedy continuation of each prompt as token ids (up to and including EOS)."""
    key = (tuple(prompts), max_new_tokens)
    cache = _CONTINUATIONS.setdefault(reference, {})
    if key in cache:
        return cache[key]
    from tqdm.auto import tqdm

    texts = render_prompts(tokenizer, prompts)
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    device = next(reference.parameters()).device
    eos_ids = eos_token_ids(reference, tokenizer)
    greedy = GenerationConfig(max_new_tokens=max_new_tokens)
    result: list[list[int] | None] = [None] * len(prompts)
    with tqdm(total=len(prompts), desc="reference continuations", unit="prompt", disable=not progress, leave=False) as bar:
        for batch in length_sorted_batches(lengths, batch_size):
            inputs = tokenize_batch(tokenizer, [texts[i] for i in batch], device)
            tokens, _ = decode(reference, inputs["input_ids"], inputs["attention_mask"], greedy, eos_ids,
                               pad_id=tokenizer.pad_token_id or 0)
            for index, row in zip(batch, tokens):
                result[index] = row
            bar.update(len(batch))
    cache[key] = result
    return result  # type: ignore[return-value]


def prompt_answer_sequences(tokenizer, prompts: list[str], answers: list[list[int]]) -> list[list[int]]:
    """Each chat-rendered prompt's token ids followed by its answer's token ids."""
    prompt_ids = tokenizer(render_prompts(tokenizer, prompts), add_special_tokens=False)["input_ids"]
    return [list(p) + list(a) for p, a in zip(prompt_ids, answers)]


def teacher_forced_log_probs(model, batch_ids: list[list[int]], pad_id: int, device, keep_last: int) -> torch.Tensor:
    """Log-softmax over the vocabulary at the last `keep_last` positions of each sequence:
    (B, keep_last, V) float32 on the CPU (only those positions are needed, which saves memory).

    The tokens every sequence starts with (a chat template's system prompt and user header) run once
    and their cache is repeated for the batch; the rest is left-padded after them, masked out (models
    with a sliding-window cache run one left-padded pass instead). Position ids count real tokens only
    (as generation does), so a padded row sees the same positions as it would alone.
    """
    shared = 0
    if len(batch_ids) > 1 and plain_cache_layers(model):
        shared = shared_prefix_length(batch_ids, own=keep_last)
    rows = [ids[shared:] for ids in batch_ids]
    length = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), shared + length), dtype=torch.long)
    attention_mask[:, :shared] = 1
    for row, ids in enumerate(rows):
        input_ids[row, length - len(ids) :] = torch.tensor(ids)
        attention_mask[row, shared + length - len(ids) :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
    extra = {}
    if shared:
        cache = prefix_cache(model, torch.tensor([batch_ids[0][:shared]], device=device), len(rows))
        extra = {cache_keyword(model): cache, "use_cache": True}
    logits = model(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), position_ids=position_ids.to(device),
        logits_to_keep=keep_last, **extra,  # the output head runs only where it is needed
    ).logits[:, -keep_last:]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def reference_teacher_forced_log_probs(reference, batch_ids: list[list[int]], pad_id: int, device, keep_last: int) -> torch.Tensor:
    """`teacher_forced_log_probs` of the reference model, computed once per model object and batch."""
    stored = _REFERENCE_LOG_PROBS.setdefault(reference, {})
    key = (tuple(tuple(ids) for ids in batch_ids), pad_id, keep_last)
    if key not in stored:
        log_probs = teacher_forced_log_probs(reference, batch_ids, pad_id, device, keep_last)
        held = sum(value.numel() * value.element_size() for value in stored.values())
        if held + log_probs.numel() * log_probs.element_size() > REFERENCE_LOG_PROBS_BYTES:
            return log_probs
        stored[key] = log_probs
    return stored[key]


@torch.inference_mode()
def divergence_per_prompt(
    model,
    tokenizer,
    reference,
    reference_tokenizer,
    prompts: list[str],
    *,
    continuation_tokens: int = 32,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Per-prompt kl_first_token, kl_continuation and ce_reference_answers (nats), in prompt order.

    Returns also "reference_ce" (the reference's own cross-entropy on its answers, to read
    ce_reference_answers against) and "continuation_tokens" (T per prompt).
    """
    from tqdm.auto import tqdm

    check_same_vocabulary(model, tokenizer, reference, reference_tokenizer)
    continuations = reference_continuations(reference, reference_tokenizer, prompts, continuation_tokens, batch_size, progress)
    sequences = prompt_answer_sequences(reference_tokenizer, prompts, continuations)
    pad_id = reference_tokenizer.pad_token_id if reference_tokenizer.pad_token_id is not None else 0
    model_device = next(model.parameters()).device
    reference_device = next(reference.parameters()).device
    out = {name: [0.0] * len(prompts) for name in ("kl_first_token", "kl_continuation", "ce_reference_answers", "reference_ce")}
    out["continuation_tokens"] = [len(c) for c in continuations]
    with tqdm(total=len(prompts), desc="KL vs reference", unit="prompt", disable=not progress, leave=False) as bar:
        for batch in length_sorted_batches([len(s) for s in sequences], batch_size):
            batch_ids = [sequences[i] for i in batch]
            keep_last = max(len(continuations[i]) for i in batch) + 1
            model_log_probs = teacher_forced_log_probs(model, batch_ids, pad_id, model_device, keep_last)
            reference_log_probs = reference_teacher_forced_log_probs(reference, batch_ids, pad_id, reference_device, keep_last)
            length = keep_last
            for row, index in enumerate(batch):
                T = len(continuations[index])
                if T == 0:
                    raise AblateError(f"reference produced an empty continuation for prompt {index}")
                # Positions length−T−1 … length−2 predict the T continuation tokens.
                positions = slice(length - T - 1, length - 1)
                log_p_ref = reference_log_probs[row, positions]  # (T, V)
                log_p_model = model_log_probs[row, positions]
                kl = (log_p_ref.exp() * (log_p_ref - log_p_model)).sum(-1).clamp(min=0.0)  # (T,)
                targets = torch.tensor(continuations[index]).unsqueeze(-1)
                out["kl_first_token"][index] = float(kl[0])
                out["kl_continuation"][index] = float(kl.mean())
                out["ce_reference_answers"][index] = float(-log_p_model.gather(-1, targets).mean())
                out["reference_ce"][index] = float(-log_p_ref.gather(-1, targets).mean())
            bar.update(len(batch))
    return out


@torch.inference_mode()
def answer_cross_entropy(model, tokenizer, prompts: list[str], answers: list[list[int]], batch_size: int = 16) -> list[float]:
    """Per-prompt cross-entropy −(1/T) Σ_t log p_model(y_t | x_<t) (nats/token) of fixed answer token ids y
    (e.g. `reference_continuations`) under `model`: `divergence_per_prompt`'s ce_reference_answers without
    a reference model in memory, for comparing models one at a time on the same answers."""
    sequences = prompt_answer_sequences(tokenizer, prompts, answers)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    out = [0.0] * len(prompts)
    for batch in length_sorted_batches([len(s) for s in sequences], batch_size):
        empty = [i for i in batch if not answers[i]]
        if empty:
            raise AblateError(f"empty answer for prompt {empty[0]}")
        keep_last = max(len(answers[i]) for i in batch) + 1
        log_probs = teacher_forced_log_probs(model, [sequences[i] for i in batch], pad_id, device, keep_last)
        for row, index in enumerate(batch):
            T = len(answers[index])
            targets = torch.tensor(answers[index]).unsqueeze(-1)
            out[index] = float(-log_probs[row, keep_last - T - 1 : keep_last - 1].gather(-1, targets).mean())
    return out
