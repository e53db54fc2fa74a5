"""Judge models on disk: where their files are, whether they can run here, what they cost, and the
prompt their own files prescribe.

    from ablate.evaluate.judge_files import judge_unavailable, judge_plan_line
    judge_unavailable(judge)      # None, or one line saying why the judge cannot be loaded
    judge_plan_line(judge)        # "judge llamaguard: meta-llama/Llama-Guard-3-8B, 8.03 B parameters, ..."

Judges need downloaded weights. A judge is *available* when its spec is a local model directory
(or a PEFT adapter directory), or a hub id whose files are in the Hugging Face cache; with
HF_HUB_OFFLINE unset, a hub id not yet cached is fetched when the judge loads (the user asked for
it by naming it). Nothing here downloads weights.

Prompts the judges' own files ship:
- Llama Guard 3 / 4: the chat template in the tokenizer files writes the policy prompt
  (`conversation: true`); no prompt text lives in this package.
- HarmBench classifier: the model card (README.md, which ships with the model files) holds the
  classifier prompt in a `"prompt": '''...'''` block; `model_card_prompt` reads it from there.
- StrongREJECT fine-tuned judge: its files ship no prompt; the prompt lives in the StrongREJECT
  authors' package, so pass it as `template_file` (see docs/evaluation.md). Without it the judge
  reads our own wording in the same layout, and the result says so (`template_sources`).
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

from ablate import AblateError
from ablate.config import JudgeConfig

# Parameters of the judges the shipped suites name, from each model card, for `--plan` before
# the weights are downloaded (once they are on disk, the safetensors headers are read instead).
MODEL_CARD_PARAMETERS = {
    "meta-llama/Llama-Guard-3-1B": 1.50e9,
    "meta-llama/Llama-Guard-3-8B": 8.03e9,
    "meta-llama/Llama-Guard-4-12B": 12.0e9,
    "cais/HarmBench-Llama-2-13b-cls": 13.0e9,
    "cais/HarmBench-Mistral-7b-val-cls": 7.24e9,
    "qylu4156/strongreject-15k-v1": 2.51e9,  # a LoRA adapter on google/gemma-2b: the base's size
}
_CARD_PROMPT = re.compile(r"""["']prompt["']\s*:\s*'''(.*?)'''""", re.DOTALL)


def _hub_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of a hub repo, if its config (or adapter config) is cached."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return None
    for name in ("config.json", "adapter_config.json"):
        try:
            found = try_to_load_from_cache(repo_id, name)
        except Exception:  # a malformed id: treated as not cached
            return None
        if isinstance(found, str):
            return Path(found).parent
    return None


def model_files(config: JudgeConfig) -> Path | None:
    """The folder holding the judge's files: the local directory, or the hub cache snapshot; None if neither."""
    path = Path(config.model).expanduser()
    if path.is_dir():
        return path
    if config.model == "embedded" or config.model.endswith(".gguf"):
        return None
    return _hub_snapshot(config.model)


def judge_unavailable(config: JudgeConfig) -> str | None:
    """None when the judge can be loaded here; otherwise one line saying why not."""
    spec = config.model
    path = Path(spec).expanduser()
    if spec == "embedded" or (spec.endswith(".gguf") and path.is_file()):
        return None
    if path.is_dir():
        if (path / "config.json").exists() or (path / "adapter_config.json").exists():
            return None
        return f"{spec}: directory has no config.json or adapter_config.json"
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        return f"{spec}: no such model directory"
    if _hub_snapshot(spec) is not None:
        return None
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return f"{spec}: weights not downloaded (not in the Hugging Face cache, and HF_HUB_OFFLINE is set)"
    # A hub id not yet cached: fetch its config now (a few kB), so that no hub, no access to a gated
    # repo, or a wrong id fails here — before generation — not after it. Loading downloads the rest.
    try:
        from huggingface_hub import hf_hub_download

        hf_hub_download(spec, "config.json", etag_timeout=10)
    except Exception as error:  # noqa: BLE001 - any failure means: cannot load it here
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return f"{spec}: weights not downloaded, and the hub cannot provide them ({first[:200]})"
    return None


def _safetensors_parameters(folder: Path) -> tuple[int, int] | None:
    """(parameters, bytes) from the safetensors headers in a folder (no tensor is read)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    parameters = size = 0
    for file in files:
        with file.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in entry["shape"]:
                count *= dim
            parameters += count
            size += entry["data_offsets"][1] - entry["data_offsets"][0]
    return parameters, size


def judge_plan_line(config: JudgeConfig, name: str | None = None) -> str:
    """One `--plan` line: the judge's size, the memory its weights take on the device it will use."""
    import torch

    from ablate.models import pick_device

    label = name or config.name or f"{config.template.value}:{config.model}"
    device = pick_device(config.device)
    # load_model's automatic dtype: half precision on an accelerator, float32 on a CPU.
    bytes_per = 2 if device.type in ("cuda", "mps") else 4
    folder = model_files(config)
    counted = _safetensors_parameters(folder) if folder is not None else None
    if counted is not None:
        parameters, source = counted[0], "safetensors headers"
    elif config.model in MODEL_CARD_PARAMETERS:
        parameters, source = int(MODEL_CARD_PARAMETERS[config.model]), "model card"
    else:
        parameters, source = None, None
    why_not = judge_unavailable(config)
    state = "available" if why_not is None else f"unavailable: {why_not}"
    if parameters is None:
        return f"judge {label}: {config.model}, size unknown until downloaded; on {device}; {state}"
    gib = parameters * bytes_per / 2**30
    accelerator = "GPU" if device.type == "cuda" and torch.cuda.is_available() else device.type.upper()
    return (f"judge {label}: {config.model}, {parameters / 1e9:.2f} B parameters ({source}), "
            f"~{gib:.1f} GiB of weights in {'16-bit' if bytes_per == 2 else 'float32'} on {accelerator} ({device}); {state}")


def model_card_prompt(folder: Path | None) -> str | None:
    """The classifier prompt a HarmBench classifier's model card prescribes, read from its README.md.

    Returns the text of the card's first `"prompt": '''...'''` block, or None when the folder has
    no README.md or the README holds no such block. Its fields ({behavior}, {generation}) are the
    aliases the judge renderer fills with the request and the response.
    """
    if folder is None or not (folder / "README.md").is_file():
        return None
    match = _CARD_PROMPT.search((folder / "README.md").read_text(encoding="utf-8", errors="replace"))
    return match.group(1) if match else None


def read_template_file(config: JudgeConfig) -> str:
    """The text of a judge's template_file, or a one-line error naming it."""
    path = Path(config.template_file).expanduser()
    if not path.is_file():
        raise AblateError(f"judge '{config.name or config.model}': key 'template_file': file not found: {path}")
    return path.read_text(encoding="utf-8")
