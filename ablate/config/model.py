"""Configs of the foundation: which model to load and how, and how completions are generated."""

from __future__ import annotations

from enum import Enum

from pydantic import Field, model_serializer

from ablate.config.loading import StrictModel



class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Quantization(str, Enum):
    none = "none"
    int8 = "8bit"
    nf4 = "4bit"


class ModelConfig(StrictModel):
    """Which model to load and how."""

    spec: str = Field("embedded", description="'embedded', a hub id, a local model directory, or a .gguf file.")
    device: str = Field("auto", description="'auto' (CUDA, then MPS, then CPU), or a torch device such as 'cpu' or 'cuda:0'.")
    dtype: DType = Field(DType.auto, description="Weight dtype; 'auto' = bfloat16 on CUDA, float32 elsewhere.")
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the hub; off unless you trust the repository.")
    chat_template: str | None = Field(None, description="A Jinja chat template to use when the tokenizer has none (or to replace its own).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for a hub id.")
    quantization: Quantization = Field(Quantization.none, description="Load the weights quantised by bitsandbytes: 'none', '8bit' (LLM.int8) or '4bit' (NF4, double quantisation); direction and eval then use hooks, and QLoRA trains on this base.")
    device_map: str | dict[str, int | str] | None = Field(None, description="Shard the model over devices: 'auto', 'balanced', 'sequential', a device ('cpu', 'cuda:0') or a {module name: device} map; None = the whole model on `device`.")
    max_memory: dict[str | int, str] | None = Field(None, description="Memory each device may hold under a device_map, e.g. {0: '70GiB', cpu: '120GiB'}.")


class PromptTooLong(str, Enum):
    error = "error"
    truncate = "truncate"


class GenerationConfig(StrictModel):
    """How completions are generated."""

    max_new_tokens: int = Field(64, ge=1, description="Tokens generated per prompt.")
    batch_size: int = Field(16, ge=1, description="Prompts per forward pass (length-sorted batches).")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (only when do_sample).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (only when do_sample).")
    seed: int = Field(0, description="Random seed for sampling.")
    system_prompt: str | None = Field(None, description="System message placed before every prompt; None keeps the template's default.")
    backend: str = Field("fast", description="Generation backend: fast (batched loop with a shared-prefix prefill), hf (transformers' model.generate, the reference) or vllm (vLLM on a CUDA GPU, where installed: the extra ablate[vllm]).")
    prompt_too_long: PromptTooLong = Field(PromptTooLong.error, description="A prompt whose chat text plus max_new_tokens exceeds the model's context window: 'error' stops before generating, naming the prompt; 'truncate' cuts the prompt's text to fit, with a warning.")

    @model_serializer(mode="wrap")
    def _omit_default_policy(self, handler):
        # Left out at its default so that every fingerprint and cache key made before this field
        # existed (suites, donor answers, organisms) stays the same.
        data = handler(self)
        if isinstance(data, dict) and self.prompt_too_long is PromptTooLong.error:
            data.pop("prompt_too_long", None)
        return data
