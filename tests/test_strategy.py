"""tuner.study.strategy: samplers, pruners, directions and the collapse constraint, on real Optuna studies."""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import optuna
import pytest
from optuna.pruners import (
    HyperbandPruner,
    NopPruner,
    PatientPruner,
    PercentilePruner,
    SuccessiveHalvingPruner,
)
from optuna.samplers import CmaEsSampler, GridSampler, QMCSampler, RandomSampler, TPESampler
from optuna.trial import TrialState, create_trial

from tuner.errors import TunerError
from tuner.store.attrs import set_trial_attrs
from tuner.study import space
from tuner.study.spec import StudySpec, parse_study_spec
from tuner.study.strategy import (
    COLLAPSE_CONSTRAINT,
    CachedPercentilePruner,
    build_pruner,
    build_sampler,
    collapse_constraint,
    collapse_constraint_attrs,
    directions,
    rung_epochs,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # QMC, Patient

SPACE = {
    "kl.beta": {"type": "float", "low": 0.5, "high": 2.0, "step": 0.5},
    "model.latent": {"type": "int", "low": 4, "high": 16, "step": 4},
    "kl.schedule": {"type": "categorical", "choices": ["constant", "linear"]},
}


def make_spec(**over: Any) -> StudySpec:
    return parse_study_spec({"study": "strategy", "space": SPACE, "budget": {"epochs": 12}, **over})


def test_tpe_sampler_with_its_parameters() -> None:
    sampler = build_sampler(make_spec(sampler={"name": "tpe", "seed": 4, "n_startup_trials": 7, "multivariate": False}))
    assert isinstance(sampler, TPESampler)
    assert sampler._n_startup_trials == 7 and sampler._multivariate is False and sampler._constant_liar is True
    assert sampler._constraints_func is None
    default = build_sampler(make_spec())
    assert default._n_startup_trials == 10 and default._multivariate is True and default._constant_liar is True


def test_random_grid_qmc_samplers() -> None:
    assert type(build_sampler(make_spec(sampler={"name": "random", "seed": 1}))) is RandomSampler
    spec = make_spec(sampler={"name": "grid", "seed": 2})
    grid = build_sampler(spec)
    assert isinstance(grid, GridSampler) and grid._search_space == space.grid(spec)
    assert len(grid._all_grids) == 4 * 4 * 2
    qmc = build_sampler(make_spec(sampler={"name": "qmc", "seed": 6, "qmc_type": "halton", "scramble": False}))
    assert isinstance(qmc, QMCSampler)
    assert (qmc._qmc_type, qmc._scramble, qmc._seed) == ("halton", False, 6)
    assert build_sampler(make_spec(sampler={"name": "qmc", "seed": 6}), worker=3)._seed == 6  # shared sequence


def test_cmaes_sampler_or_the_missing_package_named() -> None:
    spec = make_spec(sampler={"name": "cmaes", "seed": 3})
    if importlib.util.find_spec("cmaes") is None:
        with pytest.raises(TunerError, match="sampler.name: cmaes needs the 'cmaes' package; pip install cmaes"):
            build_sampler(spec)
    else:
        sampler = build_sampler(spec)
        assert isinstance(sampler, CmaEsSampler) and sampler._n_startup_trials == 1


def first_values(spec: StudySpec, worker: int, n: int = 6) -> list[float]:
    study = optuna.create_study(sampler=build_sampler(spec, worker=worker))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append(trial.suggest_float("x", 0.0, 1.0))
        study.tell(trial, out[-1])
    return out


@pytest.mark.parametrize("name", ["tpe", "random"])
def test_seeds_replay_and_workers_get_their_own(name: str) -> None:
    spec = make_spec(sampler={"name": name, "seed": 11})
    assert first_values(spec, 0) == first_values(spec, 0)
    assert first_values(spec, 0) != first_values(spec, 1)
    assert first_values(spec, 1) == first_values(make_spec(sampler={"name": name, "seed": 12}), 0)  # seed + worker


@pytest.mark.parametrize(
    ("pruner", "cls", "attrs"),
    [
        ({"name": "median", "n_startup_trials": 3, "n_warmup_steps": 2, "interval_steps": 2}, CachedPercentilePruner,
         {"_percentile": 50.0, "_n_startup_trials": 3, "_n_warmup_steps": 2, "_interval_steps": 2}),
        ({"name": "percentile", "percentile": 30.0}, CachedPercentilePruner,
         {"_percentile": 30.0, "_n_startup_trials": 5, "_n_warmup_steps": 1, "_interval_steps": 1}),
        ({"name": "successive_halving", "min_resource": 2, "reduction_factor": 4, "min_early_stopping_rate": 1},
         SuccessiveHalvingPruner, {"_min_resource": 2, "_reduction_factor": 4, "_min_early_stopping_rate": 1}),
        ({"name": "hyperband"}, HyperbandPruner, {"_min_resource": 1, "_max_resource": 12, "_reduction_factor": 3}),
        ({"name": "hyperband", "min_resource": 2, "max_resource": 9, "reduction_factor": 2}, HyperbandPruner,
         {"_min_resource": 2, "_max_resource": 9, "_reduction_factor": 2}),
        ({"name": "none"}, NopPruner, {}),
    ],
    ids=["median", "percentile", "successive_halving", "hyperband-auto", "hyperband", "none"],
)
def test_pruners_with_their_parameters(pruner: dict[str, Any], cls: type, attrs: dict[str, Any]) -> None:
    built = build_pruner(make_spec(pruner=pruner))
    assert type(built) is cls
    assert {k: getattr(built, k) for k in attrs} == attrs


def test_patient_pruner_wraps_the_named_pruner() -> None:
    patient = {"name": "patient", "patience": 4, "min_delta": 0.5, "wrapped": "percentile", "percentile": 20.0}
    built = build_pruner(make_spec(pruner=patient))
    assert isinstance(built, PatientPruner) and (built._patience, built._min_delta) == (4, 0.5)
    assert type(built._wrapped_pruner) is CachedPercentilePruner and built._wrapped_pruner._percentile == 20.0
    alone = build_pruner(make_spec(pruner={"name": "patient", "wrapped": "none"}))
    assert alone._wrapped_pruner is None and alone._patience == 2  # patience alone decides


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("direction", ["minimize", "maximize"])
@pytest.mark.parametrize(("percentile", "warmup", "interval", "n_min"), [(50.0, 0, 1, 1), (25.0, 2, 3, 4), (40.0, 1, 2, 20)])
def test_cached_percentile_pruner_decides_as_optunas(
    direction: str, percentile: float, warmup: int, interval: int, n_min: int
) -> None:
    """Same decision and same percentile (bit for bit) as Optuna's PercentilePruner on every step of
    live trials, while complete trials (ragged curves, NaN, inf, ties) keep arriving between calls."""
    import random

    import numpy as np

    rng = random.Random(int(percentile) + n_min)
    study = optuna.create_study(direction=direction)
    ours = CachedPercentilePruner(percentile, 3, warmup, interval, n_min_trials=n_min)
    theirs = PercentilePruner(percentile, 3, warmup, interval, n_min_trials=n_min)

    def value() -> float:
        return rng.choice([float("nan"), float("inf"), 1.0, 2.0]) if rng.random() < 0.05 else round(rng.gauss(0, 1), 2)

    decisions, pruned = 0, 0
    for _ in range(60):
        steps = rng.randint(1, 12)
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.0,
                                     intermediate_values={s: value() for s in range(steps) if rng.random() < 0.9}))
        live = study.ask()
        for step in range(rng.randint(1, 12)):
            live.report(value(), step)
            frozen = study._storage.get_trial(live._trial_id)
            decision = ours.prune(study, frozen)
            assert decision == theirs.prune(study, frozen)
            decisions, pruned = decisions + 1, pruned + decision
        study.tell(live, state=TrialState.FAIL)
    assert pruned > 5 and decisions - pruned > 5  # both outcomes were exercised

    values = ours._studies[study.study_name]
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    for step in range(12):
        at_step = np.array([t.intermediate_values[step] for t in complete if step in t.intermediate_values])
        expected = float(np.nanpercentile(at_step, percentile)) if (~np.isnan(at_step)).any() else float("nan")
        got = values.percentile(step, percentile, 1)
        assert got == expected or (math.isnan(got) and math.isnan(expected)), step


