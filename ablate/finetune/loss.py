"""The supervised loss of fine-tuning: next-token cross-entropy (or distillation KL) on the answers' tokens only,
with the output head applied to supervised positions and the shared chat-template prefix run once per batch."""

from __future__ import annotations

import inspect

import torch


def keep_answer_openings(batch: dict, tokens: int) -> dict:
    """A collated batch whose rows end after their answer's first `tokens` supervised tokens: every later
    position loses its label (-100) and its attention (0), so it is neither learnt nor computed (the packed
    loss skips masked positions) and the Trainer's token count, which divides the loss, counts the kept
    labels only. Rows with shorter answers are unchanged."""
    labels = batch["labels"]
    supervised = labels != -100
    seen = supervised.long().cumsum(dim=1)  # supervised tokens up to and including each position
    keep = (seen < tokens) | ((seen == tokens) & supervised)
    batch["labels"] = labels.masked_fill(~keep, -100)
    mask = batch.get("attention_mask")
    batch["attention_mask"] = (torch.ones_like(labels) if mask is None else mask).masked_fill(~keep, 0)
    return batch


def shared_prompt_prefix(inputs: dict, labels: torch.Tensor) -> int:
    """How many leading tokens every row of a right-padded batch shares without a label (the chat
    template's system prompt and user header), leaving each row's first supervised position its own."""
    input_ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    if input_ids.shape[0] < 2 or not (labels != -100).any(dim=1).all():
        return 0
    same = (input_ids == input_ids[:1]).all(dim=0) & (labels == -100).all(dim=0)
    if mask is not None:
        same &= (mask == 1).all(dim=0)
    leading = int(same.long().cumprod(dim=0).sum())
    first_label = int((labels != -100).long().argmax(dim=1).min())
    return max(0, min(leading, first_label - 1))


