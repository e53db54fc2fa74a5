"""Training one budget: the model (LoRA, QLoRA or full) and trl's SFTTrainer with our loss, token and FLOP
accounting (see the package docstring), and saving the result."""

from __future__ import annotations

import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from ablate import AblateError
from ablate.config import (
    FinetuneConfig,
    ModelConfig,
    Quantization,
    TrainingLoss,
)
from ablate.finetune.loss import accepts_logits_to_keep, keep_answer_openings, supervised_head_loss
from ablate.compat import renamed_fields
from ablate.placement import check_placement, loading_arguments
from ablate.compute import matmul_parameters
from ablate.finetune.answers import load_donor
from ablate.finetune.training_data import to_conversations
from ablate.logs import known_warnings_silenced, quiet_datasets, quiet_trainer
from ablate.models import drop_gguf_marker, load_model, pick_device, pick_dtype, resolve_spec


def estimate_train_flops(n_matmul: int, n_trainable: int, tokens: int, full_finetune: bool, n_teacher: int = 0) -> int:
    """Training FLOPs: 6·N·T (full) or 4·N·T + 6·N_lora·T (LoRA), plus 2·N_donor·T for the donor's forward
    passes when it is the teacher (`training.loss: distill`); see the module docstring."""
    teacher = 2 * n_teacher * tokens
    if full_finetune:
        return 6 * n_matmul * tokens + teacher
    return 4 * n_matmul * tokens + 6 * n_trainable * tokens + teacher


def flops_formula(full_finetune: bool, teacher: bool) -> str:
    return ("6*N*T" if full_finetune else "4*N*T + 6*N_lora*T") + (" + 2*N_donor*T" if teacher else "")


def linear_module_names(model) -> list[str]:
    """Names of the linear layers peft's 'all-linear' adapts: every Linear (and GPT-2 Conv1D) but the output head."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head})


def training_model_config(model_config: ModelConfig, config: FinetuneConfig) -> ModelConfig:
    """The model config training loads: `training.qlora` means a 4-bit base (unless the model config already
    quantises it), and the base a QLoRA variant is evaluated on is this same one."""
    if config.training.qlora and model_config.quantization is Quantization.none:
        return model_config.model_copy(update={"quantization": Quantization.nf4})
    return model_config


def load_for_training(model_config: ModelConfig, config: FinetuneConfig, rank: int, alpha: float):
    """Load the base model (4-bit for QLoRA) and wrap it in a LoRA adapter unless full fine-tuning."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    training = config.training
    device = pick_device(training.device)
    dtype = pick_dtype(training.dtype, device)
    kind, location = resolve_spec(model_config.spec)
    kwargs: dict = {"trust_remote_code": model_config.trust_remote_code, "dtype": dtype}
    if kind == "gguf":
        path = Path(location)
        location, kwargs["gguf_file"] = str(path.parent), path.name
    if kind == "hub" and model_config.revision:
        kwargs["revision"] = model_config.revision
    placed = training_model_config(model_config, config)
    check_placement(placed, device)
    kwargs.update(loading_arguments(placed, device, dtype))
    quantized = placed.quantization is not Quantization.none
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **{k: v for k, v in kwargs.items() if k in ("trust_remote_code", "gguf_file", "revision")})
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as error:
        raise AblateError(f"model spec '{model_config.spec}' ({kind}): cannot load: {str(error).strip().splitlines()[0]}") from None
    drop_gguf_marker(model)
    if "device_map" not in kwargs:  # a device map (and a quantised model) is already placed
        model.to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model_config.chat_template:
        tokenizer.chat_template = model_config.chat_template
    if training.full_finetune:
        return model, tokenizer
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=training.gradient_checkpointing)
    layers = config.lora.layers
    n_layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    if layers is not None and n_layers is not None and max(layers) >= n_layers:
        raise AblateError(f"lora.layers: layer {max(layers)} does not exist; '{model_config.spec}' has layers 0-{n_layers - 1}")
    targets = config.lora.target_modules
    if layers is not None and targets == "all-linear":  # peft takes layers_to_transform with module names only
        targets = linear_module_names(model)
    lora = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=config.lora.dropout, bias="none",
                      target_modules=targets, task_type="CAUSAL_LM", layers_to_transform=layers)
    with known_warnings_silenced():  # peft reads the deprecated `is_gradient_checkpointing`
        return get_peft_model(model, lora), tokenizer


