"""tuner.spec: configs validate once, every mistake is one line naming the field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuner.errors import TunerError
from tuner.spec import TrainConfig, config_to_yaml, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]


def test_default_config_file_is_the_documented_default() -> None:
    config = load_config(ROOT / "configs" / "mnist-mlp.yaml")
    assert config.model.latent == 32 and config.model.hidden == 512 and config.train.epochs == 50
    assert config.data.split == (0.7, 0.1, 0.2) and config.data.dataset == "mnist5k"
    # "the defaults spelled out, except kl.schedule": every other value is the code's default
    spelled, default = config.model_dump(), TrainConfig().model_dump()
    differ = [f"{section}.{key}" for section, values in spelled.items() if isinstance(values, dict)
              for key in values if values[key] != default[section][key]]
    assert differ == ["kl.schedule"] and config.kl.schedule == "linear"


def test_yaml_round_trip(tmp_path: Path) -> None:
    config = parse_config({"seed": 3, "kl": {"schedule": "cyclical", "cycles": 3}, "optim": {"betas": [0.8, 0.99]}})
    path = tmp_path / "c.yaml"
    path.write_text(config_to_yaml(config))
    assert load_config(path) == config


@pytest.mark.parametrize(
    ("raw", "phrase"),
    [
        ({"model": {"latnet": 3}}, "unknown key 'model.latnet'"),
        ({"model": {"latent": 0}}, "model.latent"),
        ({"model": {"arch": "transformer"}}, "model.arch"),
        ({"optim": {"lr": -1}}, "optim.lr"),
        ({"optim": {"betas": [0.9, 1.5]}}, "optim.betas"),
        ({"data": {"split": [0.5, 0.5, 0.5]}}, "sum to 1"),
        ({"data": {"split": [0.9, 0.1, 0.0]}}, "every fraction must be > 0"),
        ({"data": {"binarize": "none"}}, "data.binarize to 'dynamic' or 'static'"),
        ({"kl": {"schedule": "exponential"}}, "kl.schedule"),
        ({"train": {"epochs": -5}}, "train.epochs"),
        ([1, 2], "expected a mapping"),
    ],
)
def test_bad_config_is_one_line_naming_the_field(raw, phrase: str) -> None:
    with pytest.raises(TunerError) as err:
        parse_config(raw, source="c.yaml")
    message = str(err.value)
    assert phrase in message
    assert "\n" not in message and message.startswith("c.yaml")


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(TunerError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  latent: [1, 2\n")
    with pytest.raises(TunerError, match="malformed YAML at line"):
        load_config(bad)


def test_gaussian_on_continuous_data_is_allowed() -> None:
    config = parse_config({"data": {"binarize": "none"}, "model": {"likelihood": "gaussian"}})
    assert isinstance(config, TrainConfig) and config.model.likelihood == "gaussian"
