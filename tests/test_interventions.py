"""Hook contexts, weight orthogonalisation and saved abliterated models, on tiny random models."""

from __future__ import annotations

import copy

import pytest
import torch

from ablate import AblateError
from ablate.artifacts import mark_done, write_json
from ablate.generation import render_prompts, tokenize_batch
from ablate.abliterate import abliterate
from ablate.interventions import (
    activation_addition,
    directional_ablation,
    layer_weights,
    orthogonalize_weights,
    unit,
)
from ablate.models import get_adapter

FAMILIES = ["llama", "qwen2", "mistral", "gemma", "gemma2", "phi3", "gpt2"]
PROMPTS = ["Explain how photosynthesis works.", "Write a poem about the sea.", "List three tips for studying."]


def batch(tokenizer):
    return tokenize_batch(tokenizer, render_prompts(tokenizer, PROMPTS), torch.device("cpu"))


def random_direction(model, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(get_adapter(model).d_model, generator=generator)


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def final_norm(model):
    base = model.transformer if hasattr(model, "transformer") else model.model
    return base.ln_f if hasattr(base, "ln_f") else base.norm


@pytest.mark.parametrize("family", FAMILIES)
def test_ablated_residual_has_no_component_along_direction(family, tiny_models, tokenizer):
    model = tiny_models[family]
    adapter = get_adapter(model)
    direction = random_direction(model)
    r_hat = unit(direction)
    seen = {}

    def capture(name):
        def hook(module, args, kwargs):
            seen[name] = (args[0] if args else kwargs["hidden_states"]).detach()

        return hook

    with directional_ablation(model, direction):
        # Registered after the ablation hooks, so these see the ablated inputs.
        handles = [layer.register_forward_pre_hook(capture(i), with_kwargs=True) for i, layer in enumerate(adapter.layers)]
        if adapter.exact_orthogonalization:  # Gemma-2's post-norms re-introduce a component after the last layer
            handles.append(final_norm(model).register_forward_pre_hook(capture("final"), with_kwargs=True))
        with torch.no_grad():
            model(**batch(tokenizer))
        for handle in handles:
            handle.remove()
    assert len(seen) >= adapter.n_layers
    for name, hidden in seen.items():
        projection = (hidden @ r_hat).abs().max()
        assert projection < 1e-4 * hidden.norm(dim=-1).max(), f"{family} {name}: projection {projection}"
    # Without ablation the same residual has a clear component along a random direction.
    with torch.no_grad():
        plain = model(**batch(tokenizer), output_hidden_states=True).hidden_states[1]
    assert (plain @ r_hat).abs().max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_orthogonalized_weights_reproduce_hook_ablation(family, tiny_models, tokenizer):
    model = tiny_models[family]
    if family == "gemma2":
        # Fresh norms have uniform gains, which keep a vector orthogonal to r̂; trained ones do not.
        model = copy.deepcopy(model)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "norm" in name:
                    parameter.normal_(0.0, 0.5)
    direction = random_direction(model)
    inputs = batch(tokenizer)
    with torch.no_grad():
        original = model(**inputs).logits
        with directional_ablation(model, direction):
            hooked = model(**inputs).logits
    edited = copy.deepcopy(model)
    exact = get_adapter(edited).exact_orthogonalization
    if exact:
        orthogonalize_weights(edited, direction)
    else:
        with pytest.warns(UserWarning, match="only approximates hook ablation"):
            orthogonalize_weights(edited, direction)
    with torch.no_grad():
        baked = edited(**inputs).logits
    assert not torch.allclose(original, hooked, atol=1e-3)  # the intervention does something
    if exact:
        torch.testing.assert_close(baked, hooked, atol=2e-4, rtol=1e-4)
    else:  # Gemma-2: a norm between writer and residual makes the weights only approximate the hooks
        assert not torch.allclose(baked, hooked, atol=1e-4)


def test_orthogonalization_unties_a_tied_output_head(llama, tokenizer):
    adapter = get_adapter(llama)
    assert adapter.lm_head.weight.data_ptr() == adapter.embedding.weight.data_ptr()
    readout = adapter.lm_head.weight.detach().clone()
    orthogonalize_weights(llama, random_direction(llama))
    assert adapter.lm_head.weight.data_ptr() != adapter.embedding.weight.data_ptr()
    torch.testing.assert_close(adapter.lm_head.weight, readout)  # the readout is untouched
    assert not torch.allclose(adapter.embedding.weight, readout)
    assert llama.config.tie_word_embeddings is False


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_kernel_weights_match_between_hooks_and_weights(family, tiny_models, tokenizer):
    model = tiny_models[family]
    direction = random_direction(model)
    weights = layer_weights(2, coefficient=0.8, kernel={"max_weight": 1.0, "max_weight_position": 1,
                                                         "min_weight": 0.5, "min_weight_distance": 1})
    assert weights == pytest.approx([0.4, 0.8])
    inputs = batch(tokenizer)
    with torch.no_grad(), directional_ablation(model, direction, weights):
        hooked = model(**inputs).logits
    edited = copy.deepcopy(model)
    orthogonalize_weights(edited, direction, weights)
    with torch.no_grad():
        torch.testing.assert_close(edited(**inputs).logits, hooked, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_per_writer_weights_match_between_hooks_and_weights(family, tiny_models, tokenizer):
    """One weight per residual writer (attention out, MLP out): hooks and baked weights agree, and a
    writer with weight 0 is left exactly as it was."""
    model = tiny_models[family]
    direction = random_direction(model, seed=3)
    weights = layer_weights(2, coefficient=0.5, writer_weights=[[1.0, 0.0], [0.4, 2.0]])
    assert weights == [[0.5, 0.0], [0.2, 1.0]]
    inputs = batch(tokenizer)
    with torch.no_grad():
        plain = model(**inputs).logits
        with directional_ablation(model, direction, weights):
            hooked = model(**inputs).logits
    assert not torch.allclose(hooked, plain, atol=1e-4)
    edited = copy.deepcopy(model)
    orthogonalize_weights(edited, direction, weights)
    with torch.no_grad():
        torch.testing.assert_close(edited(**inputs).logits, hooked, atol=2e-4, rtol=1e-4)
    untouched = get_adapter(model).writers[0][1].weight
    torch.testing.assert_close(get_adapter(edited).writers[0][1].weight, untouched, atol=0, rtol=0)


def test_per_writer_weights_of_the_wrong_shape_are_one_line_errors(llama):
    direction = random_direction(llama)
    with pytest.raises(AblateError, match="3 rows for a model of 2 layers"):
        layer_weights(2, writer_weights=[[1.0, 1.0]] * 3)
    with pytest.raises(AblateError, match="layer 1 has 2 residual writers, got 3 weights"):
        with directional_ablation(llama, direction, [[1.0, 1.0], [1.0, 1.0, 1.0]]):
            pass
    assert hook_count(llama) == 0


def test_layer_weights_kernel_shape():
    assert layer_weights(4) is None
    assert layer_weights(3, coefficient=0.5) == [0.5, 0.5, 0.5]
    weights = layer_weights(6, kernel={"max_weight": 1.0, "max_weight_position": 2, "min_weight": 0.2,
                                       "min_weight_distance": 2})
    assert weights == pytest.approx([0.2, 0.6, 1.0, 0.6, 0.2, 0.0])


@pytest.mark.parametrize("context", ["ablation", "addition"])
def test_hooks_are_removed_after_an_exception(context, llama, tokenizer):
    inputs = batch(tokenizer)
    before = hook_count(llama)
    with torch.no_grad():
        original = llama(**inputs).logits
    direction = random_direction(llama)
    manager = directional_ablation(llama, direction) if context == "ablation" else activation_addition(llama, direction, 1, 4.0)
    with pytest.raises(RuntimeError, match="boom"):
        with manager:
            assert hook_count(llama) > before
            raise RuntimeError("boom")
    assert hook_count(llama) == before
    with torch.no_grad():
        torch.testing.assert_close(llama(**inputs).logits, original)


def test_activation_addition_adds_at_one_layer(llama, tokenizer):
    adapter = get_adapter(llama)
    direction = random_direction(llama)
    seen = {}
    handle = adapter.layers[1].register_forward_pre_hook(
        lambda module, args, kwargs: seen.__setitem__("x", (args[0] if args else kwargs["hidden_states"]).clone()),
        with_kwargs=True)
    inputs = batch(tokenizer)
    with torch.no_grad():
        llama(**inputs)
        plain = seen["x"]
        with activation_addition(llama, direction, layer=1, coefficient=2.0):
            # our hook was registered first, so it sees the input before the addition: register after
            inner = adapter.layers[1].register_forward_pre_hook(
                lambda module, args, kwargs: seen.__setitem__("y", (args[0] if args else kwargs["hidden_states"]).clone()),
                with_kwargs=True)
            llama(**inputs)
            inner.remove()
    handle.remove()
    torch.testing.assert_close(seen["y"] - plain, (2.0 * direction).expand_as(plain), atol=1e-5, rtol=1e-5)
    with pytest.raises(AblateError, match="out of range"):
        with activation_addition(llama, direction, layer=5):
            pass


def test_bad_directions_are_rejected(llama):
    with pytest.raises(AblateError, match="zero or not finite"):
        unit(torch.zeros(32))
    with pytest.raises(AblateError, match="d_model"):
        with directional_ablation(llama, torch.ones(7)):
            pass


def test_abliterated_model_loads_with_plain_transformers_and_matches_hooks(llama, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    source = tmp_path / "tiny-llama"
    llama.save_pretrained(source)
    tokenizer.save_pretrained(source)
    direction = random_direction(llama)
    direction_dir = tmp_path / "directions"
    torch.save(direction, direction_dir.mkdir() or direction_dir / "direction.pt")
    write_json(direction_dir / "selected.json", {"layer": 1, "position": -1, "strength": None})
    mark_done(direction_dir, "test")
    inputs = batch(tokenizer)
    with torch.no_grad(), directional_ablation(llama, direction):
        hooked = llama(**inputs).logits

    saved = abliterate(str(source), direction_dir, tmp_path / "abliterated", progress=False)
    assert (saved / "done.json").exists() and (saved / "abliteration.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    assert loaded.lm_head.weight.data_ptr() != loaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, hooked, atol=2e-4, rtol=1e-4)
    # A second call finds done.json and returns without reloading.
    assert abliterate(str(source), direction_dir, tmp_path / "abliterated", progress=False) == saved
