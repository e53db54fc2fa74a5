"""Report sections on how far a figure can be trusted: the contract, length sensitivity, scorers and
their agreement with human labels. `ablate.report.write_report` adds them; a notebook may call them.

    from ablate.report import load_run
    from ablate.report_honest import contract_lines, length_table, figure_length, human_agreement_table
    run = load_run("runs/x")
    header, rows = length_table(run)
"""

from __future__ import annotations

from pathlib import Path

from ablate.evaluate.length import LENGTH_RATES


def contract_lines(run) -> list[str]:
    """One line per variant: the contract its figures meet (honest or short, and what is unmet), the
    scorer that decided the labels, and any judge that was unavailable."""
    lines = []
    for variant, result in run.evals.items():
        contract = result.get("contract") or {}
        generation = result.get("generation") or {}
        tokens = generation.get("max_new_tokens", "?")
        name = contract.get("name", "short")
        text = (f"{variant}: {name} contract — {tokens} {'greedy' if not generation.get('do_sample') else 'sampled'} "
                f"new tokens, labels by the {result.get('judge', 'substring')} scorer")
        if contract.get("unmet"):
            text += "; unmet: " + "; ".join(contract["unmet"])
        for judge, reason in (result.get("judges_unavailable") or {}).items():
            text += f"; judge {judge} unavailable ({reason})"
        lines.append(text)
    return lines


def scorer_lines(run) -> list[str]:
    """How each scorer of the run maps to the four labels, and where each judge's prompt came from."""
    seen: dict[str, str] = {}
    for result in run.evals.values():
        for scorer, mapping in (result.get("scorer_mappings") or {}).items():
            source = (result.get("judge_templates") or {}).get(scorer)
            seen.setdefault(scorer, mapping + (f" (prompt: {source})" if source else ""))
    return [f"{scorer}: {text}" for scorer, text in seen.items()]


def length_table(run) -> tuple[list[str], list[list[str]]] | None:
    """Refusal / compliance / degenerate (%) against response length, one row per variant and length."""
    rows = []
    for variant, result in run.evals.items():
        table = result.get("length_sensitivity")
        if not table or not table.get("rates"):
            continue
        for length in table["lengths"]:
            rates = table["rates"][str(length)]
            rows.append([variant, str(length)] + [f"{100 * rates[label]['value']:.1f}%" for label in LENGTH_RATES]
                        + [str(rates[LENGTH_RATES[0]]["n"])])
    if not rows:
        return None
    return ["Variant", "Tokens", "Refusal", "Compliance", "Degenerate", "n"], rows


def length_note(run) -> str:
    """What the length table is, and which lengths the generation was too short for."""
    skipped = sorted({length for result in run.evals.values()
                      for length in ((result.get("length_sensitivity") or {}).get("skipped_lengths") or [])})
    text = ("Each response generated once at the suite's max_new_tokens, then cut to its first N tokens and "
            "relabelled (substring scorer and degenerate rules; held-out refusal-eliciting prompts).")
    if skipped:
        text += f" Not measured: {', '.join(map(str, skipped))} tokens (longer than the generation)."
    return text


def figure_length(run, path: Path) -> Path | None:
    """Refusal, compliance and degenerate rates against response length, one line per variant."""
    series = {variant: result["length_sensitivity"] for variant, result in run.evals.items()
              if (result.get("length_sensitivity") or {}).get("lengths")}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ablate.artifacts import save_figure

    figure, axes = plt.subplots(1, len(LENGTH_RATES), figsize=(4 * len(LENGTH_RATES), 3.6), sharey=True)
    for axis, label in zip(axes, LENGTH_RATES):
        for variant, table in series.items():
            lengths = table["lengths"]
            values = [100 * table["rates"][str(n)][label]["value"] for n in lengths]
            lows = [100 * table["rates"][str(n)][label]["ci"][0] for n in lengths]
            highs = [100 * table["rates"][str(n)][label]["ci"][1] for n in lengths]
            axis.plot(lengths, values, marker="o", label=variant)
            axis.fill_between(lengths, lows, highs, alpha=0.12)
        axis.set_title(label)
        axis.set_xlabel("new tokens scored")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("share of held-out prompts (%)")
    axes[0].set_ylim(-3, 103)
    axes[-1].legend(fontsize=8)
    figure.suptitle("Labels against response length (prefixes of one generation; 95% Wilson bands)")
    return save_figure(figure, path)


def human_agreement_table(run) -> tuple[list[str], list[list[str]]] | None:
    """Each scorer's agreement with the run's human labels: Cohen's kappa [95% CI], raw agreement, n."""
    from ablate.label import human_agreement, load_labels

    labels = load_labels(run.path)
    agreement = human_agreement(run.path)
    if not agreement:
        return None
    rows = [[scorer, f"{entry['kappa']:.2f} [{entry['ci'][0]:.2f}, {entry['ci'][1]:.2f}]",
             f"{100 * entry['agreement']:.1f}%", str(entry["n"])] for scorer, entry in agreement.items()]
    header = ["Scorer", "Cohen's kappa [95% CI]", "Agreement",
              f"n (of {len(labels['sample'])} sampled, seed {labels['seed']})"]
    return header, rows
