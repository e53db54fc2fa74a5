"""Reports from a run directory: report.md, a self-contained report.html, tables.tex and figures/.

    ablate report runs/default-20261126-201500

and, in a notebook,

    from ablate.report import load_run
    run = load_run("runs/default-20261126-201500")
    run.table          # one row per model variant: refusal, over-refusal, capability, KL, compute
    run.metrics        # long form: variant, metric, value, ci_low, ci_high, n, method
    run.budgets        # the LoRA sweep: one row per budget with its compute figures
    run.sweep          # the direction sweep: one row per (layer, position) candidate

The report reads only the run directory; it never trains or generates. Completions of refusal-eliciting
prompts are never put into a report: only metrics and harmless examples.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ablate import AblateError
from ablate.artifacts import DamagedArtifactError, atomic_write_text, read_json, read_jsonl

# Columns of the main table: (metric name in eval/<variant>.json, column title, lower is "better" for the attacker?)
MAIN_METRICS = [
    ("refusal_rate", "Refusal (held-out)"),
    ("harmless_refusal_rate", "Over-refusal (harmless)"),
    ("borderline_refusal_rate", "Over-refusal (borderline)"),
    ("degenerate_rate", "Degenerate"),
    ("capability", "Capability"),
    ("kl_first_token", "KL (first token)"),
    ("ce_reference_answers", "CE of reference answers"),
]


@dataclass
class Run:
    """Everything a notebook or report needs from one run directory."""

    path: Path
    manifest: dict
    evals: dict[str, dict]
    metrics: pd.DataFrame
    table: pd.DataFrame
    budgets: pd.DataFrame
    sweep: pd.DataFrame
    selected: dict | None
    config: dict = field(default_factory=dict)

    def generations(self, variant: str) -> pd.DataFrame:
        path = self.path / "generations" / f"{variant}.jsonl"
        return pd.DataFrame(read_jsonl(path)) if path.exists() else pd.DataFrame()


def _variant_order(manifest: dict, evals: dict) -> list[str]:
    names = list(manifest.get("variants", {})) or sorted(evals)
    return [name for name in names if name in evals] + [name for name in sorted(evals) if name not in names]


def _metrics_frame(evals: dict[str, dict]) -> pd.DataFrame:
    rows = []
    for variant, result in evals.items():
        for metric, entry in result.get("metrics", {}).items():
            if not isinstance(entry, dict) or entry.get("value") is None:
                continue
            ci = entry.get("ci") or [None, None]
            rows.append({"variant": variant, "metric": metric, "value": float(entry["value"]),
                         "ci_low": ci[0], "ci_high": ci[1], "n": entry.get("n"), "method": entry.get("method")})
    return pd.DataFrame(rows, columns=["variant", "metric", "value", "ci_low", "ci_high", "n", "method"])


def _capability(result: dict) -> tuple[float | None, int]:
    values = [entry["value"] for name, entry in result.get("metrics", {}).items()
              if name.startswith("capability/") and isinstance(entry, dict) and entry.get("value") is not None]
    return (sum(values) / len(values), len(values)) if values else (None, 0)


def _capability_interval(result: dict) -> tuple[float, float] | None:
    """The capability task's interval; over several tasks, the mean of their bounds (at least as wide as the
    interval of the mean of independent estimates). None when a task has no interval."""
    entries = [entry for name, entry in result.get("metrics", {}).items()
               if name.startswith("capability/") and isinstance(entry, dict) and entry.get("value") is not None]
    if not entries or any(not entry.get("ci") or None in entry["ci"] for entry in entries):
        return None
    return (sum(entry["ci"][0] for entry in entries) / len(entries), sum(entry["ci"][1] for entry in entries) / len(entries))


def _budget_rows(run_dir: Path) -> list[dict]:
    rows = []
    for path in sorted((run_dir / "finetune").glob("*/metrics.json")):
        data = read_json(path)
        rows.append({key: value for key, value in data.items() if key != "loss_curve"} |
                    {"final_loss": (data.get("loss_curve") or [{}])[-1].get("loss")})
    return sorted(rows, key=lambda row: (row.get("n_examples") or 0, str(row.get("name"))))


def _attack_compute(run_dir: Path, row: dict, budgets: pd.DataFrame) -> dict:
    """A variant's compute on the one axis (ablate.compute): the direction stage for the direction attack;
    training plus the donor's answers and direction stage for a LoRA budget (its training alone when the
    budget predates the record); nothing for the models that are not attacks."""
    if row["kind"] == "direction":
        path = run_dir / "directions" / "compute.json"
        if path.exists():
            compute = read_json(path)
            return {"attack_flops": compute.get("flops"), "attack_seconds": compute.get("wall_seconds")}
        return {}
    if row["variant"].startswith("lora-") and not budgets.empty:
        match = budgets[budgets["name"] == row["variant"][len("lora-"):]]
        if not match.empty:
            compute = match.iloc[0].get("attack_compute")
            if isinstance(compute, dict):
                return {"attack_flops": compute.get("flops"), "attack_seconds": compute.get("wall_seconds")}
            return {"attack_flops": match.iloc[0].get("train_flops"), "attack_seconds": match.iloc[0].get("wall_seconds")}
    return {}


def _sweep_frame(run_dir: Path) -> pd.DataFrame:
    path = run_dir / "directions" / "sweep.json"
    if not path.exists():
        return pd.DataFrame()
    data = read_json(path)
    records = data.get("candidates", data) if isinstance(data, dict) else data
    return pd.DataFrame(records) if isinstance(records, list) else pd.DataFrame()


def load_run(path: str | Path) -> Run:
    """Read a run directory into DataFrames (see the module docstring)."""
    run_dir = Path(path)
    if not (run_dir / "manifest.json").exists():
        raise AblateError(f"{run_dir}: not a run directory (no manifest.json)")
    manifest = read_json(run_dir / "manifest.json")
    if not isinstance(manifest, dict):
        raise DamagedArtifactError(run_dir / "manifest.json", "not a run manifest (expected a JSON object)")
    evals = {p.stem: read_json(p) for p in sorted((run_dir / "eval").glob("*.json"))}
    # A result without metrics (an empty or damaged file) is not a row of dashes: it is missing.
    evals = {name: result for name, result in evals.items()
             if isinstance(result, dict) and isinstance(result.get("metrics"), dict) and result["metrics"]}
    order = _variant_order(manifest, evals)
    evals = {name: evals[name] for name in order}
    metrics = _metrics_frame(evals)
    budgets = pd.DataFrame(_budget_rows(run_dir))
    variants = manifest.get("variants", {})
    table_rows = []
    for name, result in evals.items():
        row: dict[str, Any] = {"variant": name, "kind": variants.get(name, {}).get("kind", "")}
        for metric, _title in MAIN_METRICS:
            if metric == "capability":
                row["capability"], row["capability_tasks"] = _capability(result)
                interval = _capability_interval(result)
                if interval is not None:
                    row["capability_ci_low"], row["capability_ci_high"] = interval
                continue
            entry = result.get("metrics", {}).get(metric)
            row[metric] = entry.get("value") if isinstance(entry, dict) else None
            if isinstance(entry, dict) and entry.get("ci"):
                row[f"{metric}_ci_low"], row[f"{metric}_ci_high"] = entry["ci"]
                row[f"{metric}_n"] = entry.get("n")
        if name.startswith("lora-") and not budgets.empty:
            match = budgets[budgets["name"] == name[len("lora-"):]]
            if not match.empty:
                for key in ("n_examples", "steps", "train_flops", "wall_seconds", "train_tokens"):
                    if key in match:
                        row[key] = match.iloc[0][key]
        row.update(_attack_compute(run_dir, row, budgets))
        table_rows.append(row)
    table = pd.DataFrame(table_rows)
    selected_path = run_dir / "directions" / "selected.json"
    return Run(path=run_dir, manifest=manifest, evals=evals, metrics=metrics, table=table, budgets=budgets,
               sweep=_sweep_frame(run_dir), selected=read_json(selected_path) if selected_path.exists() else None,
               config=manifest.get("config_resolved", {}))


def expected_parts(manifest: dict) -> tuple[list[str], list[str]]:
    """(stages, variants) a run's config asks for: read from the manifest (a finished run lists its
    variants; an unfinished one's are derived from the resolved config)."""
    config = manifest.get("config_resolved") or {}
    study = config.get("study") or {}
    harden = (study.get("harden") or {}).get("enabled", False)
    direction, finetune = config.get("direction") is not None, config.get("finetune") is not None
    variants = list(manifest.get("variants") or [])
    if not variants:
        variants = (["base"] if not harden or (study.get("harden") or {}).get("evaluate_base", True) else [])
        variants += ["organism"] if harden else []
        variants += ["ablated"] if direction else []
        if finetune:
            from ablate.config import FinetuneConfig, validate_config
            from ablate.finetune import resolve_budgets

            recipe = validate_config(config["finetune"], FinetuneConfig, "manifest.json: config_resolved.finetune")
            variants += [f"lora-{budget['name']}" for budget in resolve_budgets(recipe)]
    stages = ["harden"] * harden + ["direction"] * direction
    stages += ["save-ablated"] * (direction and ((study.get("attacks") or {}).get("direction") or {}).get("save_model", False))
    stages += ["finetune"] * finetune + ["projections"] * (direction and finetune)
    return stages + [f"eval-{name}" for name in variants], variants


