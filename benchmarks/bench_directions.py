"""Refusal-direction stage: wall time and held-out refusal / KL, side by side with heretic-llm and abliterix.

    python benchmarks/bench_directions.py                                  # ours only, on the shipped organism
    python benchmarks/bench_directions.py --model DIR --heretic benchmarks/_work/heretic-venv/bin/heretic \
           --abliterix benchmarks/_work/abliterix-venv/bin/abliterix --honest

Ours: `run_direction` (collect + screen + score + select) and weight orthogonalisation, timed in this
process; then, on the *held-out* test prompts (never seen by selection), the refusal rate of greedy
completions (substring scorer) before and after ablation, and the first-token KL(base ‖ ablated) on
harmless test prompts.

heretic (optional, AGPL: run as an external program from its own virtual environment, never
imported): a working directory with a config.toml that points at local train/test JSONL folders
built from the same prompt sets, run headless (KAGGLE_KERNEL_RUN_TYPE=1 turns its menus into plain
numbered input() prompts, answered by this driver); its merged model is then scored by the same
held-out evaluation as ours. Install it with `bash benchmarks/setup_heretic.sh`.

abliterix (optional, AGPL: the same rules; `bash benchmarks/setup_abliterix.sh`): the same data
folders and the same budget in an abliterix.toml, run in its batch mode (`--non-interactive
--non-interactive-output-dir`: it picks the trial with the fewest refusals on its selection prompts,
then the lowest KL — the choice this driver makes for heretic — and exports it merged); its model is
scored by the same held-out evaluation.

--honest scores every method under the honest contract: 150 greedy new tokens, four labels
(refusal, compliance, evasive, degenerate: ablate.evaluate.labels) from the substring scorer, or
from a judge given with --judge (e.g. a local Llama Guard 3 directory) with the substring beside it.

Prints one table and writes benchmarks/_work/bench_directions.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
# The chat template's default system prompt, which our selection and every evaluation use.
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
WORK = ROOT / "_work"
# heretic's dtype, as the issue configures its reduced-budget run (ours: `compute_dtype: auto`).
HERETIC_DTYPE = "float32"


def reference(model, tokenizer, n_test: int, max_new_tokens: int, judge: str | None = None) -> dict:
    """The held-out prompts and the unmodified model's behaviour on them: its refusal rate on refusal:test,
    its first-token log-probabilities on harmless:test, and which harmless prompts it refuses itself."""
    from ablate.config import GenerationConfig
    from ablate.data import load_prompt_set
    from ablate.directions import first_token_logprobs, prepare_batches
    from ablate.evaluate.measure import complete, measure_refusal, refusal_verdicts

    refusal = load_prompt_set("refusal:test").head(n_test).prompts
    harmless = load_prompt_set("harmless:test").head(n_test).prompts
    config = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=16)
    batches = prepare_batches(tokenizer, harmless, 8, None, next(model.parameters()).device)
    harmless_answers = complete(model, tokenizer, harmless, config).texts
    before, _ = measure_refusal(model, tokenizer, refusal, config, scorer="substring")
    loaded_judge = None
    if judge:
        from ablate.config import JudgeConfig
        from ablate.evaluate.judges import load_judge

        judge_config = JudgeConfig(model=judge, template="llamaguard", conversation=True, device=str(model.device))
        loaded_judge = (judge_config, load_judge(judge_config))
    return {"refusal": refusal, "harmless": harmless, "batches": batches, "config": config,
            "judge": loaded_judge, "judge_name": f"llamaguard:{judge}" if judge else None,
            "base_logprobs": first_token_logprobs(model, batches),
            "over_refused": torch.tensor(refusal_verdicts(harmless_answers, "substring")),
            "before": {"refusal_rate": before["value"], "n_refusal": before["n"], "result": before}}


def held_out(model, tokenizer, ref: dict, intervention=None) -> dict:
    """Refusal rate on refusal:test and first-token KL(unmodified ‖ this) on harmless:test — over all
    harmless prompts, and split into those the unmodified model answers and those it refuses itself
    (where an attack that removes refusal *must* change the first token)."""
    from contextlib import nullcontext

    from ablate.directions import first_token_kl, first_token_logprobs
    from ablate.evaluate.measure import measure_refusal, refusal_verdicts

    with intervention() if intervention else nullcontext():
        result, completed = measure_refusal(model, tokenizer, ref["refusal"], ref["config"], scorer="substring")
        kl = first_token_kl(ref["base_logprobs"], first_token_logprobs(model, ref["batches"]))
    refused = ref["over_refused"]
    completions = completed.texts
    still_refused = refusal_verdicts(completions, "substring")
    labels = four_labels(ref, completions)
    if ref.get("judge") is not None:  # the judge's labels decide; refusal is its 'refusal' label
        still_refused = [label == "refusal" for label in labels]
    return {"refusal_rate": sum(still_refused) / len(completions), "n_refusal": len(ref["refusal"]), "result": result,
            "labels": {name: labels.count(name) for name in ("refusal", "compliance", "evasive", "degenerate", "unparsed")},
            "scorer": ref.get("judge_name") or "substring", "max_new_tokens": ref["config"].max_new_tokens,
            "kl": float(kl.mean()), "n_harmless": len(ref["harmless"]),
            "kl_answered": float(kl[~refused].mean()) if (~refused).any() else None,
            "kl_over_refused": float(kl[refused].mean()) if refused.any() else None,
            "n_over_refused": int(refused.sum()), "examples": completions[:3],
            # Per prompt, in prompt order, for the paired comparison of two methods on the same prompts.
            "refused_items": still_refused, "kl_items": [round(float(value), 5) for value in kl]}


def four_labels(ref: dict, completions: list[str]) -> list[str]:
    """The four labels of each held-out completion: from the judge given with --judge, else substring."""
    from ablate.evaluate.labels import harm_scorer, label_four
    from ablate.evaluate.refusal import COMPLIANCE, REFUSAL, is_refusal

    substring = [REFUSAL if is_refusal(text) else COMPLIANCE for text in completions]
    verdicts, template = substring, None
    if ref.get("judge") is not None:
        from ablate.evaluate.judges import run_judge

        config, loaded = ref["judge"]
        verdicts = [row["verdict"] for row in run_judge(config, ref["refusal"], completions, judge=loaded, progress=False)]
        template = config.template.value
    return [label_four(prompt, text, verdict, refused == REFUSAL, judge_is_harm_scorer=harm_scorer(template))[0]
            for prompt, text, verdict, refused in zip(ref["refusal"], completions, verdicts, substring)]


def paired_comparison(ours: dict, theirs: dict) -> dict:
    """Ours against heretic on the same held-out prompts: refusals with their Wilson intervals, the discordant
    prompts (refused by one method only) and the exact McNemar test on them, and the mean first-token KL
    difference (ours − heretic) with its paired-bootstrap interval. With 150 prompts a difference of one or
    two refusals is well inside chance; the test says how far inside."""
    from ablate.evaluate.stats import bootstrap_difference, mcnemar_exact, wilson_interval

    mine, other = ours["refused_items"], theirs["refused_items"]
    only_ours = sum(a and not b for a, b in zip(mine, other))
    only_theirs = sum(b and not a for a, b in zip(mine, other))
    kl = bootstrap_difference({str(i): v for i, v in enumerate(theirs["kl_items"])},
                              {str(i): v for i, v in enumerate(ours["kl_items"])})
    return {"refused": {"ours": sum(mine), "theirs": sum(other), "n": len(mine),
                        "ours_ci": wilson_interval(sum(mine), len(mine)), "theirs_ci": wilson_interval(sum(other), len(other))},
            "refused_by_ours_only": only_ours, "refused_by_theirs_only": only_theirs,
            "mcnemar_p": mcnemar_exact(only_ours, only_theirs),
            "kl_difference": kl}


def run_ours(model_spec: str, n_test: int, max_new_tokens: int, config_path: str | None, device: str = "cpu",
             judge: str | None = None) -> dict:
    from ablate.config import DirectionConfig, load_config
    from ablate.directions import load_direction, run_direction
    from ablate.interventions import directional_ablation, orthogonalize_weights, weights_for
    from ablate.models import load_model

    config = load_config(config_path, DirectionConfig) if config_path else DirectionConfig()
    out = WORK / "ours-directions"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    started = time.perf_counter()
    model, tokenizer = load_model(model_spec, device=device)
    loaded = time.perf_counter()
    selected = run_direction(model, tokenizer, config, out, progress=False)
    direction, _ = load_direction(out)
    selected_at = time.perf_counter()
    edited = __import__("copy").deepcopy(model)
    orthogonalize_weights(edited, direction, weights_for(edited, selected))
    finished = time.perf_counter()
    del edited
    result = {
        "load_seconds": round(loaded - started, 1),
        "direction_seconds": round(selected_at - loaded, 1),
        "orthogonalize_seconds": round(finished - selected_at, 1),
        "stage_seconds": round(finished - loaded, 1),
        "selected": {k: selected[k] for k in ("variant", "layer", "position", "refusal_score", "kl", "steering_score",
                                              "fallback", "filter_counts", "timings", "compute_dtype")},
    }
    print(f"ours: stage {result['stage_seconds']} s (direction {result['direction_seconds']} s), "
          f"layer {selected['layer']} {selected['variant']} pos {selected['position']}", flush=True)
    ref = reference(model, tokenizer, n_test, max_new_tokens, judge)
    _REFERENCES[(model_spec, n_test, max_new_tokens, device, judge)] = (model, tokenizer, ref)
    result["before"] = ref["before"]
    result["after"] = held_out(model, tokenizer, ref,
                               lambda: directional_ablation(model, direction, weights_for(model, selected)))
    return result


# --------------------------------------------------------------------------------------------
# heretic, as an external program
# --------------------------------------------------------------------------------------------


def write_heretic_inputs(workdir: Path, model_path: str, n_train: int, n_eval: int, trials: int, batch_size: int,
                         max_new_tokens: int) -> None:
    """Local dataset folders (train = our train split, test = our *validation* split, which heretic
    selects on) and a config.toml mirroring the reduced budget described in the issue."""
    from ablate.data import load_prompt_set

    for kind in ("refusal", "harmless"):
        folder = workdir / "data" / kind
        folder.mkdir(parents=True, exist_ok=True)
        for split, source, n in (("train", f"{kind}:train", n_train), ("test", f"{kind}:val", n_eval)):
            rows = load_prompt_set(source).sample(n, seed=0).prompts
            (folder / f"{split}.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in rows))
    data = workdir / "data"
    (workdir / "config.toml").write_text(f"""model = "{model_path}"