def packed_attention_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive (1, 1, T, T) causal mask for sequences packed one after another: a token sees the earlier
    tokens of its own segment and of segment -1 (the prefix every row shares), nothing else."""
    same = (segments.unsqueeze(1) == segments.unsqueeze(0)) | (segments == -1).unsqueeze(0)
    allowed = same & torch.ones_like(same).tril()
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


def first_answer_tokens(shifted: torch.Tensor) -> torch.Tensor:
    """Boolean mask over shifted labels: each row's first supervised target (the answer's first token)."""
    supervised = shifted != -100
    first = torch.zeros_like(supervised)
    rows = supervised.any(dim=1).nonzero().squeeze(-1)
    first[rows, supervised[rows].long().argmax(dim=1)] = True
    return first


def packed_forward(model, input_ids: torch.Tensor, mask: torch.Tensor, shifted: torch.Tensor, shared: int,
                   weights: torch.Tensor | None = None):
    """Logits and targets of a right-padded batch's supervised positions, from one padding-free pass
    (and `weights`, a tensor shaped like `shifted`, gathered at the same positions, when given).

    One sequence holds the prompt tokens every row starts with (`shared`, once) and then each row's own
    tokens at their own positions; a block-diagonal causal mask lets a row see the prefix and itself
    only. Padding is never computed and the output head covers the supervised positions only.
    """
    own = mask[:, shared:].bool()
    lengths = own.sum(1)
    rows = torch.arange(len(lengths), device=lengths.device)
    segments = torch.cat([torch.full((shared,), -1, device=lengths.device), torch.repeat_interleave(rows, lengths)])
    starts = torch.cumsum(lengths, 0) - lengths
    offsets = torch.arange(segments.numel() - shared, device=lengths.device) - starts[segments[shared:]]
    positions = torch.cat([torch.arange(shared, device=lengths.device), shared + offsets])

    def pack(values: torch.Tensor, pad) -> torch.Tensor:  # the shared prefix once, then each row's own tokens
        rest = torch.nn.functional.pad(values[:, shared:], (0, own.shape[1] - values.shape[1] + shared), value=pad)
        return torch.cat([values[0, :shared], rest[own]])

    tokens = pack(input_ids, 0)
    targets = pack(shifted, -100)  # shifted labels are one shorter: the last position has no target
    keep = (targets != -100).nonzero().squeeze(-1)
    logits = model(input_ids=tokens.unsqueeze(0), position_ids=positions.unsqueeze(0), use_cache=False,
                   attention_mask=packed_attention_mask(segments, next(model.parameters()).dtype),
                   logits_to_keep=keep).logits
    if weights is None:
        return logits[0], targets[keep]
    return logits[0], targets[keep], pack(weights, 0.0)[keep]


def activation_checkpointing(model) -> bool:
    """Whether the model recomputes activations in its backward pass (transformers 5's name, then the old one)."""
    value = getattr(model, "is_activation_checkpointing", None)
    return bool(getattr(model, "is_gradient_checkpointing", False) if value is None else value)


def supervised_head_loss(model, inputs: dict, num_items_in_batch=None, pack: bool = True,
                         first_token_weight: float = 1.0, teacher=None) -> torch.Tensor:
    """Next-token cross-entropy with the output head applied only to supervised positions — or, with a
    `teacher` (`training.loss: distill`), KL(teacher ‖ model) of the next-token distributions there: the
    teacher's whole distribution at each answer token in place of the one token the answer has.

    The loss is summed over supervised tokens and divided by `num_items_in_batch` (every micro-batch's
    supervised tokens, as the Trainer counts them) or by this batch's own count. `first_token_weight`
    multiplies the loss of each answer's first token — where a chat model decides to refuse or to
    answer — and leaves the divisor alone (1 = trl's loss).

    Most models take `packed_forward`: the chat template's system prompt and user header (a quarter of
    a short chat example) run once, and the rows' own tokens run after it in the same sequence, without
    padding (30% of the hardening batches' positions). Gradients flow back through the shared prefix
    exactly as if each row had computed it (tested against trl's loss and gradients). Models with a
    sliding-window attention (a custom mask would bypass the window) and activation checkpointing take
    one padded pass whose `logits_to_keep` leaves out the positions no row supervises (`pack=False` forces
    it: `benchmarks/bench_training.py` compares the two).
    """
    from ablate.generation import plain_cache_layers

    labels = inputs.pop("labels")
    shifted = labels[:, 1:]
    weights = 1.0 + (first_token_weight - 1.0) * first_answer_tokens(shifted).float()
    plain_inputs = set(inputs) <= {"input_ids", "attention_mask"}
    # Under a distributed launch the Trainer hands over the DistributedDataParallel wrapper, which has no
    # config to read the cache layout from: it takes the padded pass.
    distributed = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    if pack and plain_inputs and not distributed and not activation_checkpointing(model) and plain_cache_layers(model):
        input_ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else mask
        shared = shared_prompt_prefix(inputs, labels)
        logits, targets, weights = packed_forward(model, input_ids, mask, shifted, shared, weights)
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = packed_forward(teacher, input_ids, mask, shifted, shared)[0]
    else:
        keep = (shifted != -100).any(dim=0).nonzero().squeeze(-1)
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits.flatten(0, 1)
        targets, weights = shifted[:, keep].flatten(), weights[:, keep].flatten()
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(**inputs, use_cache=False, logits_to_keep=keep).logits.flatten(0, 1)
    if teacher is None:
        losses = torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="none")
    else:
        log_q = torch.log_softmax(teacher_logits.float().to(logits.device), dim=-1)
        kl = (log_q.exp() * (log_q - torch.log_softmax(logits.float(), dim=-1))).sum(-1)
        losses = kl * (targets != -100)
    total = (losses * weights.to(losses.device)).sum()
    count = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum()
    return total / torch.as_tensor(count, device=total.device).clamp(min=1)


def accepts_logits_to_keep(model) -> bool:
    """Whether the (peft-wrapped) model's forward can slice its logits (transformers' own causal LMs can)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters
