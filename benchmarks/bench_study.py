"""A study cold and warm, in one invocation: wall and CPU time of each, and whether both give the same table.

    python benchmarks/bench_study.py                          # the default study
    python benchmarks/bench_study.py --set harden.enabled=false --set eval.overrides=[refusal.n=16]
    python benchmarks/bench_study.py --warm-only              # one run against the user's cache, timed
    python benchmarks/bench_study.py --organism-from ~/.cache/ablate   # cold attacks and evaluations, organism reused

- **cold**: `ablate study` with an empty cache (`ABLATE_CACHE` set to a fresh folder under
  `benchmarks/_work/bench_study/`): the embedded model is converted, the organism hardened, every attack and
  every evaluation computed.
  With `--organism-from CACHE`, the fresh cache is first given the converted embedded model and the hardened
  organisms of CACHE (hard links where the file system allows, else copies; nothing else: no stage,
  donor or evaluation entry): the cold run then computes every attack and every evaluation, and skips only
  the hardening, the ~10 minutes of a cold study that a researcher pays once.
- **warm**: the same study again, the same cache, a new run directory — what a researcher iterating on a
  study waits for. Every stage of the run directory runs again; what the cache holds is reused (the
  organism, the donor's answers, the evaluation of a variant whose weights, reference, suite and code are
  unchanged: ablate/evaluate/cache.py).

Each study runs in its own process (nothing carries over in memory). The table compared is every metric
value of every variant (`eval/<variant>.json`); the script prints both times, their ratio, the load average
before and after (on a shared machine the wall time depends on what else runs; the CPU time much less), and
any metric that differs, and exits with status 1 if one does. Figures go to `_work/bench_study.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

WORK = Path(__file__).resolve().parent / "_work" / "bench_study"


def run_study(name: str, study: str, overrides: list[str], cache: str | None) -> dict:
    """One `ablate study` in a child process: its run directory, wall seconds and CPU seconds."""
    out = WORK / name
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ)
    if cache is not None:
        env["ABLATE_CACHE"] = cache
    command = [sys.executable, "-m", "ablate.cli", "study", study, "--out", str(out)]
    for override in overrides:
        command += ["--set", override]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    tick = time.perf_counter()
    with open(WORK / f"{name}.log", "w", encoding="utf-8") as log:
        returncode = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - tick
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if returncode != 0:
        raise SystemExit(f"{name} study failed (exit {returncode}); see {WORK / f'{name}.log'}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"run_dir": str(out), "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
            "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2)}


def seed_cache(source: Path, cache: Path) -> list[str]:
    """Copy `source`'s models/ and organisms/ (hard links where possible) into the empty `cache`; the entries copied."""
    copied = []
    for folder in ("models", "organisms"):
        if not (source / folder).is_dir():
            raise SystemExit(f"--organism-from {source}: no {folder}/ folder there; expected an ablate cache directory")
        shutil.copytree(source / folder, cache / folder, copy_function=link_or_copy)
        copied += [f"{folder}/{entry.name}" for entry in sorted((cache / folder).iterdir())]
    return copied


def link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def metric_table(run_dir: Path) -> dict[str, dict[str, float | None]]:
    """{variant: {metric: value}} from a run directory's eval/*.json."""
    table = {}
    for path in sorted((run_dir / "eval").glob("*.json")):
        result = json.loads(path.read_text(encoding="utf-8"))
        table[path.stem] = {name: entry.get("value") for name, entry in result["metrics"].items()}
    return table


def differences(first: dict, second: dict) -> list[str]:
    lines = []
    for variant in sorted(set(first) | set(second)):
        a, b = first.get(variant), second.get(variant)
        if a is None or b is None:
            lines.append(f"{variant}: only in {'warm' if a is None else 'cold'}")
            continue
        for metric in sorted(set(a) | set(b)):
            if a.get(metric) != b.get(metric):
                lines.append(f"{variant} {metric}: cold {a.get(metric)} warm {b.get(metric)}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", nargs="?", default="default", help="a study name or YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a study override, passed to both runs")
    parser.add_argument("--warm-only", action="store_true", help="one run against the user's cache (ABLATE_CACHE or ~/.cache/ablate)")
    parser.add_argument("--organism-from", type=Path, default=None, metavar="CACHE",
                        help="seed the cold run's fresh cache with CACHE's converted models and organisms (nothing else)")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    result: dict = {"study": args.study, "overrides": args.overrides, "cpu_count": os.cpu_count()}
    if args.warm_only:
        result["warm"] = run_study("warm", args.study, args.overrides, None)
        print(f"warm: {result['warm']['wall_seconds']} s wall, {result['warm']['cpu_seconds']} s CPU "
              f"(load {result['warm']['load_before']} → {result['warm']['load_after']})")
    else:
        cache = WORK / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        if args.organism_from is not None:
            result["organism_from"] = seed_cache(args.organism_from.expanduser(), cache)
        result["cold"] = run_study("cold", args.study, args.overrides, str(cache))
        result["warm"] = run_study("warm", args.study, args.overrides, str(cache))
        cold_table = metric_table(Path(result["cold"]["run_dir"]))
        warm_table = metric_table(Path(result["warm"]["run_dir"]))
        result["differences"] = differences(cold_table, warm_table)
        result["variants"] = sorted(cold_table)
        result["ratio"] = round(result["cold"]["wall_seconds"] / result["warm"]["wall_seconds"], 2)
        for name in ("cold", "warm"):
            run = result[name]
            print(f"{name}: {run['wall_seconds']} s wall, {run['cpu_seconds']} s CPU (load {run['load_before']} → {run['load_after']})")
        print(f"cold / warm: {result['ratio']}x; {len(cold_table)} variants, "
              + ("the same table" if not result["differences"] else f"{len(result['differences'])} metrics differ:"))
        for line in result["differences"]:
            print("  " + line)
    (WORK.parent / "bench_study.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    if result.get("differences"):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
