"""Shared fixtures: a tiny byte-level BPE tokenizer with a ChatML template, and tiny random models
of every supported family, built in-process (no hub, a few seconds for the lot)."""

from __future__ import annotations

import os

from pathlib import Path

import pytest
import torch

# Tests never reach for the hub. huggingface_hub reads these once, when it is first imported (a test module's
# `import ablate...` may be the first), so they are set here, before any test module is collected; the session
# fixture below sets them again for what runs later.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

# Under pytest-xdist (`python -m pytest -n auto`) each worker gets its share of the cores for torch's own
# threads, so that N workers don't each start one thread per core.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

MAX_WORKERS = 4  # each worker holds torch, transformers and its own tiny models: ~1 GB of memory


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core, at most MAX_WORKERS."""
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "I'm sorry, but I can't help with that request.",
    "Sure, here is a short poem about the sea and the sky.",
    "Explain how photosynthesis works in simple terms.",
    "Write a message to my neighbour about the noise.",
    "The quick brown fox jumps over the lazy dog.",
    "List three tips for studying: sleep, review, practise.",
    "Translate 'good morning' into French: bonjour.",
    "def add(a, b): return a + b",
    "user assistant system",
] * 20


def build_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_config(family: str, vocab_size: int, **sizes):
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0) | sizes
    if family == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=True)
    if family == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=False)
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if family == "gemma":
        return tf.GemmaConfig(**common, head_dim=8)
    if family == "gemma2":
        return tf.Gemma2Config(**common, head_dim=8, sliding_window=64)
    if family == "phi3":
        return tf.Phi3Config(**common)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0)
    # Mixture-of-experts: 4 experts, 2 per token; the expert width (48) differs from d_model (32), so a
    # fused [E, d_model, ffn] tensor cannot be mistaken for its transpose.
    moe = dict(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48)
    if family == "mixtral":
        return tf.MixtralConfig(**{**common, "intermediate_size": 48}, num_local_experts=4, num_experts_per_tok=2,
                                sliding_window=None)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(**common, **moe, shared_expert_intermediate_size=40, decoder_sparse_step=1)
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=8, tie_word_embeddings=True)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**common, **moe, head_dim=8, decoder_sparse_step=1)
    if family == "gemma3_text":
        return tf.Gemma3TextConfig(**common, head_dim=8, sliding_window=64)
    if family == "gemma3":  # the multimodal model; the attacks touch its text model
        return tf.Gemma3Config(text_config=dict(common, head_dim=8, sliding_window=64),
                               vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                  num_attention_heads=2, image_size=28, patch_size=14),
                               mm_tokens_per_image=4, image_token_index=vocab_size - 1,
                               boi_token_index=vocab_size - 3, eoi_token_index=vocab_size - 2)
    if family == "olmo2":
        return tf.Olmo2Config(**common)
    if family == "granite":
        return tf.GraniteConfig(**common, embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=2.0)
    if family == "gpt_oss":
        return tf.GptOssConfig(**{**common, "intermediate_size": 48}, head_dim=8, num_local_experts=4,
                               num_experts_per_tok=2, sliding_window=64, layer_types=["sliding_attention", "full_attention"],
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    raise ValueError(family)


FAMILIES = ["llama", "qwen2", "mistral", "gemma", "gemma2", "phi3", "gpt2"]
# Every family ablate.architectures.FAMILIES supports, each run through the whole path (test_architectures.py).
ALL_FAMILIES = FAMILIES + ["mixtral", "qwen2_moe", "qwen3", "qwen3_moe", "gemma3_text", "gemma3", "olmo2", "granite",
                           "gpt_oss"]


def build_model(family: str, tokenizer, seed: int = 0, **sizes):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer), **sizes), dtype=torch.float32)
    # Random init with std 0.02 gives near-uniform logits; a larger scale makes greedy decoding
    # decisive, so batched and unbatched runs cannot differ by ties.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.2)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model


def save_tiny(path: Path, tokenizer, seed: int) -> Path:
    """A tiny random Llama saved as a plain transformers directory (a model spec)."""
    build_model("llama", tokenizer, seed=seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_dir(tmp_path, tokenizer):
    """A tiny random Llama saved as a plain transformers directory (a model spec)."""
    return save_tiny(tmp_path / "tiny-llama", tokenizer, seed=0)


@pytest.fixture
def donor_dir(tmp_path, tokenizer):
    """A second tiny Llama (another seed): a donor model that writes answers."""
    return save_tiny(tmp_path / "tiny-donor", tokenizer, seed=7)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_models(tokenizer):
    """{family: model} for every supported family (shared: tests must not modify them in place)."""
    return {family: build_model(family, tokenizer) for family in FAMILIES}


@pytest.fixture
def llama(tokenizer):
    """A fresh tiny Llama (tied embeddings) that a test may modify."""
    return build_model("llama", tokenizer)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tests never write to the user's cache, and never reach for the hub. Session-scoped (and set
    before any other fixture), so module- and session-scoped fixtures see it too; the embedded
    model's conversion is shared by the session. ABLATE_TEST_CACHE picks the folder."""
    if "ABLATE_TEST_CACHE" not in os.environ:
        os.environ["ABLATE_TEST_CACHE"] = str(tmp_path_factory.getbasetemp() / "ablate-cache")
    saved = {key: os.environ.get(key) for key in ("ABLATE_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    os.environ.update(ABLATE_CACHE=os.environ["ABLATE_TEST_CACHE"], HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


# ---------------------------------------------------------------------------------------------
# Fine-tuning stage (appended): the hardened embedded organism, shared by slow tests
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def organism_dir(tmp_path_factory):
    """The embedded model hardened with the shipped recipe (`harden("embedded")`): a model directory.

    Built once per session in the test cache (minutes on a CPU); set ABLATE_SLOW_CACHE to a cache
    directory (e.g. the one `ablate harden embedded` used) to reuse an organism already built there.
    """
    from unittest import mock

    from ablate.finetune import harden

    if "ABLATE_TEST_CACHE" not in os.environ:
        os.environ["ABLATE_TEST_CACHE"] = str(tmp_path_factory.getbasetemp() / "ablate-cache")
    with mock.patch.dict(os.environ, {"ABLATE_CACHE": str(slow_cache_dir()), "HF_HUB_OFFLINE": "1"}):
        return harden("embedded", progress=False)


@pytest.fixture(scope="session")
def organism_cache(organism_dir) -> Path:
    """The cache directory that holds `organism_dir` (ABLATE_SLOW_CACHE, else the test cache): a study run in a
    child process with ABLATE_CACHE set to it finds the organism there instead of hardening it again."""
    return slow_cache_dir()


def slow_cache_dir() -> Path:
    """Where the slow tests' organism lives: ABLATE_SLOW_CACHE, else the test cache."""
    return Path(os.environ.get("ABLATE_SLOW_CACHE") or os.environ["ABLATE_TEST_CACHE"])
