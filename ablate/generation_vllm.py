"""The `vllm` generation backend: evaluation completions from vLLM on a CUDA GPU.

    pip install "ablate[vllm]"            # on a CUDA machine whose torch and transformers vLLM accepts
    ablate eval MODEL --suite default --set generation.backend=vllm

vLLM loads a model from a folder, not from memory, so the backend hands it the weights the model in
memory holds:

- a model loaded unchanged from a local folder (a saved variant: `ablate abliterate`'s orthogonalised
  model, a merged LoRA budget, the organism) loads straight from that folder;
- anything else (orthogonalised in memory, a LoRA adapter on top, a hub id) is first written to a
  temporary folder (safetensors; an adapter merged into a copy of the weights);
- a model with hooks on it (directional ablation under a context manager) is refused: vLLM cannot
  run Python hooks.

Completions are vLLM's (greedy: temperature 0), decoded and stripped as the other backends do; the
first generated token's logits (the suite's logit refusal score) come from one prefill pass of the
model in memory, the same pass the `fast` backend makes. One vLLM engine is kept per folder, so the
variants of a study each start one. Which vLLM release works against the project's torch and
transformers is in docs/evaluation.md ("Generation backends").
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

import torch

from ablate import AblateError
from ablate.config import GenerationConfig
from ablate.generation import register_backend

_ENGINE: dict = {}  # {"folder": str, "llm": vllm.LLM, "scratch": str | None}: one engine at a time


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def hooked_modules(model) -> list[str]:
    """Names of the modules that carry forward hooks (vLLM would not run them)."""
    return [name or type(model).__name__ for name, module in model.named_modules()
            if module._forward_hooks or module._forward_pre_hooks]


def weights_changed(model) -> bool:
    """Whether the weights in memory may differ from the folder the model was loaded from: an adapter
    on top, or an in-place change recorded by `orthogonalize_weights`."""
    return hasattr(model, "peft_config") or bool(getattr(model, "ablate_weights_changed", False))


def source_folder(model) -> Path | None:
    """The local folder holding exactly the weights of `model`, or None when they must be written first."""
    folder = Path(str(getattr(model, "name_or_path", "") or ""))
    if weights_changed(model) or not (folder / "config.json").is_file():
        return None
    if not any(folder.glob("*.safetensors")):
        return None
    return folder


def write_weights(model, tokenizer, folder: Path) -> Path:
    """Save the weights of `model` as a plain transformers folder (an adapter merged into a copy)."""
    if hasattr(model, "peft_config"):
        import copy

        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def vllm_folder(model, tokenizer) -> tuple[Path, str | None]:
    """(folder vLLM loads, scratch folder to delete afterwards or None)."""
    hooked = hooked_modules(model)
    if hooked:
        raise AblateError(f"generation.backend: vllm: the model has hooks on {hooked[0]} (and {len(hooked) - 1} more), "
                          "which vLLM cannot run; expected a model with the change in its weights (ablate abliterate)")
    folder = source_folder(model)
    if folder is not None:
        return folder, None
    scratch = tempfile.mkdtemp(prefix="ablate-vllm-")
    return write_weights(model, tokenizer, Path(scratch)), scratch


def release_engine() -> None:
    """Drop the vLLM engine (and its scratch folder) so that the GPU memory is free again."""
    engine = _ENGINE.pop("llm", None)
    if _ENGINE.get("scratch"):
        shutil.rmtree(_ENGINE["scratch"], ignore_errors=True)
    _ENGINE.clear()
    del engine
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def engine_for(model, tokenizer):
    """A vLLM engine over the weights of `model` (the last one, when they are the same folder)."""
    if not vllm_available():
        raise AblateError("generation.backend: vllm: vLLM is not installed; expected `pip install ablate[vllm]` on a "
                          "CUDA machine, or backend 'fast'")
    if not torch.cuda.is_available():
        raise AblateError("generation.backend: vllm: no CUDA device; expected a CUDA GPU, or backend 'fast'")
    folder, scratch = vllm_folder(model, tokenizer)
    if _ENGINE.get("folder") == str(folder) and scratch is None:
        return _ENGINE["llm"]
    release_engine()
    from vllm import LLM

    free, total = torch.cuda.mem_get_info()
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    # The model in memory keeps its share of the card; vLLM takes most of what is free.
    llm = LLM(model=str(folder), tokenizer=str(folder), dtype=dtype if dtype in ("bfloat16", "float16", "float32") else "auto",
              gpu_memory_utilization=max(0.05, 0.9 * free / total), seed=0, enforce_eager=False)
    _ENGINE.update(folder=str(folder), llm=llm, scratch=scratch)
    return llm


def sampling_params(config: GenerationConfig, eos_ids: list[int]):
    from vllm import SamplingParams

    if not config.do_sample:
        return SamplingParams(temperature=0.0, max_tokens=config.max_new_tokens, stop_token_ids=eos_ids)
    return SamplingParams(temperature=config.temperature, top_p=config.top_p, max_tokens=config.max_new_tokens,
                          stop_token_ids=eos_ids, seed=config.seed)


@register_backend("vllm")
@torch.inference_mode()
def generate_vllm(model, tokenizer, prompts: list[str], config: GenerationConfig, *, progress: bool = True,
                  description: str = "generating") -> tuple[list[str], torch.Tensor]:
    """Completions from vLLM in input order; first-token logits from a prefill of the model in memory."""
    from ablate.generation import eos_token_ids, length_sorted_batches, prefill, render_prompts

    llm = engine_for(model, tokenizer)
    texts = render_prompts(tokenizer, prompts, config.system_prompt)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos_ids = eos_token_ids(model, tokenizer)
    outputs = llm.generate([{"prompt_token_ids": list(row)} for row in ids], sampling_params(config, eos_ids),
                           use_tqdm=progress)
    completions = [tokenizer.decode(list(output.outputs[0].token_ids), skip_special_tokens=True).strip() for output in outputs]
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    first_logits: list[torch.Tensor | None] = [None] * len(prompts)
    for batch in length_sorted_batches([len(row) for row in ids], config.batch_size):
        _, _, _, logits = prefill(model, [ids[i] for i in batch], pad_id, device)
        for row, index in enumerate(batch):
            first_logits[index] = logits[row].float().cpu()
    return completions, torch.stack(first_logits)  # type: ignore[arg-type]
