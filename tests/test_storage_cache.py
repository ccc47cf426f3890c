"""tuner.store.cache through tuner.store.urls.open_storage, on real SQLite files and a real PostgreSQL
server: the cache shows what Optuna's own storage shows, sees other processes' writes, and keeps
heartbeats, stale-trial retries and store-call retries working."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import optuna
import psycopg
import pytest
import sqlalchemy
from optuna.trial import TrialState, create_trial

from tuner.store.attrs import set_trial_attrs
from tuner.store.cache import CachedStorage
from tuner.store.urls import open_storage

REPO = Path(__file__).resolve().parents[1]
optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings(
    "ignore::optuna.exceptions.ExperimentalWarning", "ignore:Heartbeat of storage:UserWarning")

ALL_STATES = [None, (TrialState.COMPLETE,), (TrialState.COMPLETE, TrialState.PRUNED), (TrialState.RUNNING,),
              (TrialState.WAITING,), (TrialState.RUNNING, TrialState.WAITING), (TrialState.FAIL, TrialState.RUNNING)]


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 't.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")


def plain(url: str) -> optuna.storages.RDBStorage:
    """Optuna's own view of the store (its RDBStorage, behind its _CachedStorage in a study)."""
    return optuna.storages.RDBStorage(url.replace("postgresql://", "postgresql+psycopg://"))


def snapshot(trials: list[optuna.trial.FrozenTrial]) -> list[tuple]:
    def same_nan(values: dict) -> dict:
        return {k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in values.items()}

    return [(t.number, t.state, t.values, same_nan(t.intermediate_values), t.params, t.user_attrs,
             same_nan(t.system_attrs), t.datetime_start, t.datetime_complete) for t in trials]


def assert_same_view(ours: optuna.Study, theirs: optuna.Study) -> None:
    for states in ALL_STATES:
        assert snapshot(ours.get_trials(states=states)) == snapshot(theirs.get_trials(states=states)), states
        assert [t.number for t in ours.get_trials(deepcopy=False, states=states)] == [
            t.number for t in theirs.get_trials(deepcopy=False, states=states)], states


def ask(study: optuna.Study, x: float | None = None) -> optuna.Trial:
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0) if x is None else trial.suggest_float("x", x, x)
    return trial


def test_open_storage_returns_the_cache_with_the_rdb_attributes(url: str) -> None:
    storage = open_storage(url)
    assert isinstance(storage, CachedStorage)
    assert storage.engine.url.drivername in ("sqlite", "postgresql+psycopg")  # the RDBStorage's attributes
    study = optuna.create_study(storage=storage)
    assert study._storage is storage  # Optuna does not wrap it in its own _CachedStorage again
    assert type(storage.backend) is optuna.storages.RDBStorage  # what the dashboard gets: Optuna's own class


