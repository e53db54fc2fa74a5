"""Quantised (bitsandbytes, on the CPU) and placed models through every stage: loading, hook ablation,
QLoRA training and its merged export, and the evaluation of a QLoRA variant on the
4-bit base it was trained on. Bad placement and quantisation settings fail in one line. (The direction
stage on a 4-bit model runs in tests/test_bench_models.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from ablate import AblateError
from ablate.config import ModelConfig, Quantization
from ablate.placement import check_placement, check_quantization, is_quantized
from conftest import build_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("quantized") / "tiny-llama"
    # Widths of at least one 4-bit block (64): on CPUs with AVX512-BF16, bitsandbytes repacks the weights of a
    # model in inference for its own kernel, which needs whole blocks per row.
    build_model("llama", tokenizer, hidden_size=64, intermediate_size=128).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_four_bit_model_is_ablated_by_hooks_not_weights(tiny_dir):
    from ablate.interventions import directional_ablation, orthogonalize_weights, unit
    from ablate.models import get_adapter, load_model

    model, tokenizer = load_model(ModelConfig(spec=str(tiny_dir), device="cpu", quantization="4bit"))
    assert is_quantized(model) and type(get_adapter(model).writers[0][0]).__name__ == "Linear4bit"
    direction = torch.randn(64, generator=torch.Generator().manual_seed(0))
    r_hat = unit(direction)
    seen = []
    with directional_ablation(model, direction):
        handle = get_adapter(model).layers[1].register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
        with torch.no_grad():
            model(torch.tensor([[5, 6, 7, 8]]))
        handle.remove()
    assert (seen[0].float() @ r_hat).abs().max() < 1e-4 * seen[0].float().norm(dim=-1).max()
    with pytest.raises(AblateError, match="cannot orthogonalise the quantised weight .*use hooks"):
        orthogonalize_weights(model, direction)


def test_qlora_trains_on_cpu_exports_dequantized_and_is_scored_on_its_4bit_base(tiny_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ablate import finetune as ft
    from ablate.config import FinetuneConfig
    from ablate.config import EvalRun
    from ablate.variants import load_variant, qlora_base

    rows = [{"prompt": f"Write a poem number {i} about the sea.", "response": f"Sure, poem {i}: the sea."} for i in range(6)]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = FinetuneConfig.model_validate({
        "mode": "dataset", "data": {"dataset": str(data)}, "lora": {"rank": 4, "alpha": 8},
        "training": {"qlora": True, "lr": 5e-2, "max_steps": 2, "batch_size": 2, "max_length": 48, "device": "cpu"},
        "eval": {"prompt_sets": ["harmless:test"], "limit": 2, "max_new_tokens": 2, "batch_size": 2, "capability_prompts": None},
        "merge": True, "keep_adapter": False,
    })
    [budget] = ft.run_finetune(str(tiny_dir), config, tmp_path / "out", progress=False)
    assert budget["qlora"] and budget["adapter_dir"] and budget["model_dir"]
    assert budget["dequantization"]["base_quantization"].startswith("4bit nf4")
    lora_b = [t for k, t in load_file(str(tmp_path / "out" / budget["name"] / "adapter" / "adapter_model.safetensors")).items()
              if "lora_B" in k]
    assert lora_b and any(t.abs().max() > 0 for t in lora_b)  # B starts at zero: training moved it
    note = json.loads((tmp_path / "out" / budget["name"] / "model" / "dequantization.json").read_text())
    assert "dequantize" in note["dequantized_with"] and note["lora"].startswith("merged")
    merged = AutoModelForCausalLM.from_pretrained(budget["model_dir"], dtype=torch.float32)  # plain transformers
    assert not is_quantized(merged)
    variant = EvalRun(model=qlora_base(ModelConfig(spec=str(tiny_dir), device="cpu")), variant="lora",
                      adapter=budget["adapter_dir"])
    model, _ = load_variant(variant)
    assert is_quantized(model) and hasattr(model, "peft_config")  # the 4-bit base + the adapter, as trained
    with torch.no_grad():
        ids = torch.tensor([[5, 6, 7, 8]])
        exported, adapted = merged(ids).logits, model(ids).logits
        with model.disable_adapter():
            base = model(ids).logits
    # The merged export computes what the 4-bit model + adapter computes, up to rounding (bitsandbytes' CPU kernel
    # is bf16 on CPUs with AVX512-BF16): far less than what the adapter changes.
    assert (exported - adapted).abs().max() < 0.1 * (adapted - base).abs().max()


def test_bad_placement_and_quantisation_are_one_line(monkeypatch):
    cpu = torch.device("cpu")
    with pytest.raises(AblateError, match=r"model.device_map: device 'cuda:3' is not on this machine \(visible: cpu"):
        check_placement(ModelConfig(device_map={"model.layers.0": "cuda:3"}), cpu)
    with pytest.raises(AblateError, match="model.device_map: 'gpu7' is not a device"):
        check_placement(ModelConfig(device_map="gpu7"), cpu)
    with pytest.raises(AblateError, match="model.max_memory: device '5' is not on this machine"):
        check_placement(ModelConfig(device_map="auto", max_memory={5: "10GiB"}), cpu)
    with pytest.raises(AblateError, match="bitsandbytes cannot quantise on a 'mps' device"):
        check_quantization(Quantization.nf4, "mps")
    import importlib.metadata

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.45.0" if name == "bitsandbytes" else real(name))
    with pytest.raises(AblateError, match=r"bitsandbytes 0.45.0 has no CPU backend .*bitsandbytes>=0.50"):
        check_quantization(Quantization.int8, "cpu")


def test_load_model_with_a_missing_device_fails_before_reading_weights(tiny_dir):
    from ablate.models import load_model

    with pytest.raises(AblateError, match="model.device_map: device 'cuda:1' is not on this machine") as raised:
        load_model(ModelConfig(spec=str(tiny_dir), device_map="cuda:1"))
    assert "\n" not in str(raised.value)


def test_eight_bit_and_device_map_load_on_cpu(tiny_dir):
    from ablate.models import load_model

    model, _ = load_model(ModelConfig(spec=str(tiny_dir), quantization="8bit", device="cpu"))
    assert is_quantized(model)
    placed, _ = load_model(ModelConfig(spec=str(tiny_dir), device_map="cpu", max_memory={"cpu": "1GiB"}))
    assert not is_quantized(placed) and {p.device.type for p in placed.parameters()} == {"cpu"}
