"""Evaluation: refusal scorers, over-refusal, capability, divergence and statistics.

    from ablate.evaluate import load_suite, run_eval, compare
    suite = load_suite("default")                      # or "paper", or a YAML path
    result = run_eval(model, tokenizer, suite, Path("runs/x"), "base", reference=(ref, ref_tok))
    compare("runs/x/eval/base.json", "runs/x/eval/ablated.json", "refusal_rate")

Modules: `refusal` (substring markers, three-way labels, logit refusal score), `judges` (judge
models through templates), `divergence` (KL and cross-entropy against a reference), `capability`
(lm-eval on the in-memory model), `stats` (Wilson, bootstrap, Cohen's kappa), `run` (the stage).
`ablate.evaluate.refusal` holds the substring scorer every stage uses to print a refusal rate.
Names from `run` and `stats` are imported on first use, so `import ablate.evaluate.refusal`
stays light (no torch, numpy or lm-eval).
"""

from ablate.evaluate.refusal import is_refusal, label_response, refusal_rate

_LAZY = {
    "load_suite": "ablate.evaluate.run",
    "run_eval": "ablate.evaluate.run",
    "compare": "ablate.evaluate.stats",
    "wilson_interval": "ablate.evaluate.stats",
    "bootstrap_interval": "ablate.evaluate.stats",
    "cohen_kappa": "ablate.evaluate.stats",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ablate.evaluate' has no attribute '{name}'")


__all__ = ["is_refusal", "label_response", "refusal_rate", *_LAZY]