def test_the_cache_shows_what_optunas_storage_shows_while_the_study_changes(url: str) -> None:
    storage = open_storage(url)
    ours = optuna.create_study(study_name="s", storage=storage)
    optuna.create_study(study_name="other", storage=storage).add_trial(create_trial(value=9.0))  # another study
    theirs_storage = plain(url)
    theirs = optuna.load_study(study_name="s", storage=theirs_storage)
    # finished trials of every kind, out of number order of completion, with NaN and inf curves
    ours.add_trials([create_trial(value=float(i + 1), intermediate_values={0: float(i), 1: math.nan}, params={"x": 0.5},
                                  distributions={"x": optuna.distributions.FloatDistribution(0, 1)},
                                  user_attrs={"i": i}, system_attrs={"completed_rung_0": float(i)}) for i in range(3)])
    ours.add_trial(create_trial(state=TrialState.PRUNED, intermediate_values={0: math.inf}))
    ours.add_trial(create_trial(state=TrialState.FAIL))
    slow, fast = ask(ours), ask(ours)
    slow.report(1.0, 0)
    ours.enqueue_trial({"x": 0.25})
    assert_same_view(ours, theirs)

    # the other storage (another worker) changes things the cache has seen unfinished or not at all
    fast_there = optuna.trial.Trial(theirs, fast._trial_id)
    fast_there.report(2.0, 0)
    theirs.tell(fast_there, 0.5)  # finishes after a trial with a higher number
    late = ask(theirs)  # the other worker takes the enqueued trial
    late.report(3.0, 0)
    theirs_storage.set_trial_system_attr(late._trial_id, "completed_rung_0", 1.0)
    assert late.params == {"x": 0.25}
    assert_same_view(ours, theirs)
    assert ours._storage.get_trial_system_attrs(late._trial_id) == {"fixed_params": {"x": 0.25}, "completed_rung_0": 1.0}
    assert ours._storage.get_trial(fast._trial_id).state == TrialState.COMPLETE  # made here, told there

    ours.tell(slow, state=TrialState.PRUNED)
    ask(ours)
    theirs.tell(late, 0.1)
    assert_same_view(ours, theirs)
    assert ours.best_trial.number == late.number and ours.best_value == 0.1
    assert storage.get_n_trials(ours._study_id, (TrialState.COMPLETE,)) == 5


def statements(storage: CachedStorage) -> list[int]:
    """A live count of the SQL statements the storage's engine runs."""
    counter = [0]
    sqlalchemy.event.listen(storage.engine, "before_cursor_execute",
                            lambda *args: counter.__setitem__(0, counter[0] + 1))
    return counter


def test_a_trial_this_process_runs_is_read_from_memory_as_the_store_holds_it(url: str) -> None:
    storage = open_storage(url)
    study = optuna.create_study(study_name="own", storage=storage)
    study.enqueue_trial({"x": 0.75}, user_attrs={"queued": True})
    popped, made = ask(study), ask(study)  # one taken from the queue, one created here
    assert popped.params == {"x": 0.75}
    for trial in (popped, made):
        trial.suggest_int("n", 1, 4)
        trial.report(2.5, 0)
        trial.report(math.inf, 1)
        trial.set_user_attr("u", [1, 2])
        storage.set_trial_system_attr(trial._trial_id, "completed_rung_0", 2.5)
        set_trial_attrs(trial, {"metrics": {"nll": 90.5}}, {"constraints:collapsed": -1.0})
    count = statements(storage)
    ours = [storage.get_trial(t._trial_id) for t in (popped, made)]
    assert count[0] == 0  # from memory
    assert snapshot(ours) == snapshot([plain(url).get_trial(t._trial_id) for t in (popped, made)])
    assert ours[0].distributions == plain(url).get_trial(popped._trial_id).distributions
    ours[0].user_attrs["u"].append(3)  # a copy: changing it leaves the cache alone
    assert storage.get_trial(popped._trial_id).user_attrs["u"] == [1, 2]

    told = study.tell(made, 1.5)  # reads the trial twice; the second time back as told, one statement
    assert count[0] <= 6, count[0]
    study.tell(popped, state=TrialState.PRUNED)
    assert snapshot([told]) == snapshot([plain(url).get_trial(made._trial_id)])
    for trial in (popped, made):  # the told copy, then the store's once a read refreshes the study
        assert snapshot([storage.get_trial(trial._trial_id)]) == snapshot([plain(url).get_trial(trial._trial_id)])
    assert_same_view(study, optuna.load_study(study_name="own", storage=plain(url)))
    assert snapshot([storage.get_trial(made._trial_id)]) == snapshot([plain(url).get_trial(made._trial_id)])


