import pytest

from ablate import AblateError
from ablate.config import GenerationConfig, ModelConfig, StrictModel, apply_overrides, load_config


class Inner(StrictModel):
    rank: int = 8


class Outer(StrictModel):
    model: ModelConfig = ModelConfig()
    lora: Inner = Inner()
    generation: GenerationConfig = GenerationConfig()


def test_unknown_key_names_file_key_and_allowed(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("lora:\n  rnak: 4\n")
    with pytest.raises(AblateError) as error:
        load_config(path, Outer)
    message = str(error.value)
    assert str(path) in message and "lora.rnak" in message and "allowed: rank" in message
    assert "\n" not in message


def test_wrong_type_names_key_and_value(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("lora:\n  rank: sixteen\n")
    with pytest.raises(AblateError, match=r"x.yaml: key 'lora.rank': .*integer.*'sixteen'"):
        load_config(path, Outer)


def test_malformed_yaml_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lora:\n  rank: [1, 2\n")
    with pytest.raises(AblateError, match=r"bad.yaml: line \d+, column \d+: malformed YAML"):
        load_config(path, Outer)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(AblateError, match="config file not found"):
        load_config(tmp_path / "nope.yaml", Outer)
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(AblateError, match="expected a mapping"):
        load_config(path, Outer)


def test_overrides_beat_yaml_which_beats_defaults(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("lora:\n  rank: 4\ngeneration:\n  max_new_tokens: 10\n")
    config = load_config(path, Outer, overrides=["lora.rank=16"])
    assert config.lora.rank == 16
    assert config.generation.max_new_tokens == 10
    assert config.generation.batch_size == GenerationConfig().batch_size
    assert apply_overrides({}, ["a.b=[1, 2]"]) == {"a": {"b": [1, 2]}}
    with pytest.raises(AblateError, match="KEY.PATH=VALUE"):
        apply_overrides({}, ["novalue"])


def test_constraint_violation(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("generation:\n  max_new_tokens: 0\n")
    with pytest.raises(AblateError, match="generation.max_new_tokens"):
        load_config(path, Outer)


@pytest.mark.parametrize("text, message", [
    ("strength:\n  writer_weights: [[1.0, 0.5], [0.0, -1.0]]\n", r"strength.*writer_weights.*finite weights >= 0.*-1.0"),
    ("strength:\n  writer_weights: [[1.0]]\n  kernel: {max_weight_position: 3, min_weight_distance: 2}\n",
     "either kernel or writer_weights, not both"),
    ("strength_learning:\n  steps: 0\n", "strength_learning.steps"),
])
def test_direction_strength_errors_name_file_and_key(tmp_path, text, message):
    from ablate.config import DirectionConfig

    path = tmp_path / "direction.yaml"
    path.write_text(text)
    with pytest.raises(AblateError, match="direction.yaml.*" + message):
        load_config(path, DirectionConfig)
