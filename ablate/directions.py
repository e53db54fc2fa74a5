"""Refusal directions (Arditi et al. 2024): collect activations, form candidates, select one.

    ablate direction embedded --out runs/x/directions
    # or: from ablate.directions import run_direction; run_direction(model, tokenizer, DirectionConfig(), out)

1. **Collect.** One forward pass per batch of train prompts records the residual stream at every decoder
   layer's input, at the post-instruction positions (the chat-template tokens between the end of the
   user's message and the start of the assistant's answer). Means accumulate in float64; no activation
   is kept. The pass stops at the last layer's input (the output head is never run).
2. **Candidates.** r[layer, position] = mean(refusal) − mean(harmless); optionally the *projected*
   variant r − (r·μ̂_h) μ̂_h, orthogonal to the harmless mean μ_h at that site (heretic, grimjim).
3. **Refusal tokens.** A few refusal validation prompts are answered greedily; the first tokens of the
   answers that `is_refusal` scores as refusals are the model's own refusal openers R. The refusal
   score of a prompt is the log-odds of R at the first generated position,
   log p(R) − log(1 − p(R)) — positive when the model is about to refuse.
4. **Screen** (cheap, every candidate). One forward+backward pass gives a first-order estimate for all
   candidates at once. Ablation removes o ← o − (o·r̂) r̂ from every residual source o (embedding and
   writers), so the refusal score changes by ΔM ≈ −Σ (∂M/∂o · r̂)(o · r̂) = −r̂ᵀ A r̂ with
   A = Σ_sources,positions (∂M/∂o) oᵀ, a d_model × d_model matrix; adding r at layer ℓ to harmless
   prompts changes it by ≈ (Σ_positions ∂M/∂x_ℓ) · r. Only the best few (spread over layers) go on.
5. **Score exactly** (shortlist, validation split only): refusal score under ablation (refusal prompts,
   lower is better), steering score under activation addition (harmless prompts, must be > 0) and
   first-token KL(base ‖ ablated) on harmless prompts (damage). Successive halving: the whole shortlist on
   a few prompts first (`prescore_prompts`), the best `prescore_keep` on all of them, where the refusal
   prompts are also answered greedily (`score_by_generation`) and their refusals counted.
6. **Select.** Filters: not in the last `exclude_last_fraction` of layers, KL ≤ `kl_max`, steering >
   `steering_min`. Among the survivors the lowest max(refusal, refusal_floor) + kl_weight · KL wins, so
   damage counts and refusal past the floor earns nothing more; the refusal term is the log-odds of the
   generated refusals when they were counted (a direction can meet the first-token score by suppressing
   the refusal openers alone while the model still refuses in other words). When none survives: the best by the
   same objective, with a warning that says how many each filter removed.
7. **Strength search.** When full ablation of the pick exceeds `kl_max`, kernels peaked at its layer
   (`strength_search`) are scored the same way; the best within `kl_max` becomes the selected strength.
8. **Strength learning** (`strength_learning.enabled`, instead of the search). One weight per residual
   writer (attention out, MLP out of every layer), w = max_weight · sigmoid(θ), and a change δ to the
   direction (unit(r̂ + δ)), learned by Adam on the validation prompts against a smooth form of the
   objective plus a distillation term (first-token KL to the pick's full ablation on the refusal prompts),
   for the pick (or, by successive halving, the next best candidates too: `learn_strength`). The result is
   ranked by the refusals of greedy completions like the candidates; it replaces the pick and full
   ablation when it ranks better, and `orthogonalize_weights` bakes it in like any other strength.

Every pass runs on a copy of the model in `compute_dtype` ("auto": bfloat16 where the hardware computes it
natively — half the forward time on a CPU with AMX — float32 elsewhere); means are float64, the direction and weights float32, the model itself is never modified.

Artifacts (out_dir): candidates.pt + candidates.json, sweep.json (every candidate's scores), sweep.png,
selected.json, direction.pt, steer.pt (full ablation only: lm-eval `steered` model format, `--model steered
--model_args pretrained=MODEL,steer_path=steer.pt`), done.json last.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ablate import AblateError
from ablate.artifacts import atomic_write_bytes, fingerprint, is_done, mark_done, read_done, read_json, write_json
from ablate.config import DirectionConfig, DirectionVariant, GenerationConfig, KernelConfig, StrengthConfig
from ablate.generation import (cache_keyword, decode, eos_token_ids, generate_batches, length_sorted_batches, prefix_cache,
                               render_prompts, shared_prefix_length, tokenize_batch)
from ablate.interventions import (_project_out, _replace_output, activation_addition, directional_ablation, layer_weights,
                                  unit)
from ablate.models import format_chat, get_adapter

# Probe messages ending in different characters, so their rendered token ids share only the template.
_PROBES = ("a", "Why?", "1 2 3", "Tell me about rivers.")


# --------------------------------------------------------------------------------------------
# Post-instruction positions and batches
# --------------------------------------------------------------------------------------------


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
    With `logits=False` the caller's hooks are expected to stop the pass early (`_StopForward`).
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


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# --------------------------------------------------------------------------------------------
# 1. Activation collection
# --------------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by the last layer's hook once its input is recorded: nothing after it is needed."""