class TokenCounter:
    """Wraps a data collator and counts the real (non-padding) tokens of every batch it builds; with
    `answer_tokens`, it first cuts each answer to its opening (`keep_answer_openings`)."""

    def __init__(self, collator, answer_tokens: int | None = None):
        self.collator, self.answer_tokens, self.tokens, self.supervised = collator, answer_tokens, 0, 0

    def __call__(self, features):
        batch = self.collator(features)
        if self.answer_tokens is not None and "labels" in batch:
            batch = keep_answer_openings(batch, self.answer_tokens)
        mask = batch.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        if "labels" in batch:
            self.supervised += int((batch["labels"] != -100).sum())
        return batch


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory on CUDA; on CPU the process's peak resident set (ru_maxrss)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def build_trainer(model, tokenizer, config: FinetuneConfig, budget: dict, examples: list[dict], work_dir: Path,
                  progress: bool = True, teacher=None):
    """trl's SFTTrainer over `examples` as prompt/completion conversations (loss on the answers only).

    On a CPU the loss is `supervised_head_loss`: trl's fused output head (per-token log-probabilities
    without full logits) has no Triton kernel there and falls back to per-tile torch ops, which took
    3.3 s of an 8.4 s hardening step on SmolLM2-135M; one matrix multiply over the answer positions
    gives the same loss in 4.7 s per step (docs/finetune.md). CUDA keeps trl's memory-saving kernel
    unless `training.first_token_weight` asks for a weighted loss or a `teacher` (the donor of
    `training.loss: distill`) for a distillation loss, which only ours computes.
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    first_token_weight = config.training.first_token_weight

    class HeadLossSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if return_outputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = supervised_head_loss(model, inputs, num_items_in_batch, first_token_weight=first_token_weight,
                                        teacher=teacher)
            # As trl does: num_items_in_batch counts every rank's tokens, and DDP averages the gradients.
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            return loss

    training = config.training
    device = next(model.parameters()).device
    tokenizer.padding_side = "right"
    use_bf16 = device.type == "cuda" and pick_dtype(training.dtype, device) == torch.bfloat16
    args = SFTConfig(**renamed_fields(SFTConfig, dict(
        output_dir=str(work_dir / "trainer"), per_device_train_batch_size=training.batch_size,
        gradient_accumulation_steps=training.grad_accum, learning_rate=budget["lr"],
        num_train_epochs=budget["epochs"], max_steps=budget["max_steps"] or -1, lr_scheduler_type=training.scheduler,
        warmup_steps=float(training.warmup_ratio), weight_decay=training.weight_decay, seed=training.seed,
        data_seed=training.seed, max_length=training.max_length, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=not progress, activation_checkpointing=training.gradient_checkpointing,
        bf16=use_bf16, use_cpu=device.type == "cpu", completion_only_loss=True, packing=False,
    )))
    slices_logits = accepts_logits_to_keep(model)
    if first_token_weight != 1.0 and not slices_logits:
        raise AblateError(f"training.first_token_weight={first_token_weight}: this model's forward takes no "
                         "logits_to_keep, which the weighted loss needs; expected 1.0 for it")
    if teacher is not None and not slices_logits:
        raise AblateError("training.loss: distill: this model's forward takes no logits_to_keep, which the "
                          "distillation loss needs; expected sft for it")
    own_loss = (device.type == "cpu" or first_token_weight != 1.0 or teacher is not None) and slices_logits
    trainer_class = HeadLossSFTTrainer if own_loss else SFTTrainer
    with quiet_datasets():  # trl prepares the dataset in four map passes, each with its own bar
        trainer = trainer_class(model=model, args=args,
                                train_dataset=Dataset.from_list(to_conversations(examples, tokenizer)),
                                processing_class=tokenizer)
    quiet_trainer(trainer, progress)  # one bar with the loss on it, no log dict per step
    return trainer


def train_budget(
    model_config: ModelConfig, config: FinetuneConfig, budget: dict, examples: list[dict], work_dir: Path,
    progress: bool = True,
) -> tuple[Any, Any, dict]:
    """Train one budget; returns (trained model — a peft model unless full fine-tuning —, tokenizer, metrics)."""
    training = config.training
    model, tokenizer = load_for_training(model_config, config, budget["rank"], budget["alpha"])
    device = next(model.parameters()).device
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_matmul = matmul_parameters(model)
    teacher = load_donor(model_config, config, model, tokenizer, progress) if training.loss is TrainingLoss.distill else None
    n_teacher = matmul_parameters(teacher) if teacher is not None else 0
    trainer = build_trainer(model, tokenizer, config, budget, examples, work_dir, progress, teacher)
    from ablate.defences import attach

    defence = attach(trainer, config, examples, tokenizer)  # a training-level defence's loss (None otherwise)
    if teacher is not None:  # on this process's device, where the Trainer puts the model (a launch: cuda:<rank>)
        teacher.to(trainer.args.device)
    counter = TokenCounter(trainer.data_collator, training.answer_tokens)
    trainer.data_collator = counter
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with known_warnings_silenced():
        trainer.train()
    wall = time.perf_counter() - start
    if trainer.accelerator.num_processes > 1:  # every process counted its own batches: sum them
        counts = torch.tensor([counter.tokens, counter.supervised], device=trainer.accelerator.device)
        counter.tokens, counter.supervised = (int(x) for x in trainer.accelerator.reduce(counts, reduction="sum"))
    loss_curve = [{"step": int(entry["step"]), "loss": float(entry["loss"])}
                  for entry in trainer.state.log_history if "loss" in entry and "step" in entry]
    metrics = {
        "steps": int(trainer.state.global_step), "epochs_completed": float(trainer.state.epoch or 0.0),
        "wall_seconds": round(wall, 2), "train_tokens": counter.tokens, "supervised_tokens": counter.supervised,
        "trainable_parameters": n_trainable, "matmul_parameters": n_matmul,
        "train_flops": estimate_train_flops(n_matmul, n_trainable, counter.tokens, training.full_finetune, n_teacher)
        + (defence.flops(n_matmul) if defence is not None else 0),
        "flops_formula": flops_formula(training.full_finetune, teacher is not None)
        + (" + 2*N*T_defence_forward + 4*N*T_defence_backward" if defence is not None else ""),
        "peak_memory_bytes": peak_memory_bytes(device),
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_max_rss",
        "loss_curve": loss_curve, "final_loss": loss_curve[-1]["loss"] if loss_curve else None,
        "device": str(device),
    }
    if defence is not None:
        metrics["defence"] = defence.summary(n_matmul)
    trained = trainer.model
    del teacher
    if trainer.accelerator.num_processes > 1:
        trained = gather_distributed(trainer, model_config, config, work_dir)
    del trainer
    return trained, tokenizer, metrics


def gather_distributed(trainer, model_config: ModelConfig, config: FinetuneConfig, work_dir: Path):
    """Under `accelerate launch` (DDP/FSDP): every process saves its part, the main one reloads it whole.

    `trainer.save_model` gathers sharded (FSDP) weights into one state dict on the main process.
    Returns the trained model on the main process and None on the others.
    """
    from transformers import AutoModelForCausalLM

    gathered = work_dir / "gathered"
    trainer.save_model(str(gathered))
    trainer.accelerator.wait_for_everyone()
    if not trainer.accelerator.is_main_process:
        return None
    if config.training.full_finetune:
        return AutoModelForCausalLM.from_pretrained(gathered)
    from peft import PeftModel

    # The base it trained on: 4-bit under QLoRA, so the adapter is saved, merged and scored on that base.
    base, _ = load_model(training_model_config(model_config, config), device=config.training.device)
    drop_gguf_marker(base)
    return PeftModel.from_pretrained(base, gathered)


def save_model_dir(model, tokenizer, target: Path) -> Path:
    """Write a plain-transformers model directory atomically (temp folder, then rename)."""
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target
