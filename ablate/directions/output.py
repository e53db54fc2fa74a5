"""The direction stage's artifacts: the lm-eval `steered` export, the sweep figure, and reading a finished
stage back (`load_direction`)."""

from __future__ import annotations

import io

from pathlib import Path

import torch
from torch import nn

from ablate import AblateError
from ablate.artifacts import atomic_write_bytes, read_done, read_json
from ablate.interventions import unit
from ablate.models import get_adapter


def save_tensor(value, path: Path) -> Path:
    """`torch.save` of a tensor (or a dict of them), written atomically."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def export_steered(model: nn.Module, direction: torch.Tensor, path: Path) -> Path:
    """Write lm-eval's `steered` model file: clamp the r̂ component to 0 at every residual source and
    at every decoder layer's output — the same directional ablation as the hooks."""
    adapter = get_adapter(model)
    names = {id(module): name for name, module in model.named_modules()}
    r_hat = unit(direction)
    modules = [adapter.embedding, *adapter.extra_embeddings, *adapter.all_writers(), *adapter.layers]
    steer = {names[id(module)]: {"action": "clamp", "steering_vector": r_hat.clone(), "steering_coefficient": 0.0,
                                  "bias": None, "head_index": None} for module in modules}
    return save_tensor(steer, path)


def plot_sweep(records: list[dict], variants: list[str], n_layers: int, position_labels: list[str],
               selected: dict, max_layer: int, path: Path) -> Path | None:
    """Layer × position heatmaps of the three scores (one row per variant); the pick is starred."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is optional
        return None
    import io

    import numpy as np

    panels = [("estimated_refusal_score", "ablation refusal score\n(first-order estimate; lower = less refusal)", "viridis"),
              ("refusal_score", "ablation refusal score\n(exact, shortlisted)", "viridis"),
              ("steering_score", "steering score\n(exact, shortlisted; > 0 wanted)", "magma"),
              ("kl", "first-token KL on harmless\n(exact, shortlisted)", "Reds")]
    n_positions = len(position_labels)
    figure, axes = plt.subplots(len(variants), len(panels), figsize=(4.2 * len(panels), 0.22 * n_layers * len(variants) + 2.0),
                                squeeze=False)
    for row, variant in enumerate(variants):
        for column, (key, title, cmap) in enumerate(panels):
            grid = np.full((n_layers, n_positions), np.nan)
            for record in records:
                if record["variant"] == variant and record.get(key) is not None:
                    grid[record["layer"], record["position"] + n_positions] = record[key]
            axis = axes[row][column]
            image = axis.imshow(grid, aspect="auto", origin="lower", cmap=cmap, interpolation="nearest")
            figure.colorbar(image, ax=axis, fraction=0.05)
            axis.axhline(max_layer - 0.5, color="grey", linestyle="--", linewidth=0.8)
            axis.set_xticks(range(n_positions))
            axis.set_xticklabels(position_labels, rotation=45, fontsize=7)
            axis.set_ylabel("layer")
            axis.set_title(f"{variant}: {title}", fontsize=8)
            if selected["variant"] == variant:
                axis.plot(selected["position"] + n_positions, selected["layer"], marker="*", color="cyan", markersize=12)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return atomic_write_bytes(path, buffer.getvalue())


def load_direction(direction_dir: Path) -> tuple[torch.Tensor, dict]:
    """(r (d_model,) float32, selected metadata) from a finished direction stage directory."""
    direction_dir = Path(direction_dir)
    path, meta_path = direction_dir / "direction.pt", direction_dir / "selected.json"
    if not path.exists() or not meta_path.exists():
        raise AblateError(f"{direction_dir}: no direction.pt/selected.json here; run `ablate direction` first")
    if read_done(direction_dir) is None:
        raise AblateError(f"{direction_dir}: the direction stage did not finish (no done.json); rerun `ablate direction`")
    direction = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(direction, torch.Tensor) or direction.dim() != 1 or not torch.isfinite(direction).all():
        raise AblateError(f"{path}: expected a finite 1-D tensor (d_model,)")
    return direction.float(), read_json(meta_path)
