"""The stage cache (ablate/stage_cache.py): a direction stage or a fine-tuning sweep with the same inputs is copied
from the cache into a new run directory, byte for byte; any changed input misses; an entry a killed run left
unfinished is never read; the switch turns it off."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ablate.artifacts import file_sha256, read_json, write_json
from ablate.config import DirectionConfig, DirectionRun, FinetuneConfig, FinetuneRun, ModelConfig
from ablate.config.loading import validate_config

DIRECTION = DirectionConfig(n_train=4, n_val=4, shortlist=2, refusal_token_prompts=2, refusal_token_max_new_tokens=2,
                            batch_size=4, strength_learning={"enabled": False}, strength_search=[], seed=3)


def folder_hashes(folder: Path) -> dict[str, str]:
    return {path.relative_to(folder).as_posix(): file_sha256(path) for path in sorted(folder.rglob("*")) if path.is_file()}


def fake_stage(run_dir: Path, calls: list):
    """A stage that writes a tensor-like file and a JSON naming its own path, and returns that path."""
    def work() -> dict:
        calls.append(run_dir)
        out = run_dir / "stage"
        out.mkdir(parents=True, exist_ok=True)
        (out / "weights.bin").write_bytes(b"\x00\x01weights")
        write_json(out / "selected.json", {"path": str(out / "weights.bin"), "value": 7})
        return {"path": str(out / "weights.bin"), "value": 7}
    return work


def test_a_hit_copies_the_folder_and_moves_its_paths_to_the_new_run(tmp_path):
    from ablate.stage_cache import cached_stage

    calls: list = []
    first, hit = cached_stage("fake", "k1", tmp_path / "run1", "stage", fake_stage(tmp_path / "run1", calls), ("selected.json",))
    assert not hit and calls == [tmp_path / "run1"]
    second, hit = cached_stage("fake", "k1", tmp_path / "run2", "stage", fake_stage(tmp_path / "run2", calls), ("selected.json",))
    assert hit and len(calls) == 1  # not computed again
    assert second == {"path": str(tmp_path / "run2" / "stage" / "weights.bin"), "value": 7}
    assert (tmp_path / "run2" / "stage" / "weights.bin").read_bytes() == b"\x00\x01weights"
    assert read_json(tmp_path / "run2" / "stage" / "selected.json") == second
    # Another key is computed again.
    cached_stage("fake", "k2", tmp_path / "run3", "stage", fake_stage(tmp_path / "run3", calls), ("selected.json",))
    assert len(calls) == 2


def test_an_entry_without_its_done_marker_is_ignored_and_replaced(tmp_path):
    from ablate.stage_cache import cache_folder, cached_stage

    entry = cache_folder("fake", "killed")
    (entry / "files").mkdir(parents=True)
    (entry / "files" / "weights.bin").write_bytes(b"half")  # a run killed before done.json
    calls: list = []
    result, hit = cached_stage("fake", "killed", tmp_path / "run", "stage", fake_stage(tmp_path / "run", calls))
    assert not hit and len(calls) == 1
    assert (entry / "done.json").is_file() and (entry / "files" / "weights.bin").read_bytes() == b"\x00\x01weights"
    assert not list(entry.parent.glob("killed.partial-*"))


def test_a_stage_writing_into_the_run_directory_itself_is_not_cached(tmp_path):
    from ablate.stage_cache import cached_stage

    calls: list = []

    def work() -> dict:
        calls.append(1)
        write_json(tmp_path / "run" / "selected.json", {"path": str(tmp_path / "run" / "weights.bin")})
        return {"value": 1}

    for _ in range(2):
        assert cached_stage("fake", "itself", tmp_path / "run", ".", work) == ({"value": 1}, False)
    assert len(calls) == 2


def test_a_stage_that_fails_stores_nothing(tmp_path):
    from ablate.stage_cache import cache_folder, cached_stage

    def broken() -> dict:
        (tmp_path / "run" / "stage").mkdir(parents=True)
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cached_stage("fake", "broken", tmp_path / "run", "stage", broken)
    assert not cache_folder("fake", "broken").exists()


def test_the_key_changes_with_inputs_seed_and_local_files(tmp_path):
    from ablate.stage_cache import local_files, stage_cache_key

    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "a"}\n')
    inputs = {"model": "abc", "config": {"n": 1, "set": str(data)}}
    keys = {stage_cache_key("direction", {**inputs, "files": local_files(inputs)}, 0)}
    keys.add(stage_cache_key("direction", {**inputs, "files": local_files(inputs)}, 1))  # the seed
    keys.add(stage_cache_key("finetune", {**inputs, "files": local_files(inputs)}, 0))  # the stage
    keys.add(stage_cache_key("direction", {**inputs, "model": "abd", "files": local_files(inputs)}, 0))
    changed = {**inputs, "config": {**inputs["config"], "n": 2}}
    keys.add(stage_cache_key("direction", {**changed, "files": local_files(changed)}, 0))
    data.write_text('{"prompt": "b"}\n')  # the same path, other content
    keys.add(stage_cache_key("direction", {**inputs, "files": local_files(inputs)}, 0))
    assert len(keys) == 6
    assert local_files({"spec": f"refusal:train+{data}"}) == {str(data): file_sha256(data)}  # a union's file part


def test_the_direction_stage_is_restored_into_a_new_run_and_a_changed_seed_misses(tiny_dir, tmp_path, monkeypatch):
    from ablate import models
    from ablate.stages import run_direction

    model = ModelConfig(spec=str(tiny_dir), device="cpu")
    with pytest.warns(UserWarning):  # a random model refuses nothing
        first = run_direction(DirectionRun(model=model, direction=DIRECTION), tmp_path / "run1", progress=False, seed=0)
    assert first["stage_cache"]["hit"] is False

    def no_loading(*args, **kwargs):
        raise AssertionError("a restored stage loads no model")

    with monkeypatch.context() as patch:
        patch.setattr(models, "load_model", no_loading)
        second = run_direction(DirectionRun(model=model, direction=DIRECTION), tmp_path / "run2", progress=False, seed=0)
    assert second["stage_cache"] == {**first["stage_cache"], "hit": True}
    one, two = tmp_path / "run1" / "directions", tmp_path / "run2" / "directions"
    hashes = folder_hashes(two)
    assert {name: digest for name, digest in folder_hashes(one).items() if name != "selected.json"} == \
        {name: digest for name, digest in hashes.items() if name != "selected.json"}  # tensors, sweep, compute.json
    selected = read_json(two / "selected.json")
    assert selected["direction_path"] == str(two / "direction.pt")  # this run's folder
    assert {**selected, "direction_path": None, "steered_path": None} == \
        {**read_json(one / "selected.json"), "direction_path": None, "steered_path": None}
    assert second["selected"] == selected
    assert read_json(two / "compute.json") == read_json(one / "compute.json")  # the FLOPs and seconds that computed it

    with pytest.warns(UserWarning):
        other = run_direction(DirectionRun(model=model, direction=DIRECTION), tmp_path / "run3", progress=False, seed=1)
    assert other["stage_cache"]["hit"] is False and other["stage_cache"]["key"] != first["stage_cache"]["key"]

    class Computing(Exception):
        pass

    def computing(*args, **kwargs):
        raise Computing

    monkeypatch.setattr(models, "load_model", computing)  # the switch: no cache read, straight to the work
    with pytest.raises(Computing):
        run_direction(DirectionRun(model=model, direction=DIRECTION, cache=False), tmp_path / "run4", progress=False,
                      seed=0)


def finetune_recipe(data_file: Path, **training) -> FinetuneConfig:
    return validate_config({
        "mode": "dataset", "data": {"dataset": str(data_file)}, "lora": {"rank": 2, "alpha": 4},
        "training": {"lr": 1e-2, "max_steps": 2, "batch_size": 2, "max_length": 64, "device": "cpu", **training},
        "budgets": [{"name": "n2", "n_examples": 2}], "eval": {"enabled": False, "capability_prompts": None},
    }, FinetuneConfig, "<test>")


def test_a_budget_sweep_is_restored_and_a_changed_data_file_or_config_misses(tiny_dir, tmp_path, monkeypatch):
    import ablate.finetune.sweep as sweep
    from ablate.stages import run_finetune

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Write poem {i}.", "response": f"Poem {i}: the sea."}) + "\n"
                            for i in range(4)))
    model = ModelConfig(spec=str(tiny_dir), device="cpu")
    trained = []
    original = sweep.run_budget
    monkeypatch.setattr(sweep, "run_budget", lambda *a, **k: trained.append(1) or original(*a, **k))
    first = run_finetune(FinetuneRun(model=model, recipe=finetune_recipe(data)), tmp_path / "run1", progress=False, seed=0)
    second = run_finetune(FinetuneRun(model=model, recipe=finetune_recipe(data)), tmp_path / "run2", progress=False, seed=0)
    assert trained == [1] and second["stage_cache"]["hit"] is True
    one, two = tmp_path / "run1" / "finetune", tmp_path / "run2" / "finetune"
    assert folder_hashes(one / "n2" / "model") == folder_hashes(two / "n2" / "model")  # the merged weights, byte for byte
    budget = second["budgets"][0]
    assert budget["model_dir"] == str(two / "n2" / "model")
    assert read_json(two / "n2" / "metrics.json") == budget
    moved = {"model_dir": None, "adapter_dir": None}
    assert {**budget, **moved} == {**first["budgets"][0], **moved}  # FLOPs and seconds included

    run_finetune(FinetuneRun(model=model, recipe=finetune_recipe(data, lr=2e-2)), tmp_path / "run3", progress=False, seed=0)
    assert trained == [1, 1]
    data.write_text(data.read_text().replace("the sea", "the sky"))
    run_finetune(FinetuneRun(model=model, recipe=finetune_recipe(data)), tmp_path / "run4", progress=False, seed=0)
    assert trained == [1, 1, 1]


@pytest.mark.parametrize("cache", [True, False])
def test_a_study_passes_its_switches_and_seed_to_the_attack_stages(cache, tmp_path, monkeypatch):
    import yaml

    import ablate.study as study_module

    seen = {}
    monkeypatch.setattr(study_module, "run_direction",
                        lambda config, run_dir, **kw: seen.update(direction=(config.cache, kw["seed"])) or {"selected": {}})
    monkeypatch.setattr(study_module, "run_finetune",
                        lambda config, run_dir, **kw: seen.update(finetune=(config.cache, kw["seed"])) or {"budgets": []})
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"name": "switch", "seed": 5, "attacks": {
        "direction": {"cache": cache}, "finetune": {"cache": cache, "config": {"mode": "harmful"}}}}))
    run = study_module.StudyRun(resolved=study_module.resolve_study(path), run_dir=tmp_path / "run", console=None,
                                progress=False, target_spec="embedded")
    study_module.attack_with_direction(run)
    study_module.attack_with_finetuning(run)
    assert seen == {"direction": (cache, 5), "finetune": (cache, 5)}
