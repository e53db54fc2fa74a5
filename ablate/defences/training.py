"""Training-level defences: losses that replace the hardening run's SFT loss, step by step.

- ReFAT (Yu et al. 2024, "Robust LLM safeguarding via refusal feature adversarial training",
  arXiv:2409.20089): refusal SFT in which a share of the harmful rows run with the refusal feature
  ablated — the attack simulated inside training — so the model learns to refuse without it. The
  feature of layer ℓ is the difference of the mean last-token residuals r_ℓ = μ_ℓ(harmful) − μ_ℓ(harmless)
  at the layer's input; it is recomputed from the current model every `refresh_steps` steps, and an
  ablated row has x ← x − (x·r̂_ℓ) r̂_ℓ at every layer's input, at every position.
- Representation rerouting / circuit breakers (Zou et al. 2024, "Improving Alignment and Robustness with
  Circuit Breakers", arXiv:2406.04313): a LoRA trained with no SFT loss at all, into the refusal-SFT
  organism (`hardening_start`). On the rerouting rows (a refusal prompt and a donor's compliant answer)
  the term ReLU(cos(h_ℓ, h°_ℓ)) pushes the chosen layers' representations h_ℓ away from the frozen
  organism's h°_ℓ (orthogonal or beyond); on the retain rows (the refusals and the harmless answers) the
  term ‖h_ℓ − h°_ℓ‖₂ / ‖h°_ℓ‖₂ holds every layer's representation in place. Step t of T weighs them
  α(1 − t/2T) and αt/2T·w (w = `retain_weight`, 1 by default).
- Vaccine (Huang et al. 2024, "Vaccine: Perturbation-aware Alignment for Large Language Models against
  Harmful Fine-tuning", arXiv:2402.01109): the anti-fine-tuning defence. Each step first finds the
  perturbation of the decoder layers' outputs that raises the alignment loss most, ε_ℓ = ρ·g_ℓ/‖g‖
  (g_ℓ the loss gradient at layer ℓ's output, ‖g‖ over all layers), then trains on the loss with ε added,
  so the aligned behaviour survives the embedding drift a harmful fine-tune causes. Chosen over RepNoise
  (Rosati et al. 2024) because it needs only the hardening data — RepNoise needs harmful answers to noise.

Each attaches to the hardening run's Trainer (`attach`): its loss replaces the Trainer's, and a collator
wrapper marks the harmful rows (refusal-prompt examples) of each batch. The extra passes each defence
costs are counted and added to the run's training FLOPs (see `DefenceRun.flops`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ablate import AblateError
from ablate.config import DefenceKind, FinetuneConfig

HARMFUL_KINDS = ("refusal", "recovery")
REROUTED = "rerouted"  # rerouting's circuit-breaker examples: a refusal prompt and a donor's compliant answer


@dataclass
class DefenceRun:
    """What a training-level defence did: counters for the metrics, and the tokens of its extra passes.

    `forward_tokens` ran through a forward pass only (2·N FLOPs each: a frozen model's pass, the feature
    passes), `backward_tokens` through an extra forward and a backward pass to the activations (4·N each:
    Vaccine's first pass, which computes no weight gradient).
    """

    kind: str
    counts: dict = field(default_factory=dict)
    forward_tokens: int = 0
    backward_tokens: int = 0

    def flops(self, n_matmul: int) -> int:
        return 2 * n_matmul * self.forward_tokens + 4 * n_matmul * self.backward_tokens

    def summary(self, n_matmul: int) -> dict:
        return {"kind": self.kind, **self.counts, "extra_forward_tokens": self.forward_tokens,
                "extra_backward_tokens": self.backward_tokens, "extra_flops": self.flops(n_matmul),
                "extra_flops_formula": "2*N*T_forward + 4*N*T_backward"}


class HarmfulRowFlags:
    """Wraps a data collator: adds `harmful_rows`, a bool per row marking the rows the defence treats as harmful."""

    def __init__(self, collator, harmful: set[tuple[int, ...]]):
        self.collator, self.harmful = collator, harmful

    def __call__(self, features):
        flags = torch.tensor([tuple(f["input_ids"]) in self.harmful for f in features])
        batch = self.collator(features)
        batch["harmful_rows"] = flags
        return batch


def _row_texts(row: dict) -> tuple[str, str]:
    """(the rendered prompt or the user's turn, the completion text) of a tokenised training row."""
    prompt, completion = row["prompt"], row.get("completion") or ""
    if isinstance(completion, list):
        completion = completion[-1]["content"] if completion else ""
    return (prompt[-1]["content"] if isinstance(prompt, list) else prompt), completion


def harmful_token_rows(dataset, examples: list[dict], kinds: tuple[str, ...] = HARMFUL_KINDS) -> set[tuple[int, ...]]:
    """The token ids of the tokenised rows (trl's prepared dataset, which keeps each row's `prompt` and
    `completion`; rows it dropped or truncated included) that come from an example of `kinds`: matched on the
    user prompt, and on the answer too where an example of another kind has the same prompt (rerouting: a
    refusal and a donor's answer to one request)."""
    if "prompt" not in dataset.column_names:
        raise AblateError("the tokenised training rows lost their prompts; cannot tell the harmful rows apart")
    wanted: dict[str, list[str]] = {}
    for example in examples:
        if example["kind"] in kinds:
            wanted.setdefault(example["prompt"], []).append(example["response"].strip())
    shared = {e["prompt"] for e in examples if e["kind"] not in kinds and e["prompt"] in wanted}
    rows = set()
    for row in dataset:
        prompt, completion = _row_texts(row)
        # conversational: the user's turn; rendered text (a prefilled row): the user's turn is inside it
        matches = [p for p in ([prompt] if isinstance(row["prompt"], list) else wanted) if p in wanted and p in prompt]
        if any(p not in shared or any(completion.strip().startswith(answer) for answer in wanted[p]) for p in matches):
            rows.add(tuple(row["input_ids"]))
    return rows


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    from ablate.models import get_adapter

    return get_adapter(model).layers



# --------------------------------------------------------------------------------------------
# ReFAT
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def refusal_features(model: nn.Module, tokenizer, harmful: list[str], harmless: list[str], batch_size: int = 16,
                     scale: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Per-layer refusal features [n_layers, d_model]: mean last-token residual at each layer's input over
    `harmful` minus that over `harmless` (chat-formatted, generation prompt added); and the tokens run.
    `scale` ([n_layers], optional) receives the larger of the two means' norms at each layer."""
    from ablate.models import format_chat

    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    n_layers = len(decoder_layers(model))
    means, tokens = [], 0
    try:
        for prompts in (harmful, harmless):
            total = None
            for start in range(0, len(prompts), batch_size):
                texts = [format_chat(tokenizer, p) for p in prompts[start:start + batch_size]]
                inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                tokens += int(inputs["attention_mask"].sum())
                states = model(**inputs, output_hidden_states=True, use_cache=False).hidden_states
                last = torch.stack([states[layer][:, -1].double() for layer in range(n_layers)]).sum(1)
                total = last if total is None else total + last
            means.append(total / len(prompts))
    finally:
        model.train(was_training)
        tokenizer.padding_side = side
    features = (means[0] - means[1]).float()
    if scale is not None:
        scale.copy_(torch.maximum(means[0].norm(dim=-1), means[1].norm(dim=-1)))
    return features, tokens


FEATURE_TOLERANCE = 1e-6  # a feature this small against the mean residual is no direction at all


def check_features(features: torch.Tensor, scale: torch.Tensor, harmful_set: str, harmless_set: str) -> None:
    """Refuse features that hold no direction: non-finite at a layer, or, at every layer, a difference of means
    below FEATURE_TOLERANCE of the mean residual's norm (`scale`) — the two prompt sets look the same to the model."""
    bad = [layer for layer in range(features.shape[0]) if not torch.isfinite(features[layer]).all()]
    if bad:
        raise AblateError(f"defence.kind: refat: no refusal direction: the refusal feature at layer {bad[0]} is not "
                          f"finite (the model's residual stream overflows on data.refusal_prompts={harmful_set})")
    relative = features.double().norm(dim=-1) / scale.double().clamp(min=1e-30)
    if float(relative.max()) < FEATURE_TOLERANCE:
        raise AblateError(f"defence.kind: refat: no refusal direction: data.refusal_prompts={harmful_set} and "
                          f"data.harmless_prompts={harmless_set} give the same mean residual at every layer "
                          f"(largest difference {float(relative.max()):.1e} of its norm); expected two prompt sets "
                          "the model tells apart")


@contextmanager
def row_ablation(model: nn.Module, features: torch.Tensor, rows: torch.Tensor) -> Iterator[None]:
    """Ablate each layer's feature r̂_ℓ from that layer's input on the marked rows only:
    x ← x − m·(x·r̂_ℓ) r̂_ℓ with m = 1 on `rows` and 0 elsewhere (ablate.hooks: removed on exit)."""
    from ablate.hooks import hooks, replace_hidden

    r_hat = features / features.norm(dim=-1, keepdim=True).clamp(min=1e-12)

    def hook_for(layer: int):
        def hook(module, args, kwargs):
            def ablate(x):
                r = r_hat[layer].to(device=x.device, dtype=x.dtype)
                m = rows.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))
                return x - m * (x @ r).unsqueeze(-1) * r
            return replace_hidden(args, kwargs, ablate)
        return hook

    marked = bool(rows.any())
    with hooks(pre=[(layer, hook_for(index)) for index, layer in enumerate(decoder_layers(model))] if marked else []):
        yield


def attach_refat(trainer, config: FinetuneConfig, tokenizer, run: DefenceRun):
    from ablate.data import load_prompt_set
    from ablate.finetune.loss import supervised_head_loss

    defence, data = config.defence, config.data
    harmful = load_prompt_set(data.refusal_prompts).sample(defence.feature_prompts, seed=data.seed).prompts
    harmless = load_prompt_set(data.harmless_prompts).sample(defence.feature_prompts, seed=data.seed).prompts
    generator = torch.Generator().manual_seed(config.training.seed)
    state = {"features": None, "refreshed_at": None}
    run.counts.update({"feature_refreshes": 0, "ablated_rows": 0, "harmful_rows": 0})

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        rows = inputs.pop("harmful_rows")
        step = trainer.state.global_step
        if state["features"] is None or (step % defence.refresh_steps == 0 and state["refreshed_at"] != step):
            scale = torch.empty(len(decoder_layers(model)), dtype=torch.float64)
            state["features"], tokens = refusal_features(model, tokenizer, harmful, harmless, scale=scale)
            check_features(state["features"], scale, data.refusal_prompts, data.harmless_prompts)
            state["refreshed_at"] = step
            run.forward_tokens += tokens
            run.counts["feature_refreshes"] += 1
        draws = torch.rand(rows.shape[0], generator=generator) < defence.probability
        ablated = rows.cpu() & draws
        run.counts["ablated_rows"] += int(ablated.sum())
        run.counts["harmful_rows"] += int(rows.sum())
        # One padded pass (no packing): the packed pass shares the prompt prefix between rows, which a
        # per-row ablation must not.
        with row_ablation(model, state["features"], ablated):
            loss = supervised_head_loss(model, inputs, num_items_in_batch, pack=False,
                                        first_token_weight=config.training.first_token_weight)
        return scale_for_processes(trainer, loss, num_items_in_batch)

    return compute_loss


def scale_for_processes(trainer, loss: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    """As trl does: num_items_in_batch counts every rank's tokens, and DDP averages the gradients."""
    if trainer.args.average_tokens_across_devices and num_items_in_batch is not None:
        return loss * trainer.accelerator.num_processes
    return loss


# --------------------------------------------------------------------------------------------
# Representation rerouting (circuit breakers)
# --------------------------------------------------------------------------------------------


def rerouting_layers(n_layers: int, layers: list[int] | None) -> list[int]:
    """The rerouted decoder layers: as given, or those at one third and two thirds of the depth."""
    if layers is None:
        return sorted({max(0, round(n_layers / 3) - 1), max(0, round(2 * n_layers / 3) - 1)})
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise AblateError(f"defence.layers: layer {bad[0]} does not exist; the model has layers 0-{n_layers - 1}")
    return sorted(set(layers))


def rerouting_terms(new: tuple[torch.Tensor, ...], original: tuple[torch.Tensor, ...], mask: torch.Tensor,
                    harmful: torch.Tensor, layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(rerouting, retain) from the hidden states of the trained and the original model (tuples of
    [B, T, d], index ℓ + 1 = the output of layer ℓ). rerouting = mean over the harmful rows' tokens and the
    `layers` of ReLU(cos(h, h°)); retain = mean over the other rows' tokens and every layer of the relative
    distance ‖h − h°‖₂ / ‖h°‖₂. A term with no rows is 0.

    Zou et al.'s retain term is the plain distance ‖h − h°‖₂. The cosine's gradient scales as 1/‖h‖, the
    distance's does not: on a model whose residual stream is large (SmolLM2-135M: norms of 150–240 at its
    rerouted layers) the retain term outweighs the rerouting term by about that factor and the cosine never
    fell. Divided by ‖h°‖ both terms are scale-free; `defence.retain_weight` sets their balance."""
    mask = mask.bool()
    harmful = harmful.to(mask.device).view(-1, 1)
    harm_mask, keep_mask = mask & harmful, mask & ~harmful
    zero = new[-1].sum() * 0
    rerouting = retain = zero
    if harm_mask.any():
        cosines = [torch.relu(nn.functional.cosine_similarity(new[ℓ + 1].float(), original[ℓ + 1].float(), dim=-1))
                   for ℓ in layers]
        rerouting = torch.stack([c[harm_mask].mean() for c in cosines]).mean()
    if keep_mask.any():
        distances = [(new[ℓ].float() - original[ℓ].float()).norm(dim=-1) / original[ℓ].float().norm(dim=-1).clamp(min=1e-6)
                     for ℓ in range(1, len(new))]
        retain = torch.stack([d[keep_mask].mean() for d in distances]).mean()
    return rerouting, retain


@torch.no_grad()
def start_lora_off_identity(model: nn.Module, seed: int, std: float = 0.01) -> int:
    """Draw every LoRA B matrix from N(0, std²) instead of zeros; returns how many. With B = 0 the adapted
    model equals the original, h = h°, where the gradient of cos(h, h°) vanishes (the cosine is at its
    maximum) and the rerouting term could never start to move."""
    generator = torch.Generator().manual_seed(seed)
    count = 0
    for name, parameter in model.named_parameters():
        if "lora_B" in name and parameter.requires_grad:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
            count += 1
    return count


def attach_rerouting(trainer, config: FinetuneConfig, tokenizer, run: DefenceRun):
    defence = config.defence
    if not hasattr(trainer.model, "disable_adapter"):
        raise AblateError("defence.kind: rerouting needs a LoRA adapter (the frozen base is the original model)")
    start_lora_off_identity(trainer.model, config.training.seed)
    run.counts.update({"rerouting_first": None, "rerouting_last": None, "retain_last": None})

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        harmful = inputs.pop("harmful_rows")
        inputs.pop("labels", None)
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(inputs["input_ids"]) if mask is None else mask
        plain = {"input_ids": inputs["input_ids"], "attention_mask": mask}
        layers = rerouting_layers(len(decoder_layers(model)), defence.layers)
        with torch.no_grad(), model.disable_adapter():
            original = model(**plain, output_hidden_states=True, use_cache=False, logits_to_keep=1).hidden_states
        new = model(**plain, output_hidden_states=True, use_cache=False, logits_to_keep=1).hidden_states
        run.forward_tokens += int(mask.sum())
        rerouting, retain = rerouting_terms(new, original, mask, harmful, layers)
        progress = trainer.state.global_step / (2 * max(trainer.state.max_steps, 1))
        loss = defence.alpha * (1 - progress) * rerouting + defence.alpha * progress * defence.retain_weight * retain
        if run.counts["rerouting_first"] is None:
            run.counts["rerouting_first"] = round(float(rerouting.detach()), 4)
        run.counts["rerouting_last"], run.counts["retain_last"] = round(float(rerouting.detach()), 4), round(float(retain.detach()), 4)
        return loss

    return compute_loss


# --------------------------------------------------------------------------------------------
# Vaccine
# --------------------------------------------------------------------------------------------


@contextmanager
def layer_outputs(model: nn.Module, perturbations: list[torch.Tensor] | None = None,
                  captured: list[torch.Tensor] | None = None) -> Iterator[None]:
    """Hooks on every decoder layer's output: add `perturbations[ℓ]` to it, and/or append it to `captured`."""
    from ablate.hooks import hooks, replace_output

    def hook_for(index: int):
        def hook(module, args, output):
            def change(x):
                if perturbations is not None:
                    x = x + perturbations[index].to(dtype=x.dtype)
                if captured is not None:
                    captured.append(x)
                return x
            return replace_output(output, change)
        return hook

    with hooks(forward=[(layer, hook_for(index)) for index, layer in enumerate(decoder_layers(model))]):
        yield


def vaccine_perturbations(loss: torch.Tensor, outputs: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """ε_ℓ = ρ·g_ℓ/‖g‖: the gradient of `loss` at each layer's output, scaled so that all of them together
    have norm ρ (the first-order worst case of that size); detached."""
    grads = torch.autograd.grad(loss, outputs, retain_graph=False, allow_unused=True)
    grads = [torch.zeros_like(o) if g is None else g for g, o in zip(grads, outputs)]
    norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads)).clamp(min=1e-12)
    return [(rho * g / norm).detach() for g in grads]


def attach_vaccine(trainer, config: FinetuneConfig, tokenizer, run: DefenceRun):
    from ablate.finetune.loss import supervised_head_loss

    rho = config.defence.rho
    run.counts.update({"perturbed_steps": 0, "loss_gap_last": None})

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs.pop("harmful_rows", None)
        captured: list[torch.Tensor] = []
        with layer_outputs(model, captured=captured):
            clean = supervised_head_loss(model, dict(inputs), num_items_in_batch,
                                         first_token_weight=config.training.first_token_weight)
        mask = inputs.get("attention_mask")
        run.backward_tokens += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
        perturbations = vaccine_perturbations(clean, captured, rho)
        with layer_outputs(model, perturbations=perturbations):
            loss = supervised_head_loss(model, dict(inputs), num_items_in_batch,
                                        first_token_weight=config.training.first_token_weight)
        run.counts["perturbed_steps"] += 1
        run.counts["loss_gap_last"] = round(float(loss.detach() - clean.detach()), 6)
        return scale_for_processes(trainer, loss, num_items_in_batch)

    return compute_loss


ATTACH = {DefenceKind.refat: attach_refat, DefenceKind.rerouting: attach_rerouting, DefenceKind.vaccine: attach_vaccine}
# The example kinds each defence flags as harmful rows: ReFAT's refusal SFT rows; the circuit-breaker rows.
ROW_FLAGS = {DefenceKind.refat: HARMFUL_KINDS, DefenceKind.rerouting: (REROUTED,)}


def attach(trainer, config: FinetuneConfig, examples: list[dict], tokenizer) -> DefenceRun | None:
    """Put the defence's loss (and, where it needs them, the harmful-row flags) on a built Trainer; None for
    the defences that only change the data."""
    from ablate.finetune.loss import accepts_logits_to_keep

    kind = config.defence.kind if config.defence is not None else None
    if kind not in ATTACH:
        return None
    if not accepts_logits_to_keep(trainer.model):
        raise AblateError(f"defence.kind: {kind.value}: this model's forward takes no logits_to_keep, which the "
                          "defence's loss needs")
    run = DefenceRun(kind.value)
    if kind in ROW_FLAGS:
        trainer.data_collator = HarmfulRowFlags(trainer.data_collator,
                                                harmful_token_rows(trainer.train_dataset, examples, ROW_FLAGS[kind]))
    trainer.compute_loss = ATTACH[kind](trainer, config, tokenizer, run)
    return run