def pruned_at_first_rung(pruner: optuna.pruners.BasePruner) -> int:
    """8 trials running at once report epoch 1 (worst last): how many the pruner stops."""
    study = optuna.create_study(study_name="rungs", pruner=pruner)
    running = [study.ask() for _ in range(8)]
    for value, trial in enumerate(running):
        trial.report(float(value), 1)
    return sum(trial.should_prune() for trial in running)


def test_hyperband_auto_prunes_before_any_trial_finishes() -> None:
    # our "auto" is budget.epochs up front; Optuna's own waits for a finished trial, so a
    # population that starts together would prune nothing until one finishes
    ours = pruned_at_first_rung(build_pruner(make_spec(pruner={"name": "hyperband"})))
    assert ours >= 2
    assert pruned_at_first_rung(HyperbandPruner(min_resource=1, max_resource="auto", reduction_factor=3)) == 0
    halving = build_pruner(make_spec(pruner={"name": "successive_halving", "reduction_factor": 2}))
    assert pruned_at_first_rung(halving) >= 4


def test_directions() -> None:
    assert directions(make_spec()) == ["minimize"]
    assert directions(make_spec(objective="neg_elbo")) == ["minimize"]
    multi = make_spec(objective="multi")
    assert directions(multi) == ["minimize", "minimize"] and type(build_pruner(multi)) is NopPruner
    study = optuna.create_study(directions=directions(multi))
    assert len(study.directions) == 2


