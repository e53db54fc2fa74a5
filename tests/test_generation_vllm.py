"""The vllm generation backend: which weights it hands vLLM, its errors, and (where vLLM and a CUDA GPU
are present) greedy completions equal to the reference backend's."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from ablate import AblateError
from ablate.config import GenerationConfig

PROMPTS = ["Write a short poem about the sea.", "Explain photosynthesis.", "List three tips for studying."]


@pytest.fixture()
def saved_llama(tokenizer, tmp_path):
    from conftest import build_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "llama"
    build_model("llama", tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, AutoModelForCausalLM.from_pretrained(folder).eval()


def test_a_saved_variant_loads_from_its_folder_and_a_changed_one_is_written(saved_llama, tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ablate.generation_vllm import source_folder, vllm_folder, write_weights
    from ablate.interventions import orthogonalize_weights

    folder, model = saved_llama
    assert source_folder(model) == folder
    assert vllm_folder(model, tokenizer) == (folder, None)  # straight from the saved folder, no copy

    adapted = get_peft_model(model, LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights=False))
    assert source_folder(adapted) is None
    written = write_weights(adapted, tokenizer, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(written).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-5)
    assert hasattr(adapted, "peft_config")  # the adapter in memory stays unmerged

    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    orthogonalize_weights(plain, torch.randn(plain.config.hidden_size))
    assert source_folder(plain) is None  # orthogonalised in memory: its folder no longer holds its weights


def test_hooks_and_a_missing_vllm_are_one_line_errors(saved_llama, tokenizer):
    from ablate.generation import generate_batches
    from ablate.generation_vllm import vllm_folder
    from ablate.interventions import directional_ablation

    _, model = saved_llama
    with directional_ablation(model, torch.randn(model.config.hidden_size)):
        with pytest.raises(AblateError, match="generation.backend: vllm: the model has hooks on"):
            vllm_folder(model, tokenizer)
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(AblateError, match="vLLM is not installed"):
            generate_batches(model, tokenizer, PROMPTS, GenerationConfig(backend="vllm"), progress=False)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None or not torch.cuda.is_available(),
                    reason="needs vLLM and a CUDA GPU")
def test_vllm_greedy_completions_equal_the_reference_backend(saved_llama, tokenizer):
    from ablate.generation import generate_batches
    from ablate.generation_vllm import release_engine

    _, model = saved_llama
    model = model.to("cuda")
    config = GenerationConfig(max_new_tokens=12, batch_size=8, backend="hf")
    reference, reference_logits = generate_batches(model, tokenizer, PROMPTS, config, progress=False)
    try:
        completions, logits = generate_batches(model, tokenizer, PROMPTS, config.model_copy(update={"backend": "vllm"}),
                                               progress=False)
    finally:
        release_engine()
    assert completions == reference
    assert torch.allclose(logits, reference_logits, atol=1e-3)
