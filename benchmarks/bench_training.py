"""Training loss on a CPU: trl's fused output head against our `supervised_head_loss`, padded and packed,
on the same hardening batches in one process.

    python benchmarks/bench_training.py                        # the embedded model, the shipped organism recipe
    python benchmarks/bench_training.py --batches 4 --repeats 1

The batches are the first `--batches` the trainer of `finetune_configs/harden_organism.yaml` draws (its
self-distilled answers are generated once, or read from the cache), on a fresh LoRA adapter whose B
matrices are randomised so that every path has a gradient to compare. Three ways, each a forward and a
backward pass per batch, repeated `--repeats` times in turn:

- `trl`: `SFTTrainer.compute_loss` (its fused output head, per-tile torch ops on a CPU);
- `padded`: `supervised_head_loss(pack=False)` — one pass over the right-padded batch, output head on the
  positions some row supervises;
- `packed`: `supervised_head_loss` as shipped — the shared prompt prefix once and every row's own tokens in
  one padding-free sequence.

Prints seconds per step (the best of the repeats), ratios against `trl`, and the largest difference of
each path's losses and LoRA gradients from trl's.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import ablate.finetune as ft
from ablate.config import FinetuneConfig, load_config

RECIPE = Path(__file__).resolve().parents[1] / "finetune_configs" / "harden_organism.yaml"


def main() -> None:
    from trl import SFTTrainer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--config", default=str(RECIPE))
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    config = load_config(args.config, FinetuneConfig)
    model_config = ft.as_model_config(args.model)
    examples, _ = ft.build_examples(model_config, config)
    budget = ft.resolve_budgets(config)[0]
    model, tokenizer = ft.load_for_training(model_config, config, budget["rank"], budget["alpha"])
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.01)
    with tempfile.TemporaryDirectory() as work:
        trainer = ft.build_trainer(model, tokenizer, config, budget, examples, Path(work), progress=False)
        batches = []
        for batch in trainer.get_train_dataloader():
            batches.append(batch)
            if len(batches) == args.batches:
                break
        paths = {
            "trl": lambda m, b: SFTTrainer.compute_loss(trainer, m, b),
            "padded": lambda m, b: ft.supervised_head_loss(m, b, pack=False),
            "packed": lambda m, b: ft.supervised_head_loss(m, b),
        }
        seconds = {name: float("inf") for name in paths}
        results: dict[str, tuple[list[float], list[dict]]] = {}
        for _ in range(args.repeats):
            for name, compute in paths.items():
                losses, grads = [], []
                tick = time.perf_counter()
                for batch in batches:
                    model.zero_grad()
                    loss = compute(model, dict(batch))
                    loss.backward()
                    losses.append(float(loss.detach()))
                    grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
                seconds[name] = min(seconds[name], (time.perf_counter() - tick) / len(batches))
                results[name] = (losses, grads)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    computed = sum(b["input_ids"].numel() for b in batches)
    print(f"{len(batches)} batches of {config.training.batch_size}: {real} real tokens, {computed} with padding")
    reference_losses, reference_grads = results["trl"]
    for name in paths:
        losses, grads = results[name]
        loss_diff = max(abs(a - b) for a, b in zip(losses, reference_losses))
        grad_diff = max(float((g[k] - r[k]).abs().max()) for g, r in zip(grads, reference_grads) for k in r)
        print(f"{name:7s} {seconds[name]:6.2f} s/step  ×{seconds['trl'] / seconds[name]:.2f} vs trl  "
              f"max |Δloss| {loss_diff:.1e}  max |Δgrad| {grad_diff:.1e}")


if __name__ == "__main__":
    main()