def test_a_trial_failed_by_another_process_is_never_told_twice(url: str) -> None:
    storage = open_storage(url)
    study = optuna.create_study(study_name="stale", storage=storage)
    trial = ask(study)
    trial.report(1.0, 0)
    plain(url).set_trial_state_values(trial._trial_id, TrialState.FAIL)  # another worker's stale-trial check
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        trial.report(2.0, 1)  # the store refuses; the cached copy goes
    assert storage.get_trial(trial._trial_id).state == TrialState.FAIL
    with pytest.raises(ValueError, match="Cannot tell a FAIL trial"):
        study.tell(trial, 1.0)
    again = ask(study)
    plain(url).set_trial_state_values(again._trial_id, TrialState.FAIL)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        study.tell(again, 1.0)  # the copy still says running: the store's write refuses the tell
    assert [t.state for t in plain(url).get_all_trials(study._study_id)] == [TrialState.FAIL, TrialState.FAIL]


def test_trials_are_counted_by_state_without_loading_them(url: str) -> None:
    storage = open_storage(url)
    study = optuna.create_study(study_name="count", storage=storage)
    theirs = optuna.load_study(study_name="count", storage=plain(url))
    study.add_trials([create_trial(value=1.0), create_trial(state=TrialState.PRUNED), create_trial(state=TrialState.FAIL)])
    running = ask(study)
    study.enqueue_trial({"x": 0.5})
    assert storage.count_trials(study._study_id) == {
        TrialState.COMPLETE: 1, TrialState.PRUNED: 1, TrialState.FAIL: 1, TrialState.RUNNING: 1, TrialState.WAITING: 1}
    taken = ask(theirs)  # the other worker takes the queued trial, finishes it and ours, and adds one
    theirs.tell(taken, 2.0)
    theirs.tell(running.number, state=TrialState.PRUNED)
    theirs.add_trial(create_trial(value=0.5))
    count = statements(storage)
    counts = storage.count_trials(study._study_id)
    assert count[0] == 1  # the light query: no trial loaded
    assert counts == {TrialState.COMPLETE: 3, TrialState.PRUNED: 2, TrialState.FAIL: 1}
    assert counts == dict(Counter(t.state for t in theirs.get_trials()))
    assert_same_view(study, theirs)  # the next read loads what the count only saw
    assert study.best_value == 0.5 and storage.count_trials(study._study_id) == counts


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
def test_the_best_trial_is_kept_as_trials_arrive(url: str, direction: str) -> None:
    storage = open_storage(url)
    study = optuna.create_study(study_name="best", storage=storage, direction=direction)
    theirs = optuna.load_study(study_name="best", storage=plain(url))
    with pytest.raises(ValueError):
        study.best_trial  # none complete yet: Optuna's error
    for value in (3.0, -math.inf, 7.5, math.inf, 0.25):
        theirs.add_trial(create_trial(value=value))
        theirs.add_trial(create_trial(state=TrialState.PRUNED, intermediate_values={0: -100.0}))
        assert study.best_trial.number == theirs.best_trial.number and study.best_value == theirs.best_value
    first = study.best_trial.number
    study.add_trial(create_trial(value=study.best_value))  # a tie: the earlier trial stays the best
    assert study.best_trial.number == first


FINISH = """
import sys, warnings
warnings.simplefilter("ignore")
import optuna
from optuna.trial import TrialState
from tuner.store.urls import open_storage
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.load_study(study_name="s", storage=open_storage(sys.argv[1]))
study.tell(int(sys.argv[2]), 7.0)  # by trial number
new = study.ask()
new.report(1.5, 0)
study.tell(new, state=TrialState.PRUNED)
"""


def test_a_trial_finished_by_another_process_becomes_visible(url: str, tmp_path: Path) -> None:
    study = optuna.create_study(study_name="s", storage=open_storage(url))
    study.add_trial(create_trial(value=1.0, intermediate_values={0: 1.0}))
    running = ask(study)
    running.report(0.5, 0)
    judged = ask(study)
    judged.report(0.9, 0)
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE, TrialState.RUNNING, TrialState.RUNNING]
    pruner = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
    frozen = study._storage.get_trial(judged._trial_id)
    assert not pruner.prune(study, frozen)  # 0.9 is better than the median of the complete [1.0]

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", FINISH, url, str(running.number)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert pruner.prune(study, frozen)  # ... and worse than the median of [1.0, 0.5]: the cache saw the tell

    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert [(t.number, t.value, t.intermediate_values) for t in complete] == [(0, 1.0, {0: 1.0}), (1, 7.0, {0: 0.5})]
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert [(t.number, t.intermediate_values) for t in pruned] == [(3, {0: 1.5})]  # made there
    assert study._storage.get_trial(running._trial_id).state == TrialState.COMPLETE


