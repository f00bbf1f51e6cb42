"""Typed configs: YAML loading, dotted overrides and one-line errors naming the key."""

from __future__ import annotations

import pytest
from pydantic import Field, model_validator

from common.config import Config, dump_config, load_config
from common.errors import ConfigError


class Attention(Config):
    hidden: int = 64
    heads: int = 4

    @model_validator(mode="after")
    def _heads_divide_hidden(self):
        if self.hidden % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide hidden ({self.hidden})")
        return self


class Train(Config):
    lr: float = Field(1e-3, gt=0)
    steps: int = 10
    bf16: bool = False


class Source(Config):
    path: str
    weight: float = 1.0


class Mixing(Config):
    weights: dict[str, float] = Field(default_factory=lambda: {"wiki": 1.0, "web": 0.5})


class Experiment(Config):
    model: Attention = Attention()
    train: Train = Train()
    sources: list[Source] = Field(default_factory=list)
    mixing: Mixing = Mixing()


def write(tmp_path, text: str):
    path = tmp_path / "experiment.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def error_of(tmp_path, text: str, *overrides: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(Experiment, write(tmp_path, text), overrides)
    assert caught.value.exit_code == 2
    return str(caught.value)


def test_yaml_and_overrides_are_typed(tmp_path):
    path = write(tmp_path, "train:\n  lr: 3e-4\nsources:\n  - path: wiki\n  - path: web\n")
    config = load_config(
        Experiment,
        path,
        ["train.steps=500", "train.bf16=true", "sources.1.weight=0.25", "model.hidden=128"],
    )
    assert config.train.lr == pytest.approx(3e-4)
    assert config.train.steps == 500 and config.train.bf16 is True
    assert [s.weight for s in config.sources] == [1.0, 0.25]
    assert config.model.hidden == 128


def test_override_creates_missing_section(tmp_path):
    config = load_config(Experiment, write(tmp_path, ""), ["model.heads=8"])
    assert config.model.heads == 8


def test_a_key_set_inside_a_table_keeps_the_tables_other_keys(tmp_path):
    def weights(text: str, override: str) -> dict[str, float]:
        return load_config(Experiment, write(tmp_path, text), [override]).mixing.weights

    # The default table when the file gives none (no section, or an empty one); else the file's.
    assert weights("", "mixing.weights.web=2") == {"wiki": 1.0, "web": 2.0}
    assert weights("mixing:\n", "mixing.weights.web=2") == {"wiki": 1.0, "web": 2.0}
    assert weights("mixing:\n  weights:\n    code: 3\n", "mixing.weights.web=2") == {
        "code": 3.0,
        "web": 2.0,
    }
    # A whole table replaces the table.
    assert weights("", "mixing.weights={web: 2}") == {"web": 2.0}
    assert weights("", "mixing.weights={}") == {}


def test_unknown_key_in_file_is_named_with_a_suggestion(tmp_path):
    message = error_of(tmp_path, "train:\n  lrr: 0.1\n")
    assert "\n" not in message
    assert "unknown key 'train.lrr'" in message and "did you mean train.lr?" in message
    assert "experiment.yaml" in message


def test_unknown_key_from_command_line_says_so(tmp_path):
    message = error_of(tmp_path, "", "trian.lr=0.1")
    assert "unknown key 'trian'" in message and "(from the command line)" in message
    assert "did you mean train?" in message


def test_wrong_type_names_key_and_value(tmp_path):
    message = error_of(tmp_path, "train:\n  steps: many\n")
    assert "\n" not in message
    assert "'train.steps'" in message and "'many'" in message and "integer" in message


def test_numbers_are_numbers_and_quoted_numbers_are_refused(tmp_path):
    # Bare 3e-3 is a float (YAML 1.1 would read a string); "3e-3" in quotes is refused.
    assert load_config(Experiment, write(tmp_path, "train:\n  lr: 3e-3\n")).train.lr == 3e-3
    assert load_config(Experiment, write(tmp_path, ""), ["train.lr=2E-4"]).train.lr == 2e-4
    message = error_of(tmp_path, 'train:\n  lr: "3e-3"\n')
    assert "\n" not in message
    assert "'train.lr'" in message and "not the string '3e-3'" in message
    assert "without quotes" in error_of(tmp_path, "", "train.steps='10'")


def test_wrong_type_inside_a_list(tmp_path):
    message = error_of(tmp_path, "sources:\n  - path: a\n    weight: heavy\n")
    assert "'sources.0.weight'" in message


def test_constraint_violation_names_key(tmp_path):
    message = error_of(tmp_path, "", "train.lr=-1")
    assert "'train.lr'" in message and "greater than 0" in message


def test_inconsistent_values_are_rejected(tmp_path):
    message = error_of(tmp_path, "model:\n  hidden: 100\n  heads: 8\n")
    assert "\n" not in message
    assert "in 'model'" in message and "heads (8) must divide hidden (100)" in message


def test_missing_required_key(tmp_path):
    message = error_of(tmp_path, "sources:\n  - weight: 2\n")
    assert "missing required key 'sources.0.path'" in message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lr", "must look like key.subkey=value"),
        ("=3", "must look like key.subkey=value"),
        ("train..lr=3", "must look like key.subkey=value"),
        ("train.lr.x=3", "train.lr is a value, not a section"),
        ("sources.3.path=x", "sources.3 is not an index of a list of 1"),
    ],
)
def test_malformed_overrides(tmp_path, override, expected):
    message = error_of(tmp_path, "train:\n  lr: 0.1\nsources:\n  - path: a\n", override)
    assert expected in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train:\n  lr: 0.1\ntrain:\n  steps: 3\n", "duplicate key 'train'"),
        ("train: [1, 2\n", "invalid YAML at line"),
        ("- 1\n- 2\n", "top level must be a mapping"),
    ],
)
def test_bad_yaml_files(tmp_path, text, expected):
    assert expected in error_of(tmp_path, text)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Experiment, tmp_path / "absent.yaml")


def test_dump_round_trips(tmp_path):
    config = load_config(
        Experiment, write(tmp_path, "sources:\n  - path: ウィキペディア\n"), ["train.lr=0.5"]
    )
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(config), encoding="utf-8")
    assert "ウィキペディア" in path.read_text(encoding="utf-8")
    assert load_config(Experiment, path) == config