def _hidden_from(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@torch.inference_mode()
def collect_mean_activations(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    n_positions: int,
    *,
    system: str | None = None,
    batch_size: int = 32,
    progress: bool = False,
    description: str = "collecting",
) -> torch.Tensor:
    """Mean residual stream at every layer input and the last `n_positions` tokens.

    Returns (n_layers, n_positions, d_model) float64. One forward pass per batch, stopped after the
    last layer's input is recorded; sums accumulate in float64 and no activation is kept.
    """
    adapter = get_adapter(model)
    expected = torch.tensor(post_instruction_tokens(tokenizer, system)[-n_positions:])
    sums = torch.zeros(adapter.n_layers, n_positions, adapter.d_model, dtype=torch.float64)
    state = {"prefix": False, "rows": None}
    handles = []

    def make_hook(index: int):
        def hook(module, args, kwargs):
            if state["prefix"]:
                return None
            hidden = _hidden_from(args, kwargs)
            rows = state["rows"]  # (B, n_positions) indices of the post-instruction tokens
            picked = hidden.gather(1, rows.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
            sums[index] += picked.double().sum(0).cpu()
            if index == adapter.n_layers - 1:
                raise _StopForward

        return hook

    prepared = prepare_batches(tokenizer, prompts, batch_size, system, _device(model), keep=n_positions)
    try:
        for index, layer in enumerate(adapter.layers):
            handles.append(layer.register_forward_pre_hook(make_hook(index), with_kwargs=True))
        with tqdm(total=len(prompts), desc=description, unit="prompt", disable=not progress, leave=False) as bar:
            for batch, inputs in prepared.batches:
                offsets = torch.arange(-n_positions + 1, 1, device=inputs["last"].device)
                rows = inputs["last"].unsqueeze(1) + offsets
                state["rows"] = rows
                if not (inputs["input_ids"].gather(1, rows).cpu() == expected).all():
                    raise AblateError("a prompt's last tokens are not the chat template's post-instruction tokens "
                                      "(the message merged with the template); cannot align positions")
                try:
                    run_prefix_and_batch(model, prepared.prefix, inputs, logits=False,
                                         on_prefix=lambda flag: state.__setitem__("prefix", flag))
                except _StopForward:
                    pass
                bar.update(len(batch))
    finally:
        for handle in handles:
            handle.remove()
    means = sums / len(prompts)
    if not torch.isfinite(means).all():
        raise AblateError("activation means are not finite (the model produced NaN/inf activations)")
    return means


def compute_candidates(refusal_mean: torch.Tensor, harmless_mean: torch.Tensor, variant: DirectionVariant) -> dict[str, torch.Tensor]:
    """Difference-in-means candidates, (n_layers, n_positions, d_model) float32 per variant.

    'projected' removes each candidate's component along the harmless mean at the same site:
    r − (r·μ̂_h) μ̂_h, so ablating it leaves the harmless prompts' mean activation untouched.
    """
    plain = refusal_mean - harmless_mean
    result = {}
    if variant in (DirectionVariant.plain, DirectionVariant.both):
        result["plain"] = plain.float()
    if variant in (DirectionVariant.projected, DirectionVariant.both):
        mu_hat = harmless_mean / harmless_mean.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        result["projected"] = (plain - (plain * mu_hat).sum(-1, keepdim=True) * mu_hat).float()
    return result


# --------------------------------------------------------------------------------------------
# Scores: refusal log-odds, KL
# --------------------------------------------------------------------------------------------


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


@torch.inference_mode()
def continue_after(model, tokenizer, prompt_tokens: list[tuple[str, int]], config: GenerationConfig) -> list[str]:
    """Greedy completions of each (prompt, first token id) pair: the text of that token and what follows it."""
    texts = render_prompts(tokenizer, [prompt for prompt, _ in prompt_tokens], config.system_prompt)
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    device, eos_ids = next(model.parameters()).device, eos_token_ids(model, tokenizer)
    out = [""] * len(texts)
    for batch in length_sorted_batches(lengths, config.batch_size):
        inputs = tokenize_batch(tokenizer, [texts[i] for i in batch], device)  # left-padded: append the token
        first = torch.tensor([[prompt_tokens[i][1]] for i in batch], device=device)
        input_ids = torch.cat([inputs["input_ids"], first], dim=1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(first)], dim=1)
        tokens, _ = decode(model, input_ids, mask, config, eos_ids, pad_id=tokenizer.pad_token_id or 0)
        for row, index in enumerate(batch):
            out[index] = tokenizer.decode([prompt_tokens[index][1]] + tokens[row], skip_special_tokens=True).strip()
    return out


@torch.inference_mode()
def find_refusal_tokens(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 12,
    system: str | None = None,
    batch_size: int = 32,
    alternatives: int = 0,
) -> tuple[list[int], list[dict]]:
    """The model's own refusal-opening tokens: first tokens of its greedy answers scored as refusals,
    and with `alternatives` N also each prompt's next N most likely first tokens, each continued greedily
    (a model trained on varied refusals may open with "I" first and "Sorry" second: an ablation that
    only lowers "I" would leave the refusals).

    A token is kept when it opens more refusals than non-refusals. Returns (token ids, examples);
    falls back (with a warning) to the first tokens of the packaged generic refusals when the
    model refuses none of the prompts.
    """
    from ablate.data import read_package_text
    from ablate.evaluate.refusal import is_refusal

    refusing, complying, examples = Counter(), Counter(), []
    greedy = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size, system_prompt=system)
    completions, first_logits = generate_batches(model, tokenizer, prompts, greedy, progress=False)
    for index, (text, logits) in enumerate(zip(completions, first_logits)):
        first = int(logits.argmax())  # greedy: the first generated token
        refused = is_refusal(text) and bool(text)
        (refusing if refused else complying)[first] += 1
        examples.append({"index": index, "prompt": prompts[index], "completion": text, "refusal": refused, "first_token": first})
    if alternatives and prompts:
        runner_ups = first_logits.float().topk(alternatives + 1, dim=-1).indices[:, 1:].tolist()
        pairs = [(index, token) for index, tokens in enumerate(runner_ups) for token in tokens]
        completions = continue_after(model, tokenizer, [(prompts[i], token) for i, token in pairs], greedy)
        for (index, token), text in zip(pairs, completions):
            refused = bool(text) and is_refusal(text)
            (refusing if refused else complying)[token] += 1
            examples.append({"index": index, "prompt": prompts[index], "completion": text, "refusal": refused,
                             "first_token": token, "forced": True})
    tokens = sorted(token for token, count in refusing.items() if count > complying.get(token, 0))
    if not tokens:
        warnings.warn("the model refused none of the refusal validation prompts; using the first tokens of the "
                      "packaged generic refusals as refusal openers", stacklevel=2)
        lines = [line for line in read_package_text("refusals.txt").splitlines() if line.strip()]
        tokens = sorted({tokenizer(line.strip(), add_special_tokens=False)["input_ids"][0] for line in lines})
    return tokens, examples


# --------------------------------------------------------------------------------------------
# 4. First-order screening of every candidate
# --------------------------------------------------------------------------------------------


@contextmanager
def _frozen(model: nn.Module):
    """Parameters stop requiring gradients while the context is open (gradients flow to activations only)."""
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


@contextmanager
def gradient_attention(model: nn.Module, implementation: str):
    """The model runs with this attention implementation while the context is open, and gets its own back after.

    'model' changes nothing; 'auto' is eager on a CPU — its backward is ~2.5× faster than the sdpa flash kernel's
    on short prompts (SmolLM2, batch 8, ~50 tokens) — and the model's own elsewhere.
    """
    if implementation == "auto":
        implementation = "eager" if _device(model).type == "cpu" else "model"
    config = getattr(model, "config", None)
    own = getattr(config, "_attn_implementation", None)
    if implementation == "model" or own is None or own == implementation or not hasattr(model, "set_attn_implementation"):
        yield
        return
    model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        model.set_attn_implementation(own)


def _mean_refusal_metric(model, prompts: PromptBatches, inputs, token_ids, n_total: int) -> torch.Tensor:
    logprobs = torch.log_softmax(run_prefix_and_batch(model, prompts.prefix, inputs), dim=-1)
    return refusal_log_odds(logprobs, token_ids).sum() / n_total


def ablation_sensitivity(model: nn.Module, prompts: PromptBatches, token_ids: list[int], n_prompts: int) -> torch.Tensor:
    """A = Σ (∂M/∂o) oᵀ over every residual source o, position and prompt: (d_model, d_model) float64.

    M is the mean refusal log-odds; to first order, ablating r̂ changes M by −r̂ᵀ A r̂.
    """
    adapter = get_adapter(model)
    d_model = adapter.d_model
    matrix = torch.zeros(d_model, d_model, dtype=torch.float64)
    captured: list[torch.Tensor] = []

    def leaf_hook(module, inputs, output):
        # The embedding output is made a leaf that requires grad, so the graph exists with frozen weights.
        output = output.detach().requires_grad_(True)
        captured.append(output)
        return output

    def writer_hook(module, inputs, output):
        tensor = output[0] if isinstance(output, tuple) else output
        tensor.retain_grad()
        captured.append(tensor)

    handles = []
    try:
        with _frozen(model), torch.enable_grad():
            for module in [adapter.embedding, *adapter.extra_embeddings]:
                handles.append(module.register_forward_hook(leaf_hook))
            for module in adapter.all_writers():
                handles.append(module.register_forward_hook(writer_hook))
            for _, inputs in prompts.batches:
                captured.clear()
                _mean_refusal_metric(model, prompts, inputs, token_ids, n_prompts).backward()
                for tensor in captured:
                    if tensor.grad is None:
                        continue
                    o = tensor.detach().reshape(-1, d_model).double().cpu()
                    g = tensor.grad.reshape(-1, d_model).double().cpu()
                    matrix += g.T @ o
                captured.clear()
    finally:
        for handle in handles:
            handle.remove()
    return matrix