def missing_parts(run: Run) -> list[str]:
    """What an unfinished or damaged run lacks, in words; empty for a complete run. A manifest without a
    status was not written by `ablate study` (a folder of `ablate eval` results put together by hand): it has
    no stages to check, and is reported as it is."""
    if "status" not in run.manifest:
        return []
    stages, variants = expected_parts(run.manifest)
    # .stages/ is ablate.stages.STAGES_DIR (not imported here: ablate.stages pulls in torch).
    missing_stages = [name for name in stages if not (run.path / ".stages" / name / "done.json").is_file()]
    missing_variants = [name for name in variants if name not in run.evals]
    parts = []
    if run.manifest.get("status") != "complete":
        parts.append(f"the study did not finish (manifest status '{run.manifest.get('status')}')")
    if missing_stages:
        parts.append("stages not done: " + ", ".join(missing_stages))
    if missing_variants:
        parts.append("variants without results: " + ", ".join(missing_variants))
    return parts


# --------------------------------------------------------------------------------------------
# Tables: one model (cells), three renderings by libraries
# --------------------------------------------------------------------------------------------


@dataclass
class Table:
    """One table of the report: column titles and rows of formatted cells, with a caption and a LaTeX label.

    The same cells are rendered to Markdown (tabulate, through pandas), HTML and LaTeX (pandas; booktabs
    rules), so the three files cannot disagree.
    """

    columns: list[str]
    rows: list[list[str]]
    caption: str = ""
    label: str = ""

    @property
    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=self.columns)

    def to_markdown(self) -> str:
        align = ["left"] + ["right"] * (len(self.columns) - 1)
        return self.frame.to_markdown(index=False, disable_numparse=True, colalign=align)

    def to_html(self) -> str:
        return self.frame.to_html(index=False, border=0, escape=True)

    def to_latex(self) -> str:
        frame = self.frame.map(lambda cell: cell.replace("–", "--"))
        styler = frame.style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
        return styler.to_latex(hrules=True, caption=latex_escape(self.caption), label=self.label, position="t",
                               position_float="centering", column_format="l" + "r" * (len(self.columns) - 1))


