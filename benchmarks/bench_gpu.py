"""GPU throughput of every stage of ablate, each against what the card allows.

    python benchmarks/bench_gpu.py --tokenizer benchmarks/_work/tokenizer     # on a GPU machine
    python benchmarks/bench_gpu.py --export-tokenizer benchmarks/_work/tokenizer   # once, where ablate is installed
    python benchmarks/bench_gpu.py --tiny                                     # a tiny shape on the CPU (the test)

No download: the model is built from a config with random weights in bfloat16 — Llama-3-8B's shapes
(hidden 4096, 32 layers, 32 heads, 8 KV heads, MLP 14336, vocabulary 128,256, rope theta 500,000, untied
head) — with the embedded model's tokenizer and chat template. Timings do not depend on the weights. Each
step is timed with the device synchronised before and after, records the peak memory it allocated, and is
guarded, so one failure (or a missing package: each step imports what it needs) costs that step only:

- `generation`: 128 built-in prompts (64 refusal:test + 64 harmless:test) × 64 new tokens, greedy, one
  batch, with `ablate.generation.generate_batches` against `model.generate` on the same batch. Tokens/s,
  the ratio, and the fraction of the bandwidth bound: every decode step reads the weights and the KV
  cache once, so the bound is Σ_steps (weight bytes + KV bytes at that step) / memory bandwidth (the
  measured time also holds the prefill, which the bound leaves out).
- `collect`: the direction stage's mean activations over 128 refusal:train + 128 harmless:train prompts.
  Achieved TFLOP/s = 2 · (matrix weights of the layers run) · tokens run / seconds, against the card's
  dense bfloat16 peak.
- `direction`: the whole direction stage (`run_direction`, default `DirectionConfig`) with its phase
  timings. Nothing refuses on a random model, so no candidate passes the filters and the stage takes
  its fallback (`selected.fallback` is recorded); it is timed anyway: every phase still runs.
- `orthogonalise`: `orthogonalize_weights` on every residual writer.
- `lora`, `qlora`: ablate's own trainer (`train_budget`, rank-16 LoRA on every linear layer; QLoRA in
  4-bit NF4, which needs bitsandbytes) on 32 harmless prompts, 2 epochs at batch 8. The model is
  saved once to a scratch folder to be loaded as a user's model is. Tokens/s, the fraction of peak by
  the project's FLOPs formula (`train_flops` = 4·N·T + 6·N_lora·T), peak memory.

Writes `benchmarks/_work/bench_gpu.json` (or `--out`) and prints a table. `--bandwidth-gbs` and
`--peak-tflops` override the card's figures (known: H100 SXM/PCIe, H200, A100, L40S, A10G, L4); on a
CPU or an unknown card the fractions are left out. `--deadline` (seconds, default 420) skips the steps
that would start after it, so the run ends well inside 8 minutes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

# Dense bfloat16 tensor-core peak (TFLOP/s, without sparsity) and memory bandwidth (GB/s), from the
# vendors' data sheets, by a substring of torch.cuda.get_device_name (first match wins).
CARDS = [
    ("H200", 989.0, 4800.0),
    ("H100 PCIe", 756.0, 2000.0),
    ("H100 NVL", 835.0, 3900.0),
    ("H100", 989.0, 3350.0),  # SXM
    ("A100-SXM4-80GB", 312.0, 2039.0),
    ("A100 80GB PCIe", 312.0, 1935.0),
    ("A100", 312.0, 1555.0),  # 40 GB
    ("L40S", 362.0, 864.0),
    ("A10G", 70.0, 600.0),
    ("L4", 121.0, 300.0),
]

LLAMA3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=14336, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False,
                 max_position_embeddings=8192)
TINY = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=49152, rope_theta=500000.0, tie_word_embeddings=False, max_position_embeddings=2048)
# The tiny shape's direction stage: every phase runs, on a handful of prompts (seconds on a CPU).
TINY_DIRECTION = dict(n_train=4, n_val=2, shortlist=1, screen_prompts=2, prescore_prompts=None, refusal_token_prompts=1,
                      refusal_token_alternatives=1, refusal_token_max_new_tokens=2,
                      strength_learning={"steps": 1, "batch_size": 2})
STEPS = ("generation", "collect", "direction", "orthogonalise", "lora", "qlora")


def card_figures(device: torch.device, peak_tflops: float | None, bandwidth_gbs: float | None) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak, bandwidth = None, None
    if device.type == "cuda":
        for key, card_peak, card_bandwidth in CARDS:
            if key in name:
                peak, bandwidth = card_peak, card_bandwidth
                break
    return {"name": name, "peak_bf16_tflops": peak_tflops or peak, "bandwidth_gbs": bandwidth_gbs or bandwidth}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(shape: dict, device: torch.device, dtype: torch.dtype):
    """A Llama model with random weights, built on the device in `dtype` (no float32 copy on the way)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def load_tokenizer(folder: str | None):
    """The embedded model's tokenizer (with its chat template): from a folder, or from the embedded model."""
    from transformers import AutoTokenizer

    from ablate.models import prepare_tokenizer

    if folder is None:
        from ablate.models import embedded_model_dir

        folder = str(embedded_model_dir())
    return prepare_tokenizer(AutoTokenizer.from_pretrained(folder))