device_map = "cpu"
dtypes = ["{HERETIC_DTYPE}"]
batch_size = {batch_size}
n_trials = {trials}
n_startup_trials = {min(8, trials)}
max_response_length = {max_new_tokens}
export_strategy = "merge"
system_prompt = "{SMOLLM_SYSTEM}"

[good_prompts]
dataset = "{data / 'harmless'}"
split = "train"
column = "text"

[bad_prompts]
dataset = "{data / 'refusal'}"
split = "train"
column = "text"

[good_evaluation_prompts]
dataset = "{data / 'harmless'}"
split = "test"
column = "text"

[bad_evaluation_prompts]
dataset = "{data / 'refusal'}"
split = "test"
column = "text"
""")


TRIAL_LINE = re.compile(r"\[(\d+)\].*?Refusals:\s*(\d+)/(\d+),\s*KL divergence:\s*([0-9.]+)")


def drive_heretic(executable: str, workdir: Path, saved: Path, env: dict, timeout: float) -> tuple[int, str, dict]:
    """Run heretic, answering its numbered menus: the Pareto trial with the fewest refusals (then the
    lowest KL) is chosen, saved (merged) to `saved`, then the program is exited. Returns (exit code,
    transcript, chosen trial as heretic reported it on its own selection prompts). The transcript is
    also appended to workdir/heretic.log as it arrives, so a long run can be followed."""
    import select

    log = (workdir / "heretic.log").open("w", encoding="utf-8")

    # An absolute path: the child runs in `workdir`, where a relative one would not resolve.
    process = subprocess.Popen([str(Path(executable).resolve())], cwd=workdir, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    transcript, pending, chosen, stage = [], "", {}, "trial"
    deadline = time.monotonic() + timeout

    def answer(text: str) -> None:
        process.stdin.write((text + "\n").encode())
        process.stdin.flush()

    while process.poll() is None and time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 5.0)
        if not ready:
            continue
        chunk = os.read(process.stdout.fileno(), 65536).decode(errors="replace")
        if not chunk:
            break
        transcript.append(chunk)
        log.write(chunk)
        log.flush()
        pending += chunk
        if pending.rstrip().endswith("Enter number:"):
            menu = pending
            pending = ""
            if "Which trial do you want to use?" in menu:
                if stage == "trial":
                    trials = [(int(r), float(kl), int(n), int(total)) for n, r, total, kl in TRIAL_LINE.findall(menu)]
                    refusals, kl, number, total = min(trials)
                    chosen = {"menu_number": number, "refusals": refusals, "of": total, "kl": kl}
                    answer(str(number))
                    stage = "save"
                else:  # back at the trial menu after saving: the last entry exits
                    answer(str(len(re.findall(r"^\[\d+\]", menu.split("Which trial do you want to use?")[-1], re.M))))
            elif "What do you want to do with the decensored model?" in menu:
                answer("1" if stage == "save" else "5")
            else:  # any other menu (e.g. an existing checkpoint): take the first option
                answer("1")
        elif "Path to the folder" in pending and pending.rstrip().endswith(":"):
            pending = ""
            answer(str(saved))
            stage = "done"
    if process.poll() is None:
        process.kill()
    process.wait()
    log.close()
    return process.returncode, "".join(transcript), chosen


_REFERENCES: dict = {}


def shared_reference(model_path: str, n_test: int, max_new_tokens: int, device: str, judge: str | None) -> tuple:
    """(base model, tokenizer, reference), computed once per invocation and shared by every method."""
    key = (model_path, n_test, max_new_tokens, device, judge)
    if key not in _REFERENCES:
        from ablate.models import load_model

        model, tokenizer = load_model(model_path, device=device)
        _REFERENCES[key] = (model, tokenizer, reference(model, tokenizer, n_test, max_new_tokens, judge))
    return _REFERENCES[key]


def score_external(model_path: str, saved: Path, n_test: int, max_new_tokens: int, device: str, judge: str | None) -> dict:
    """Our held-out evaluation of a model another tool saved: refusal (and the four labels), KL vs the base."""
    from ablate.models import load_model

    _, tokenizer, ref = shared_reference(model_path, n_test, max_new_tokens, device, judge)
    merged, _ = load_model(str(saved), device=device)
    after = held_out(merged, tokenizer, ref)
    del merged
    return after


def run_heretic(executable: str, model_path: str, n_test: int, max_new_tokens: int, trials: int, device: str = "cpu",
                judge: str | None = None) -> dict:
    """heretic's reduced-budget run (as measured in the issue), then our held-out evaluation of its model."""
    import shutil

    workdir = WORK / "heretic-run"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    write_heretic_inputs(workdir, model_path, n_train=64, n_eval=32, trials=trials, batch_size=32,
                         max_new_tokens=32)
    saved = workdir / "merged"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KAGGLE_KERNEL_RUN_TYPE": "1", "PYTHONUNBUFFERED": "1",
           "COLUMNS": "200"}
    started = time.perf_counter()
    returncode, _, chosen = drive_heretic(executable, workdir, saved, env, timeout=4 * 3600)
    wall = time.perf_counter() - started
    result = {"wall_seconds": round(wall, 1), "returncode": returncode, "log": str(workdir / "heretic.log"),
              "chosen_trial_on_its_selection_prompts": chosen}
    if not (saved / "config.json").exists():
        result["error"] = "heretic saved no model; see the log"
        return result
    result["after"] = score_external(model_path, saved, n_test, max_new_tokens, device, judge)
    return result


