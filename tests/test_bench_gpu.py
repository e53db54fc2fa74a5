"""The GPU benchmark's script on a tiny Llama shape on the CPU, so that it cannot rot between GPU runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from conftest import build_tokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_gpu_tiny_runs_every_step(tmp_path):
    tokenizer_dir = tmp_path / "tokenizer"
    build_tokenizer().save_pretrained(tokenizer_dir)
    out = tmp_path / "bench_gpu.json"
    results = load_script().main(["--tiny", "--device", "cpu", "--tokenizer", str(tokenizer_dir),
                                  "--steps", "generation,collect,direction,orthogonalise,lora", "--out", str(out)])
    assert out.exists()
    for step in ("generation", "collect", "direction", "orthogonalise", "lora"):
        assert results[step]["status"] == "ok", (step, results[step].get("traceback"))
    generation = results["generation"]
    assert generation["ours_tokens"] > 0 and generation["generate_tokens"] > 0 and generation["speedup"] > 0
    assert generation["bound_bytes"] > generation["weight_bytes"] * 3  # 4 decode steps, each reads every weight
    assert results["collect"]["tokens"] > 0 and results["collect"]["tflops"] > 0
    assert results["direction"]["phases"] and "collect" in results["direction"]["phases"]
    assert results["orthogonalise"]["writers"] == 2 * 4  # attention out and MLP out of 4 layers
    lora = results["lora"]
    assert lora["train_tokens"] > 0 and lora["train_flops"] > 0 and lora["flops_formula"] == "4*N*T + 6*N_lora*T"
    assert "fraction_of_peak" not in lora  # no peak figure for a CPU


def test_bench_gpu_card_figures_and_bound():
    import torch

    bench = load_script()
    assert bench.card_figures(torch.device("cpu"), None, None)["bandwidth_gbs"] is None
    assert bench.card_figures(torch.device("cpu"), 100.0, 1000.0) == {"name": "cpu", "peak_bf16_tflops": 100.0,
                                                                      "bandwidth_gbs": 1000.0}
    # Llama-3-8B in bfloat16: 2 (K, V) · 32 layers · 8 heads · 128 dims · 2 bytes = 131,072 bytes per token.
    config = type("C", (), {"hidden_size": 4096, "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8})()
    assert bench.kv_bytes_per_token(config, torch.bfloat16) == 131072
