"""The store-outage retry (tuner/retry.py) on a real SQLite store: which errors are retried, a tell
whose commit went through before its connection dropped, a trial finished by someone else, and the
bounded budget. Real outages (a PostgreSQL restart under four workers) are in test_faults.py."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import optuna
import psycopg
import pytest
import sqlalchemy
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from tuner.errors import TunerError
from tuner.store.retry import StorageUnavailableError, is_transient, retry_transient
from tuner.store.urls import open_storage


def dropped(message: str = "server closed the connection unexpectedly") -> optuna.exceptions.StorageInternalError:
    """What Optuna raises when the connection drops under a commit: its wrapper around SQLAlchemy's."""
    wrapped = sqlalchemy.exc.OperationalError("COMMIT", {}, psycopg.OperationalError(message))
    error = optuna.exceptions.StorageInternalError("An exception is raised during the commit.")
    error.__cause__ = wrapped
    return error


def test_transient_errors_are_connection_losses_and_locks_only() -> None:
    assert is_transient(dropped())
    assert is_transient(sqlalchemy.exc.OperationalError("SELECT", {}, sqlite3.OperationalError("database is locked")))
    assert not is_transient(sqlalchemy.exc.OperationalError("SELECT", {}, sqlite3.OperationalError("no such table: x")))
    assert not is_transient(KeyError("no study"))
    try:  # raised while a dropped connection was being handled: not caused by it
        try:
            raise dropped()
        except optuna.exceptions.StorageInternalError:
            raise optuna.exceptions.UpdateFinishedTrialError("finished") from None
    except optuna.exceptions.UpdateFinishedTrialError as finished:
        assert not is_transient(finished)


def test_one_shot_commands_do_not_retry(tmp_path: Path, monkeypatch) -> None:
    study = optuna.create_study(study_name="o", storage=open_storage(f"sqlite:///{tmp_path}/o.db"))
    trial = study.ask()

    def drop(self, trial_id, state, values=None):  # noqa: ANN001, ANN202
        raise dropped()

    monkeypatch.setattr(RDBStorage, "set_trial_state_values", drop)
    with pytest.raises(optuna.exceptions.StorageInternalError):
        study.tell(trial, 1.0)  # a user watching a one-shot command sees the error at once


@pytest.fixture
def store(tmp_path: Path) -> tuple[optuna.Study, list[str], str]:
    """A study in a real SQLite file behind a retrying storage, the list its retry lines, its URL."""
    lines: list[str] = []
    url = f"sqlite:///{tmp_path}/r.db"
    return optuna.create_study(study_name="r", storage=open_storage(url, retry_log=lines.append)), lines, url


def test_a_tell_committed_before_the_connection_dropped_counts_as_done(store, monkeypatch) -> None:
    study, lines, url = store
    trial = study.ask()
    real = RDBStorage.set_trial_state_values
    calls = []

    def commit_then_drop(self, trial_id, state, values=None):  # noqa: ANN001, ANN202
        calls.append(state)
        result = real(self, trial_id, state, values)  # committed ...
        if len(calls) == 1:
            raise dropped()  # ... but the answer never arrived
        return result

    monkeypatch.setattr(RDBStorage, "set_trial_state_values", commit_then_drop)
    study.tell(trial, 1.5)  # the retry finds it COMPLETE with 1.5: done, not an error
    assert calls == [TrialState.COMPLETE, TrialState.COMPLETE]
    frozen = study.get_trials()[0]
    assert frozen.state == TrialState.COMPLETE and frozen.values == [1.5]
    assert len(lines) == 2
    assert lines[0].startswith(f"storage '{url}': cannot connect (server closed the connection unexpectedly)")
    assert "retrying set_trial_state_values" in lines[0] and "already COMPLETE" in lines[1]


def test_a_trial_finished_by_another_worker_during_the_outage_is_not_taken_over(store, monkeypatch) -> None:
    study, lines, url = store
    trial = study.ask()
    real = RDBStorage.set_trial_state_values
    calls = []

    def drop_while_another_worker_fails_it(self, trial_id, state, values=None):  # noqa: ANN001, ANN202
        calls.append(state)
        if len(calls) == 1:
            real(self, trial_id, TrialState.FAIL)  # another worker: failed as stale
            raise dropped()  # our own commit never happened
        return real(self, trial_id, state, values)

    monkeypatch.setattr(RDBStorage, "set_trial_state_values", drop_while_another_worker_fails_it)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        study._storage.set_trial_state_values(trial._trial_id, TrialState.COMPLETE, [1.5])
    assert study.get_trials()[0].state == TrialState.FAIL and len(lines) == 1


def test_a_repeated_report_of_the_same_epoch_is_harmless(store) -> None:
    """What a retried report does when its first write went through: the same step written again."""
    study, lines, url = store
    trial = study.ask()
    for _ in range(2):
        study._storage.set_trial_intermediate_value(trial._trial_id, 1, 3.0)
    assert study.get_trials()[0].intermediate_values == {1: 3.0} and lines == []


def test_an_outage_longer_than_the_budget_ends_in_one_line() -> None:
    lines: list[str] = []

    def never() -> None:
        raise dropped("connection refused")

    with pytest.raises(StorageUnavailableError) as caught:
        retry_transient(never, "record_heartbeat", log=lines.append, describe=lambda e: "storage 'x': down",
                        budget_s=1.0)
    assert isinstance(caught.value, TunerError)  # the CLI prints it as one line, exit 2
    assert str(caught.value) == ("storage 'x': down; gave up on record_heartbeat after 1 s of retries; "
                                 "restart the worker once the store is back")
    assert 2 <= len(lines) <= 4 and all(line.startswith("storage 'x': down; retrying record_heartbeat") for line in lines)


def test_other_errors_are_raised_at_once(store) -> None:
    study, lines, url = store
    with pytest.raises(KeyError):
        study._storage.get_study_id_from_name("no-such-study")
    assert lines == []


def test_the_launchers_table_rides_over_an_outage_and_other_errors_still_raise(tmp_path: Path, monkeypatch) -> None:
    import io

    from rich.console import Console

    from tuner.study import launch
    from tuner.study.spec import parse_study_spec

    spec = parse_study_spec({"study": "outage", "budget": {"trials": 2}})
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 'o.db'}"), study_name="outage")
    real, calls = launch.study_counts, []

    def flaky(s: optuna.Study, error: BaseException = dropped()):
        calls.append(1)
        if len(calls) in (2, 3):  # the store is down for two refreshes
            raise error
        return real(s)

    monkeypatch.setattr(launch, "study_counts", flaky)
    alive = iter([2, 2, 1, 0])
    launch.watch_progress(study, spec, lambda: next(alive), Console(file=io.StringIO()), refresh_s=0)
    assert len(calls) == 5  # start, 3 refreshes while alive, the final one

    calls.clear()
    monkeypatch.setattr(launch, "study_counts", lambda s: flaky(s, KeyError("not an outage")))
    alive = iter([1, 1, 0])
    with pytest.raises(KeyError):
        launch.watch_progress(study, spec, lambda: next(alive), Console(file=io.StringIO()), refresh_s=0)
