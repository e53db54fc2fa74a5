"""Streaming abliteration (shard by shard) equals in-memory orthogonalisation, on tiny models saved in
several shards: dense, tied heads, MoE with per-expert and fused checkpoint layouts, shared experts,
GPT-2's Conv1D and Gemma-3's multimodal wrapper."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from ablate import AblateError
from ablate.architectures import get_adapter
from ablate.interventions import orthogonalize_weights
from ablate.streaming import ShardWriter, abliterate_shards, checkpoint_shards
from conftest import build_model

FAMILIES = ["llama", "gemma", "gpt2", "mixtral", "qwen2_moe", "gpt_oss", "gemma3"]


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_equals_in_memory(family, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_model(family, tokenizer)
    source = tmp_path / "source"
    model.save_pretrained(source, max_shard_size="40KB")
    tokenizer.save_pretrained(source)
    assert len(checkpoint_shards(source)) > 1  # really sharded
    direction = torch.randn(get_adapter(model).d_model, generator=torch.Generator().manual_seed(3))

    in_memory = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        orthogonalize_weights(in_memory, direction)
    summary = abliterate_shards(source, direction, tmp_path / "streamed", max_shard_bytes=64 << 10)
    assert summary["projected_tensors"] > 2 * 2
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed", dtype=torch.float32).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    torch.testing.assert_close(_logits(streamed, ids), _logits(in_memory, ids), atol=1e-5, rtol=1e-5)
    expected = in_memory.state_dict()
    for name, tensor in streamed.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-6, rtol=1e-6, msg=name)
    assert (tmp_path / "streamed" / "tokenizer.json").exists()


def test_tied_head_is_untied_with_the_original_embedding(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_model("llama", tokenizer)  # tie_word_embeddings=True
    model.save_pretrained(tmp_path / "source")
    direction = torch.randn(32, generator=torch.Generator().manual_seed(4))
    summary = abliterate_shards(tmp_path / "source", direction, tmp_path / "out")
    assert summary["untied_head"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)  # the readout is untouched
    r_hat = direction / direction.norm()
    assert (loaded.model.embed_tokens.weight @ r_hat).abs().max() < 1e-5


def test_partial_strength_scales_only_the_named_writers(tokenizer, tmp_path):
    model = build_model("qwen2", tokenizer)
    model.save_pretrained(tmp_path / "source")
    direction = torch.randn(32, generator=torch.Generator().manual_seed(5))
    weights = [[0.0, 0.5], [1.0, 0.0]]
    expected = copy.deepcopy(model)
    orthogonalize_weights(expected, direction, weights)
    abliterate_shards(tmp_path / "source", direction, tmp_path / "out", weights)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, expected.state_dict()[name], atol=1e-6, rtol=1e-6, msg=name)


def test_index_naming_a_missing_shard_is_one_line_and_writes_nothing(tokenizer, tmp_path):
    from ablate.artifacts import mark_done, write_json
    from ablate.abliterate import abliterate

    model = build_model("llama", tokenizer)
    source = tmp_path / "source"
    model.save_pretrained(source, max_shard_size="40KB")
    tokenizer.save_pretrained(source)
    index = json.loads((source / "model.safetensors.index.json").read_text())
    missing = sorted(set(index["weight_map"].values()))[-1]
    (source / missing).unlink()
    with pytest.raises(AblateError, match=rf"names shard '{missing}', which is missing from") as raised:
        abliterate_shards(source, torch.ones(32), tmp_path / "out")
    assert "\n" not in str(raised.value)
    directions = tmp_path / "directions"
    directions.mkdir()
    torch.save(torch.ones(32), directions / "direction.pt")
    write_json(directions / "selected.json", {"layer": 1, "position": -1})
    mark_done(directions, "test")
    with pytest.raises(AblateError, match="missing from"):
        abliterate(str(source), directions, tmp_path / "abliterated", stream=True)
    assert not (tmp_path / "abliterated").exists() and not (tmp_path / "abliterated.partial").exists()


def test_shard_writer_splits_and_indexes(tmp_path):
    from safetensors.torch import load_file

    writer = ShardWriter(tmp_path, max_bytes=4 * 100)
    for index in range(5):
        writer.add(f"t{index}", torch.full((60,), float(index)))
    files = writer.close()
    assert len(files) == 5 and (tmp_path / "model.safetensors.index.json").exists()
    assert [load_file(str(p)) for p in checkpoint_shards(tmp_path)][2]["t2"][0] == 2.0