def steering_sensitivity(model: nn.Module, prompts: PromptBatches, token_ids: list[int], n_prompts: int) -> torch.Tensor:
    """G[ℓ] = Σ_positions ∂M/∂x_ℓ (mean over prompts): (n_layers, d_model) float64.

    To first order, adding c·r at layer ℓ's input raises the refusal log-odds M by c·G[ℓ]·r.
    """
    adapter = get_adapter(model)
    gradients = torch.zeros(adapter.n_layers, adapter.d_model, dtype=torch.float64)
    captured: list[tuple[int, torch.Tensor]] = []

    def leaf_hook(module, inputs, output):
        return output.detach().requires_grad_(True)

    def make_hook(index: int):
        def hook(module, args, kwargs):
            hidden = _hidden_from(args, kwargs)
            hidden.retain_grad()
            captured.append((index, hidden))

        return hook

    handles = []
    try:
        with _frozen(model), torch.enable_grad():
            handles.append(adapter.embedding.register_forward_hook(leaf_hook))
            for index, layer in enumerate(adapter.layers):
                handles.append(layer.register_forward_pre_hook(make_hook(index), with_kwargs=True))
            for _, inputs in prompts.batches:
                captured.clear()
                _mean_refusal_metric(model, prompts, inputs, token_ids, n_prompts).backward()
                for index, hidden in captured:
                    if hidden.grad is not None:
                        gradients[index] += hidden.grad.double().sum((0, 1)).cpu()
                captured.clear()
    finally:
        for handle in handles:
            handle.remove()
    return gradients


# --------------------------------------------------------------------------------------------
# 5–6. Exact scores and selection
# --------------------------------------------------------------------------------------------


def objective(record: dict, config: DirectionConfig) -> float:
    """Lower is better: max(refusal score, refusal_floor) + kl_weight · KL."""
    return max(record["refusal_score"], config.refusal_floor) + config.kl_weight * record["kl"]


def ranking_objective(record: dict, config: DirectionConfig) -> float:
    """The objective that ranks: with the refusals of greedy completions in place of the first-token score when
    they were measured (`generated_objective`), else `objective`."""
    for key in ("generated_objective", "objective"):
        if record.get(key) is not None:
            return record[key]
    return objective(record, config)


def shortlist_candidates(records: list[dict], config: DirectionConfig, max_layer: int) -> list[int]:
    """Indices of the candidates to score exactly.

    Sites (layer, position) are taken in order of their best estimated ablation refusal score, at most
    `shortlist_per_layer` sites per layer and only layers < max_layer; every variant at a chosen site is
    scored (the projected variant often refuses as little at a lower KL), up to `shortlist` candidates.
    """
    by_site: dict[tuple[int, int], list[int]] = {}
    for index, record in enumerate(records):
        if record["layer"] < max_layer and not record["degenerate"]:
            by_site.setdefault((record["layer"], record["position"]), []).append(index)
    sites = sorted(by_site, key=lambda site: (min(records[i]["estimated_refusal_score"] for i in by_site[site]), site))
    chosen, per_layer = [], Counter()
    for site in sites:
        if per_layer[site[0]] >= config.shortlist_per_layer:
            continue
        per_layer[site[0]] += 1
        for index in sorted(by_site[site], key=lambda i: records[i]["estimated_refusal_score"]):
            if len(chosen) < config.shortlist:
                chosen.append(index)
        if len(chosen) >= config.shortlist:
            break
    return chosen


def select_candidate(records: list[dict], config: DirectionConfig, n_layers: int,
                     steering=None, unsteered: float = 0.0) -> tuple[int, bool, dict]:
    """Apply the filters and the objective to the exactly-scored records.

    Returns (index of the chosen record, fallback used, filter counts). Filters apply in order (late
    layer, shortlist, prescore, KL, steering); each count is how many that filter removed of those left. The
    steering score is needed only down to the pick, so survivors of the KL filter are visited in
    objective order and `steering(index)` (default: the record's stored score) is asked lazily;
    those ranked below the pick are counted as `steering_not_scored`. With `steering_relative` the
    steering threshold is `unsteered` (the harmless prompts' own refusal score) + steering_min.
    """
    steering = steering or (lambda index: records[index]["steering_score"])
    threshold = steering_threshold(config, unsteered)
    max_layer = max_layer_allowed(n_layers, config.exclude_last_fraction)
    counts = {"candidates": len(records)}
    left = [i for i in range(len(records)) if records[i]["layer"] < max_layer]
    counts["late_layer"] = len(records) - len(left)
    scored = [i for i in left if records[i].get("kl") is not None]
    dropped = sum(1 for i in left if records[i].get("kl") is None and "prescore" in records[i])
    counts["not_shortlisted"] = len(left) - len(scored) - dropped
    counts["prescore_dropped"] = dropped
    left = [i for i in scored if records[i]["kl"] <= config.kl_max]
    counts["kl_above_max"] = len(scored) - len(left)
    ranked = sorted(left, key=lambda i: (ranking_objective(records[i], config), i))
    counts["steering_not_above_min"] = 0
    for rank, index in enumerate(ranked):
        if steering(index) > threshold:
            counts["steering_not_scored"] = len(ranked) - rank - 1
            counts["passed"] = 1
            return index, False, counts
        counts["steering_not_above_min"] += 1
    counts["steering_not_scored"], counts["passed"] = 0, 0
    if not scored:
        raise AblateError("no candidate was scored (shortlist empty: every layer excluded by exclude_last_fraction?)")
    chosen = min(scored, key=lambda i: (ranking_objective(records[i], config), i))
    steering(chosen)
    return chosen, True, counts


# --------------------------------------------------------------------------------------------
# 8. Learned per-writer strength
# --------------------------------------------------------------------------------------------