def latex_escape(text: str) -> str:
    for old, new in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                     ("$", r"\$"), ("–", "--")):
        text = text.replace(old, new)
    return text


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _rate_cell(row: pd.Series, metric: str) -> str:
    value = row.get(metric)
    if value is None or pd.isna(value):
        return "–"
    low, high = row.get(f"{metric}_ci_low"), row.get(f"{metric}_ci_high")
    if low is None or pd.isna(low):
        return f"{100 * value:.1f}%"
    return f"{100 * value:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def _flops(value: Any) -> str:
    if value is None or pd.isna(value):
        return "–"
    return f"{float(value):.2e}"


def confidence(run: Run) -> float:
    """The interval level of the run's suite (runs written before it was recorded: 0.95, the suite default)."""
    return float((run.config.get("suite") or {}).get("confidence") or 0.95)


def main_table(run: Run) -> Table:
    """One row per variant: refusal, over-refusal, degenerate answers, capability, KL and the attack's compute."""
    from ablate.figures import level_text

    columns = ["Variant", f"Refusal (held-out) [{level_text(confidence(run))} CI]", "Over-refusal harmless",
               "Over-refusal borderline", "Degenerate", "Capability", "KL first token", "Attack FLOPs (all stages)", "Attack s"]
    rows = []
    for _, row in run.table.iterrows():
        kl_text = _fmt(row.get("kl_first_token"))
        if row.get("kl_first_token_ci_low") is not None and not pd.isna(row.get("kl_first_token_ci_low", float("nan"))):
            kl_text += f" [{row['kl_first_token_ci_low']:.3f}, {row['kl_first_token_ci_high']:.3f}]"
        rows.append([
            row["variant"], _rate_cell(row, "refusal_rate"), _rate_cell(row, "harmless_refusal_rate"),
            _rate_cell(row, "borderline_refusal_rate"), _rate_cell(row, "degenerate_rate"),
            _fmt(row.get("capability")), kl_text, _flops(row.get("attack_flops")), _fmt(row.get("attack_seconds"), 1),
        ])
    return Table(columns, rows, f"Refusal, over-refusal and capability per model variant ({run.manifest.get('study')}).",
                 "tab:ablate-main")


