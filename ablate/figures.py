"""The report's figures, drawn from a loaded run (`ablate.report.load_run`); they read nothing else.

    from ablate.report import load_run
    from ablate.figures import write_figures
    write_figures(load_run("runs/default-20261126-201500"), Path("figures"))

Every figure names what it plots and the level of its intervals (the suite's `confidence`). Variants are
told apart by a legend, never by text written beside the points, so that labels cannot overlap however
close the points lie.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import pandas as pd

from ablate.artifacts import atomic_write_bytes

# Markers cycle with the colours, so that variants stay apart in a grey-scale print.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path) -> Path:
    """PNG at 130 dpi, written atomically; the figure is closed."""
    buffer = io.BytesIO()
    # No metadata: the PNG's bytes depend on the figure alone (not on the matplotlib version's stamp).
    figure.savefig(buffer, format="png", dpi=130, bbox_inches="tight", metadata={"Software": None})
    atomic_write_bytes(path, buffer.getvalue())
    _pyplot().close(figure)
    return path


def level_text(confidence: float) -> str:
    """'95%' for 0.95; '99.5%' for 0.995."""
    return f"{100 * confidence:g}%"


def _error(row: pd.Series, key: str, scale: float = 1.0) -> list[list[float]] | None:
    """[[below], [above]] for matplotlib's errorbar from `<key>_ci_low/high`, or None without an interval."""
    low, high, value = row.get(f"{key}_ci_low"), row.get(f"{key}_ci_high"), row.get(key)
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return None
    return [[scale * (value - low)], [scale * (high - value)]]