# --------------------------------------------------------------------------------------------
# abliterix, as an external program
# --------------------------------------------------------------------------------------------


def write_abliterix_inputs(workdir: Path, model_path: str, n_train: int, n_eval: int, trials: int, batch_size: int,
                           max_new_tokens: int, device: str) -> None:
    """The same data folders as heretic's (train = our train split, selection = our validation split)
    and an abliterix.toml with the same budget: trials, start-up trials, batch size, response tokens,
    the model's own default system prompt. On a CPU: float32 on the CPU; on a GPU: bfloat16, device_map auto."""
    write_heretic_inputs(workdir, model_path, n_train, n_eval, trials, batch_size, max_new_tokens)
    (workdir / "config.toml").unlink()  # heretic's file; abliterix reads abliterix.toml
    data = workdir / "data"
    on_gpu = device.startswith("cuda")
    sources = {"benign_prompts": ("harmless", "train"), "target_prompts": ("refusal", "train"),
               "benign_eval_prompts": ("harmless", "test"), "target_eval_prompts": ("refusal", "test")}
    sections = "".join(f'\n[{name}]\ndataset = "{data / kind}"\nsplit = "{split}"\ncolumn = "text"\n'
                       for name, (kind, split) in sources.items())
    (workdir / "abliterix.toml").write_text(f"""system_prompt = "{SMOLLM_SYSTEM}"

[model]
model_id = "{model_path}"
device_map = "{'auto' if on_gpu else 'cpu'}"
dtype_fallback_order = {'["bfloat16", "float32"]' if on_gpu else '["float32"]'}

[inference]
batch_size = {batch_size}
max_gen_tokens = {max_new_tokens}

[optimization]
num_trials = {trials}
num_warmup_trials = {min(8, trials)}
{sections}""")


