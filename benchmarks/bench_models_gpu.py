"""One prepared run of the large-model path: an 8B-shaped random-init Llama loaded in 4-bit, the direction
stage on it with hooks, a QLoRA fine-tune of it, and streaming abliteration of its saved shards.

    python benchmarks/bench_models_gpu.py --out benchmarks/_work/models_gpu.json     # on a CUDA GPU (~16 GB disk)
    python benchmarks/bench_models_gpu.py --tiny --out runs/tiny.json                # the same steps, tiny, on a CPU

Steps, each timed (wall seconds) with its peak memory (CUDA: torch.cuda.max_memory_allocated; the streaming
step runs in a child process and reports its own peak RSS):

1. `build`: a random-init Llama of the Llama-3.1-8B shape (32 layers, d_model 4096, ffn 14336, 32 heads,
   8 KV heads, vocab 128256; `--tiny`: 2 layers, d_model 64) saved in bfloat16 safetensors shards, with a
   small byte-level tokenizer and a chat template (no hub access).
2. `load_4bit`: `load_model` with `quantization: 4bit` (bitsandbytes NF4, double quantisation).
3. `direction`: `run_direction` on the 4-bit model (hooks; a random model refuses nothing, so the stage
   falls back to generic refusal tokens and warns).
4. `qlora`: `run_finetune` with `training.qlora` on a few generated prompt/answer pairs, `--steps` steps.
5. `stream`: `abliterate_shards` over the saved shards with the stage's direction.

The JSON names the device (`torch.cuda.get_device_name`) and the package versions; a figure copied into
benchmarks/README.md must name the card.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

LLAMA_8B = dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256)
TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512)
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def peak_memory() -> float:
    """Peak GiB since the last reset: CUDA memory on a GPU, this process's RSS on a CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(results: dict, name: str, function):
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    value = function()
    results[name] = {"seconds": round(time.perf_counter() - started, 2), "peak_gib": round(peak_memory(), 3)}
    print(f"{name}: {results[name]}", flush=True)
    return value


def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["I'm sorry, but I can't help with that.", "Sure, here is a short poem about the sea.",
              "Explain how photosynthesis works.", "user assistant system"] * 20
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=min(vocab_size, 400),
                                                         special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    return tokenizer


def build(folder: Path, shape: dict, shard: str) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = build_tokenizer(shape["vocab_size"])
    config = LlamaConfig(**shape, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size=shard)
    tokenizer.save_pretrained(folder)


def stream_child(source: str, direction: str, out: str) -> None:
    """Run in a child process: streaming abliteration, then print its peak RSS (GiB) as JSON."""
    from ablate.streaming import abliterate_shards

    started = time.perf_counter()
    summary = abliterate_shards(Path(source), torch.load(direction, weights_only=True), Path(out))
    print(json.dumps({"seconds": round(time.perf_counter() - started, 2),
                      "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
                      "largest_shard_gib": round(summary["largest_input_shard_bytes"] / 2**30, 3),
                      "projected_tensors": summary["projected_tensors"], "shards": len(summary["shards"])}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="A 2-layer model: the same steps in seconds, on a CPU.")
    parser.add_argument("--work", default="benchmarks/_work/models_gpu", help="Scratch folder (the saved model, outputs).")
    parser.add_argument("--out", default="benchmarks/_work/models_gpu.json", help="Where the figures are written (JSON).")
    parser.add_argument("--steps", type=int, default=4, help="QLoRA optimiser steps.")
    parser.add_argument("--stream-child", nargs=3, metavar=("SOURCE", "DIRECTION", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stream_child:
        stream_child(*args.stream_child)
        return
    import shutil

    from ablate.config import DirectionConfig, FinetuneConfig, ModelConfig
    from ablate.directions import load_direction, run_direction
    from ablate.finetune import run_finetune
    from ablate.models import load_model
    from ablate.study import package_versions

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                     "shape": "tiny" if args.tiny else "Llama-3.1-8B (random init)", "versions": package_versions()}
    source = work / "model"
    timed(results, "build", lambda: build(source, TINY if args.tiny else LLAMA_8B, "100KB" if args.tiny else "2GB"))
    model_config = ModelConfig(spec=str(source), quantization="4bit", dtype="bfloat16" if device == "cuda" else "float32",
                               device=device)
    model, tokenizer = timed(results, "load_4bit", lambda: load_model(model_config))
    small = DirectionConfig(n_train=8 if args.tiny else 32, n_val=4 if args.tiny else 16, refusal_token_prompts=2,
                            refusal_token_max_new_tokens=2, batch_size=4 if args.tiny else 8, shortlist=2,
                            strength_learning={"enabled": False}, strength_search=[])
    timed(results, "direction", lambda: run_direction(model, tokenizer, small, work / "directions", progress=False))
    del model
    rows = [{"prompt": f"Write line {i} of a poem about the sea.", "response": f"Line {i}: the sea is wide."} for i in range(16)]
    (work / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = FinetuneConfig.model_validate({
        "mode": "dataset", "data": {"dataset": str(work / "pairs.jsonl")}, "lora": {"rank": 16, "alpha": 32},
        "training": {"qlora": True, "lr": 2e-4, "max_steps": args.steps, "batch_size": 2, "max_length": 64,
                     "gradient_checkpointing": not args.tiny, "device": device,
                     "dtype": "bfloat16" if device == "cuda" else "float32"},
        "eval": {"enabled": False}, "merge": False})
    budgets = timed(results, "qlora", lambda: run_finetune(ModelConfig(spec=str(source), device=device), recipe,
                                                           work / "finetune", progress=False))
    results["qlora"]["train_loss"] = budgets[0].get("train_loss")
    direction, _ = load_direction(work / "directions")
    torch.save(direction, work / "direction.pt")
    child = subprocess.run([sys.executable, __file__, "--stream-child", str(source), str(work / "direction.pt"),
                            str(work / "streamed")], capture_output=True, text=True, check=True)
    results["stream"] = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"stream: {results['stream']}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"→ {args.out}")


if __name__ == "__main__":
    main()