def test_reports_write_only_running_trials_and_read_back_exactly(url: str) -> None:
    storage = open_storage(url)
    study = optuna.create_study(storage=storage)
    trial = ask(study)
    for step, value in enumerate([1.25, math.nan, math.inf, -math.inf]):
        storage.set_trial_intermediate_value(trial._trial_id, step, value)
    storage.set_trial_intermediate_value(trial._trial_id, 0, 2.5)  # a repeated step overwrites (retry-safe)
    if storage.engine.dialect.name == "postgresql":  # a report's asynchronous commit is its own: tells stay synchronous
        assert storage._execute(lambda db: db.exec_driver_sql("SHOW synchronous_commit").scalar()) == "on"
    values = storage.get_trial(trial._trial_id).intermediate_values
    assert values[0] == 2.5 and math.isnan(values[1]) and values[2] == math.inf and values[3] == -math.inf
    assert plain(url).get_trial(trial._trial_id).intermediate_values.keys() == {0, 1, 2, 3}
    assert storage.get_trial_system_attrs(trial._trial_id) == {}
    storage.set_trial_system_attr(trial._trial_id, "completed_rung_0", 2.5)
    assert storage.get_trial_system_attrs(trial._trial_id) == {"completed_rung_0": 2.5}
    study.tell(trial, 1.0)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        storage.set_trial_intermediate_value(trial._trial_id, 4, 1.0)
    assert storage.get_trial(trial._trial_id).intermediate_values.keys() == {0, 1, 2, 3}
    with pytest.raises(KeyError):
        storage.set_trial_intermediate_value(10_000, 0, 1.0)
    with pytest.raises(KeyError):
        storage.get_trial_system_attrs(10_000)


def test_heartbeats_and_stale_trial_retries_go_through_the_cache(url: str) -> None:
    storage = open_storage(url, heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(storage=storage)
    study.add_trial(create_trial(value=1.0))
    dead = ask(study, 0.5)
    dead.report(3.0, 0)
    storage.record_heartbeat(dead._trial_id)
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE, TrialState.RUNNING]  # cached: running
    time.sleep(2.2)  # SQLite's CURRENT_TIMESTAMP has 1 s resolution: past the 1 s grace whatever the rounding
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert trials[2].system_attrs["failed_trial"] == dead.number
    assert trials[2].intermediate_values == {0: 3.0}
    retry = study.ask()
    assert retry.number == trials[2].number and retry.params == {"x": 0.5}


def test_store_calls_of_the_cache_are_retried(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    lines: list[str] = []
    storage = open_storage(url, retry_log=lines.append)
    study = optuna.create_study(storage=storage)
    trial = ask(study)
    study.get_trials()
    real, failures = CachedStorage._execute, [1, 1]

    def drops(self: CachedStorage, statement):  # the connection drops twice (a real driver error), then works
        if failures:
            failures.pop()
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return real(self, statement)

    monkeypatch.setattr(CachedStorage, "_execute", drops)
    assert [t.number for t in study.get_trials(states=(TrialState.RUNNING,))] == [trial.number]
    assert len(lines) == 2 and all("retrying get_all_trials" in line for line in lines)
    assert "server closed the connection unexpectedly" in lines[0]

    failures[:] = [1]  # a report is one statement too
    trial.report(1.0, 0)
    assert "retrying set_trial_intermediate_value" in lines[2]
    assert plain(url).get_trial(trial._trial_id).intermediate_values == {0: 1.0}