def run_abliterix(executable: str, model_path: str, n_test: int, max_new_tokens: int, trials: int, device: str = "cpu",
                  judge: str | None = None, timeout: float = 4 * 3600) -> dict:
    """abliterix's batch-mode run with heretic's budget, then our held-out evaluation of its exported model."""
    import shutil

    workdir = WORK / "abliterix-run"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    write_abliterix_inputs(workdir, model_path, n_train=64, n_eval=32, trials=trials, batch_size=32,
                           max_new_tokens=32, device=device)
    saved = workdir / "merged"
    # The thread count our stage uses: without it, a loaded shared CPU left abliterix's first generation
    # (20 prompts, 32 tokens) unfinished after 25 minutes; with it the same run took minutes.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))}
    command = [str(Path(executable).resolve()), "--config", "abliterix.toml", "--non-interactive",
               "--non-interactive-output-dir", str(saved), "--seed", "0"]
    started = time.perf_counter()
    with (workdir / "abliterix.log").open("w", encoding="utf-8") as log:
        try:
            returncode = subprocess.run(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            returncode = None
    wall = time.perf_counter() - started
    result = {"wall_seconds": round(wall, 1), "returncode": returncode, "log": str(workdir / "abliterix.log")}
    manifest = next(saved.glob("reproduce/*.json"), None) if saved.exists() else None
    if manifest is not None:
        result["reproduce_manifest"] = str(manifest)
    if not (saved / "config.json").exists():
        result["error"] = ("abliterix timed out" if returncode is None else "abliterix saved no model") + "; see the log"
        return result
    result["after"] = score_external(model_path, saved, n_test, max_new_tokens, device, judge)
    return result


def fmt_interval(bounds) -> str:
    return f"[{bounds[0]:.1%}, {bounds[1]:.1%}]"


def print_paired(name: str, paired: dict) -> None:
    refused, kl = paired["refused"], paired["kl_difference"]
    print(f"ours vs {name} on the same held-out prompts: refused {refused['ours']} (ours) and {refused['theirs']} ({name}) of "
          f"{refused['n']}, 95% Wilson {fmt_interval(refused['ours_ci'])} and {fmt_interval(refused['theirs_ci'])}; "
          f"{paired['refused_by_ours_only']} refused by ours only, {paired['refused_by_theirs_only']} by {name} only "
          f"(exact McNemar p = {paired['mcnemar_p']:.3f}); KL ours − {name} {kl['value']:+.3f} "
          f"(95% paired bootstrap [{kl['ci'][0]:+.3f}, {kl['ci'][1]:+.3f}])")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Model to ablate: a directory, hub id or .gguf (default: the shipped "
                        "organism, `ablate harden embedded`, built or taken from the cache).")
    parser.add_argument("--config", default=None, help="DirectionConfig YAML for ours (default: the defaults).")
    parser.add_argument("--n-test", type=int, default=150, help="Held-out prompts per side (refusal:test, harmless:test).")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="Greedy tokens per held-out completion.")
    parser.add_argument("--honest", action="store_true", help="Score under the honest contract: 150 greedy tokens, four labels.")
    parser.add_argument("--judge", default=None, help="A judge model (local Llama Guard directory) for the four labels.")
    parser.add_argument("--device", default="cpu", help="Device for every method and the evaluation (cpu, cuda).")
    parser.add_argument("--heretic", default=None, help="heretic executable in its own venv (skip heretic when absent).")
    parser.add_argument("--heretic-trials", type=int, default=20)
    parser.add_argument("--abliterix", default=None, help="abliterix executable in its own venv (skip abliterix when absent).")
    parser.add_argument("--abliterix-trials", type=int, default=None, help="Trials for abliterix (default: --heretic-trials).")
    args = parser.parse_args()
    if args.honest:
        args.max_new_tokens = 150
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    WORK.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    from ablate.directions import native_bfloat16

    if args.model is None:
        from ablate.finetune import default_config, harden
        from ablate.finetune.holdout import unscored

        args.model = str(harden("embedded", unscored(default_config()), progress=False))  # not scored again here
    results = {"model": args.model, "n_test": args.n_test, "max_new_tokens": args.max_new_tokens, "honest": args.honest,
               "judge": args.judge, "device": args.device,
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "loadavg_start": load,
               # The stage's compute dtype follows this (compute_dtype auto); heretic runs in HERETIC_DTYPE.
               "cpu_native_bfloat16": native_bfloat16(torch.device("cpu"))}
    results["ours"] = run_ours(args.model, args.n_test, args.max_new_tokens, args.config, args.device, args.judge)
    peers = {}
    if args.heretic:
        peers["heretic"] = run_heretic(args.heretic, args.model, args.n_test, args.max_new_tokens, args.heretic_trials,
                                       args.device, args.judge)
    if args.abliterix:
        peers["abliterix"] = run_abliterix(args.abliterix, args.model, args.n_test, args.max_new_tokens,
                                           args.abliterix_trials or args.heretic_trials, args.device, args.judge)
    for name, peer in peers.items():
        results[name] = peer
        if "after" in peer:  # the peer's wall time over our stage's
            peer["speed_ratio"] = round(peer["wall_seconds"] / results["ours"]["stage_seconds"], 2)
            peer["paired"] = paired_comparison(results["ours"]["after"], peer["after"])
    results["loadavg_end"] = os.getloadavg()
    (WORK / "bench_directions.json").write_text(json.dumps(results, indent=2))

    ours = results["ours"]
    def row(name: str, wall: float, after: dict) -> str:
        answered, over = (f"{after[k]:.3f}" if after[k] is not None else "-" for k in ("kl_answered", "kl_over_refused"))
        labels = after["labels"]
        return (f"{name:10} {wall:>8} {ours['before']['refusal_rate']:>15.3f} {after['refusal_rate']:>14.3f} "
                f"{after['kl']:>12.3f} {answered:>12} {over:>15}   {labels['compliance']:>4} {labels['evasive']:>4} "
                f"{labels['degenerate']:>4}")

    print(f"\n{'':10} {'wall s':>8} {'refusal before':>15} {'refusal after':>14} {'KL harmless':>12} "
          f"{'KL answered':>12} {'KL over-refused':>15}   {'comp':>4} {'evas':>4} {'degn':>4}")
    print(row("ours", ours["stage_seconds"], ours["after"]))
    for name, peer in peers.items():
        if "after" in peer:
            print(row(name, peer["wall_seconds"], peer["after"]))
    for name, peer in peers.items():
        if "after" in peer:
            print(f"ours is {peer['speed_ratio']}x faster than {name} ({peer['wall_seconds']} s / {ours['stage_seconds']} s)")
            print_paired(name, peer["paired"])
        else:
            print(f"{name}: {peer.get('error')} (exit {peer['returncode']}, log {peer['log']})")
    print(f"held-out: refusal:test / harmless:test, first {args.n_test} each ({ours['after']['n_over_refused']} harmless "
          f"refused by the unmodified model: 'KL over-refused'); {args.max_new_tokens} greedy tokens; labels by "
          f"{ours['after']['scorer']}; load average {load[0]:.1f} at start on {os.cpu_count()} CPUs "
          f"(native bfloat16: {'yes' if results['cpu_native_bfloat16'] else 'no'}) → {WORK / 'bench_directions.json'}")


if __name__ == "__main__":
    sys.exit(main())
