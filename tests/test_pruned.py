"""tell_pruned: a pruned trial keeps no value and its intermediate values, and what reads pruned
trials (Optuna's TPE sampler, its Hyperband pruner, tuner's median pruner) decides exactly as after
Optuna's own tell, which copies the last intermediate value into the value."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.exceptions import UpdateFinishedTrialError
from optuna.pruners import HyperbandPruner
from optuna.samplers import TPESampler
from optuna.trial import TrialState

from tuner.store.urls import open_storage
from tuner.study.strategy import CachedPercentilePruner
from tuner.study.pruned import tell_pruned


def _objective_curve(x: float, epoch: int) -> float:
    return (x - 0.3) ** 2 * 100 + 50 / epoch  # lower is better; x near 0.3 wins


def _run(study: optuna.Study, ours: bool, trials: int = 24) -> list[float]:
    """Ask/tell ``trials`` trials of a 1-d problem, 4 epochs each, pruned by the study's pruner;
    pruned ones told by Optuna (``ours`` False) or by tell_pruned. Returns the x's sampled."""
    xs = []
    for _ in range(trials):
        trial = study.ask()
        x = trial.suggest_float("x", 0.0, 1.0)
        xs.append(x)
        for epoch in range(1, 5):
            trial.report(_objective_curve(x, epoch), epoch)
            if trial.should_prune():
                tell_pruned(study, trial) if ours else study.tell(trial, state=TrialState.PRUNED)
                break
        else:
            study.tell(trial, _objective_curve(x, 4))
    return xs


PRUNERS = {
    "hyperband": lambda: HyperbandPruner(min_resource=1, max_resource=4, reduction_factor=2),
    "median": lambda: CachedPercentilePruner(50.0, n_startup_trials=2),  # tuner's median pruner
}


@pytest.mark.parametrize(("store", "pruner"), [("memory", "hyperband"), ("sqlite", "hyperband"), ("sqlite", "median")])
def test_tpe_and_the_pruners_decide_as_after_optunas_tell(store: str, pruner: str, tmp_path: Path) -> None:
    runs = {}
    for ours in (False, True):
        storage = (optuna.storages.InMemoryStorage() if store == "memory"
                   else open_storage(f"sqlite:///{tmp_path}/{ours}.db", heartbeat_interval=None, grace_period=None))
        # one name: Hyperband assigns brackets by a hash of the study name and trial number
        study = optuna.create_study(storage=storage, study_name="same", sampler=TPESampler(seed=3, n_startup_trials=4),
                                    pruner=PRUNERS[pruner]())
        runs[ours] = (_run(study, ours), study.get_trials())
    (theirs_x, theirs), (ours_x, ours) = runs[False], runs[True]
    pruned = [t for t in ours if t.state == TrialState.PRUNED]
    assert len(pruned) >= 5  # the comparison below covers many pruned trials
    assert ours_x == theirs_x  # every later proposal the same: TPE ranks pruned trials by intermediate values
    assert [t.state for t in ours] == [t.state for t in theirs]  # the same prune decisions
    for a, b in zip(ours, theirs):
        assert a.intermediate_values == b.intermediate_values
        if a.state == TrialState.PRUNED:
            assert a.values is None and b.values == [b.intermediate_values[b.last_step]]  # Optuna copies it
        else:
            assert a.values == b.values


def test_a_trial_another_worker_failed_is_refused(tmp_path: Path) -> None:
    """Our cached copy still says RUNNING; the store refuses the write, as it refuses Optuna's tell
    (the bookkeeper lets such a trial go: tests/test_faults.py)."""
    url = f"sqlite:///{tmp_path}/f.db"
    ours = optuna.create_study(storage=open_storage(url, heartbeat_interval=None, grace_period=None), study_name="f")
    trial = ours.ask()
    trial.report(7.0, 1)
    theirs = open_storage(url, heartbeat_interval=None, grace_period=None)
    theirs.set_trial_state_values(trial._trial_id, TrialState.FAIL)  # failed as stale elsewhere
    with pytest.raises(UpdateFinishedTrialError):
        tell_pruned(ours, trial)
    (frozen,) = optuna.load_study(study_name="f", storage=url).get_trials()
    assert frozen.state == TrialState.FAIL and frozen.intermediate_values == {1: 7.0}
    done = ours.ask()
    tell_pruned(ours, done)
    with pytest.raises(ValueError, match="Cannot tell a PRUNED trial"):  # Optuna's words for a told trial
        tell_pruned(ours, done)
