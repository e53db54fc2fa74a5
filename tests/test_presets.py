"""The shipped direction presets: `arditi2024` is Arditi et al.'s selection with full ablation and no learned strength."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ablate import AblateError
from ablate.config import DirectionConfig, direction_preset_path, direction_presets, load_config

# What a tiny random model can run in seconds; every selection setting stays the preset's.
TINY = ["n_train=6", "n_val=6", "refusal_token_prompts=3", "refusal_token_max_new_tokens=3", "batch_size=6",
        "compute_dtype=model", "kl_max=5"]


def test_arditi2024_is_the_papers_method_without_learned_strength():
    config = load_config(direction_preset_path("arditi2024"), DirectionConfig)
    assert "arditi2024" in direction_presets()
    assert config.variant.value == "plain" and config.positions is None
    assert not config.strength_learning.enabled and config.strength_search == []
    assert config.strength.coefficient == 1.0 and config.strength.kernel is None and config.strength.writer_weights is None
    assert config.kl_weight == 0 and config.kl_max == 0.1 and config.steering_min == 0 and not config.steering_relative
    assert not config.score_by_generation and config.prescore_prompts is None and config.exclude_last_fraction == 0.2
    assert (config.n_train, config.n_val) == (128, 32)


def test_unknown_preset_is_a_one_line_error():
    with pytest.raises(AblateError, match="unknown direction preset 'arditi'.*arditi2024"):
        direction_preset_path("arditi")


def test_arditi2024_scores_every_candidate_and_picks_the_lowest_refusal_score(llama, tokenizer, tmp_path):
    """`ablate direction --preset arditi2024` on a tiny model: every candidate below the excluded layers is scored
    exactly, the pick has the lowest refusal score among those passing the filters, and it is fully ablated."""
    from ablate.cli import app

    source = tmp_path / "tiny"
    llama.save_pretrained(source)
    tokenizer.save_pretrained(source)
    out = tmp_path / "dir"
    args = ["direction", str(source), "--preset", "arditi2024", "--out", str(out), "--device", "cpu"]
    for override in TINY:
        args += ["--set", override]
    with pytest.warns(UserWarning):  # a random model refuses nothing: the generic-refusal fallback warns
        result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "variant: plain" in result.output and "kl_weight: 0.0" in result.output  # the resolved config is printed

    sweep = json.loads((out / "sweep.json").read_text())
    selected = json.loads((out / "selected.json").read_text())
    max_layer = sweep["max_layer_allowed"]
    allowed = [c for c in sweep["candidates"] if c["layer"] < max_layer and not c["degenerate"]]
    assert allowed and all(c["kl"] is not None for c in allowed)  # no shortlist: all of them scored
    assert {c["variant"] for c in sweep["candidates"]} == {"plain"}
    assert selected["strength"] == {"coefficient": 1.0, "kernel": None, "writer_weights": None}
    assert sweep["strength_learning"] is None and sweep["strength_search"] == []
    if selected["fallback"]:
        eligible = allowed
    else:
        # Candidates ranked above the pick failed the steering filter; none below it was asked.
        eligible = [c for c in allowed if c["kl"] <= 5 and (c["steering_score"] is None or c["steering_score"] > 0)]
    assert selected["refusal_score"] == pytest.approx(min(c["refusal_score"] for c in eligible))


def test_a_study_names_the_preset_as_its_direction_config(tmp_path):
    from ablate.study import resolve_study

    study = tmp_path / "study.yaml"
    study.write_text("name: s\nattacks:\n  direction: {config: arditi2024}\n  finetune: {enabled: false}\n")
    resolved = resolve_study(study)
    assert resolved.direction == load_config(direction_preset_path("arditi2024"), DirectionConfig)
