"""Steps 1–3 of the direction stage: mean activations at the post-instruction positions, difference-in-means
candidates, and the model's own refusal-opening tokens."""

from __future__ import annotations

import warnings
from collections import Counter
from typing import NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from ablate import AblateError
from ablate.config import DirectionVariant, GenerationConfig
from ablate.directions.batches import model_device, post_instruction_tokens, prepare_batches, run_prefix_and_batch
from ablate.hooks import StopForward, hidden_from, hooks
from ablate.models import get_adapter


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
    device = model_device(model)
    # On a GPU the sums stay there (a copy to the host per layer and batch would make it wait each time);
    # elsewhere they live on the CPU (MPS has no float64).
    sums = torch.zeros(adapter.n_layers, n_positions, adapter.d_model, dtype=torch.float64,
                       device=device if device.type == "cuda" else "cpu")
    state = {"prefix": False, "rows": None}

    def make_hook(index: int):
        def hook(module, args, kwargs):
            if state["prefix"]:
                return None
            hidden = hidden_from(args, kwargs)
            rows = state["rows"]  # (B, n_positions) indices of the post-instruction tokens
            picked = hidden.gather(1, rows.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
            sums[index] += picked.double().sum(0).to(sums.device)
            if index == adapter.n_layers - 1:
                raise StopForward

        return hook

    prepared = prepare_batches(tokenizer, prompts, batch_size, system, device, keep=n_positions)
    with hooks(pre=[(layer, make_hook(index)) for index, layer in enumerate(adapter.layers)]), \
            tqdm(total=len(prompts), desc=description, unit="prompt", disable=not progress, leave=False) as bar:
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
            except StopForward:
                pass
            bar.update(len(batch))
    means = sums.cpu() / len(prompts)
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


class RefusalOpeners(NamedTuple):
    """The model's refusal-opening tokens, the completions behind them, and the answer length they were judged at."""

    tokens: list[int]
    examples: list[dict]
    max_new_tokens: int


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
    retry_new_tokens: int | None = None,
) -> RefusalOpeners:
    """The model's own refusal-opening tokens: first tokens of its greedy answers scored as refusals,
    and with `alternatives` N also each prompt's next N most likely first tokens, each continued greedily
    (a model trained on varied refusals may open with "I" first and "Sorry" second: an ablation that
    only lowers "I" would leave the refusals).

    A token is kept when it opens more refusals than non-refusals. A refusal that first restates the request and
    says why declines only later: when fewer than half of the answers are refusals within `max_new_tokens` and
    `retry_new_tokens` is longer, the answers are generated again at that length, and when it recognises more
    than twice as many refusals, the longer answers are the ones judged (that length is returned, and the
    runner-up tokens are continued to it). Falls back (with a warning) to the first tokens of the packaged
    generic refusals when the model refuses none of the prompts.
    """
    from ablate.data import read_package_text
    from ablate.evaluate.measure import complete, complete_after, refusal_verdicts

    refusing, complying, examples = Counter(), Counter(), []
    greedy = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size, system_prompt=system)
    completed = complete(model, tokenizer, prompts, greedy)
    verdicts = refusal_verdicts(completed.texts, "substring_nonempty")
    if 2 * sum(verdicts) < len(verdicts) and retry_new_tokens is not None and retry_new_tokens > max_new_tokens:
        longer = GenerationConfig(max_new_tokens=retry_new_tokens, batch_size=batch_size, system_prompt=system)
        retried = complete(model, tokenizer, prompts, longer)
        retried_verdicts = refusal_verdicts(retried.texts, "substring_nonempty")
        if sum(retried_verdicts) > 2 * sum(verdicts):
            greedy, completed, verdicts = longer, retried, retried_verdicts
    completions, first_logits = completed.texts, completed.first_logits
    for index, (text, logits, refused) in enumerate(zip(completions, first_logits, verdicts)):
        first = int(logits.argmax())  # greedy: the first generated token
        (refusing if refused else complying)[first] += 1
        examples.append({"index": index, "prompt": prompts[index], "completion": text, "refusal": refused, "first_token": first})
    if alternatives and prompts:
        runner_ups = first_logits.float().topk(alternatives + 1, dim=-1).indices[:, 1:].tolist()
        pairs = [(index, token) for index, tokens in enumerate(runner_ups) for token in tokens]
        completions = complete_after(model, tokenizer, [(prompts[i], token) for i, token in pairs], greedy)
        for (index, token), text, refused in zip(pairs, completions, refusal_verdicts(completions, "substring_nonempty")):
            (refusing if refused else complying)[token] += 1
            examples.append({"index": index, "prompt": prompts[index], "completion": text, "refusal": refused,
                             "first_token": token, "forced": True})
    tokens = sorted(token for token, count in refusing.items() if count > complying.get(token, 0))
    if not tokens:
        warnings.warn("the model refused none of the refusal validation prompts; using the first tokens of the "
                      "packaged generic refusals as refusal openers", stacklevel=2)
        lines = [line for line in read_package_text("refusals.txt").splitlines() if line.strip()]
        tokens = sorted({tokenizer(line.strip(), add_special_tokens=False)["input_ids"][0] for line in lines})
    return RefusalOpeners(tokens, examples, greedy.max_new_tokens)