@contextmanager
def _learnable_ablation(model: nn.Module, direction: torch.Tensor, logits: torch.Tensor, max_weight: float,
                        delta: torch.Tensor | None = None):
    """o ← o − w (o·r̂) r̂ on every residual writer, w = max_weight · sigmoid(logits[layer, writer]),
    r̂ = unit(unit(direction) + delta) when `delta` is given (the direction is learned too).

    The weights and r̂ are computed inside each hook from the leaves `logits` and `delta`, so every
    forward pass builds its own graph and gradients reach them. Hooks are removed in `finally`.
    """
    r_start = unit(direction).to(_device(model))
    handles = []

    def make_hook(layer: int, writer: int):
        def hook(module, inputs, output):
            weight = max_weight * torch.sigmoid(logits[layer, writer])
            r_hat = r_start if delta is None else (r_start + delta) / (r_start + delta).norm()  # differentiable
            return _replace_output(output, lambda x: _project_out(x, r_hat, weight.to(x.dtype)))

        return hook

    try:
        for layer, writers in enumerate(get_adapter(model).writers):
            for writer, module in enumerate(writers):
                handles.append(module.register_forward_hook(make_hook(layer, writer)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class LearningState:
    """Where a run of strength learning stands: the weights' logits, the change to the direction (None when
    the direction is fixed), their optimiser, the next step and the per-step history."""

    logits: torch.Tensor
    delta: torch.Tensor | None
    optimizer: torch.optim.Optimizer
    step: int = 0
    history: list[dict] = field(default_factory=list)


def learned_direction(direction: torch.Tensor, state: LearningState) -> torch.Tensor:
    """The direction a learning run ablates, at the norm of the one it started from (ablation uses only r̂;
    activation addition and the steering score use the norm)."""
    if state.delta is None:
        return direction.clone()
    r_hat = unit(unit(direction.float()) + state.delta.detach().to(direction.device))
    return (r_hat * direction.float().norm()).to(direction.dtype)


def learn_writer_weights(model: nn.Module, direction: torch.Tensor, refusal: PromptBatches, harmless: PromptBatches,
                         base_harmless: torch.Tensor, token_ids: list[int], config: DirectionConfig,
                         progress: bool = False, steps: int | None = None, state: LearningState | None = None,
                         target_refusal: torch.Tensor | None = None) -> tuple[list[list[float]], LearningState]:
    """Per-writer ablation weights in [0, max_weight] (and, with `direction_lr` > 0, a change to the direction)
    that minimise the selection objective on validation prompts.

    Loss = mean over refusal prompts of floor + softplus(score − floor) (a smooth max(score, floor): refusal
    pushed past `refusal_floor` earns nothing more) + kl_weight · mean first-token KL(base ‖ ablated) over
    harmless prompts; with `target_refusal` (first-token log-probabilities of the refusal prompts, input
    order: the start candidate's full ablation) also + distill_weight · mean KL(target ‖ ablated) over the
    refusal prompts — the learned ablation must answer them as full ablation does, not merely avoid the
    refusal openers (which a learned direction can do while the model still refuses in other words).
    Adam on the weights' logits (start 0: every weight max_weight / 2) and on δ, where the ablated
    direction is unit(r̂ + δ) (start 0: the candidate itself); each step takes the next batch of each
    validation set in turn (mini-batches as `refusal` and `harmless` are batched), joined into one pass
    (`join_batches`), the model frozen and its attention `config.gradient_attention`. Runs
    `steps` steps (default `strength_learning.steps`) from `state` (default: a fresh start), so a run can be
    continued exactly where it stopped. Deterministic for the same inputs.
    Returns (weights, state); `state.history` has one entry per step, `learned_direction` reads the direction.
    """
    settings = config.strength_learning
    rows = [len(writers) for writers in get_adapter(model).writers]
    if len(set(rows)) != 1:
        raise AblateError(f"strength_learning needs the same number of residual writers in every layer, got {sorted(set(rows))}")
    if state is None:
        logits = torch.zeros(len(rows), rows[0], requires_grad=True)
        groups = [{"params": [logits], "lr": settings.lr}]
        delta = None
        if settings.direction_lr > 0:
            delta = torch.zeros(direction.shape[-1], device=_device(model), requires_grad=True)
            groups.append({"params": [delta], "lr": settings.direction_lr})
        state = LearningState(logits, delta, torch.optim.Adam(groups))
    logits, optimizer, floor = state.logits, state.optimizer, config.refusal_floor
    steps = settings.steps if steps is None else steps
    with _frozen(model), gradient_attention(model, config.gradient_attention), \
            _learnable_ablation(model, direction, logits, settings.max_weight, state.delta):
        for step in tqdm(range(state.step, state.step + steps), desc="strength learning", unit="step",
                         disable=not progress, leave=False):
            optimizer.zero_grad()
            refusal_rows, refusal_inputs = refusal.batches[step % len(refusal.batches)]
            harmless_rows, harmless_inputs = harmless.batches[step % len(harmless.batches)]
            # Both sets' mini-batches in one pass: rows [0, n) are the refusal prompts, the rest the harmless ones.
            prefix, inputs = join_batches(refusal, refusal_inputs, harmless, harmless_inputs)
            logprobs = torch.log_softmax(run_prefix_and_batch(model, prefix, inputs), dim=-1)
            n = len(refusal_rows)
            refusal_loss = (floor + nn.functional.softplus(refusal_log_odds(logprobs[:n], token_ids) - floor)).mean()
            distill = torch.zeros(())
            if target_refusal is not None and settings.distill_weight > 0:
                distill = first_token_kl(target_refusal[refusal_rows].to(logprobs.device), logprobs[:n]).mean()
                refusal_loss = refusal_loss + settings.distill_weight * distill
            kl = first_token_kl(base_harmless[harmless_rows].to(logprobs.device), logprobs[n:]).mean()
            loss = refusal_loss + config.kl_weight * kl
            loss.backward()
            ramp = min(1.0, (step + 1) / settings.warmup_steps) if settings.warmup_steps else 1.0
            for group, rate in zip(optimizer.param_groups, (settings.lr, settings.direction_lr)):
                group["lr"] = rate * ramp
            optimizer.step()
            state.history.append({"step": step, "refusal_loss": round(float(refusal_loss.detach()), 4),
                                  "distill_kl": round(float(distill.detach()), 4), "kl": round(float(kl.detach()), 4),
                                  "loss": round(float(loss.detach()), 4)})
    state.step += steps
    weights = (settings.max_weight * torch.sigmoid(logits.detach())).tolist()
    return [[round(w, 4) for w in row] for row in weights], state


@dataclass
class ValidationScorer:
    """An intervention measured on the validation prompts (never a test split): the first-token refusal score
    and KL(base ‖ intervened), the steering score, and the refusals of greedy completions."""

    model: nn.Module
    tokenizer: object
    config: DirectionConfig
    sets: dict
    token_ids: list[int]
    refusal: PromptBatches
    harmless: PromptBatches
    base_harmless: torch.Tensor

    def ablated_logprobs(self, direction: torch.Tensor, weights, refusal: PromptBatches | None = None,
                         harmless: PromptBatches | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """First-token log-probabilities of the refusal and the harmless prompts under the ablation."""
        with directional_ablation(self.model, direction, weights):
            return joint_first_token_logprobs(self.model, refusal or self.refusal, harmless or self.harmless)

    def scores(self, refusal_logprobs: torch.Tensor, harmless_logprobs: torch.Tensor) -> tuple[float, float]:
        """(mean refusal log-odds on the refusal prompts, mean first-token KL on the harmless prompts); the
        harmless rows are the first len(harmless_logprobs) validation prompts (all of them, or a prescore's)."""
        base = self.base_harmless[: harmless_logprobs.shape[0]]
        return (float(refusal_log_odds(refusal_logprobs, self.token_ids).mean()),
                float(first_token_kl(base, harmless_logprobs).mean()))

    def ablated(self, direction: torch.Tensor, weights, refusal: PromptBatches | None = None,
                harmless: PromptBatches | None = None) -> tuple[float, float]:
        """`scores` of the ablation on the validation prompts (or on the first few of each: a prescore's)."""
        return self.scores(*self.ablated_logprobs(direction, weights, refusal, harmless))

    def steering(self, direction: torch.Tensor, layer: int) -> float:
        """Refusal log-odds on harmless prompts with `direction` added at `layer`'s input."""
        with activation_addition(self.model, direction, layer, self.config.steering_coefficient):
            steered = first_token_logprobs(self.model, self.harmless)
        return float(refusal_log_odds(steered, self.token_ids).mean())

    def measure(self, direction: torch.Tensor, weights, generate: bool) -> tuple[dict, torch.Tensor]:
        """The ablation's refusal score, KL and objective, and with `generate` the refusals of greedy completions
        of the refusal prompts (`generated_fields`; the first-token scores then come from the same pass).
        Returns (scores, the refusal prompts' first-token log-probabilities)."""
        if not generate:
            refusal_logprobs, harmless_logprobs = self.ablated_logprobs(direction, weights)
            refused = n = None
        else:
            from ablate.evaluate.refusal import is_refusal

            greedy = GenerationConfig(max_new_tokens=self.config.refusal_token_max_new_tokens,
                                      batch_size=self.config.generation_batch_size, system_prompt=self.config.system_prompt)
            with directional_ablation(self.model, direction, weights):
                completions, first_logits = generate_batches(self.model, self.tokenizer, self.sets["refusal_val"].prompts,
                                                             greedy, progress=False)
                harmless_logprobs = first_token_logprobs(self.model, self.harmless)
            refusal_logprobs = torch.log_softmax(first_logits.float(), dim=-1).cpu()
            refused, n = sum(bool(text) and is_refusal(text) for text in completions), len(completions)
        refusal_score, kl = self.scores(refusal_logprobs, harmless_logprobs)
        scores = {"refusal_score": refusal_score, "kl": kl,
                  "objective": objective({"refusal_score": refusal_score, "kl": kl}, self.config)}
        if refused is not None:
            scores.update(generated_fields(refused, n, kl, self.config))
        return scores, refusal_logprobs


GENERATED_FIELDS = ("generated_refusal_rate", "generated_refusal_score", "generated_objective")


def generated_fields(refused: int, n: int, kl: float, config: DirectionConfig) -> dict:
    """Refusals of greedy completions (the substring scorer, as evaluation counts them) as a rate and as smoothed
    log-odds log((k + ½) / (n − k + ½)), and the objective with those log-odds in place of the first-token score:
    a direction can meet the first-token score by suppressing the refusal openers alone while the model still
    refuses in other words — the completions count the refusals."""
    score = math.log((refused + 0.5) / (n - refused + 0.5))
    return {"generated_refusal_rate": refused / n, "generated_refusal_score": score,
            "generated_objective": objective({"refusal_score": score, "kl": kl}, config)}


def learn_strength(model: nn.Module, scorer: ValidationScorer, starts: list[tuple[int, torch.Tensor, torch.Tensor | None]],
                   progress: bool = False) -> tuple[dict, list[dict]]:
    """Strength learning (`learn_writer_weights`) on `model` from each start — (candidate index, direction,
    distillation target or None) — by successive halving: with several starts each learns `halving_steps`
    steps and is scored, and only the best by the ranking (generated refusals, then the objective, then start
    order) goes on to `steps`; when its second half ranks worse, the halfway weights and direction are kept.

    Returns (best, runs): best = {index, weights, direction, state, scores}; runs = each start's scores after
    its first rung (index, steps, scores).
    """
    config, settings = scorer.config, scorer.config.strength_learning
    device = _device(model)
    batches = {name: prepare_batches(scorer.tokenizer, scorer.sets[f"{name}_val"].prompts, settings.batch_size,
                                     config.system_prompt, device) for name in ("refusal", "harmless")}
    first_steps = settings.steps if len(starts) == 1 else min(settings.halving_steps, settings.steps)

    def learn(direction, target, steps, state=None):
        return learn_writer_weights(model, direction, batches["refusal"], batches["harmless"], scorer.base_harmless,
                                    scorer.token_ids, config, progress, steps=steps, state=state, target_refusal=target)

    def scored(start: torch.Tensor, weights, state: LearningState) -> dict:
        direction = learned_direction(start, state)
        scores, _ = scorer.measure(direction, weights, generate=settings.select_by_generation)
        return {**scores, "direction_cosine": float(nn.functional.cosine_similarity(direction.float(), start.float(), dim=0))}

    runs = []
    for order, (index, start, target) in enumerate(starts):
        weights, state = learn(start, target, first_steps)
        runs.append({"order": order, "index": index, "steps": first_steps, "scores": scored(start, weights, state),
                     "weights": weights, "state": state})
    best_run = min(runs, key=lambda run: (ranking_objective(run["scores"], config), run["scores"]["objective"], run["order"]))
    index, start, target = starts[best_run["order"]]
    best = {"index": index, "weights": best_run["weights"], "state": best_run["state"], "scores": best_run["scores"],
            "direction": learned_direction(start, best_run["state"])}
    if first_steps < settings.steps:
        halfway = dict(best)
        weights, state = learn(start, target, settings.steps - first_steps, best["state"])
        best = {**best, "weights": weights, "state": state, "scores": scored(start, weights, state),
                "direction": learned_direction(start, state)}
        if ranking_objective(best["scores"], config) > ranking_objective(halfway["scores"], config):  # the second half made it worse
            best = {**halfway, "state": state, "scores": {**halfway["scores"], "kept_halfway": True}}
    return best, [{"index": run["index"], "steps": run["steps"], **run["scores"]} for run in runs]


def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 in hardware: a CUDA GPU that supports it, or a CPU with AMX or
    AVX512-BF16 (an AVX2-only CPU emulates it: a SmolLM2 matmul ran 5x slower than in float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def resolve_compute_dtype(compute_dtype: str, device: torch.device) -> str:
    """`compute_dtype` with "auto" resolved for `device`: bfloat16 where it is native, float32 elsewhere."""
    if compute_dtype != "auto":
        return compute_dtype
    return "bfloat16" if native_bfloat16(device) else "float32"


def compute_model(model: nn.Module, compute_dtype: str) -> nn.Module:
    """The model the stage's passes run on: `model` itself for "model", its own dtype or a quantised model
    (bitsandbytes weights have no other dtype), else a copy in that dtype ("auto": `resolve_compute_dtype`)."""
    if (compute_dtype == "model" or getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None)
            or getattr(model, "hf_device_map", None)):  # a sharded model is not copied either
        return model
    dtype = getattr(torch, resolve_compute_dtype(compute_dtype, next(model.parameters()).device))
    if next(model.parameters()).dtype == dtype:
        return model
    import copy

    return copy.deepcopy(model).to(dtype)


def steering_threshold(config: DirectionConfig, unsteered: float) -> float:
    """The steering score a candidate must exceed: steering_min, plus the unsteered score when relative."""
    return config.steering_min + (unsteered if config.steering_relative else 0.0)


def max_layer_allowed(n_layers: int, exclude_last_fraction: float) -> int:
    """Layers ≥ this are excluded; at least layer 0 stays allowed."""
    return max(1, n_layers - int(math.floor(n_layers * exclude_last_fraction + 1e-9)))


def _model_fingerprint(model: nn.Module) -> str:
    """A cheap content fingerprint: name, class and the float64 sum of every parameter."""
    sums = [float(parameter.detach().double().sum()) for parameter in model.parameters()]
    name = getattr(getattr(model, "config", None), "_name_or_path", "")
    return fingerprint({"class": type(model).__name__, "name": name, "sums": sums})


def _inputs_fingerprint(model, tokenizer, config: DirectionConfig, sets: dict) -> str:
    return fingerprint({
        "config": config.model_dump(mode="json"),
        "compute_dtype": resolve_compute_dtype(config.compute_dtype, next(model.parameters()).device),
        "model": _model_fingerprint(model),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "sets": {name: prompt_set.fingerprint for name, prompt_set in sets.items()},
        "version": 1,
    })


def load_sets(config: DirectionConfig) -> dict:
    """The four prompt sets (seeded samples), never a test split."""
    from ablate.data import load_prompt_set

    def draw(spec: str, n: int, offset: int):
        prompt_set = load_prompt_set(spec)
        if len(prompt_set) < 2:
            raise AblateError(f"prompt set '{spec}': needs at least 2 prompts, has {len(prompt_set)}")
        return prompt_set.sample(n, seed=config.seed + offset)

    return {
        "refusal_train": draw(config.refusal_train, config.n_train, 0),
        "harmless_train": draw(config.harmless_train, config.n_train, 1),
        "refusal_val": draw(config.refusal_val, config.n_val, 2),
        "harmless_val": draw(config.harmless_val, config.n_val, 3),
    }


def export_steered(model: nn.Module, direction: torch.Tensor, path: Path) -> Path:
    """Write lm-eval's `steered` model file: clamp the r̂ component to 0 at every residual source and
    at every decoder layer's output — the same directional ablation as the hooks."""
    adapter = get_adapter(model)
    names = {id(module): name for name, module in model.named_modules()}
    r_hat = unit(direction)
    modules = [adapter.embedding, *adapter.extra_embeddings, *adapter.all_writers(), *adapter.layers]
    steer = {names[id(module)]: {"action": "clamp", "steering_vector": r_hat.clone(), "steering_coefficient": 0.0,
                                  "bias": None, "head_index": None} for module in modules}
    import io

    buffer = io.BytesIO()
    torch.save(steer, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def plot_sweep(records: list[dict], variants: list[str], n_layers: int, position_labels: list[str],
               selected: dict, max_layer: int, path: Path) -> Path | None:
    """Layer × position heatmaps of the three scores (one row per variant); the pick is starred."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is optional
        return None
    import io

    import numpy as np

    panels = [("estimated_refusal_score", "ablation refusal score\n(first-order estimate; lower = less refusal)", "viridis"),
              ("refusal_score", "ablation refusal score\n(exact, shortlisted)", "viridis"),
              ("steering_score", "steering score\n(exact, shortlisted; > 0 wanted)", "magma"),
              ("kl", "first-token KL on harmless\n(exact, shortlisted)", "Reds")]
    n_positions = len(position_labels)
    figure, axes = plt.subplots(len(variants), len(panels), figsize=(4.2 * len(panels), 0.22 * n_layers * len(variants) + 2.0),
                                squeeze=False)
    for row, variant in enumerate(variants):
        for column, (key, title, cmap) in enumerate(panels):
            grid = np.full((n_layers, n_positions), np.nan)
            for record in records:
                if record["variant"] == variant and record.get(key) is not None:
                    grid[record["layer"], record["position"] + n_positions] = record[key]
            axis = axes[row][column]
            image = axis.imshow(grid, aspect="auto", origin="lower", cmap=cmap, interpolation="nearest")
            figure.colorbar(image, ax=axis, fraction=0.05)
            axis.axhline(max_layer - 0.5, color="grey", linestyle="--", linewidth=0.8)
            axis.set_xticks(range(n_positions))
            axis.set_xticklabels(position_labels, rotation=45, fontsize=7)
            axis.set_ylabel("layer")
            axis.set_title(f"{variant}: {title}", fontsize=8)
            if selected["variant"] == variant:
                axis.plot(selected["position"] + n_positions, selected["layer"], marker="*", color="cyan", markersize=12)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return atomic_write_bytes(path, buffer.getvalue())


def run_direction(model: nn.Module, tokenizer, config: DirectionConfig, out_dir: Path, progress: bool = True) -> dict:
    """Extract, screen, score and select the refusal direction; write the artifacts; return the pick.

    Skips (returns the stored selection) when `out_dir/done.json` matches these inputs.
    """
    out_dir = Path(out_dir)
    sets = load_sets(config)
    key = _inputs_fingerprint(model, tokenizer, config, sets)
    if is_done(out_dir, key) and (out_dir / "selected.json").exists():
        return read_json(out_dir / "selected.json")
    started = time.perf_counter()
    timings: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        timings[name] = round(now - clock[0], 2)
        clock[0] = now

    adapter = get_adapter(model)
    n_layers, system, device = adapter.n_layers, config.system_prompt, _device(model)
    template_tokens = post_instruction_tokens(tokenizer, system)
    if config.positions is not None:
        template_tokens = template_tokens[-config.positions:]
    n_positions = len(template_tokens)
    position_labels = [repr(tokenizer.decode([token])) for token in template_tokens]

    # Every pass of the stage runs on `compute`: the model itself, or a copy in `compute_dtype` (bfloat16
    # halves the forward passes' time on a CPU with AMX; "auto" takes it only where it is native).
    # Means, directions and weights stay float32/64.
    compute = compute_model(model, config.compute_dtype)

    # 1–2. Means and candidates.
    refusal_mean = collect_mean_activations(compute, tokenizer, sets["refusal_train"].prompts, n_positions, system=system,
                                            batch_size=config.batch_size, progress=progress, description="refusal activations")
    harmless_mean = collect_mean_activations(compute, tokenizer, sets["harmless_train"].prompts, n_positions, system=system,
                                             batch_size=config.batch_size, progress=progress, description="harmless activations")
    candidates = compute_candidates(refusal_mean, harmless_mean, config.variant)
    variants = list(candidates)
    lap("collect")

    # 3. Refusal openers and the base model's validation scores.
    token_ids, token_examples = find_refusal_tokens(
        compute, tokenizer, sets["refusal_val"].prompts[: config.refusal_token_prompts],
        max_new_tokens=config.refusal_token_max_new_tokens, system=system, batch_size=config.generation_batch_size,
        alternatives=config.refusal_token_alternatives)
    refusal_batches = prepare_batches(tokenizer, sets["refusal_val"].prompts, config.batch_size, system, device)
    harmless_batches = prepare_batches(tokenizer, sets["harmless_val"].prompts, config.batch_size, system, device)
    base_refusal, base_harmless = joint_first_token_logprobs(compute, refusal_batches, harmless_batches)
    base_refusal_score = float(refusal_log_odds(base_refusal, token_ids).mean())
    base_harmless_score = float(refusal_log_odds(base_harmless, token_ids).mean())
    lap("refusal_tokens")

    # 4. First-order screening of every candidate (on the first `screen_prompts` of each validation set).
    def screened(name: str, every: PromptBatches) -> PromptBatches:
        prompts, n = sets[name].prompts, config.screen_prompts
        return every if n is None or n >= len(prompts) else prepare_batches(tokenizer, prompts[:n], config.batch_size, system, device)

    screen_refusal, screen_harmless = screened("refusal_val", refusal_batches), screened("harmless_val", harmless_batches)
    with gradient_attention(compute, config.gradient_attention):
        ablation_matrix = ablation_sensitivity(compute, screen_refusal, token_ids, screen_refusal.n)
        steering_gradients = steering_sensitivity(compute, screen_harmless, token_ids, screen_harmless.n)
    symmetric = (ablation_matrix + ablation_matrix.T) / 2
    records: list[dict] = []
    for variant in variants:
        stack = candidates[variant].double()  # (n_layers, n_positions, d_model)
        r_hat = stack / stack.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        estimated_ablation = base_refusal_score - torch.einsum("lpd,de,lpe->lp", r_hat, symmetric, r_hat)
        estimated_steering = base_harmless_score + config.steering_coefficient * torch.einsum("lpd,ld->lp", stack, steering_gradients)
        for layer in range(n_layers):
            for p in range(n_positions):
                records.append({
                    "variant": variant, "layer": layer, "position": p - n_positions, "position_token": position_labels[p],
                    "norm": float(stack[layer, p].norm()),
                    # Layer 0's input at a template token is that token's embedding, the same for every
                    # prompt: its difference in means is (numerically) zero and is never a candidate.
                    "degenerate": bool(stack[layer, p].norm() <= 1e-6 * harmless_mean[layer, p].norm()),
                    "estimated_refusal_score": float(estimated_ablation[layer, p]),
                    "estimated_steering_score": float(estimated_steering[layer, p]),
                    "refusal_score": None, "steering_score": None, "kl": None,
                })
    lap("screen")

    # 5. Exact scores for the shortlist.
    max_layer = max_layer_allowed(n_layers, config.exclude_last_fraction)
    shortlist = shortlist_candidates(records, config, max_layer)
    strength = config.strength
    weights = layer_weights(n_layers, strength.coefficient, strength.kernel.model_dump() if strength.kernel else None,
                            strength.writer_weights)
    scorer = ValidationScorer(compute, tokenizer, config, sets, token_ids, refusal_batches, harmless_batches, base_harmless)

    def direction_of(record: dict) -> torch.Tensor:
        return candidates[record["variant"]][record["layer"], record["position"] + n_positions]

    def check_finite(record: dict, scores: tuple[float, float]) -> None:
        if not all(math.isfinite(value) for value in scores):
            raise AblateError(f"candidate layer {record['layer']} position {record['position']}: non-finite score")

    # Successive halving: the whole shortlist on the first `prescore_prompts` prompts of each set, then
    # the best `prescore_keep` of them by the objective on every prompt.
    exact = shortlist
    n_prescore = config.prescore_prompts
    if n_prescore is not None and n_prescore < min(len(sets["refusal_val"]), len(sets["harmless_val"])) \
            and config.prescore_keep < len(shortlist):
        few_refusal = prepare_batches(tokenizer, sets["refusal_val"].prompts[:n_prescore], config.batch_size, system, device)
        few_harmless = prepare_batches(tokenizer, sets["harmless_val"].prompts[:n_prescore], config.batch_size, system, device)
        for index in tqdm(shortlist, desc="prescoring candidates", unit="candidate", disable=not progress, leave=False):
            record = records[index]
            scores = scorer.ablated(direction_of(record), weights, few_refusal, few_harmless)
            check_finite(record, scores)
            record["prescore"] = {"refusal_score": scores[0], "kl": scores[1], "n_prompts": n_prescore,
                                  "objective": objective({"refusal_score": scores[0], "kl": scores[1]}, config)}
        exact = sorted(shortlist, key=lambda i: (records[i]["prescore"]["objective"], i))[: config.prescore_keep]
        lap("prescore")
    ablated_refusal: dict[int, torch.Tensor] = {}  # each exactly scored candidate's refusal log-probabilities
    for index in tqdm(exact, desc="scoring candidates", unit="candidate", disable=not progress, leave=False):
        record = records[index]
        scores, ablated_refusal[index] = scorer.measure(direction_of(record), weights, generate=config.score_by_generation)
        check_finite(record, (scores["refusal_score"], scores["kl"]))
        record.update(scores)

    def steering_score(index: int) -> float:
        """The candidate's steering score, computed once."""
        record = records[index]
        if record["steering_score"] is None:
            record["steering_score"] = scorer.steering(direction_of(record), record["layer"])
        return record["steering_score"]

    lap("score")
    # 6. Selection.
    chosen, fallback, filter_counts = select_candidate(records, config, n_layers, steering_score, base_harmless_score)
    pick = records[chosen]
    direction = candidates[pick["variant"]][pick["layer"], pick["position"] + n_positions].clone()
    lap("select")

    # 7. Strength search: when full ablation of the pick is too damaging, try kernels peaked at the
    #    layer of the pick and of the next best scored candidates (a damaging direction may be the best
    #    one once it is removed from a few layers only).
    strength, searched = config.strength, []
    threshold = steering_threshold(config, base_harmless_score)
    if pick["kl"] > config.kl_max and config.strength_search and not config.strength_learning.enabled:
        allowed = [i for i in exact if records[i]["layer"] < max_layer]
        searched_indices = [chosen] + sorted((i for i in allowed if i != chosen), key=lambda i: (records[i]["objective"], i))
        options = [(chosen, strength, pick["refusal_score"], pick["kl"])]
        total = len(config.strength_search) * len(searched_indices[: config.strength_candidates])
        with tqdm(total=total, desc="strength search", unit="kernel", disable=not progress, leave=False) as bar:
            for index in searched_indices[: config.strength_candidates]:
                record = records[index]
                for kernel in config.strength_search:
                    option = StrengthConfig(coefficient=config.strength.coefficient, kernel=KernelConfig(
                        max_weight=kernel.max_weight, max_weight_position=record["layer"], min_weight=kernel.min_weight,
                        min_weight_distance=kernel.distance))
                    refusal_score, kl = scorer.ablated(
                        direction_of(record), layer_weights(n_layers, option.coefficient, option.kernel.model_dump()))
                    options.append((index, option, refusal_score, kl))
                    searched.append({"layer": record["layer"], "position": record["position"], "variant": record["variant"],
                                     "strength": option.model_dump(mode="json"), "refusal_score": refusal_score, "kl": kl,
                                     "objective": objective({"refusal_score": refusal_score, "kl": kl}, config)})
                    bar.update(1)
        passing = [o for o in options if o[3] <= config.kl_max] or options
        # The search runs only for a pick that failed the KL filter (a fallback), so every option competes.
        best = min(passing, key=lambda o: (objective({"refusal_score": o[2], "kl": o[3]}, config), options.index(o)))
        if best[1] is not strength:
            chosen, strength = best[0], best[1]
            full = records[chosen]
            pick = {**full, "refusal_score": best[2], "kl": best[3],
                    "objective": objective({"refusal_score": best[2], "kl": best[3]}, config),
                    "full_ablation": {"refusal_score": full["refusal_score"], "kl": full["kl"]}}
            direction = direction_of(full).clone()
        pick["steering_score"] = steering_score(chosen)
        lap("strength_search")
        if fallback and pick["kl"] <= config.kl_max and pick["steering_score"] > threshold:
            fallback = False  # full ablation failed only the KL filter, and a weaker kernel passes it
            filter_counts["passed_after_strength_search"] = 1
    # 8. Strength learning (`learn_strength`): per-writer weights and a change to the direction, learned on
    #    the validation prompts from the pick and the next best exactly-scored candidates. The result replaces
    #    the pick and its strength when it ranks better (within kl_max beats above it, then the ranking).
    learned = None
    if config.strength_learning.enabled:
        settings = config.strength_learning
        pool = [chosen] + sorted((i for i in exact if i != chosen and records[i]["layer"] < max_layer),
                                 key=lambda i: (ranking_objective(records[i], config), i))
        # Candidates whose addition does not induce refusal are no refusal direction: learned only when none does.
        # Steering scores are computed down the pool only until enough candidates pass (one forward pass each).
        inducing = list(islice((i for i in pool if steering_score(i) > threshold), settings.candidates))
        pool = inducing or pool[: settings.candidates]
        best, runs = learn_strength(compute, scorer, [(i, direction_of(records[i]), ablated_refusal.get(i)) for i in pool], progress)
        scores, writer_weights, state = best["scores"], best["weights"], best["state"]
        pick_scores = {key: pick[key] for key in ("objective", *GENERATED_FIELDS) if key in pick}
        if settings.select_by_generation and "generated_objective" not in pick_scores:
            pick_scores.update({key: value for key, value in scorer.measure(direction, weights, generate=True)[0].items()
                                if key in GENERATED_FIELDS})
        chosen_learned = (scores["kl"] <= config.kl_max, -ranking_objective(scores, config)) > \
            (pick["kl"] <= config.kl_max, -ranking_objective(pick_scores, config))
        learned = {**scores, "chosen": chosen_learned, "candidate_index": best["index"], "writer_weights": writer_weights,
                   "history": state.history, "settings": settings.model_dump(mode="json"),
                   "compared_with": {"index": chosen, "refusal_score": pick["refusal_score"], "kl": pick["kl"], **pick_scores},
                   "candidates": [{"layer": records[run["index"]]["layer"], "position": records[run["index"]]["position"],
                                   "variant": records[run["index"]]["variant"], **run} for run in runs]}
        if chosen_learned:
            chosen = best["index"]
            full = records[chosen]
            direction = best["direction"]
            strength = StrengthConfig(writer_weights=writer_weights)
            pick = {**full, **scores, "full_ablation": {"refusal_score": full["refusal_score"], "kl": full["kl"]}}
        # A learned direction has a steering score of its own (added at its candidate's layer).
        learned_direction_chosen = chosen_learned and state.delta is not None
        pick["steering_score"] = scorer.steering(direction, pick["layer"]) if learned_direction_chosen else steering_score(chosen)
        lap("strength_learning")
        if fallback and pick["kl"] <= config.kl_max and pick["steering_score"] > threshold:
            fallback = False  # full ablation failed only the KL filter, and the learned weights pass it
            filter_counts["passed_after_strength_learning"] = 1
    warning_text = None
    if fallback:
        removed = ", ".join(f"{name}: {count}" for name, count in filter_counts.items()
                            if name not in ("candidates", "passed", "steering_not_scored"))
        warning_text = (f"no candidate passed the filters ({removed}; of {filter_counts['candidates']}); falling back to the "
                        f"best by the objective — consider a larger kl_max or shortlist")
        warnings.warn(warning_text, stacklevel=2)

    # Artifacts: tensors first, small JSON beside them, done.json last.
    out_dir.mkdir(parents=True, exist_ok=True)
    import io

    buffer = io.BytesIO()
    torch.save({**{variant: tensor for variant, tensor in candidates.items()},
                "refusal_mean": refusal_mean.float(), "harmless_mean": harmless_mean.float()}, buffer)
    atomic_write_bytes(out_dir / "candidates.pt", buffer.getvalue())
    write_json(out_dir / "candidates.json", {
        "shape": "(n_layers, n_positions, d_model) per variant; position p is token p − n_positions of the prompt",
        "variants": variants, "n_layers": n_layers, "n_positions": n_positions, "d_model": adapter.d_model,
        "position_tokens": position_labels, "template_token_ids": template_tokens,
        "sets": {name: {"name": s.name, "n": len(s), "fingerprint": s.fingerprint, "ids": s.ids} for name, s in sets.items()},
    })
    write_json(out_dir / "sweep.json", {
        "base": {"refusal_score_refusal_val": base_refusal_score, "refusal_score_harmless_val": base_harmless_score},
        "refusal_tokens": {"ids": token_ids, "text": [tokenizer.decode([t]) for t in token_ids], "examples": token_examples},
        "max_layer_allowed": max_layer, "shortlist": shortlist, "exactly_scored": exact, "selected_index": chosen, "strength_search": searched,
        "strength_learning": learned,
        "config": config.model_dump(mode="json"), "candidates": records,
    })
    buffer = io.BytesIO()
    torch.save(direction, buffer)
    atomic_write_bytes(out_dir / "direction.pt", buffer.getvalue())
    steered_path = None
    if strength.kernel is None and strength.writer_weights is None and strength.coefficient == 1.0:  # clamp = full ablation
        steered_path = str(export_steered(model, direction, out_dir / "steer.pt"))
    selected = {
        "variant": pick["variant"], "layer": pick["layer"], "position": pick["position"], "position_token": pick["position_token"],
        "refusal_score": pick["refusal_score"], "steering_score": pick["steering_score"], "kl": pick["kl"],
        "objective": pick["objective"], "norm": pick["norm"],
        "base_refusal_score": base_refusal_score, "base_harmless_refusal_score": base_harmless_score,
        "direction_path": str(out_dir / "direction.pt"), "steered_path": steered_path,
        "fallback": fallback, "warning": warning_text, "filter_counts": filter_counts,
        "strength": strength.model_dump(mode="json"), "full_ablation": pick.get("full_ablation"),
        "direction_cosine": pick.get("direction_cosine"), "generated_refusal_rate": pick.get("generated_refusal_rate"), "refusal_tokens": [tokenizer.decode([t]) for t in token_ids],
        "n_layers": n_layers, "d_model": adapter.d_model, "timings": timings,
        "compute_dtype": str(next(compute.parameters()).dtype).removeprefix("torch."),
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    write_json(out_dir / "selected.json", selected)
    try:
        plot_sweep(records, variants, n_layers, position_labels, selected, max_layer, out_dir / "sweep.png")
    except Exception as error:  # a figure must never lose a finished selection
        warnings.warn(f"sweep figure not written: {error}", stacklevel=2)
    selected["wall_seconds"] = round(time.perf_counter() - started, 2)
    write_json(out_dir / "selected.json", selected)
    mark_done(out_dir, key, layer=pick["layer"], position=pick["position"], variant=pick["variant"],
              kl=pick["kl"], refusal_score=pick["refusal_score"], wall_seconds=selected["wall_seconds"])
    return selected


def load_direction(direction_dir: Path) -> tuple[torch.Tensor, dict]:
    """(r (d_model,) float32, selected metadata) from a finished direction stage directory."""
    direction_dir = Path(direction_dir)
    path, meta_path = direction_dir / "direction.pt", direction_dir / "selected.json"
    if not path.exists() or not meta_path.exists():
        raise AblateError(f"{direction_dir}: no direction.pt/selected.json here; run `ablate direction` first")
    if read_done(direction_dir) is None:
        raise AblateError(f"{direction_dir}: the direction stage did not finish (no done.json); rerun `ablate direction`")
    direction = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(direction, torch.Tensor) or direction.dim() != 1 or not torch.isfinite(direction).all():
        raise AblateError(f"{path}: expected a finite 1-D tensor (d_model,)")
    return direction.float(), read_json(meta_path)