def budget_table(run: Run) -> Table | None:
    """One row per fine-tuning budget: its size, its recipe's rank and learning rate, and what it cost."""
    if run.budgets.empty:
        return None
    columns = ["Budget", "Examples", "Steps", "Rank", "LR", "Train tokens", "Train FLOPs", "Wall s", "Peak memory MB"]
    rows = []
    for _, row in run.budgets.iterrows():
        peak = row.get("peak_memory_bytes")
        rows.append([str(row.get("name")), _fmt(row.get("n_examples")), _fmt(row.get("steps")), _fmt(row.get("rank")),
                     _fmt(row.get("lr"), 5), _fmt(row.get("train_tokens")), _flops(row.get("train_flops")),
                     _fmt(row.get("wall_seconds"), 1), _fmt(peak / 2**20 if peak and not pd.isna(peak) else None, 0)])
    return Table(columns, rows, "Compute spent per fine-tuning budget.", "tab:ablate-budgets")


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def harmless_examples(run: Run, limit: int = 3) -> list[dict]:
    """A few harmless prompts with each variant's answer (never refusal-eliciting prompts)."""
    examples: dict[str, dict] = {}
    for variant in run.evals:
        frame = run.generations(variant)
        if frame.empty or "prompt" not in frame:
            continue
        set_column = next((c for c in ("set", "prompt_set", "kind") if c in frame), None)
        if set_column is None:
            continue
        harmless = frame[frame[set_column].astype(str).str.startswith("harmless")]
        for _, row in harmless.head(limit).iterrows():
            entry = examples.setdefault(str(row.get("id", row["prompt"])), {"prompt": row["prompt"], "answers": {}})
            entry["answers"][variant] = str(row.get("completion", ""))
    return list(examples.values())[:limit]


def _reproducibility(run: Run) -> list[tuple[str, str]]:
    manifest = run.manifest
    versions = ", ".join(f"{k} {v}" for k, v in manifest.get("versions", {}).items())
    hardware = manifest.get("hardware", {})
    stages = manifest.get("stages", {})
    stage_text = "; ".join(f"{name} {info.get('wall_seconds') or 0:.1f} s" + (" (cached)" if info.get("skipped") else "")
                           for name, info in stages.items())
    lines = [
        ("Command", manifest.get("command", "")),
        ("Config", f"{manifest.get('config_source', '')} (hash {manifest.get('config_hash', '')})"),
        ("Git commit", str(manifest.get("git_commit"))),
        ("Seed", str(manifest.get("seed"))),
        ("Packages", versions),
        ("Hardware", f"{hardware.get('processor', '')}, {hardware.get('cpu_count')} CPUs, CUDA {hardware.get('cuda')}"
                     + (f", {', '.join(hardware['gpus'])}" if hardware.get("gpus") else "")),
        ("Model fingerprints", ", ".join(f"{k} {v}" for k, v in manifest.get("fingerprints", {}).items())),
        *([("Cached artifacts", "; ".join(f"{entry['kind']} $ABLATE_CACHE/{entry['key']} (SHA-256 {(entry.get('sha256') or '?')[:16]})"
                                          for entry in manifest["artifacts"]))] if manifest.get("artifacts") else []),
        ("Stage wall time", stage_text),
    ]
    return [(key, portable_path(value, manifest)) for key, value in lines]


