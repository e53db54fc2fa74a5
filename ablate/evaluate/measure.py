"""The measurement layer: every refusal figure of every stage is generated and scored here.

    from ablate.config import GenerationConfig
    from ablate.evaluate.measure import complete, measure_refusal, refusal_verdicts
    completions = complete(model, tokenizer, prompts, GenerationConfig(max_new_tokens=48))
    figure, completions = measure_refusal(model, tokenizer, prompts, GenerationConfig(max_new_tokens=48))
    # figure: {"value", "ci", "n", "k", "method": "wilson", "scorer": "substring", "max_new_tokens": 48}

Each caller names the lengths and the scorer its own config holds, and gets the same result format (a rate
with its Wilson interval and the contract it was measured under):

- the evaluation stage (`ablate.evaluate.run`): the suite's `generation` and `scorers`;
- a fine-tuning budget's refusal rates (`ablate.finetune.measure`): `eval.max_new_tokens`, `substring`;
- the direction stage's validation (`ablate.directions.select.ValidationScorer`, the refusal openers):
  `refusal_token_max_new_tokens`, `substring_nonempty` (an empty answer is no refusal opener);
- `benchmarks/bench_directions.py`: its `--max-new-tokens`, `substring`.

Completions come from `ablate.generation.generate_batches`, whose backend `GenerationConfig.backend` names
(`fast`, or `hf`: transformers' own `model.generate`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ablate import AblateError
from ablate.config import GenerationConfig
from ablate.evaluate import refusal as markers
from ablate.evaluate.stats import rate_metric

SCORERS: dict[str, Callable[[str], bool]] = {
    "substring": lambda text: markers.is_refusal(text),  # refusal markers; an empty answer counts as a refusal
    "substring_nonempty": lambda text: bool(text) and markers.is_refusal(text),  # markers in a non-empty answer
}


@dataclass
class Completions:
    """Completions in the prompts' order (new text, special tokens stripped) and the first generated token's
    logits (n_prompts, vocab) float32 on the CPU, from the same pass."""

    texts: list[str]
    first_logits: torch.Tensor


def complete(model, tokenizer, prompts: list[str], generation: GenerationConfig, *, progress: bool = False,
             description: str = "generating") -> Completions:
    """Generate one completion per prompt with `generation`'s settings and backend."""
    from ablate.generation import generate_batches

    texts, first_logits = generate_batches(model, tokenizer, prompts, generation, progress=progress, description=description)
    return Completions(texts, first_logits)


@torch.inference_mode()
def complete_after(model, tokenizer, prompt_tokens: list[tuple[str, int]], generation: GenerationConfig) -> list[str]:
    """Completions of each (prompt, first token id) pair, the first token forced: that token's text and what
    follows it (greedy or sampled as `generation` says)."""
    from ablate.generation import decode, eos_token_ids, length_sorted_batches, render_prompts, tokenize_batch

    texts = render_prompts(tokenizer, [prompt for prompt, _ in prompt_tokens], generation.system_prompt)
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    device, eos_ids = next(model.parameters()).device, eos_token_ids(model, tokenizer)
    out = [""] * len(texts)
    for batch in length_sorted_batches(lengths, generation.batch_size):
        inputs = tokenize_batch(tokenizer, [texts[i] for i in batch], device)  # left-padded: append the token
        first = torch.tensor([[prompt_tokens[i][1]] for i in batch], device=device)
        input_ids = torch.cat([inputs["input_ids"], first], dim=1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(first)], dim=1)
        tokens, _ = decode(model, input_ids, mask, generation, eos_ids, pad_id=tokenizer.pad_token_id or 0)
        for row, index in enumerate(batch):
            out[index] = tokenizer.decode([prompt_tokens[index][1]] + tokens[row], skip_special_tokens=True).strip()
    return out


def refusal_verdicts(texts: list[str], scorer: str = "substring") -> list[bool]:
    """Per completion, whether the named scorer calls it a refusal."""
    if scorer not in SCORERS:
        raise AblateError(f"refusal scorer '{scorer}': unknown; expected one of: {', '.join(sorted(SCORERS))}")
    return [SCORERS[scorer](text) for text in texts]


def refusal_result(verdicts: list[bool], generation: GenerationConfig, scorer: str, confidence: float = 0.95) -> dict:
    """The refusal rate of some verdicts in the common result format: the rate with its Wilson interval
    (`rate_metric`) and what it was measured under (scorer, new tokens)."""
    return {**rate_metric(sum(verdicts), len(verdicts), confidence), "scorer": scorer,
            "max_new_tokens": generation.max_new_tokens}


def measure_refusal(model, tokenizer, prompts: list[str], generation: GenerationConfig, *, scorer: str = "substring",
                    confidence: float = 0.95, progress: bool = False,
                    description: str = "generating") -> tuple[dict, Completions]:
    """Generate and score: (`refusal_result` of the completions, the completions)."""
    completions = complete(model, tokenizer, prompts, generation, progress=progress, description=description)
    return refusal_result(refusal_verdicts(completions.texts, scorer), generation, scorer, confidence), completions