def matrix_parameters(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * torch.finfo(dtype).bits // 8


def prompts_of(spec: str, n: int) -> list[str]:
    from ablate.data import load_prompt_set

    prompts = load_prompt_set(spec).prompts
    return [prompts[i % len(prompts)] for i in range(n)]  # a split shorter than n repeats


# --------------------------------------------------------------------------------------------
# Steps: each returns a dict of figures
# --------------------------------------------------------------------------------------------


def step_generation(model, tokenizer, card: dict, n_prompts: int, new_tokens: int) -> dict:
    from ablate import generation
    from ablate.config import GenerationConfig
    from ablate.generation import render_prompts, tokenize_batch

    device = next(model.parameters()).device
    prompts = prompts_of("refusal:test", n_prompts // 2) + prompts_of("harmless:test", n_prompts - n_prompts // 2)
    config = GenerationConfig(max_new_tokens=new_tokens, batch_size=n_prompts)
    # New tokens are counted where they are made (a random model's ids past the tokenizer's vocabulary
    # decode to nothing, so the text cannot be counted).
    counted = {"tokens": 0}
    decode = generation.decode

    def counting_decode(*args, **kwargs):
        tokens, logits = decode(*args, **kwargs)
        counted["tokens"] += sum(len(row) for row in tokens)
        return tokens, logits

    generation.decode = counting_decode
    try:
        synchronize(device)
        tick = time.perf_counter()
        generation.generate_batches(model, tokenizer, prompts, config, progress=False)
        synchronize(device)
        ours_s = time.perf_counter() - tick
    finally:
        generation.decode = decode
    ours_tokens = counted["tokens"]

    texts = render_prompts(tokenizer, prompts)
    inputs = tokenize_batch(tokenizer, texts, device)
    with torch.inference_mode():
        synchronize(device)
        tick = time.perf_counter()
        generated = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None,
                                   top_k=None, pad_token_id=tokenizer.pad_token_id)
        synchronize(device)
        plain_s = time.perf_counter() - tick
    new = generated[:, inputs["input_ids"].shape[1]:]
    stop = torch.tensor(generation.eos_token_ids(model, tokenizer), device=new.device)
    ends = [torch.isin(row, stop).nonzero() for row in new]
    steps = new.shape[1]
    plain_tokens = sum(int(e[0]) + 1 if len(e) else steps for e in ends)
    # The bound: each decode step reads every weight and the KV cache built so far (batch × tokens).
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_token = kv_bytes_per_token(model.config, next(model.parameters()).dtype)
    prompt_tokens = int(inputs["attention_mask"].sum())
    rows = len(prompts)
    bound_bytes = sum(weight_bytes + kv_token * (prompt_tokens + rows * step) for step in range(new_tokens))
    out = {"prompts": rows, "new_tokens": new_tokens, "prompt_tokens": prompt_tokens,
           "ours_seconds": ours_s, "ours_tokens": ours_tokens, "ours_tokens_per_s": ours_tokens / ours_s,
           "generate_seconds": plain_s, "generate_tokens": plain_tokens, "generate_tokens_per_s": plain_tokens / plain_s,
           "speedup": (ours_tokens / ours_s) / (plain_tokens / plain_s),
           "weight_bytes": weight_bytes, "bound_bytes": bound_bytes}
    if card["bandwidth_gbs"]:
        bound_s = bound_bytes / (card["bandwidth_gbs"] * 1e9)
        out.update(bound_seconds=bound_s, ours_fraction_of_bound=bound_s / ours_s * (ours_tokens / (rows * new_tokens)),
                   generate_fraction_of_bound=bound_s / plain_s * (plain_tokens / (rows * new_tokens)))
    return out


def step_collect(model, tokenizer, card: dict, n_prompts: int, batch_size: int | None) -> dict:
    from ablate.config import DirectionConfig
    from ablate.directions import collect_mean_activations, post_instruction_tokens, prepare_batches
    from ablate.models import get_adapter

    device = next(model.parameters()).device
    batch_size = batch_size or DirectionConfig().batch_size
    adapter = get_adapter(model)
    n_positions = len(post_instruction_tokens(tokenizer))
    sets = [prompts_of("refusal:train", n_prompts), prompts_of("harmless:train", n_prompts)]
    # Tokens run: the shared prefix once per batch plus every batch's padded remainder, through every
    # layer but the last (collection stops at the last layer's input).
    tokens = 0
    for prompts in sets:
        prepared = prepare_batches(tokenizer, prompts, batch_size, None, torch.device("cpu"), keep=n_positions)
        tokens += sum(len(prepared.prefix) + inputs["input_ids"].numel() for _, inputs in prepared.batches)
    layer_weights = sum(matrix_parameters(layer) for layer in adapter.layers[:-1])
    synchronize(device)
    tick = time.perf_counter()
    for prompts in sets:
        collect_mean_activations(model, tokenizer, prompts, n_positions, batch_size=batch_size)
    synchronize(device)
    seconds = time.perf_counter() - tick
    tflops = 2 * layer_weights * tokens / seconds / 1e12
    out = {"prompts": 2 * n_prompts, "batch_size": batch_size, "tokens": tokens, "seconds": seconds, "tflops": tflops}
    if card["peak_bf16_tflops"]:
        out["fraction_of_peak"] = tflops / card["peak_bf16_tflops"]
    return out


def step_direction(model, tokenizer, work: Path, settings: dict) -> dict:
    from ablate.config import DirectionConfig
    from ablate.directions import run_direction

    device = next(model.parameters()).device
    synchronize(device)
    tick = time.perf_counter()
    selected = run_direction(model, tokenizer, DirectionConfig.model_validate(settings), work / "directions", progress=False)
    synchronize(device)
    return {"seconds": time.perf_counter() - tick, "phases": selected.get("timings"), "fallback": selected.get("fallback"),
            "layer": selected.get("layer"), "compute_dtype": selected.get("compute_dtype")}


def step_orthogonalise(model) -> dict:
    from ablate.interventions import orthogonalize_weights
    from ablate.models import get_adapter

    device = next(model.parameters()).device
    direction = torch.randn(get_adapter(model).d_model, generator=torch.Generator().manual_seed(0))
    synchronize(device)
    tick = time.perf_counter()
    orthogonalize_weights(model, direction)
    synchronize(device)
    return {"seconds": time.perf_counter() - tick, "writers": len(get_adapter(model).all_writers())}


def step_train(model_dir: Path, card: dict, qlora: bool, n_examples: int, batch_size: int, work: Path) -> dict:
    from ablate.config import FinetuneConfig, ModelConfig
    from ablate.finetune import resolve_budgets, train_budget

    config = FinetuneConfig.model_validate({
        "mode": "dataset",
        "data": {"dataset": "unused"},  # the examples below are passed in directly
        "lora": {"rank": 16, "alpha": 32, "target_modules": "all-linear"},
        "training": {"qlora": qlora, "epochs": 2, "batch_size": batch_size, "lr": 1e-4, "max_length": 256,
                     "gradient_checkpointing": False},
        "eval": {"enabled": False},
    })
    # Timing only: harmless prompts, each answered with the text of another (no model writes an answer).
    prompts = prompts_of("harmless:train", n_examples + 1)
    examples = [{"prompt": prompts[i], "response": prompts[i + 1], "kind": "benign"} for i in range(n_examples)]
    budget = resolve_budgets(config)[0]
    _, _, metrics = train_budget(ModelConfig(spec=str(model_dir)), config, budget, examples, work / ("qlora" if qlora else "lora"),
                                 progress=False)
    out = {key: metrics[key] for key in ("steps", "wall_seconds", "train_tokens", "trainable_parameters",
                                         "matmul_parameters", "train_flops", "flops_formula", "peak_memory_bytes")}
    out["tokens_per_s"] = metrics["train_tokens"] / metrics["wall_seconds"]
    out["tflops"] = metrics["train_flops"] / metrics["wall_seconds"] / 1e12
    if card["peak_bf16_tflops"]:
        out["fraction_of_peak"] = out["tflops"] / card["peak_bf16_tflops"]
    return out


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def run_step(name: str, function, results: dict, device: torch.device, started: float, deadline: float) -> None:
    """Time one step with its peak memory; an exception is recorded, not raised."""
    if time.perf_counter() - started > deadline:
        results[name] = {"status": "skipped", "reason": f"past the {deadline:.0f} s deadline"}
        print(f"[{name}] skipped (deadline)", file=sys.stderr)
        return
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    tick = time.perf_counter()
    try:
        figures = function()
        status = {"status": "ok"}
    except Exception as error:  # noqa: BLE001 — one failure must not lose the other steps
        figures, status = {}, {"status": "failed", "error": f"{type(error).__name__}: {error}".splitlines()[0],
                               "traceback": traceback.format_exc(limit=4)}
    synchronize(device)
    results[name] = {**status, "step_seconds": time.perf_counter() - tick, **figures}
    if device.type == "cuda":
        results[name]["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    print(f"[{name}] {results[name]['status']} in {results[name]['step_seconds']:.1f} s"
          + (f": {results[name].get('error')}" if status["status"] == "failed" else ""), file=sys.stderr)


def table(results: dict) -> str:
    def cell(step: str, key: str, scale: float = 1.0, digits: int = 1) -> str:
        value = results.get(step, {}).get(key)
        return "—" if value is None else f"{value * scale:.{digits}f}"

    rows = [
        ("generation: ablate tokens/s", cell("generation", "ours_tokens_per_s")),
        ("generation: model.generate tokens/s", cell("generation", "generate_tokens_per_s")),
        ("generation: ratio", cell("generation", "speedup", digits=2)),
        ("generation: % of bandwidth bound (ablate)", cell("generation", "ours_fraction_of_bound", 100)),
        ("generation: % of bandwidth bound (generate)", cell("generation", "generate_fraction_of_bound", 100)),
        ("collect: s", cell("collect", "seconds", digits=2)),
        ("collect: TFLOP/s", cell("collect", "tflops", digits=2)),
        ("collect: % of bf16 peak", cell("collect", "fraction_of_peak", 100)),
        ("direction stage: s", cell("direction", "seconds")),
        ("orthogonalise: s", cell("orthogonalise", "seconds", digits=3)),
        ("LoRA: tokens/s", cell("lora", "tokens_per_s", digits=0)),
        ("LoRA: % of peak (FLOPs formula)", cell("lora", "fraction_of_peak", 100)),
        ("QLoRA: tokens/s", cell("qlora", "tokens_per_s", digits=0)),
        ("QLoRA: % of peak (FLOPs formula)", cell("qlora", "fraction_of_peak", 100)),
    ]
    for step in STEPS:
        if step in results:
            rows.append((f"{step}: status, peak GiB", f"{results[step]['status']}, {cell(step, 'peak_memory_gib', digits=1)}"))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama shape (4 layers, hidden 64): the CPU test")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--tokenizer", default=None, help="folder with the embedded model's tokenizer (default: the embedded model)")
    parser.add_argument("--export-tokenizer", default=None, metavar="DIR", help="write the embedded model's tokenizer to DIR and exit")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--prompts", type=int, default=None, help="prompts of the generation step and per set of the collection step (128; --tiny 8)")
    parser.add_argument("--new-tokens", type=int, default=None, help="new tokens per prompt (64; --tiny 4)")
    parser.add_argument("--collect-batch", type=int, default=None, help="default: DirectionConfig.batch_size")
    parser.add_argument("--train-examples", type=int, default=None, help="training examples (32; --tiny 4)")
    parser.add_argument("--train-batch", type=int, default=None, help="training batch size (8; --tiny 2)")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--bandwidth-gbs", type=float, default=None)
    parser.add_argument("--deadline", type=float, default=420.0, help="seconds after which no further step starts")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "_work" / "bench_gpu.json"))
    args = parser.parse_args(argv)
    for name, full, tiny in (("prompts", 128, 8), ("new_tokens", 64, 4), ("train_examples", 32, 4), ("train_batch", 8, 2)):
        if getattr(args, name) is None:  # the tiny shape's sizes are the test's
            setattr(args, name, tiny if args.tiny else full)
    if args.export_tokenizer:
        load_tokenizer(None).save_pretrained(args.export_tokenizer)
        print(f"tokenizer written to {args.export_tokenizer}")
        return {}
    steps = [step.strip() for step in args.steps.split(",") if step.strip()]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        parser.error(f"--steps: unknown step(s) {', '.join(unknown)}; expected some of {', '.join(STEPS)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    card = card_figures(device, args.peak_tflops, args.bandwidth_gbs)
    started = time.perf_counter()
    results: dict = {"card": card, "shape": "tiny" if args.tiny else "llama3-8b", "dtype": str(dtype).removeprefix("torch."),
                     "versions": {"torch": torch.__version__, "python": sys.version.split()[0]}}
    with __import__("contextlib").suppress(Exception):
        import transformers

        results["versions"]["transformers"] = transformers.__version__
    tokenizer = load_tokenizer(args.tokenizer)
    tick = time.perf_counter()
    model = build_model(TINY if args.tiny else LLAMA3_8B, device, dtype)
    synchronize(device)
    results["build_seconds"] = time.perf_counter() - tick
    results["parameters"] = sum(p.numel() for p in model.parameters())
    print(f"model: {results['parameters'] / 1e9:.2f} B parameters, {results['dtype']}, on {card['name']}, "
          f"built in {results['build_seconds']:.1f} s", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    try:
        if "generation" in steps:
            run_step("generation", lambda: step_generation(model, tokenizer, card, args.prompts, args.new_tokens),
                     results, device, started, args.deadline)
        if "collect" in steps:
            run_step("collect", lambda: step_collect(model, tokenizer, card, args.prompts, args.collect_batch),
                     results, device, started, args.deadline)
        if "direction" in steps:
            run_step("direction", lambda: step_direction(model, tokenizer, work, TINY_DIRECTION if args.tiny else {}), results, device, started, args.deadline)
        if "orthogonalise" in steps:
            run_step("orthogonalise", lambda: step_orthogonalise(model), results, device, started, args.deadline)
        training = [step for step in ("lora", "qlora") if step in steps]
        if training:
            model_dir = work / "model"

            def save() -> dict:
                model.save_pretrained(model_dir)
                tokenizer.save_pretrained(model_dir)
                return {}

            run_step("save", save, results, device, started, args.deadline)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
            for step in training:
                run_step(step, lambda step=step: step_train(model_dir, card, step == "qlora", args.train_examples,
                                                        args.train_batch, work),
                         results, device, started, args.deadline)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["total_seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    print(f"{card['name']}, {results['shape']} ({results['parameters'] / 1e9:.2f} B), {results['dtype']}, "
          f"{results['total_seconds']:.0f} s in all")
    print(table(results))
    print(f"written: {out}")
    return results


if __name__ == "__main__":
    main()
