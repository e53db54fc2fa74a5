import pytest
import torch
from torch import nn

from ablate import AblateError
from ablate.models import format_chat, get_adapter, pick_device, pick_dtype, resolve_spec, writer_output_axis
from conftest import FAMILIES, build_model


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_finds_layers_embedding_and_writers(tiny_models, family):
    model = tiny_models[family]
    adapter = get_adapter(model)
    assert adapter.family == family
    assert adapter.n_layers == 2
    assert adapter.d_model == 32
    assert isinstance(adapter.embedding, nn.Embedding)
    writers = adapter.all_writers()
    assert len(writers) == 4  # attention output and MLP down projection per layer
    for module in writers:
        axis = writer_output_axis(module)
        assert module.weight.shape[axis] == adapter.d_model


@pytest.mark.parametrize("family", FAMILIES)
def test_writers_are_what_the_residual_stream_receives(tiny_models, tokenizer, family):
    """Zeroing every writer and embedding must leave the final residual stream exactly zero,
    which proves the adapter found every module that writes into it."""
    model = build_model(family, tokenizer)
    adapter = get_adapter(model)
    with torch.no_grad():
        for module in adapter.all_writers() + [adapter.embedding] + adapter.extra_embeddings:
            module.weight.zero_()
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
    captured = {}
    handle = adapter.layers[-1].register_forward_hook(
        lambda _m, _i, output: captured.setdefault("out", output[0] if isinstance(output, tuple) else output))
    try:
        model(torch.tensor([[5, 6, 7, 8]]))
    finally:
        handle.remove()
    assert torch.count_nonzero(captured["out"]) == 0


def test_unknown_architecture_names_class_and_supported():
    from transformers import BertConfig, BertLMHeadModel

    model = BertLMHeadModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32, is_decoder=True))
    with pytest.raises(AblateError, match=r"BertLMHeadModel.*supported: .*llama"):
        get_adapter(model)


def test_adapter_sees_through_peft_wrapper(tokenizer):
    from peft import LoraConfig, get_peft_model

    model = build_model("llama", tokenizer)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert get_adapter(wrapped).n_layers == 2


def test_format_chat_uses_template(tokenizer):
    text = format_chat(tokenizer, "Hello?", system="Be brief.")
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello?<|im_end|>\n<|im_start|>assistant\n"


def test_format_chat_without_template_is_clear_error(tokenizer):
    import copy

    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(AblateError, match="no chat template"):
        format_chat(bare, "Hello?")


def test_resolve_spec_kinds(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert resolve_spec(str(tmp_path / "m")) == ("local", str(tmp_path / "m"))
    assert resolve_spec("HuggingFaceTB/SmolLM2-135M-Instruct") == ("hub", "HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(AblateError, match="GGUF file not found"):
        resolve_spec(str(tmp_path / "missing.gguf"))
    with pytest.raises(AblateError, match="no config.json"):
        (tmp_path / "empty").mkdir()
        resolve_spec(str(tmp_path / "empty"))
    with pytest.raises(AblateError, match="no such directory"):
        resolve_spec("./does/not/exist")


def test_device_and_dtype_defaults():
    assert pick_device("cpu").type == "cpu"
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


def test_load_local_directory_roundtrip(tmp_path, tokenizer):
    from ablate.models import load_model

    model = build_model("qwen2", tokenizer)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    loaded, loaded_tokenizer = load_model(str(tmp_path / "tiny"), device="cpu")
    ids = torch.tensor([[3, 4, 5]])
    assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
    assert loaded_tokenizer.padding_side == "left"
    assert not loaded.training


def test_gguf_marker_is_dropped_so_models_save(tmp_path, tokenizer):
    """transformers leaves quantization_config={'quant_method': 'gguf'} on de-quantised models; it must go."""
    from ablate.models import drop_gguf_marker

    model = build_model("llama", tokenizer)
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    drop_gguf_marker(model)
    assert not hasattr(model.config, "quantization_config")
    model.save_pretrained(tmp_path / "saved")
    assert "quantization_config" not in (tmp_path / "saved" / "config.json").read_text()


def test_gguf_is_parsed_once_during_a_conversion_and_the_reader_restored(tmp_path):
    import gguf
    import numpy as np

    from ablate.models import parse_gguf_once

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    original = gguf.GGUFReader
    with parse_gguf_once():
        first, second = gguf.GGUFReader(path), gguf.GGUFReader(str(path))
        assert first is second and first.tensors[0].name == "token_embd.weight"
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    assert gguf.GGUFReader is original and gguf.GGUFReader(path) is not first