def _log_ticks(axis, values: pd.Series) -> None:
    """Readable ticks on a log10 axis: round numbers (1, 2 and 5 × 10^k over a short range, powers of ten
    over a long one) written as 2×10⁷, and no labelled minor ticks (they overlapped)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    values = values[values > 0]
    if values.empty:
        return
    low, high = values.min() / 1.4, values.max() * 1.4
    decades = math.log10(high / low)
    ticks: list[float] = []
    for mantissas in ([(1,)] if decades > 3 else []) + [(1, 2, 5), (1, 2, 3, 4, 5, 6, 8)]:
        ticks = [m * 10.0**k for k in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
                 for m in mantissas if low <= m * 10.0**k <= high]
        if len(ticks) >= 2:
            break

    def label(value: float, _position=None) -> str:
        exponent = math.floor(math.log10(value) + 1e-9)
        mantissa = round(value / 10**exponent)
        return rf"$10^{{{exponent}}}$" if mantissa == 1 else rf"${mantissa}\times10^{{{exponent}}}$"

    axis.set_xlim(low, high)
    axis.xaxis.set_major_locator(FixedLocator(ticks))
    axis.xaxis.set_major_formatter(FuncFormatter(label))
    axis.xaxis.set_minor_locator(NullLocator())
    axis.xaxis.set_minor_formatter(NullFormatter())


def figure_refusal_vs_budget(run, path: Path, confidence: float = 0.95) -> Path | None:
    """Refusal against attack budget (examples, and training FLOPs); every other variant is a dashed line
    named in the legend, for scale."""
    lora = run.table[run.table["variant"].str.startswith("lora-")]
    if lora.empty or "n_examples" not in lora:
        return None
    plt = _pyplot()
    lora = lora.sort_values("n_examples")
    references = [row for _, row in run.table[~run.table["variant"].str.startswith("lora-")].iterrows()
                  if row.get("refusal_rate") is not None and not pd.isna(row.get("refusal_rate"))]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for axis, x_key, x_label in ((axes[0], "n_examples", "attack examples"), (axes[1], "train_flops", "training FLOPs")):
        if x_key not in lora or lora[x_key].isna().all():
            axis.set_visible(False)
            continue
        y = 100 * lora["refusal_rate"]
        low = 100 * (lora["refusal_rate"] - lora.get("refusal_rate_ci_low", lora["refusal_rate"]))
        high = 100 * (lora.get("refusal_rate_ci_high", lora["refusal_rate"]) - lora["refusal_rate"])
        axis.errorbar(lora[x_key], y, yerr=[low, high], marker="o", capsize=3, color=colours[0], label="LoRA attack")
        for index, row in enumerate(references):
            axis.axhline(100 * row["refusal_rate"], linestyle="--", linewidth=1.2,
                         color=colours[(index + 1) % len(colours)],
                         label=f"{row['variant']} ({100 * row['refusal_rate']:.0f}%)")
        if x_key == "n_examples":
            axis.set_xscale("log", base=2)
            axis.set_xticks(sorted(lora[x_key].unique()), [str(int(n)) for n in sorted(lora[x_key].unique())])
            axis.minorticks_off()
        else:
            axis.set_xscale("log", base=10)
            _log_ticks(axis, lora[x_key].astype(float))
        axis.set_xlabel(x_label)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("refusal on held-out prompts (%)")
    axes[0].set_ylim(-3, 103)
    handles, labels = next(a for a in axes if a.get_visible()).get_legend_handles_labels()
    figure.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=9)
    figure.suptitle(f"Refusal against attack budget ({level_text(confidence)} Wilson intervals; "
                    "dashed: the other variants)")
    figure.tight_layout()
    return save_figure(figure, path)


def figure_direction_sweep(run, path: Path) -> Path | None:
    """Layer × position heat maps of the candidates' refusal score, steering score and KL."""
    sweep = run.sweep
    if sweep.empty or not {"layer", "position"} <= set(sweep.columns):
        return None
    scores = [column for column in ("refusal_score", "steering_score", "kl") if column in sweep]
    if not scores:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(scores), figsize=(4.2 * len(scores), 3.6), squeeze=False)
    for axis, column in zip(axes[0], scores):
        grid = sweep.pivot_table(index="position", columns="layer", values=column, aggfunc="mean")
        image = axis.imshow(grid.values, aspect="auto", cmap="viridis", origin="lower")
        axis.set_yticks(range(len(grid.index)), [str(p) for p in grid.index])
        axis.set_xlabel("layer")
        axis.set_ylabel("position")
        axis.set_title(column.replace("_", " "))
        figure.colorbar(image, ax=axis, shrink=0.8)
        if run.selected and "layer" in run.selected and run.selected.get("position") in list(grid.index):
            layers = list(grid.columns)
            if run.selected["layer"] in layers:
                axis.scatter([layers.index(run.selected["layer"])], [list(grid.index).index(run.selected["position"])],
                             marker="*", s=120, color="red")
    figure.suptitle("Direction candidates (validation prompts; ★ = selected)")
    return save_figure(figure, path)


def figure_capability_vs_refusal(run, path: Path, confidence: float = 0.95) -> Path | None:
    """Each variant's remaining refusal against what it kept: capability (or KL when there is none), with
    the intervals the suite gives (Wilson for refusal; for capability the task's interval, or over several
    tasks the mean of their bounds, which is at least as wide as the interval of the mean)."""
    table = run.table.dropna(subset=["refusal_rate"])
    y_key = "capability" if "capability" in table and table["capability"].notna().any() else "kl_first_token"
    if table.empty or y_key not in table or table[y_key].isna().all():
        return None
    plt = _pyplot()
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    figure, axis = plt.subplots(figsize=(6.5, 4))
    for index, (_, row) in enumerate(table.iterrows()):
        if pd.isna(row.get(y_key)):
            continue
        axis.errorbar(100 * row["refusal_rate"], row[y_key], xerr=_error(row, "refusal_rate", 100),
                      yerr=_error(row, y_key), marker=MARKERS[index % len(MARKERS)], markersize=7, capsize=3,
                      linestyle="none", color=colours[index % len(colours)], label=row["variant"], alpha=0.9)
    axis.set_xlim(-3, 103)
    axis.set_xlabel("refusal on held-out prompts (%)")
    axis.set_ylabel("capability (mean accuracy)" if y_key == "capability" else "KL on harmless prompts (first token)")
    axis.grid(alpha=0.3)
    axis.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False, fontsize=9, title="variant")
    axis.set_title(f"What each attack costs ({level_text(confidence)} intervals)")
    return save_figure(figure, path)


