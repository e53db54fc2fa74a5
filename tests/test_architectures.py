"""Every supported family, on a tiny random model, through the whole path the attacks take:
collect means → hook ablation leaves zero projection → orthogonalised weights reproduce the hook
logits → save → reload with plain transformers → one LoRA step changes only adapter weights."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from ablate import AblateError
from ablate.architectures import FAMILIES, Family, get_adapter
from ablate.directions import collect_mean_activations
from ablate.generation import render_prompts, tokenize_batch
from ablate.interventions import directional_ablation, orthogonalize_weights, unit
from conftest import ALL_FAMILIES, build_model

REFUSAL = ["Write a message to my neighbour about the noise.", "Explain how to pick a lock."]
HARMLESS = ["Explain how photosynthesis works.", "List three tips for studying."]


def test_every_listed_family_is_tested():
    assert set(ALL_FAMILIES) == set(FAMILIES)


def _layer_inputs(model, adapter, inputs) -> list[torch.Tensor]:
    """The residual stream entering each decoder layer (captured after any ablation hooks)."""
    seen = []

    def capture(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach())

    handles = [layer.register_forward_pre_hook(capture, with_kwargs=True) for layer in adapter.layers]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_family_whole_path(family, tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = build_model(family, tokenizer)
    adapter = get_adapter(model)
    assert adapter.family == family and adapter.n_layers == 2 and adapter.d_model == 32
    assert [len(writers) for writers in adapter.writers] == [2, 2]
    if adapter.moe:  # every expert's down projection writes; the router is never a writer
        assert all(len(parts) >= 1 for parts in adapter.writer_parts[0])
        names = {part.name for part in adapter.all_writer_parts()}
        assert not any("gate" == name or "router" in name for name in names)

    # 1. Collect means and take their difference at the last layer's input, last position.
    refusal = collect_mean_activations(model, tokenizer, REFUSAL, 1, batch_size=2)
    harmless = collect_mean_activations(model, tokenizer, HARMLESS, 1, batch_size=2)
    direction = (refusal - harmless)[-1, -1].float()
    r_hat = unit(direction)
    inputs = tokenize_batch(tokenizer, render_prompts(tokenizer, HARMLESS + REFUSAL), torch.device("cpu"))

    # 2. Hook ablation leaves no component along r̂ in the residual entering every layer.
    with directional_ablation(model, direction):
        hooked_inputs = _layer_inputs(model, adapter, inputs)
        with torch.no_grad():
            hooked = model(**inputs).logits
    for hidden in hooked_inputs:
        assert (hidden @ r_hat).abs().max() < 1e-4 * hidden.norm(dim=-1).max()
    assert max((hidden @ r_hat).abs().max() for hidden in _layer_inputs(model, adapter, inputs)[1:]) > 1e-3

    # 3. Orthogonalised weights reproduce the hooked logits (approximately only, with a warning, where a
    #    norm sits between writer and residual: Gemma-2/3, OLMo-2).
    edited = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        orthogonalize_weights(edited, direction)
    approximate = [w for w in caught if "only approximates hook ablation" in str(w.message)]
    with torch.no_grad():
        baked = edited(**inputs).logits
    if adapter.exact_orthogonalization:
        assert not approximate
        torch.testing.assert_close(baked, hooked, atol=3e-4, rtol=1e-4)
    else:
        assert approximate
    for hidden in _layer_inputs(edited, get_adapter(edited), inputs)[:1]:  # the embedding holds no r̂ either
        assert (hidden @ r_hat).abs().max() < 1e-4 * hidden.norm(dim=-1).max()

    # 4. Save, reload with plain transformers: the same logits.
    edited.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, baked, atol=1e-5, rtol=1e-5)

    # 5. One LoRA step changes the adapter's weights and nothing else.
    wrapped = get_peft_model(reloaded, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", lora_dropout=0.0))
    assert get_adapter(wrapped).n_layers == 2  # the adapter sees through peft
    before = {name: p.detach().clone() for name, p in wrapped.named_parameters()}
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    wrapped.train()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    wrapped(**inputs, labels=labels).loss.backward()
    optimizer.step()
    changed = {name for name, p in wrapped.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert changed and all("lora_" in name for name in changed)


def test_missing_family_names_architecture_and_supported():
    from transformers import BertConfig, BertLMHeadModel

    model = BertLMHeadModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32, is_decoder=True))
    with pytest.raises(AblateError, match=r"BertLMHeadModel \(model_type 'bert'\): no entry in .*FAMILIES") as raised:
        get_adapter(model)
    assert "\n" not in str(raised.value)


def test_structure_not_where_the_entry_says_names_what_and_where(monkeypatch, tokenizer):
    model = build_model("llama", tokenizer)
    monkeypatch.setitem(FAMILIES, "llama", Family(attention_out=("out_proj",)))
    with pytest.raises(AblateError, match=r"LlamaForCausalLM .*no attention output projection \(out_proj\) in model\.layers\.0\.self_attn"):
        get_adapter(model)
    monkeypatch.setitem(FAMILIES, "llama", Family(mlp=("feed_forward",)))
    with pytest.raises(AblateError, match=r"no MLP block \(feed_forward\) in model\.layers\.0$"):
        get_adapter(model)