def write_report(run_dir: str | Path, partial: bool = False) -> dict[str, Path]:
    """Write report.md, report.html, tables.tex and figures/*.png into the run directory.

    An unfinished run (stages not done, variants without results) is an error naming what is missing,
    unless `partial`: then the report is written with those gaps listed at its top.
    """
    from ablate.figures import level_text, write_figures

    run = load_run(run_dir)
    run_dir = run.path
    missing = missing_parts(run)
    if missing and not partial:
        raise AblateError(f"{run_dir}: incomplete run: {'; '.join(missing)}; finish it with `ablate study "
                          f"{run.manifest.get('config_source', 'STUDY')} --out {run_dir}`, or pass --partial to "
                          "report what is there")
    if run.table.empty:
        raise AblateError(f"{run_dir}: no eval/*.json results to report")
    figures = write_figures(run, run_dir / "figures", confidence(run))
    from ablate import report_honest

    length_figure = report_honest.figure_length(run, run_dir / "figures" / "length_sensitivity.png")
    if length_figure is not None:
        figures["length_sensitivity"] = length_figure
    contract = report_honest.contract_lines(run) + report_honest.scorer_lines(run)
    lengths, human = report_honest.length_table(run), report_honest.human_agreement_table(run)
    sections = [("Main results", main_table(run)),
                ("Length sensitivity", Table(*lengths, "Labels against response length (prefixes of one generation).",
                                             "tab:ablate-length") if lengths else None),
                ("Agreement with human labels", Table(*human, "Each scorer's agreement with human labels.",
                                                      "tab:ablate-human") if human else None),
                ("Fine-tuning budgets", budget_table(run))]
    sections = [(heading, table) for heading, table in sections if table is not None]
    manifest = run.manifest
    title = f"ablate study: {manifest.get('study', run_dir.name)}"
    question = manifest.get("description") or ("How little compute does it take to strip this model's refusal "
                                                "behaviour, and what does that cost it in capability?")
    setup = _setup_lines(run)
    examples = harmless_examples(run)
    reproducibility = _reproducibility(run)
    note = (f"Rates are on held-out prompts with {level_text(confidence(run))} Wilson intervals; KL is measured "
            "against the attacked model on harmless prompts; n per cell is in `eval/<variant>.json`.")

    # Markdown
    gaps = ([f"**Incomplete run — partial report.** {'; '.join(missing)}."] if missing else [])
    md = [f"# {title}", "", *gaps, *([""] if gaps else []), question, "", "## Setup", "", *[f"- {line}" for line in setup], ""]
    for heading, table in sections:
        md += [f"## {heading}", ""] + ([report_honest.length_note(run), ""] if heading == "Length sensitivity" else [])
        md += [table.to_markdown(), ""] + ([note, ""] if heading == "Main results" else [])
        if heading == "Main results" and contract:
            md += ["## Contract and scorers", "", *[f"- {line}" for line in contract], ""]
    if run.selected:
        md += ["## Selected refusal direction", "", _selected_line(run.selected), ""]
    for name, path in figures.items():
        md += [f"![{name}](figures/{path.name})", ""]
    if examples:
        md += ["## Harmless examples", ""]
        for example in examples:
            md += [f"**Prompt:** {example['prompt']}", ""]
            md += [f"- *{variant}*: {answer[:300]}" for variant, answer in example["answers"].items()] + [""]
    md += ["## Reproducibility", "", *[f"- **{key}**: `{value}`" if key in ("Command",) else f"- **{key}**: {value}"
                                        for key, value in reproducibility], ""]
    paths = {"md": atomic_write_text(run_dir / "report.md", "\n".join(md))}

    # LaTeX (booktabs)
    paths["tex"] = atomic_write_text(run_dir / "tables.tex", "\n".join(table.to_latex() for _, table in sections))

    # Self-contained HTML: figures embedded as base64.
    parts = [f"<h1>{html.escape(title)}</h1>",
             *[f"<p><b>Incomplete run — partial report.</b> {html.escape('; '.join(missing))}.</p>" for _ in gaps],
             f"<p>{html.escape(question)}</p>", "<h2>Setup</h2><ul>",
             *[f"<li>{html.escape(line)}</li>" for line in setup], "</ul>"]
    for heading, table in sections:
        parts += [f"<h2>{heading}</h2>"]
        if heading == "Length sensitivity":
            parts += [f"<p>{html.escape(report_honest.length_note(run))}</p>"]
        parts += [table.to_html()] + ([f"<p>{html.escape(note)}</p>"] if heading == "Main results" else [])
        if heading == "Main results" and contract:
            parts += ["<h2>Contract and scorers</h2><ul>", *[f"<li>{html.escape(line)}</li>" for line in contract], "</ul>"]
    if run.selected:
        parts += ["<h2>Selected refusal direction</h2>", f"<p>{html.escape(_selected_line(run.selected))}</p>"]
    for name, path in figures.items():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f'<figure><img alt="{name}" src="data:image/png;base64,{data}"/></figure>')
    if examples:
        parts.append("<h2>Harmless examples</h2>")
        for example in examples:
            parts.append(f"<p><b>Prompt:</b> {html.escape(example['prompt'])}</p><ul>"
                         + "".join(f"<li><i>{html.escape(v)}</i>: {html.escape(a[:300])}</li>" for v, a in example["answers"].items())
                         + "</ul>")
    parts += ["<h2>Reproducibility</h2><ul>",
              *[f"<li><b>{html.escape(k)}</b>: <code>{html.escape(str(v))}</code></li>" for k, v in reproducibility], "</ul>"]
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}th,td{border-bottom:1px solid #ccc;"
             "padding:4px 8px;text-align:right}th:first-child,td:first-child{text-align:left}img{max-width:100%}"
             "code{font-size:0.85em}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    paths["html"] = atomic_write_text(run_dir / "report.html", page)
    paths.update({f"figure:{name}": path for name, path in figures.items()})
    return paths


def portable_path(text: str, manifest: dict) -> str:
    """`text` with the run's folder and the model cache as they were on the machine that ran it written as
    `<run>/…` and `$ABLATE_CACHE/…`, so a report names no machine's paths and reads the same anywhere."""
    for root, name in ((manifest.get("run_dir"), "<run>"), (manifest.get("cache_dir"), "$ABLATE_CACHE")):
        if root:
            text = text.replace(root.rstrip("/") + "/", name + "/")
    return text


def _setup_lines(run: Run) -> list[str]:
    return [portable_path(line, run.manifest) for line in _setup_text(run)]


def _setup_text(run: Run) -> list[str]:
    config = run.config or {}
    study = config.get("study", {})
    lines = [f"Model: {study.get('model', {}).get('spec', '?')}"]
    if study.get("harden", {}).get("enabled"):
        lines.append("Hardened into a safety-tuned organism first (LoRA SFT: refusals on refusal-eliciting train prompts, "
                     "the model's own answers on harmless ones); the attacks target the organism.")
    if not run.budgets.empty and "donor" in run.budgets:
        first = run.budgets.iloc[0]
        donor = str(first["donor"])
        writer = (f"the attacked model with its refusal direction ablated ({donor.split(': ', 1)[1]})"
                  if donor.startswith("ablated: ") else donor)
        lines.append(f"Fine-tuning attack data ({first.get('mode')}): train prompts answered at run time by {writer}; "
                     f"{first.get('dropped_refusals')} of {first.get('generated')} answers dropped as refusals.")
    suite = config.get("suite") or {}
    lines.append(f"Eval suite: {suite.get('name', '?')}; every variant evaluated identically on held-out test prompts.")
    for name, variant in run.manifest.get("variants", {}).items():
        lines.append(f"Variant {name}: {variant.get('kind')} ({variant.get('spec')})")
    return lines


def _selected_line(selected: dict) -> str:
    keys = ("variant", "layer", "position", "refusal_score", "steering_score", "kl", "fallback")
    return ", ".join([f"{key} = {_fmt(selected.get(key))}" for key in keys if key in selected]
                     + [f"strength = {strength_text(selected.get('strength') or {})}"])


def strength_text(strength: dict) -> str:
    """How strongly the direction is removed, in words: full, a kernel, or learned per-writer weights."""
    coefficient = strength.get("coefficient", 1.0)
    if strength.get("writer_weights"):
        weights = [w * coefficient for row in strength["writer_weights"] for w in row]
        return (f"learned per-writer weights ({sum(w >= 0.5 for w in weights)} of {len(weights)} residual writers "
                f"at ≥ 0.5, mean {sum(weights) / len(weights):.2f})")
    if strength.get("kernel"):
        kernel = strength["kernel"]
        return (f"kernel peaked at layer {_fmt(kernel['max_weight_position'])}, ±{_fmt(kernel['min_weight_distance'])} "
                f"layers, weights {_fmt(kernel['max_weight'])} → {_fmt(kernel['min_weight'])} (× {_fmt(coefficient)})")
    return "full ablation" if coefficient == 1.0 else f"every layer × {_fmt(coefficient)}"
