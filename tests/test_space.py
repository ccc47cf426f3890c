"""tuner.study.space: a study spec's entries -> Optuna distributions and suggestions, on real studies."""

from __future__ import annotations

import math
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from tuner.errors import TunerError
from tuner.spec import TrainConfig
from tuner.study import space
from tuner.study.spec import StudySpec, parse_study_spec
from tuner.study.strategy import build_sampler

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE: dict[str, Any] = {
    # the conditional entry comes first on purpose: sample() must still settle kl.schedule first
    "kl.cycles": {"type": "int", "low": 2, "high": 6, "when": {"kl.schedule": "cyclical"}},
    "model.latent": {"type": "int", "low": 4, "high": 64, "log": True},
    "model.hidden": {"type": "int", "low": 128, "high": 512, "step": 128},
    "kl.beta": {"type": "float", "low": 0.25, "high": 4.0, "log": True},
    "optim.lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
    "model.dropout": {"type": "float", "low": 0.0, "high": 0.3, "step": 0.05},
    "kl.schedule": {"type": "categorical", "choices": ["constant", "linear", "cyclical"]},
    "kl.warmup_epochs": {"type": "float", "low": 1.0, "high": 10.0, "when": {"kl.schedule": ["linear", "cyclical"]}},
    "optim.batch_size": {"type": "fixed", "value": 32},
    "optim.grad_clip": {"type": "fixed", "value": 5.0, "when": {"kl.schedule": "constant"}},
}


def make_spec(sampler: dict[str, Any] | None = None, **space_over: Any) -> StudySpec:
    return parse_study_spec(
        {
            "study": "space-test",
            "base": {"model": {"latent": 16, "hidden": 256}},
            "space": {**SPACE, **space_over},
            "sampler": sampler or {"name": "random", "seed": 3},
            "budget": {"epochs": 4},
        }
    )


def sampled(spec: StudySpec, n: int, worker: int = 0) -> list[dict[str, Any]]:
    """n trials asked and told on a fresh in-memory study; returns each trial's sample."""
    study = optuna.create_study(sampler=build_sampler(spec, worker=worker))
    out = []
    for i in range(n):
        trial = study.ask()
        out.append(space.sample(trial, spec))
        study.tell(trial, float(i % 7))
    return out


def test_distributions_are_the_full_space_without_fixed_entries() -> None:
    dists = space.distributions(make_spec())
    assert set(dists) == set(SPACE) - {"optim.batch_size", "optim.grad_clip"}
    assert dists["model.latent"] == IntDistribution(4, 64, log=True)
    assert dists["model.hidden"] == IntDistribution(128, 512, step=128)
    assert dists["kl.beta"] == FloatDistribution(0.25, 4.0, log=True)
    assert dists["model.dropout"] == FloatDistribution(0.0, 0.3, step=0.05)
    assert dists["kl.schedule"] == CategoricalDistribution(("constant", "linear", "cyclical"))
    assert dists["kl.cycles"] == IntDistribution(2, 6)  # conditions are ignored: the full space


def test_active_follows_the_categorical_values() -> None:
    spec = make_spec()
    always = ["model.latent", "model.hidden", "kl.beta", "optim.lr", "model.dropout", "kl.schedule", "optim.batch_size"]
    assert space.active(spec, {"kl.schedule": "constant"}) == sorted(always + ["optim.grad_clip"], key=list(SPACE).index)
    assert space.active(spec, {"kl.schedule": "linear"}) == sorted(always + ["kl.warmup_epochs"], key=list(SPACE).index)
    assert set(space.active(spec, {"kl.schedule": "cyclical"})) == set(always) | {"kl.cycles", "kl.warmup_epochs"}
    assert set(space.active(spec, {})) == set(always)  # no schedule chosen yet: no conditional entry