def test_collapse_constraint_follows_optunas_sign_convention() -> None:
    collapsed = create_trial(value=1.0, user_attrs={"collapsed": True})
    healthy = create_trial(value=1.0, user_attrs={"collapsed": False})
    pruned = create_trial(state=TrialState.PRUNED, intermediate_values={1: 5.0})
    assert collapse_constraint(collapsed) == [1.0]  # > 0: infeasible
    assert collapse_constraint(healthy) == [-1.0]
    assert collapse_constraint(pruned) == [0.0]  # no verdict: feasible, judged by its values


def test_tpe_records_the_constraints_func_after_tell() -> None:
    spec = make_spec(sampler={"name": "tpe", "seed": 0})
    with pytest.warns(FutureWarning, match="constraints_func"):  # deprecated in Optuna 5
        sampler = build_sampler(spec, constraints_func=collapse_constraint)
    study = optuna.create_study(sampler=sampler)
    for verdict in (True, False):
        trial = study.ask()
        space.sample(trial, spec)
        trial.set_user_attr("collapsed", verdict)
        study.tell(trial, 1.0)
    trial = study.ask()
    trial.report(3.0, 1)
    study.tell(trial, state=TrialState.PRUNED)
    assert [t.system_attrs["constraints"] for t in study.trials] == [(1.0,), (-1.0,), (0.0,)]
    assert [t.constraints for t in study.trials] == [{"0": 1.0}, {"0": -1.0}, {"0": 0.0}]


def collapsed_share(use_constraint: bool) -> float:
    """A 1-d study where high beta looks best but collapses: how often late TPE trials go there."""
    spec = parse_study_spec({"study": "c", "space": {"kl.beta": {"type": "float", "low": 0.0, "high": 8.0}}})
    study = optuna.create_study(sampler=build_sampler(spec))
    betas = []
    for _ in range(60):
        trial = study.ask()
        beta = space.sample(trial, spec)["kl.beta"]
        trial.set_user_attr("collapsed", beta > 4.0)
        if use_constraint:
            set_trial_attrs(trial, system=collapse_constraint_attrs(beta > 4.0))
        study.tell(trial, -beta)
        betas.append(beta)
    late = betas[30:]
    return sum(b > 4.0 for b in late) / len(late)


def test_the_collapse_constraint_attr_is_what_set_constraint_writes_and_steers_tpe_away() -> None:
    spec = make_spec()
    study = optuna.create_study(sampler=build_sampler(spec))
    for collapsed in (True, False, None):
        ours, theirs = study.ask(), study.ask()
        set_trial_attrs(ours, system=collapse_constraint_attrs(collapsed))
        if collapsed is not None:
            theirs.set_user_attr("collapsed", collapsed)
        theirs.set_constraint(COLLAPSE_CONSTRAINT, collapse_constraint(theirs)[0])  # Optuna's own call
        study.tell(ours, 1.0)
        study.tell(theirs, 1.0)
    trials = study.trials
    assert [t.system_attrs for t in trials[::2]] == [t.system_attrs for t in trials[1::2]]
    assert [t.constraints for t in trials[::2]] == [{"collapsed": 1.0}, {"collapsed": -1.0}, {"collapsed": 0.0}]
    # unconstrained TPE chases the (collapsed) best values; constrained TPE mostly stays feasible
    assert collapsed_share(False) > 0.8
    assert collapsed_share(True) < 0.6


@pytest.mark.parametrize(
    ("pruner", "epochs", "rungs"),
    [
        ({"name": "successive_halving", "min_resource": 2, "reduction_factor": 3}, 40, {2, 6, 18}),
        ({"name": "successive_halving", "min_resource": 1, "reduction_factor": 2, "min_early_stopping_rate": 1},
         10, {2, 4, 8}),
        ({"name": "hyperband", "min_resource": 1, "reduction_factor": 3}, 8, {1, 3}),
        ({"name": "patient", "wrapped": "hyperband", "min_resource": 2, "reduction_factor": 2}, 9, {2, 4, 8}),
        ({"name": "median"}, 40, set()),
        ({"name": "patient", "wrapped": "median"}, 40, set()),
        ({"name": "none"}, 40, set()),
    ],
)
def test_rung_epochs_are_where_the_pruner_compares(pruner: dict[str, Any], epochs: int, rungs: set[int]) -> None:
    spec = parse_study_spec({"study": "r", "pruner": pruner, "budget": {"epochs": epochs}})
    assert rung_epochs(spec) == rungs
    built = build_pruner(spec)
    if isinstance(built, SuccessiveHalvingPruner):  # Optuna's own rung arithmetic agrees
        rate = built._min_early_stopping_rate
        assert min(rungs) == built._min_resource * built._reduction_factor ** rate
