"""tuner.study.spec: study specs validate once; every mistake is one line naming the field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from tuner.errors import TunerError
from tuner.spec import load_config
from tuner.study.entries import CategoricalParam, FloatParam, IntParam
from tuner.study.spec import StudySpec, load_study_spec, parse_study_spec, study_spec_to_yaml

ROOT = Path(__file__).resolve().parents[1]


GOOD: dict[str, Any] = {
    "study": "s1",
    "base": {"model": {"hidden": 256}, "train": {"iwae_k": 50}},
    "space": {
        "model.latent": {"type": "int", "low": 4, "high": 64, "log": True},
        "kl.beta": {"type": "float", "low": 0.25, "high": 4.0, "log": True},
        "model.dropout": {"type": "float", "low": 0.0, "high": 0.3, "step": 0.05},
        "kl.schedule": {"type": "categorical", "choices": ["constant", "linear", "cyclical"]},
        "kl.cycles": {"type": "int", "low": 2, "high": 6, "when": {"kl.schedule": "cyclical"}},
        "optim.batch_size": {"type": "fixed", "value": 64},
    },
    "budget": {"trials": 5, "epochs": 3},
}


def study(space: dict[str, Any] | None = None, **sections: Any) -> dict[str, Any]:
    """GOOD with top-level sections replaced and `space` entries added or replaced."""
    raw = {**copy.deepcopy(GOOD), **sections}
    raw["space"] = {**raw["space"], **(space or {})}
    return raw


def entry(path: str, **fields: Any) -> dict[str, Any]:
    """GOOD with one space entry set, e.g. entry("model.latent", type="int", low=4, high=8)."""
    return study(space={path: fields})


def test_good_study_spec_reads_as_typed_objects() -> None:
    spec = parse_study_spec(study())
    assert spec.storage == "sqlite:///storage/tuner.db" and spec.objective == "iwae_nll"
    assert isinstance(spec.space["model.latent"], IntParam) and spec.space["model.latent"].log
    assert isinstance(spec.space["kl.schedule"], CategoricalParam)
    assert spec.space["kl.cycles"].when == {"kl.schedule": "cyclical"}
    assert spec.sampler.name == "tpe" and spec.sampler.n_startup_trials == 10 and spec.sampler.constant_liar
    assert spec.pruner.name == "hyperband" and spec.pruner.max_resource == "auto"
    assert (spec.budget.trials, spec.budget.timeout, spec.budget.epochs) == (5, None, 3)
    assert (spec.workers.count, spec.workers.slots, spec.workers.max_slots) == (1, None, 64)
    assert (spec.workers.heartbeat_interval, spec.workers.grace_period) == (10, 30)


BAD_STUDIES = [
    (study(sampler_name="tpe"), "unknown key 'sampler_name'"),
    ({k: v for k, v in GOOD.items() if k != "study"}, "'study' is required"),
    (study(study="my study!"), "study: use 1-64 letters, digits"),
    (study(study="x" * 65), "study: use 1-64 letters"),
    (study(storage="mysql://u:secret@h/db"), "storage: scheme 'mysql' is not supported; use sqlite:///"),
    (study(base={"model": {"latnet": 3}}), "unknown key 'base.model.latnet'"),
    (entry("model.latnet", type="int", low=1, high=2),
     "space.model.latnet: not a TrainConfig field; did you mean model.latent?"),
    (entry("seed", type="int", low=0, high=9), "space.seed: seed is not searchable"),
    (entry("train.epochs", type="int", low=1, high=9), "space.train.epochs: train.epochs is not searchable: budget.epochs"),
    (entry("model.latent", type="integer", low=4, high=8), "space.model.latent.type: unknown type 'integer'"),
    (entry("model.latent", low=4, high=8), "space.model.latent: add a type"),
    (entry("model.latent", type="int", low=64, high=4), "space.model.latent: low 64 > high 4; swap them"),
    (entry("kl.beta", type="float", low=0.0, high=4.0, log=True), "space.kl.beta: log: true needs low > 0"),
    (entry("model.dropout", type="float", low=0.05, high=0.3, step=0.05, log=True),
     "space.model.dropout: log and step are exclusive"),
    (entry("model.dropout", type="float", low=0.0, high=0.3, step=0), "space.model.dropout: step must be > 0"),
    (entry("model.dropout", type="float", low=0.0, high=0.3, step=0.07), "not a multiple of step 0.07; set high to 0.28"),
    (entry("model.latent", type="float", low=4, high=8),
     "space.model.latent: type float does not fit model.latent (an integer); use type: int"),
    (entry("model.arch", type="int", low=1, high=2),
     "type int does not fit model.arch (one of mlp, conv); use type: categorical or fixed"),
    (entry("kl.schedule", type="categorical", choices=[]), "space.kl.schedule.choices: choices is empty"),
    (entry("kl.schedule", type="categorical", choices=[[1], "a"]),
     "space.kl.schedule.choices: [1] is not a number, string or true/false"),
    (entry("kl.cycles", type="int", low=2, high=6, when={"kl.schedule": {"x": 1}}),
     "space.kl.cycles.when.kl.schedule: {'x': 1} is not a number, string or true/false"),
    (entry("kl.schedule", type="categorical", choices=["linear", "cyclical", "linear"]), "choice 'linear' is listed twice"),
    (entry("kl.schedule", type="categorical", choices=["constant", "exponential"]),
     "space.kl.schedule: choice 'exponential' is not a valid kl.schedule"),
    (entry("model.latent", type="int", low=4, high=5000),
     "space.model.latent: high 5000 is outside model.latent's allowed range (<= 4096)"),
    (entry("model.latent", type="int", low=0, high=8),
     "space.model.latent: low 0 is outside model.latent's allowed range (>= 1)"),
    (entry("optim.batch_size", type="fixed", value=0),
     "space.optim.batch_size: value 0 is outside optim.batch_size's allowed range (>= 1)"),
    (entry("data.binarize", type="categorical", choices=["dynamic", "none"]),
     "space.data.binarize: choice 'none' makes an invalid config: model.likelihood 'bernoulli' needs binary data"),
    (entry("kl.cycles", type="int", low=2, high=6, when={"kl.beta": 1.0}),
     "space.kl.cycles.when: kl.beta is a float entry; conditions must name categorical entries"),
    (entry("kl.cycles", type="int", low=2, high=6, when={"optim.decay": "cosine"}),
     "space.kl.cycles.when: optim.decay is not in the space"),
    (entry("kl.cycles", type="int", low=2, high=6, when={"kl.schedule": "cyclic"}),
     "space.kl.cycles.when: 'cyclic' is not among kl.schedule's choices"),
    (study(space={
        "optim.decay": {"type": "categorical", "choices": ["constant", "cosine"], "when": {"kl.schedule": "linear"}},
        "optim.min_lr_ratio": {"type": "float", "low": 0.0, "high": 0.1, "when": {"optim.decay": "cosine"}},
    }), "space.optim.min_lr_ratio.when: optim.decay has a when of its own"),
    (study(sampler={"name": "bayes"}),
     "sampler.name: Input should be 'tpe', 'random', 'grid', 'cmaes' or 'qmc' (got 'bayes')"),
    (study(sampler={"name": "random", "n_startup_trials": 3}),
     "sampler: 'n_startup_trials' applies to cmaes or tpe only, not 'random'"),
    (study(pruner={"name": "asha"}), "pruner.name: Input should be 'median'"),
    (study(pruner={"name": "hyperband", "percentile": 30}),
     "pruner: 'percentile' applies to percentile only, not 'hyperband'"),
    (study(pruner={"name": "percentile", "percentile": 120}),
     "pruner.percentile: Input should be less than or equal to 100"),
    (study(pruner={"name": "successive_halving", "reduction_factor": 1}), "pruner.reduction_factor"),
    (study(pruner={"name": "hyperband", "max_resource": "big"}),
     "pruner.max_resource: use auto (= budget.epochs) or a whole number of epochs >= 1 (got 'big')"),
    (study(pruner={"name": "hyperband", "min_resource": 4, "max_resource": 2}), "pruner: max_resource 2 < min_resource 4"),
    (study(objective="multi", pruner={"name": "hyperband"}),
     "pruner.name: 'hyperband' cannot prune objective 'multi' (Optuna's trial.should_prune is single-objective); "
     "set pruner.name: none"),
    (study(objective="multi", sampler={"name": "cmaes"}), "sampler.name: cmaes is single-objective"),
    (study(objective="nll"), "objective: Input should be 'iwae_nll', 'neg_elbo' or 'multi'"),
    (study(sampler={"name": "grid"}), "sampler.name: grid needs a finite space, but space.kl.beta is a continuous float"),
    (study(budget={"trials": -1}), "budget.trials: Input should be greater than or equal to 1 (got -1)"),
    (study(budget={"epochs": 0}), "budget.epochs: Input should be greater than or equal to 1 (got 0)"),
    (study(budget={"timeout": -1}), "budget.timeout: Input should be greater than 0 (got -1)"),
    (study(workers={"count": 0}), "workers.count: Input should be greater than or equal to 1 (got 0)"),
    (study(workers={"slots": 0}), "workers.slots"),
    (study(workers={"slots": 100, "max_slots": 64}), "workers: slots 100 > max_slots 64"),
    (study(workers={"heartbeat_interval": 10, "grace_period": 5}), "workers: grace_period 5 <= heartbeat_interval 10"),
    (study(workers={"device": "gpu"}), "workers.device: not a device; use auto, cpu, cuda or cuda:N (got 'gpu')"),
    ([1, 2], "expected a mapping of study sections"),
]


@pytest.mark.parametrize(("raw", "phrase"), BAD_STUDIES)
def test_bad_study_spec_is_one_line_naming_the_field(raw: Any, phrase: str) -> None:
    with pytest.raises(TunerError) as err:
        parse_study_spec(raw, source="s.yaml")
    message = str(err.value)
    assert phrase in message
    assert "\n" not in message and message.startswith("s.yaml: ")


def test_storage_errors_never_echo_the_url() -> None:
    with pytest.raises(TunerError) as err:
        parse_study_spec(study(storage="mysql://user:hunter2@db/tuner"), source="s.yaml")
    assert "hunter2" not in str(err.value)


def test_study_spec_files_missing_malformed_empty(tmp_path: Path) -> None:
    with pytest.raises(TunerError, match="study spec file '.*nope.yaml' does not exist"):
        load_study_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("study: x\nspace:\n  model.latent: {type: int, low: 4\n")
    with pytest.raises(TunerError, match=r"bad.yaml: malformed YAML at line \d+; fix the syntax"):
        load_study_spec(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(TunerError, match="empty.yaml: 'study' is required; add it"):
        load_study_spec(empty)


def test_yaml_exponents_without_a_dot_are_numbers(tmp_path: Path) -> None:
    # PyYAML reads 1e-4 (no dot) as the string "1e-4": floats, categorical choices and fixed values
    # of float fields still come out as numbers
    path = tmp_path / "s.yaml"
    path.write_text(
        "study: exp\nspace:\n"
        "  optim.lr: {type: float, low: 1e-4, high: 3e-3, log: true}\n"
        "  optim.weight_decay: {type: categorical, choices: [0, 1e-5, 1e-4]}\n"
        "  optim.eps: {type: fixed, value: 1e-6}\n"
    )
    assert yaml.safe_load(path.read_text())["space"]["optim.lr"]["low"] == "1e-4"
    spec = load_study_spec(path)
    assert isinstance(spec.space["optim.lr"], FloatParam) and spec.space["optim.lr"].low == 1e-4
    assert spec.space["optim.lr"].high == 3e-3
    assert spec.space["optim.weight_decay"].choices == [0.0, 1e-5, 1e-4]
    assert all(type(c) is float for c in spec.space["optim.weight_decay"].choices)
    assert spec.space["optim.eps"].value == 1e-6


def test_study_spec_yaml_round_trip(tmp_path: Path) -> None:
    spec = parse_study_spec(study(pruner={"name": "patient", "wrapped": "percentile", "percentile": 40.0, "patience": 3}))
    path = tmp_path / "s.yaml"
    path.write_text(study_spec_to_yaml(spec))
    again = load_study_spec(path)
    assert again == spec
    dumped = yaml.safe_load(path.read_text())
    # sampler/pruner sections keep only the keys their name reads; entries read type first
    assert dumped["pruner"] == {
        "name": "patient", "percentile": 40.0, "n_startup_trials": 5, "n_warmup_steps": 1, "interval_steps": 1,
        "patience": 3, "min_delta": 0.0, "wrapped": "percentile",
    }
    assert set(dumped["sampler"]) == {"name", "seed", "n_startup_trials", "multivariate", "constant_liar"}
    assert list(dumped["space"]["kl.cycles"]) == ["type", "low", "high", "log", "step", "when"]


def test_defaults_that_depend_on_other_keys() -> None:
    # multi cannot be pruned, so its pruner defaults to none; cmaes starts after 1 random trial
    spec = parse_study_spec(study(objective="multi"))
    assert spec.pruner.name == "none"
    assert parse_study_spec(study(sampler={"name": "cmaes"})).sampler.n_startup_trials == 1
    assert parse_study_spec(study(sampler={"name": "cmaes", "n_startup_trials": 4})).sampler.n_startup_trials == 4


def test_grid_accepts_a_finite_space() -> None:
    grid_beta = {"kl.beta": {"type": "float", "low": 0.5, "high": 2.0, "step": 0.5}}
    spec = parse_study_spec(study(sampler={"name": "grid"}, space=grid_beta))
    assert spec.sampler.name == "grid" and spec.space["kl.beta"].step == 0.5


def test_train_config_applies_params_fixed_values_epochs_and_seed() -> None:
    spec = parse_study_spec(study())
    config = spec.train_config({"model.latent": 9, "kl.beta": 0.5, "kl.schedule": "cyclical", "kl.cycles": 3}, seed=17)
    assert config.seed == 17 and config.train.epochs == 3 and config.train.iwae_k == 50
    assert (config.model.latent, config.model.hidden, config.kl.beta) == (9, 256, 0.5)
    assert (config.kl.schedule, config.kl.cycles, config.optim.batch_size) == ("cyclical", 3, 64)
    assert spec.base.train.epochs == 50  # the base is untouched: budget.epochs wins per trial
    with pytest.raises(TunerError, match=r"params \['optim.lr'\] are not in its space"):
        spec.train_config({"optim.lr": 0.1}, seed=0)


def test_conditional_fixed_value_applies_only_with_its_condition() -> None:
    spec = parse_study_spec(entry("optim.grad_clip", type="fixed", value=5.0, when={"kl.schedule": "cyclical"}))
    assert spec.train_config({"kl.schedule": "cyclical"}, seed=0).optim.grad_clip == 5.0
    assert spec.train_config({"kl.schedule": "linear"}, seed=0).optim.grad_clip == 0.0


@pytest.mark.parametrize("path", sorted((ROOT / "studies").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_study_loads_and_round_trips(path: Path, tmp_path: Path) -> None:
    spec = load_study_spec(path)
    assert isinstance(spec, StudySpec) and spec.study and spec.space
    copy_path = tmp_path / path.name
    copy_path.write_text(study_spec_to_yaml(spec))
    assert load_study_spec(copy_path) == spec


def test_shipped_studies_are_the_documented_ones() -> None:
    names = sorted(p.name for p in (ROOT / "studies").glob("*.yaml"))
    assert {"mnist-quick.yaml", "mnist.yaml", "mnist-conv.yaml", "gpu.yaml"} <= set(names)
    quick = load_study_spec(ROOT / "studies" / "mnist-quick.yaml")
    assert quick.workers.count == 2 and quick.budget.epochs == 8 and quick.budget.trials == 40  # ~1 min on 2 cores
    assert quick.pruner.name in {"hyperband", "successive_halving"} and quick.space["optim.lr"].high == 3e-2
    gpu = load_study_spec(ROOT / "studies" / "gpu.yaml")
    assert gpu.workers.device == "cuda" and gpu.workers.slots is None and gpu.workers.max_slots == 128
    assert load_study_spec(ROOT / "studies" / "mnist-conv.yaml").base.model.arch == "conv"


def test_the_tuned_config_file_is_the_config_the_cpu_study_enqueues() -> None:
    # configs/mnist-mlp-tuned.yaml (the README's rows train it) and studies/mnist.yaml's enqueued race
    # winner under the cosine decay must not drift apart; the first enqueued config is the same at a
    # constant rate (the study's quick first good model)
    spec = load_study_spec(Path(__file__).resolve().parents[1] / "studies" / "mnist.yaml")
    tuned = load_config(Path(__file__).resolve().parents[1] / "configs" / "mnist-mlp-tuned.yaml")
    assert spec.train_config(spec.enqueue[1], seed=tuned.seed) == tuned
    constant = {**spec.enqueue[1], "optim.decay": "constant"}
    del constant["optim.min_lr_ratio"]
    assert spec.enqueue[0] == constant


def test_the_variants_study_samples_only_valid_configs_of_every_family_and_remedy() -> None:
    import optuna

    from tuner.study import space

    spec = load_study_spec(ROOT / "studies" / "variants.yaml")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen: set[str] = set()
    for i in range(300):
        cfg = spec.train_config(space.sample(study.ask(), spec), seed=i)  # validated: every combination allowed
        m, k = cfg.model, cfg.kl
        seen |= {m.posterior, m.prior, *(["mixture"] if m.mixture > 1 else []), k.divergence,
                 *(["aux"] if k.aux_weight > 0 else []), *(["ortho"] if m.ortho_weight > 0 else []),
                 *(["aggressive"] if cfg.train.aggressive_epochs > 0 else [])}
    assert seen == {"gaussian", "iaf", "normal", "mog", "vamp", "diffusion", "mixture", "kl", "mmd", "aux", "ortho",
                    "aggressive"}