def test_samples_respect_bounds_log_step_conditions_and_fixed_values() -> None:
    spec = make_spec()
    samples = sampled(spec, 60)
    for s in samples:
        assert 4 <= s["model.latent"] <= 64 and type(s["model.latent"]) is int
        assert s["model.hidden"] in {128, 256, 384, 512}
        assert 0.25 <= s["kl.beta"] <= 4.0 and 1e-4 <= s["optim.lr"] <= 3e-3
        k = s["model.dropout"] / 0.05
        assert 0.0 <= s["model.dropout"] <= 0.3 and abs(k - round(k)) < 1e-8
        assert s["optim.batch_size"] == 32
        schedule = s["kl.schedule"]
        assert ("kl.cycles" in s) == (schedule == "cyclical")
        assert ("kl.warmup_epochs" in s) == (schedule in {"linear", "cyclical"})
        assert ("optim.grad_clip" in s) == (schedule == "constant")
        assert set(s) == set(space.active(spec, s))
    assert {s["kl.schedule"] for s in samples} == {"constant", "linear", "cyclical"}
    # log sampling: about half of the draws of a 4..64 log range fall below the geometric middle 16
    below = sum(s["model.latent"] < 16 for s in samples) / len(samples)
    assert 0.3 < below < 0.7
    lrs = sorted(s["optim.lr"] for s in samples)
    assert lrs[len(lrs) // 2] < 1e-3  # a uniform draw's median would be ~1.5e-3


def test_trial_params_hold_only_the_suggested_entries() -> None:
    spec = make_spec()
    study = optuna.create_study(sampler=build_sampler(spec))
    trial = study.ask()
    params = space.sample(trial, spec)
    study.tell(trial, 1.0)
    fixed = {"optim.batch_size", "optim.grad_clip"}
    assert study.trials[0].params == {k: v for k, v in params.items() if k not in fixed}


def test_train_configs_from_samples_are_valid_and_carry_the_values() -> None:
    spec = make_spec()
    for i, s in enumerate(sampled(spec, 25)):
        config = spec.train_config(s, seed=i)
        assert isinstance(config, TrainConfig) and config.seed == i and config.train.epochs == 4
        assert (config.model.latent, config.model.hidden) == (s["model.latent"], s["model.hidden"])
        assert math.isclose(config.kl.beta, s["kl.beta"]) and math.isclose(config.optim.lr, s["optim.lr"])
        assert config.kl.schedule == s["kl.schedule"] and config.optim.batch_size == 32
        assert config.kl.cycles == s.get("kl.cycles", 4)  # the base value where it does not apply
        assert config.optim.grad_clip == (5.0 if s["kl.schedule"] == "constant" else 0.0)


def test_the_same_seed_gives_the_same_sequence_and_workers_differ() -> None:
    for sampler in ({"name": "random", "seed": 5}, {"name": "tpe", "seed": 5, "n_startup_trials": 4}):
        spec = make_spec(sampler=sampler)
        first = sampled(spec, 12)
        assert first == sampled(spec, 12)
        assert first != sampled(spec, 12, worker=1)  # parallel workers must not propose the same trials
        configs = [spec.train_config(s, seed=i) for i, s in enumerate(first)]
        assert configs == [spec.train_config(s, seed=i) for i, s in enumerate(sampled(spec, 12))]


def test_grid_lists_every_value_and_drives_the_grid_sampler() -> None:
    spec = parse_study_spec(
        {
            "study": "grid",
            "space": {
                "model.dropout": {"type": "float", "low": 0.0, "high": 0.15, "step": 0.05},
                "model.latent": {"type": "int", "low": 4, "high": 16, "step": 6},
                "kl.schedule": {"type": "categorical", "choices": ["constant", "linear"]},
                "optim.batch_size": {"type": "fixed", "value": 32},
            },
            "sampler": {"name": "grid", "seed": 1},
        }
    )
    g = space.grid(spec)
    assert g == {"model.dropout": [0.0, 0.05, 0.1, 0.15], "model.latent": [4, 10, 16], "kl.schedule": ["constant", "linear"]}
    sampler = build_sampler(spec)
    study = optuna.create_study(sampler=sampler)
    seen = set()
    for i in range(24):
        assert not sampler.is_exhausted(study)
        trial = study.ask()
        seen.add(tuple(sorted((k, v) for k, v in space.sample(trial, spec).items() if k != "optim.batch_size")))
        study.tell(trial, float(i))  # the last tell must not raise (Optuna's grid calls study.stop())
    assert len(seen) == 24 and sampler.is_exhausted(study)  # every grid point once
    assert {dict(p)["model.dropout"] for p in seen} == {0.0, 0.05, 0.1, 0.15}


def test_grid_of_a_continuous_float_is_an_error() -> None:
    with pytest.raises(TunerError, match="space.kl.beta: a continuous float has no grid"):
        space.grid(make_spec())


def test_size_bounds_are_the_population_maxima() -> None:
    assert space.size_bounds(make_spec()) == (64, 512)  # unconditional: the space's highs
    spec = make_spec(**{"model.latent": {"type": "categorical", "choices": [8, 24, 12]}})
    assert space.size_bounds(spec) == (24, 512)
    # conditional entries leave the base value (latent 16, hidden 256) to the other trials
    spec = make_spec(
        **{
            "model.latent": {"type": "int", "low": 2, "high": 8, "when": {"kl.schedule": "cyclical"}},
            "model.hidden": {"type": "fixed", "value": 1024, "when": {"kl.schedule": "linear"}},
        }
    )
    assert space.size_bounds(spec) == (16, 1024)
    base_only = parse_study_spec({"study": "b", "base": {"model": {"latent": 40, "hidden": 300}}})
    assert space.size_bounds(base_only) == (40, 300)
