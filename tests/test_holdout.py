"""Leave-one-category-out on a tiny random model: category filters on prompt sets, one organism per held-out
category trained without it, each scored on that category's unseen prompts, a rerun resumed, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ablate import AblateError
from ablate.config import DirectionConfig, FinetuneConfig, read_yaml, validate_config
from ablate.data import load_prompt_set

TWO = ["fraud_scams", "privacy_invasion"]


def tiny_recipe() -> FinetuneConfig:
    return validate_config({
        "mode": "harden",
        "data": {"n_refusal": 6, "n_harmless": 3, "n_borderline": 1, "answer_max_new_tokens": 6,
                 "generation_batch_size": 8},
        "lora": {"rank": 2, "alpha": 4},
        "training": {"lr": 1e-2, "max_steps": 1, "batch_size": 4, "max_length": 96, "device": "cpu"},
        "eval": {"max_new_tokens": 2, "batch_size": 64},
    }, FinetuneConfig, "<test>")


def test_category_filters_select_and_exclude_and_name_an_unknown_category():
    test = load_prompt_set("refusal:test")
    fraud = load_prompt_set("refusal:test[category=fraud_scams]")
    others = load_prompt_set("refusal:test[category!=fraud_scams]")
    assert set(fraud.categories) == {"fraud_scams"} and "fraud_scams" not in others.categories
    assert sorted(fraud.ids + others.ids) == sorted(test.ids)
    both = load_prompt_set("refusal:val[category=fraud_scams,privacy_invasion]+refusal:test[category=fraud_scams]")
    assert set(both.categories) == set(TWO) and len(both) == 2 * 10 + 15
    with pytest.raises(AblateError, match=r"'refusal:test\[category=fraud\]': no category 'fraud'.*fraud_scams") as error:
        load_prompt_set("refusal:test[category=fraud]")
    assert "\n" not in str(error.value)
    with pytest.raises(Exception, match="test split is held out"):  # a filter does not hide the test split
        DirectionConfig(refusal_val="refusal:test[category=fraud_scams]")


def test_the_held_out_prompt_sets_follow_a_recipe_on_several_sets():
    """A recipe on refusal:train+refusal_kinds:train is held out on a category of either set, in each set that
    holds it: a category only one set has is filtered out of that set alone."""
    from ablate.finetune.holdout import default_sets, holdout_recipe
    from ablate.config import ORGANISM_RECIPE

    narrow = Path(__file__).parents[1] / "finetune_configs" / "harden_narrow.yaml"
    assert default_sets(validate_config(read_yaml(narrow), FinetuneConfig, narrow.name)) == (
        "refusal:val+refusal:test", "refusal:test", "harmless:test")
    wide = validate_config(ORGANISM_RECIPE, FinetuneConfig, "<organism>")
    held, seen, harmless = default_sets(wide)
    assert held == "refusal:val+refusal:test+refusal_kinds:val+refusal_kinds:test"
    assert (seen, harmless) == ("refusal:test+refusal_kinds:test", "harmless:test+harmless_kinds:test")
    drugs = holdout_recipe(wide, "drugs")  # only refusal_kinds holds it
    assert drugs.data.refusal_prompts == "refusal:train+refusal_kinds:train[category!=drugs]"
    assert drugs.eval.prompt_sets[0] == "refusal_kinds:val[category=drugs]+refusal_kinds:test[category=drugs]"
    assert set(load_prompt_set(drugs.eval.prompt_sets[0]).categories) == {"drugs"}
    fraud = holdout_recipe(wide, "fraud_scams")  # both hold it: asked as requests and as questions
    held_out = load_prompt_set(fraud.eval.prompt_sets[0])
    assert set(held_out.categories) == {"fraud_scams"} and len(held_out) == 25 + 3
    assert "fraud_scams" not in load_prompt_set(fraud.data.refusal_prompts).categories


def test_each_organism_is_hardened_without_its_category_and_scored_on_it(tiny_dir, tmp_path):
    from ablate.finetune.holdout import holdout_recipe, run_holdout
    from ablate.finetune.organism import organism_key

    recipe = tiny_recipe()
    for category in TWO:
        config = holdout_recipe(recipe, category)
        assert category not in load_prompt_set(config.data.refusal_prompts).categories
        held = load_prompt_set(config.eval.prompt_sets[0])
        assert set(held.categories) == {category} and len(held) == 25  # its validation and test prompts
        assert organism_key(str(tiny_dir), config) != organism_key(str(tiny_dir), recipe)
    lines = []
    result = run_holdout(str(tiny_dir), recipe, tmp_path / "holdout", categories=TWO, progress=False, log=lines.append)
    rows = result["categories"]
    assert [row["category"] for row in rows] == TWO and len({row["organism"] for row in rows}) == 2
    for row in rows:
        assert row["held_out"]["n"] == 25 and 0.0 <= row["held_out"]["rate"] <= 1.0
        assert row["full_on_held_out"]["n"] == 25 and row["seen"]["n"] == 135 and row["harmless"]["n"] == 150
        assert row["held_out"]["prompts"] == f"refusal:val[category={row['category']}]+refusal:test[category={row['category']}]"
    pooled = result["summary"]
    assert pooled["n"] == 50 and pooled["held_out"] == pytest.approx(sum(r["held_out"]["rate"] for r in rows) / 2)
    saved = json.loads((tmp_path / "holdout" / "holdout.json").read_text())
    assert saved["categories"] == rows
    table = (tmp_path / "holdout" / "holdout.md").read_text()
    assert all(f"| {category} | 25 |" in table for category in TWO) and "2 new tokens" in table.replace("\n", " ")
    # A rerun into the same folder keeps the finished categories: no organism is hardened or scored again.
    again = []
    run_holdout(str(tiny_dir), recipe, tmp_path / "holdout", categories=TWO, progress=False, log=again.append)
    assert sum("scored by an earlier run" in line for line in again) == 2
    assert not any("hardening without" in line for line in again)
    # A rerun for one category keeps the other's row: adding a category loses nothing already measured.
    one = run_holdout(str(tiny_dir), recipe, tmp_path / "holdout", categories=TWO[1:], progress=False, log=again.append)
    assert one["categories"] == rows and one["summary"]["n"] == 50
    assert json.loads((tmp_path / "holdout" / "holdout.json").read_text())["categories"] == rows


def test_bad_holdout_input_is_one_line_before_anything_is_written(tiny_dir, tmp_path):
    from test_cli import run_cli

    from ablate.finetune.holdout import check_holdout

    with pytest.raises(AblateError, match=r"--category fraud: not a category of data.refusal_prompts=refusal:train; "
                                          r"expected one of .*fraud_scams"):
        check_holdout(tiny_recipe(), ["fraud"])
    one = tiny_recipe().model_copy(update={"data": tiny_recipe().data.model_copy(
        update={"refusal_prompts": "refusal:train[category=fraud_scams]"})})
    with pytest.raises(AblateError, match="holds 1 category; leaving one out needs at least two"):
        check_holdout(one)
    result = run_cli("holdout", str(tiny_dir), "--out", str(tmp_path / "never"), "--category", "fraud")
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 2 and len(errors) == 1 and "--category fraud" in errors[0], result.stderr
    assert not (tmp_path / "never").exists()
