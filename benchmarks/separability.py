"""How separable are the packaged refusal and harmless/borderline prompts — the ceiling a hardening recipe
can hope to reach on the held-out splits.

Two classifiers are trained on the *train* splits (refusal:train against harmless:train + borderline:train)
and scored on the validation and test splits, as a hardened organism is:
- a bag-of-words baseline (TF-IDF of words and word pairs, logistic regression), which sees the wording only;
- a linear probe on a model's residual stream at the last prompt token (the position whose output is the
  answer's first token) at every third layer, which sees what the model itself represents.

Each row prints the share of each set classified "refuse": refusal (want high), harmless and borderline
(want low), as the hardening targets read them (≥ 95% / ≤ 5% / ≤ 15% on the test splits).

    python benchmarks/separability.py --model embedded
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from ablate.data import SPLITS, load_prompt_set
from ablate.generation import length_sorted_batches, render_prompts, tokenize_batch
from ablate.models import load_model

SETS = ("refusal", "harmless", "borderline")


def last_token_residuals(model, tokenizer, prompts: list[str], batch_size: int) -> np.ndarray:
    """(prompts, layers + 1, d_model): the residual stream at the last template token of each prompt."""
    texts = render_prompts(tokenizer, prompts)
    lengths = [len(tokenizer(text, add_special_tokens=False).input_ids) for text in texts]
    out = np.zeros((len(texts), model.config.num_hidden_layers + 1, model.config.hidden_size), dtype=np.float32)
    for indices in length_sorted_batches(lengths, batch_size):
        batch = tokenize_batch(tokenizer, [texts[i] for i in indices], model.device)
        batch["position_ids"] = (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)  # left padding shifts nothing
        with torch.no_grad():
            states = model(**batch, output_hidden_states=True, use_cache=False).hidden_states
        out[indices] = torch.stack([state[:, -1] for state in states], 1).float().cpu().numpy()
    return out


def rates(predict, features: dict) -> str:
    """Share classified 'refuse' per set, for the validation and the test split."""
    cells = []
    for split in ("val", "test"):
        cells.append(" / ".join(f"{100 * predict(features[name, split]).mean():5.1f}" for name in SETS))
    return "   ".join(cells)


def at_95_refusal(score, features: dict) -> str:
    """Harmless / borderline test rates at the strictest threshold that still refuses >= 95% of the refusal
    test prompts — chosen on the test split itself, so an optimistic bound on what this classifier allows."""
    refusal = np.sort(score(features["refusal", "test"]))
    threshold = refusal[int(np.floor(0.05 * len(refusal)))]
    return " / ".join(f"{100 * (score(features[name, 'test']) >= threshold).mean():5.1f}" for name in SETS[1:])


def train_labels(features: dict) -> np.ndarray:
    """1 for refusal:train, 0 for harmless:train and borderline:train, in SETS order."""
    return np.concatenate([np.full(len(features[name, "train"]), name == "refusal") for name in SETS])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded", help="model spec (default: the embedded SmolLM2)")
    parser.add_argument("--C", type=float, default=0.05, help="inverse L2 strength of the residual probe")
    parser.add_argument("--every", type=int, default=3, help="probe every N-th layer")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    prompts = {(name, split): load_prompt_set(f"{name}:{split}").prompts for name in SETS for split in SPLITS}
    print(f"{'classifier':<34} {'val: refusal / harmless / borderline':<38}{'test: refusal / harmless / borderline':<40}"
          "test at 95% refusal: harmless / borderline")

    texts, labels = [text for name in SETS for text in prompts[name, "train"]], train_labels(prompts)
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit(texts)
    words = LogisticRegression(C=1.0, max_iter=5000).fit(vectorizer.transform(texts), labels)
    print(f"{'TF-IDF words + pairs':<34} {rates(lambda p: words.predict(vectorizer.transform(p)), prompts)}     "
          f"{at_95_refusal(lambda p: words.decision_function(vectorizer.transform(p)), prompts)}")

    model, tokenizer = load_model(args.model)
    model.eval()
    residuals = {key: last_token_residuals(model, tokenizer, value, args.batch_size) for key, value in prompts.items()}
    for layer in range(args.every, model.config.num_hidden_layers + 1, args.every):
        x, y = np.concatenate([residuals[name, "train"][:, layer] for name in SETS]), train_labels(residuals)
        mean, scale = x.mean(0), x.std(0) + 1e-6
        probe = LogisticRegression(C=args.C, max_iter=5000).fit((x - mean) / scale, y)
        print(f"{f'residual probe, layer {layer} input':<34} "
              f"{rates(lambda r: probe.predict((r[:, layer] - mean) / scale), residuals)}     "
              f"{at_95_refusal(lambda r: probe.decision_function((r[:, layer] - mean) / scale), residuals)}")


if __name__ == "__main__":
    main()