def write_figures(run, folder: Path, confidence: float = 0.95) -> dict[str, Path]:
    """Every figure the run has data for, as folder/<name>.png."""
    figures = {
        "refusal_vs_budget": figure_refusal_vs_budget(run, folder / "refusal_vs_budget.png", confidence),
        "direction_sweep": figure_direction_sweep(run, folder / "direction_sweep.png"),
        "capability_vs_refusal": figure_capability_vs_refusal(run, folder / "capability_vs_refusal.png", confidence),
    }
    return {name: path for name, path in figures.items() if path is not None}


def figure_robustness_curves(points: pd.DataFrame, path: Path, threshold: float = 0.10) -> Path | None:
    """Refusal against attack compute (FLOPs, everything the attack used), one colour per defence on one axis:
    the harmful LoRA budgets solid, the benign ones dashed, the direction attack a star. Each point is the mean
    over seeds, its bar the seeds' range. `points`: defence, attack, budget, flops, refusal_rate (one row per seed)."""
    points = points.dropna(subset=["flops", "refusal_rate"])
    points = points[points["flops"] > 0]
    if points.empty:
        return None
    plt = _pyplot()
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = {"harmful": ("-", "o", "harmful LoRA"), "benign": ("--", "s", "benign LoRA"), "direction": ("none", "*", "direction ablation")}
    figure, axis = plt.subplots(figsize=(8, 4.5))
    for index, defence in enumerate(dict.fromkeys(points["defence"])):
        colour = colours[index % len(colours)]
        for attack, (line, marker, _label) in styles.items():
            rows = points[(points["defence"] == defence) & (points["attack"] == attack)]
            if rows.empty:
                continue
            grouped = rows.groupby("budget").agg(flops=("flops", "mean"), mean=("refusal_rate", "mean"),
                                                 low=("refusal_rate", "min"), high=("refusal_rate", "max")).sort_values("flops")
            axis.errorbar(grouped["flops"], 100 * grouped["mean"],
                          yerr=[100 * (grouped["mean"] - grouped["low"]), 100 * (grouped["high"] - grouped["mean"])],
                          linestyle=line, marker=marker, markersize=9 if marker == "*" else 6, capsize=3, color=colour)
    axis.axhline(100 * threshold, color="grey", linewidth=1, linestyle=":")
    axis.set_xscale("log", base=10)
    _log_ticks(axis, points["flops"].astype(float))
    axis.set_ylim(-3, 103)
    axis.set_xlabel("attack compute (FLOPs: training, donor answers, direction stages)")
    axis.set_ylabel("refusal on held-out prompts (%)")
    axis.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    defence_handles = [Line2D([], [], color=colours[i % len(colours)], linewidth=3, label=name)
                       for i, name in enumerate(dict.fromkeys(points["defence"]))]
    attack_handles = [Line2D([], [], color="black", linestyle=line, marker=marker, label=label)
                      for attack, (line, marker, label) in styles.items() if (points["attack"] == attack).any()]
    threshold_handle = [Line2D([], [], color="grey", linestyle=":", label=f"stripped: ≤ {100 * threshold:g}%")]
    axis.legend(handles=defence_handles + attack_handles + threshold_handle, loc="center left",
                bbox_to_anchor=(1.02, 0.5), frameon=False, fontsize=9)
    axis.set_title("Refusal against attack compute per defence (mean over seeds; bars: the seeds' range)")
    return save_figure(figure, path)
