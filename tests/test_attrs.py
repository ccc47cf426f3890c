"""set_trial_attrs: one transaction on real SQLite and PostgreSQL, same rows as set_user_attr and
set_trial_system_attr, and the worker's cached copy of the trial in step."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from tuner.store.attrs import CONFIG_ATTR, set_trial_attrs, trial_config
from tuner.store.urls import open_storage

ATTRS = {"iwae_nll": 98.25, "collapsed": False, "config": {"model": {"latent": 16}}, "name": "x'\"{}",
         "curve": [1.5, float("inf")], "none": None}
SYSTEM = {"constraints:collapsed": -1.0, "artifacts:1234": '{"artifact_id": "1234", "filename": "a.png"}'}


@pytest.fixture(params=["sqlite", "postgres"])
def url(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'attrs.db'}"
    return request.getfixturevalue("pg_url")


def _commits(storage) -> list[int]:
    counter = [0]
    sqlalchemy.event.listen(storage.engine, "commit", lambda conn: counter.__setitem__(0, counter[0] + 1))
    return counter


def test_one_transaction_and_the_rows_set_user_attr_writes(url: str) -> None:
    storage = open_storage(url, heartbeat_interval=None, grace_period=None)
    study = optuna.create_study(storage=storage, study_name="attrs")
    ours, theirs = study.ask(), study.ask()
    ours.set_user_attr("iwae_nll", 500.0)  # an existing key is overwritten
    commits = _commits(storage)
    set_trial_attrs(ours, ATTRS)
    assert commits[0] == 1
    for key, value in ATTRS.items():
        theirs.set_user_attr(key, value)
    assert commits[0] == 1 + len(ATTRS)
    assert ours.user_attrs == ATTRS  # the trial's own view, before any re-read
    fresh = open_storage(url, heartbeat_interval=None, grace_period=None)
    stored = {t.number: t.user_attrs for t in fresh.get_all_trials(study._study_id)}
    assert stored[ours.number] == stored[theirs.number] == ATTRS


def test_user_and_system_attrs_in_one_transaction_as_optuna_writes_them(url: str) -> None:
    storage = open_storage(url, heartbeat_interval=None, grace_period=None)
    study = optuna.create_study(storage=storage, study_name="both")
    ours, theirs = study.ask(), study.ask()
    commits = _commits(storage)
    set_trial_attrs(ours, ATTRS, SYSTEM)
    assert commits[0] == 1
    for key, value in ATTRS.items():
        theirs.set_user_attr(key, value)
    for key, value in SYSTEM.items():
        storage.set_trial_system_attr(theirs._trial_id, key, value)
    cached = storage.get_trial(ours._trial_id)  # the worker's copy of its running trial, from memory
    assert (cached.user_attrs, cached.system_attrs) == (ATTRS, SYSTEM)
    assert ours._cached_frozen_trial.system_attrs == SYSTEM  # the trial object's own view, as set_constraint keeps it
    fresh = open_storage(url, heartbeat_interval=None, grace_period=None)
    stored = {t.number: (t.user_attrs, t.system_attrs) for t in fresh.get_all_trials(study._study_id)}
    assert stored[ours.number] == stored[theirs.number] == (ATTRS, SYSTEM)


def test_a_finished_trial_is_refused_and_keeps_its_attrs(url: str) -> None:
    storage = open_storage(url, heartbeat_interval=None, grace_period=None)
    study = optuna.create_study(storage=storage, study_name="done")
    trial = study.ask()
    set_trial_attrs(trial, {"a": 1})
    study.tell(trial, 1.0)
    with pytest.raises(RuntimeError, match="finished"):
        set_trial_attrs(trial, {"a": 2, "b": 3})
    (frozen,) = study.get_trials(states=(TrialState.COMPLETE,))
    assert frozen.user_attrs == {"a": 1}


def test_other_storages_fall_back_to_one_call_per_attr() -> None:
    study = optuna.create_study()  # in-memory
    trial = study.ask()
    set_trial_attrs(trial, ATTRS)
    assert study.trials[0].user_attrs == ATTRS


def test_trial_config_reads_the_system_attr_and_an_older_tuners_user_attr(tmp_path: Path) -> None:
    """The dashboard shows user attrs and not system attrs: the config is a system attr now, and a
    study run by an older tuner (config as the user attr) reads the same."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/c.db", study_name="c")
    config = {"model": {"latent": 16}, "seed": 3}
    new, old, none = study.ask(), study.ask(), study.ask()
    set_trial_attrs(new, {"seed": 3}, {CONFIG_ATTR: config})
    old.set_user_attr("config", config)
    for trial in (new, old, none):
        study.tell(trial, 1.0)
    new, old, none = optuna.load_study(study_name="c", storage=f"sqlite:///{tmp_path}/c.db").trials
    assert "config" not in new.user_attrs and new.system_attrs[CONFIG_ATTR] == config
    assert trial_config(new) == trial_config(old) == config
    assert trial_config(none) is None
