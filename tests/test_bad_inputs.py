"""Bad inputs against every command: exit status 2, one line naming the culprit, the user's files untouched.

Each case runs the command line through `ablate.cli.main`, the function the installed `ablate` console
script calls, in this process: a subprocess costs 3–6 s of interpreter and torch start-up on a small CPU,
so ~50 of them would cost minutes. A representative handful (`SUBPROCESS_CASES`) also runs through the
installed `ablate` executable, to show the in-process path is the real one.

Every case shares one workspace (a tiny model, a direction, a user's folders holding their own files,
run directories, eval results) and, after it, the workspace must be byte-for-byte what it was: a refused
command writes nothing, anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ablate.cli import main

REPO = Path(__file__).resolve().parents[1]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*"))
            if path.is_file() and "__pycache__" not in path.parts}


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return path


def eval_result(model: str) -> dict:
    entry = {"value": 0.5, "ci": [0.2, 0.8], "n": 4, "method": "wilson"}
    return {"variant": "x", "model_spec": model, "metrics": {"refusal_rate": entry},
            "per_item": {"refusal_rate": {"a": 1.0, "b": 0.0, "c": 1.0, "d": 0.0}}}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tokenizer):
    """Everything the cases point at; built once, never changed by a case (each checks that)."""
    from conftest import build_model

    root = tmp_path_factory.mktemp("bad-inputs")
    model = build_model("llama", tokenizer)
    model.save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    # A model whose weights file was cut short, and one whose config is not JSON.
    for name in ("truncated", "badconfig"):
        shutil.copytree(root / "tiny", root / name)
    weights = (root / "truncated" / "model.safetensors").read_bytes()
    write(root / "truncated" / "model.safetensors", weights[: len(weights) // 2])
    write(root / "badconfig" / "config.json", "{ not json")
    write(root / "m" / "notes.txt", "a local folder named m\n")  # so 'm/nope' is a path, not a hub id

    # A finished direction stage (as `ablate direction` leaves it) and two damaged copies.
    direction = root / "direction"
    direction.mkdir()
    torch.save(torch.randn(32), direction / "direction.pt")
    write(direction / "selected.json", json.dumps({"layer": 1, "position": -1, "variant": "mean_diff"}))
    write(direction / "done.json", json.dumps({"fingerprint": "f"}))
    write(direction / ".ablate-output.json", "{}")
    shutil.copytree(direction, root / "pickled")
    import datetime

    torch.save({"when": datetime.datetime(2020, 1, 1)}, root / "pickled" / "direction.pt")
    shutil.copytree(direction, root / "badselected")
    write(root / "badselected" / "selected.json", '{"layer": 1,')

    # A user's own folder, which ablate did not write, with their files in it.
    write(root / "mine" / "config.yaml", "my: own settings\n")
    write(root / "mine" / "config.json", '{"mine": true}\n')
    write(root / "mine" / "notes.md", "do not delete\n")
    write(root / "existing.jsonl", '{"kept": true}\n')
    write(root / "afile", "a file, not a folder\n")

    # Configs: empty, a folder, not UTF-8, an unknown key, a suite that measures nothing.
    write(root / "empty.yaml", "")
    (root / "configdir.yaml").mkdir()
    write(root / "latin1.yaml", "name: caf\xe9\n".encode("latin-1"))
    write(root / "unknown.yaml", "lora:\n  rnak: 4\n")
    write(root / "nothing.yaml", "name: nothing\nrefusal: null\nharmless: null\nborderline: null\n")
    write(root / "study_unknown.yaml", "name: s\nattacks:\n  directoin: {}\n")
    write(root / "prompts_empty.jsonl", "")
    write(root / "prompts_latin1.txt", "caf\xe9\n".encode("latin-1"))

    # An eval folder holding another model's result under the name the tiny model would get.
    write(root / "evalrun" / ".ablate-output.json", "{}")
    write(root / "evalrun" / "eval" / "tiny.json", json.dumps(eval_result(str(root / "elsewhere" / "tiny"))))
    write(root / "results" / "a.json", json.dumps(eval_result("a")))
    write(root / "results" / "corrupt.json", '{"metrics": {"refusal_rate": ')
    write(root / "results" / "empty.json", "{}")

    # An interrupted study: the direction attack never finished, so 'ablated' has no result.
    manifest = {"study": "s", "status": "running", "config_source": "s.yaml",
                "config_resolved": {"study": {"harden": {"enabled": False}}, "direction": {"kl_max": 0.1},
                                    "finetune": None, "suite": {"name": "default"}}}
    write(root / "run" / "manifest.json", json.dumps(manifest))
    write(root / "run" / "eval" / "base.json", json.dumps(eval_result("base")))
    write(root / "run" / ".stages" / "eval-base" / "done.json", "{}")
    write(root / "run_corrupt" / "manifest.json", json.dumps({**manifest, "status": "complete"}))
    write(root / "run_corrupt" / "eval" / "base.json", "{ truncated")
    write(root / "run_empty" / "manifest.json", json.dumps({**manifest, "status": "complete",
                                                            "variants": {"base": {}, "ablated": {}}}))
    write(root / "run_empty" / "eval" / "base.json", json.dumps(eval_result("base")))
    write(root / "run_empty" / "eval" / "ablated.json", "{}")
    return root, snapshot(root)


PYTHON_TAG = '!!python/object/apply:os.system ["echo pwned"]'
LORA = str(REPO / "finetune_configs" / "lora_attack.yaml")

# (id, command line ({ws} = the workspace), text the error line must contain, working directory under ws)
CASES = [
    # models
    ("models-missing-dir", ["models", "{ws}/no/such/model"], ["no/such/model"], None),
    ("models-first-part-local", ["models", "m/nope"], ["m/nope", "no such directory"], "."),
    ("models-no-config", ["models", "{ws}/m"], ["/m'", "config.json"], None),
    ("models-not-a-model-config", ["models", "{ws}/mine"], ["mine/config.json", "model_type"], None),
    ("models-truncated-safetensors", ["models", "{ws}/truncated"], ["model.safetensors", "truncated or corrupt"], None),
    ("models-corrupt-config", ["models", "{ws}/badconfig"], ["config.json", "corrupt JSON"], None),
    ("models-not-gguf-file", ["models", "{ws}/afile"], ["afile", ".gguf"], None),
    # data, and the command line itself
    ("data-unknown-option", ["data", "--bogus"], ["--bogus"], None),
    ("unknown-command", ["evaluate"], ["evaluate"], None),
    ("generate-misspelt-option", ["generate", "{ws}/tiny", "--prompt", "refusal:test"], ["--prompt"], None),
    # generate
    ("generate-limit-zero", ["generate", "{ws}/tiny", "-p", "refusal:test", "--limit", "0", "--out", "{ws}/existing.jsonl"], ["--limit"], None),
    ("generate-limit-negative", ["generate", "{ws}/tiny", "-p", "refusal:test", "--limit", "-3"], ["--limit"], None),
    ("generate-batch-size-zero", ["generate", "{ws}/tiny", "-p", "refusal:test", "--batch-size", "0"], ["--batch-size"], None),
    ("generate-max-new-tokens-zero", ["generate", "{ws}/tiny", "-p", "refusal:test", "--max-new-tokens", "0"], ["--max-new-tokens"], None),
    ("generate-temperature-zero", ["generate", "{ws}/tiny", "-p", "refusal:test", "--sample", "--temperature", "0"], ["--temperature"], None),
    ("generate-out-exists", ["generate", "{ws}/tiny", "-p", "refusal:test", "--limit", "1", "--out", "{ws}/existing.jsonl"], ["existing.jsonl", "--overwrite"], None),
    ("generate-out-is-folder", ["generate", "{ws}/tiny", "-p", "refusal:test", "--out", "{ws}/mine"], ["mine", "folder"], None),
    ("generate-out-under-file", ["generate", "{ws}/tiny", "-p", "refusal:test", "--out", "{ws}/afile/gens.jsonl"], ["afile", "is a file"], None),
    ("generate-prompts-missing", ["generate", "{ws}/tiny", "-p", "{ws}/nope.jsonl"], ["nope.jsonl"], None),
    ("generate-prompts-empty", ["generate", "{ws}/tiny", "-p", "{ws}/prompts_empty.jsonl"], ["prompts_empty"], None),
    ("generate-prompts-not-utf8", ["generate", "{ws}/tiny", "-p", "{ws}/prompts_latin1.txt"], ["prompts_latin1.txt", "UTF-8"], None),
    ("generate-prompt-beyond-context", ["generate", "{ws}/tiny", "-p", "refusal:test", "--limit", "2", "--max-new-tokens", "250"], ["context window", "prompt_too_long"], None),
    ("generate-bad-too-long-policy", ["generate", "{ws}/tiny", "-p", "refusal:test", "--prompt-too-long", "cut"], ["prompt_too_long", "cut"], None),
    ("generate-model-missing", ["generate", "{ws}/nomodel", "-p", "refusal:test", "--limit", "1"], ["nomodel"], None),
    # harden
    ("harden-config-is-folder", ["harden", "{ws}/tiny", "--config", "{ws}/configdir.yaml"], ["configdir.yaml", "folder"], None),
    ("harden-config-not-utf8", ["harden", "{ws}/tiny", "--config", "{ws}/latin1.yaml"], ["latin1.yaml", "UTF-8"], None),
    ("harden-config-empty", ["harden", "{ws}/tiny", "--config", "{ws}/empty.yaml"], ["empty.yaml", "empty"], None),
    ("harden-set-python-tag", ["harden", "{ws}/tiny", "--set", f"training.lr={PYTHON_TAG}"], ["training.lr", "not valid YAML"], None),
    ("harden-set-malformed", ["harden", "{ws}/tiny", "--set", "training.lr=[1, 2"], ["training.lr", "not valid YAML"], None),
    ("harden-set-no-equals", ["harden", "{ws}/tiny", "--set", "training.lr"], ["training.lr", "KEY.PATH=VALUE"], None),
    ("harden-out-users-folder", ["harden", "{ws}/tiny", "--out", "{ws}/mine"], ["mine", "not empty", "--overwrite"], None),
    # holdout
    ("holdout-unknown-category", ["holdout", "{ws}/tiny", "--out", "{ws}/ho", "--category", "fraud"], ["--category fraud", "fraud_scams"], None),
    ("holdout-one-category", ["holdout", "{ws}/tiny", "--out", "{ws}/ho", "--set", "data.refusal_prompts=refusal:train[category=fraud_scams]"], ["refusal:train[category=fraud_scams]", "at least two"], None),
    ("holdout-out-users-folder", ["holdout", "{ws}/tiny", "--out", "{ws}/mine"], ["mine", "not empty"], None),
    # finetune
    ("finetune-out-users-folder", ["finetune", "{ws}/tiny", "--config", LORA, "--out", "{ws}/mine"], ["mine", "not empty"], None),
    ("finetune-unknown-key", ["finetune", "{ws}/tiny", "--config", "{ws}/unknown.yaml", "--out", "{ws}/ft"], ["unknown.yaml", "lora.rnak"], None),
    ("finetune-config-missing", ["finetune", "{ws}/tiny", "--config", "{ws}/none.yaml", "--out", "{ws}/ft"], ["none.yaml", "not found"], None),
    ("finetune-bad-value", ["finetune", "{ws}/tiny", "--config", LORA, "--set", "training.lr=-1", "--out", "{ws}/ft"], ["training.lr"], None),
    ("finetune-out-is-cwd", ["finetune", "{ws}/tiny", "--config", LORA, "--out", "."], ["working directory"], "mine"),
    # direction
    ("direction-out-users-folder", ["direction", "{ws}/tiny", "--out", "{ws}/mine"], ["mine", "not empty"], None),
    ("direction-out-is-file", ["direction", "{ws}/tiny", "--out", "{ws}/afile"], ["afile", "a file is there"], None),
    ("direction-set-malformed", ["direction", "{ws}/tiny", "--out", "{ws}/d2", "--set", "kl_max={1"], ["kl_max", "not valid YAML"], None),
    ("direction-unknown-set-key", ["direction", "{ws}/tiny", "--out", "{ws}/d2", "--set", "kl_maxx=1"], ["kl_maxx"], None),
    # abliterate
    ("abliterate-out-is-direction", ["abliterate", "{ws}/tiny", "--direction", "{ws}/direction", "--out", "{ws}/direction"], ["direction", "input"], None),
    ("abliterate-out-inside-direction", ["abliterate", "{ws}/tiny", "--direction", "{ws}/direction", "--out", "{ws}/direction/model"], ["direction", "input"], None),
    ("abliterate-out-is-cwd", ["abliterate", "{ws}/tiny", "--direction", "{ws}/direction", "--out", "."], ["working directory"], "mine"),
    ("abliterate-out-users-folder", ["abliterate", "{ws}/tiny", "--direction", "{ws}/direction", "--out", "{ws}/mine"], ["mine", "not empty"], None),
    ("abliterate-pickled-direction", ["abliterate", "{ws}/tiny", "--direction", "{ws}/pickled", "--out", "{ws}/abl"], ["direction.pt", "pickled", "ablate direction"], None),
    ("abliterate-corrupt-selected", ["abliterate", "{ws}/tiny", "--direction", "{ws}/badselected", "--out", "{ws}/abl"], ["selected.json", "corrupt JSON", "ablate direction"], None),
    ("abliterate-no-direction", ["abliterate", "{ws}/tiny", "--direction", "{ws}/mine", "--out", "{ws}/abl"], ["mine", "ablate direction"], None),
    # eval
    ("eval-suite-empty", ["eval", "{ws}/tiny", "--suite", "{ws}/empty.yaml", "--out", "{ws}/ev"], ["empty.yaml", "empty"], None),
    ("eval-suite-is-folder", ["eval", "{ws}/tiny", "--suite", "{ws}/configdir.yaml", "--out", "{ws}/ev"], ["configdir.yaml", "folder"], None),
    ("eval-suite-measures-nothing", ["eval", "{ws}/tiny", "--suite", "{ws}/nothing.yaml", "--out", "{ws}/ev"], ["nothing", "measures nothing"], None),
    ("eval-suite-unknown-name", ["eval", "{ws}/tiny", "--suite", "defualt", "--out", "{ws}/ev"], ["defualt"], None),
    ("eval-set-n-zero", ["eval", "{ws}/tiny", "--set", "refusal.n=0", "--out", "{ws}/ev"], ["refusal.n"], None),
    ("eval-other-models-result", ["eval", "{ws}/tiny", "--out", "{ws}/evalrun"], ["tiny.json", "another model", "--variant"], None),
    ("eval-out-users-folder", ["eval", "{ws}/tiny", "--out", "{ws}/mine"], ["mine", "not empty"], None),
    ("eval-bad-variant", ["eval", "{ws}/tiny", "--variant", "../x", "--out", "{ws}/ev"], ["../x"], None),
    # eval-compare
    ("compare-corrupt-json", ["eval-compare", "{ws}/results/a.json", "{ws}/results/corrupt.json"], ["corrupt.json", "corrupt JSON"], None),
    ("compare-empty-result", ["eval-compare", "{ws}/results/a.json", "{ws}/results/empty.json"], ["empty.json", "no metrics"], None),
    ("compare-missing", ["eval-compare", "{ws}/results/a.json", "{ws}/results/none.json"], ["none.json"], None),
    ("compare-folder", ["eval-compare", "{ws}/results/a.json", "{ws}/results"], ["results", "folder"], None),
    ("compare-unknown-metric", ["eval-compare", "{ws}/results/a.json", "{ws}/results/a.json", "-m", "nope_rate"], ["nope_rate"], None),
    # study
    ("study-missing-file", ["study", "{ws}/none.yaml"], ["none.yaml", "not found"], None),
    ("study-unknown-name", ["study", "defualt"], ["defualt"], None),
    ("study-unknown-key", ["study", "{ws}/study_unknown.yaml"], ["study_unknown.yaml", "directoin"], None),
    ("study-not-utf8", ["study", "{ws}/latin1.yaml"], ["latin1.yaml", "UTF-8"], None),
    ("study-set-python-tag", ["study", "--set", f"name={PYTHON_TAG}"], ["name", "not valid YAML"], None),
    ("study-out-users-folder", ["study", "--out", "{ws}/mine"], ["mine", "not empty"], None),
    ("study-out-is-file", ["study", "--out", "{ws}/afile"], ["afile", "a file is there"], None),
    ("study-executor-single-study", ["study", "--executor", "ray"], ["--executor", "single study"], None),
    # the robustness study
    ("robustness-unknown-defence", ["study", "robustness", "--set", "defences=[refusal_sft,nope]"], ["robustness.yaml", "defences", "nope", "vaccine"], None),
    ("robustness-empty-seeds", ["study", "robustness", "--set", "seeds=[]"], ["robustness.yaml", "seeds"], None),
    ("robustness-no-budget", ["study", "robustness", "--set", "budgets=[]"], ["budgets", "no cell"], None),
    ("robustness-no-attack", ["study", "robustness", "--set", "attacks.direction=false", "--set", "attacks.harmful.enabled=false",
                              "--set", "attacks.benign.enabled=false"], ["attacks", "no cell"], None),
    ("robustness-unknown-executor", ["study", "robustness", "--executor", "slurmm"], ["--executor", "slurmm"], None),
    ("robustness-out-users-folder", ["study", "robustness", "--out", "{ws}/mine"], ["mine", "not empty"], None),
    # label
    ("label-no-generations", ["label", "{ws}/mine"], ["mine", "generations"], None),
    ("label-n-zero", ["label", "{ws}/run", "--n", "0"], ["--n"], None),
    # report
    ("report-incomplete-run", ["report", "{ws}/run"], ["incomplete", "direction", "ablated", "--partial"], None),
    ("report-corrupt-eval", ["report", "{ws}/run_corrupt"], ["base.json", "corrupt JSON"], None),
    ("report-empty-eval", ["report", "{ws}/run_empty"], ["incomplete", "ablated"], None),
    ("report-not-a-run", ["report", "{ws}/mine"], ["mine", "manifest.json"], None),
    ("report-missing", ["report", "{ws}/norun"], ["norun"], None),
    # export
    ("export-not-a-run", ["export", "{ws}/mine"], ["mine", "manifest.json"], None),
    ("export-missing-self-contained", ["export", "{ws}/norun", "--self-contained"], ["norun"], None),
]

# Light commands (no model load) that also go through the installed executable.
SUBPROCESS_CASES = ["generate-limit-zero", "compare-corrupt-json", "report-incomplete-run", "data-unknown-option"]


def error_lines(stderr: str) -> list[str]:
    """Non-empty stderr lines, leaving out progress bars (a model load draws one)."""
    return [line for line in stderr.splitlines() if line.strip() and not ("%|" in line or "it/s]" in line)]


def check(code: int, stderr: str, culprits: list[str], root: Path, before: dict[str, bytes]) -> None:
    lines = error_lines(stderr)
    assert code == 2, f"exit {code}; stderr: {stderr[-2000:]}"
    assert len(lines) == 1, f"expected one line, got {len(lines)}: {lines}"
    assert lines[0].startswith("error: ") and "Traceback" not in stderr
    for culprit in culprits:
        assert culprit in lines[0], f"{culprit!r} not named in: {lines[0]}"
    after = snapshot(root)
    assert sorted(after) == sorted(before), f"files added or removed: {set(after) ^ set(before)}"
    assert all(after[name] == before[name] for name in before), "a pre-existing file changed"


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_bad_input(case, workspace, capsys, monkeypatch):
    name, argv, culprits, cwd = case
    root, before = workspace
    monkeypatch.chdir(root / cwd if cwd else root / "m")
    with pytest.raises(SystemExit) as exited:
        main([arg.replace("{ws}", str(root)) for arg in argv])
    check(exited.value.code, capsys.readouterr().err, [c.replace("{ws}", str(root)) for c in culprits], root, before)


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_bad_input_through_installed_command(name, workspace):
    """The same cases through the `ablate` executable, as a user runs it."""
    _, argv, culprits, cwd = next(case for case in CASES if case[0] == name)
    root, before = workspace
    exe = shutil.which("ablate") or os.path.join(os.path.dirname(sys.executable), "ablate")
    result = subprocess.run([exe, *[arg.replace("{ws}", str(root)) for arg in argv]], capture_output=True, text=True,
                            cwd=root / cwd if cwd else root / "m", timeout=300)
    check(result.returncode, result.stderr, culprits, root, before)


def test_at_least_forty_cases_cover_every_command():
    from ablate.cli import app

    commands = {command.name or command.callback.__name__ for command in app.registered_commands}
    covered = {argv[0] for _, argv, _, _ in CASES}
    assert len(CASES) >= 40
    assert commands <= covered, f"commands without a bad-input case: {commands - covered}"


def test_debug_shows_the_traceback(workspace, capsys):
    root, _ = workspace
    with pytest.raises(Exception) as raised:
        main(["--debug", "report", str(root / "mine")])
    assert "manifest.json" in str(raised.value)
