"""Prompt batches of the direction stage: the chat template's post-instruction tokens, prompts tokenised once
with their shared template prefix run once per batch, and first-token scores (refusal log-odds, KL)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ablate import AblateError
from ablate.generation import cache_keyword, length_sorted_batches, prefix_cache, render_prompts, shared_prefix_length
from ablate.models import format_chat

_PROBES = ("a", "Why?", "1 2 3", "Tell me about rivers.")


def post_instruction_tokens(tokenizer, system: str | None = None) -> list[int]:
    """Token ids the chat template puts after the user's message, up to where the assistant starts.

    Found as the longest token suffix shared by prompts rendered from different messages.
    """
    rendered = [tokenizer(format_chat(tokenizer, probe, system=system), add_special_tokens=False)["input_ids"]
                for probe in _PROBES]
    n = 0
    while all(len(ids) > n for ids in rendered) and len({ids[-1 - n] for ids in rendered}) == 1:
        n += 1
    if n == 0:
        raise AblateError("chat template: no template tokens after the user's message; cannot find post-instruction positions")
    return rendered[0][-n:]


@dataclass
class PromptBatches:
    """Chat-rendered prompts, tokenised once, split into a shared prefix and right-padded remainders.

    Every prompt starts with the same template tokens (system prompt, user header); they are run once
    per batch (batch size 1) and their KV cache is repeated for the batch, which saves ~40% of the
    compute of scoring a candidate on SmolLM2. With right padding every prompt keeps the positions it
    has alone, and its last real token is at `inputs["last"]`.
    """

    prefix: torch.Tensor  # (P,) token ids shared by every prompt; may be empty
    batches: list[tuple[list[int], dict]]  # (indices, {input_ids (B, S), attention_mask (B, S), last (B,)})
    n: int


def prepare_batches(tokenizer, prompts: list[str], batch_size: int, system: str | None, device,
                    keep: int = 1, share_prefix: bool = True) -> PromptBatches:
    """Tokenise prompts once; `keep` = how many final tokens every remainder must contain."""
    texts = render_prompts(tokenizer, prompts, system)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    # Every prompt keeps at least one of its own tokens before the `keep` it must contain.
    shared = shared_prefix_length(ids, own=keep + 1) if share_prefix else 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for batch in length_sorted_batches([len(row) for row in ids], batch_size):
        rows = [ids[i][shared:] for i in batch]
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, row in enumerate(rows):
            input_ids[j, : len(row)] = torch.tensor(row)
            mask[j, : len(row)] = 1
        last = mask.sum(1) - 1
        batches.append((batch, {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "last": last.to(device)}))
    return PromptBatches(torch.tensor(ids[0][:shared], dtype=torch.long, device=device), batches, len(prompts))


def run_prefix_and_batch(model: nn.Module, prefix: torch.Tensor, inputs: dict, *, logits: bool = True,
                         on_prefix=None) -> torch.Tensor | None:
    """Forward one batch after its shared prefix; returns the logits at each row's last token (B, vocab).

    `on_prefix(True/False)` is called before each of the two passes (hooks use it to tell them apart).
    With `logits=False` the caller's hooks are expected to stop the pass early (`StopForward`).
    """
    input_ids, mask, last = inputs["input_ids"], inputs["attention_mask"], inputs["last"]
    batch, width = input_ids.shape
    keep = last.unsqueeze(1) if logits else 1
    if prefix.numel() == 0:
        if on_prefix:
            on_prefix(False)
        output = model(input_ids=input_ids, attention_mask=mask, use_cache=False, logits_to_keep=keep)
        return output.logits[:, -1, :].float() if logits else None
    if on_prefix:
        on_prefix(True)
    cache = prefix_cache(model, prefix.unsqueeze(0), batch)
    if on_prefix:
        on_prefix(False)
    length = prefix.numel()
    full_mask = torch.cat([torch.ones(batch, length, dtype=mask.dtype, device=mask.device), mask], dim=1)
    positions = torch.arange(length, length + width, device=input_ids.device).unsqueeze(0).expand(batch, width)
    output = model(input_ids=input_ids, attention_mask=full_mask, position_ids=positions, use_cache=True,
                   logits_to_keep=keep, **{cache_keyword(model): cache})
    return output.logits[:, -1, :].float() if logits else None


def join_batches(first: PromptBatches, first_inputs: dict, second: PromptBatches, second_inputs: dict) -> tuple[torch.Tensor, dict]:
    """One batch of two sets' batches — `first_inputs`' rows, then `second_inputs'` — after the prefix the two sets
    share (where their prefixes differ, the rest of each moves into its rows), right-padded to a common width:
    (prefix, inputs) for `run_prefix_and_batch`. One pass over 16 rows costs ~25% less than two over 8."""
    limit = min(first.prefix.numel(), second.prefix.numel())
    common = next((i for i in range(limit) if first.prefix[i] != second.prefix[i]), limit)
    parts = []
    for prompts, inputs in ((first, first_inputs), (second, second_inputs)):
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        extra = prompts.prefix[common:]
        if extra.numel():
            ids = torch.cat([extra.unsqueeze(0).expand(ids.shape[0], -1), ids], dim=1)
            mask = torch.cat([torch.ones(ids.shape[0], extra.numel(), dtype=mask.dtype, device=mask.device), mask], dim=1)
        parts.append((ids, mask))
    width = max(ids.shape[1] for ids, _ in parts)
    input_ids = torch.cat([nn.functional.pad(ids, (0, width - ids.shape[1])) for ids, _ in parts])
    mask = torch.cat([nn.functional.pad(mask, (0, width - mask.shape[1])) for _, mask in parts])
    return first.prefix[:common], {"input_ids": input_ids, "attention_mask": mask, "last": mask.sum(1) - 1}


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def first_token_logprobs(model: nn.Module, prompts: PromptBatches) -> torch.Tensor:
    """log-softmax of the first generated token, (n_prompts, vocab) float32 on the CPU, input order."""
    rows: dict[int, torch.Tensor] = {}
    for batch, inputs in prompts.batches:
        logprobs = torch.log_softmax(run_prefix_and_batch(model, prompts.prefix, inputs), dim=-1).cpu()
        rows.update(zip(batch, logprobs))
    return torch.stack([rows[i] for i in range(prompts.n)])


@torch.inference_mode()
def joint_first_token_logprobs(model: nn.Module, first: PromptBatches, second: PromptBatches) -> tuple[torch.Tensor, torch.Tensor]:
    """`first_token_logprobs` of two prompt sets, the i-th batch of each run as one pass (`join_batches`): half the
    passes and prefixes of scoring a candidate on both validation sets. Batches one set has more of run alone."""
    sets = (first, second)
    rows: tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]] = ({}, {})
    for index in range(max(len(first.batches), len(second.batches))):
        present = [which for which in (0, 1) if index < len(sets[which].batches)]
        if len(present) == 2:
            prefix, inputs = join_batches(first, first.batches[index][1], second, second.batches[index][1])
        else:
            prefix, inputs = sets[present[0]].prefix, sets[present[0]].batches[index][1]
        logprobs = torch.log_softmax(run_prefix_and_batch(model, prefix, inputs), dim=-1).cpu()
        offset = 0
        for which in present:
            batch = sets[which].batches[index][0]
            rows[which].update(zip(batch, logprobs[offset : offset + len(batch)]))
            offset += len(batch)
    return tuple(torch.stack([found[i] for i in range(prompts.n)]) for found, prompts in zip(rows, sets))


def refusal_log_odds(logprobs: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """Per prompt: log p(R) − log(1 − p(R)), p(R) the first-token probability of the refusal openers."""
    log_p = torch.logsumexp(logprobs[..., token_ids], dim=-1).clamp(max=-1e-7)
    return log_p - torch.log(-torch.expm1(log_p))


def first_token_kl(base_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """Per prompt: KL(base ‖ intervened) of the first-token distributions (nats)."""
    return (base_logprobs.exp() * (base_logprobs - logprobs)).sum(-1)
