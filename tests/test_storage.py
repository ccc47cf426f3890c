"""tuner.store.urls on real SQLite files, real worker processes and a real PostgreSQL server."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
import warnings
from pathlib import Path

import optuna
import pytest
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.trial import TrialState

from tuner.errors import TunerError
from tuner.store.urls import DEFAULT_URL, check_storage, mask_secrets, mask_url, open_storage

REPO = Path(__file__).resolve().parents[1]


def quiet_study(storage, name: str = "s", **kwargs) -> optuna.Study:
    """create_study without Optuna's info logs."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(study_name=name, storage=storage, **kwargs)


def ask(study: optuna.Study) -> optuna.Trial:
    """study.ask() minus Optuna's "heartbeat is supposed to be used with optimize" UserWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return study.ask()


def fail_stale(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def entries(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---- masking -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql+psycopg://user:secret@db.example:5432/tuner",
         "postgresql+psycopg://user:***@db.example:5432/tuner"),
        ("postgresql://user:secret@db.example/tuner", "postgresql://user:***@db.example/tuner"),
        ("postgresql://user:s%40c%3Ar%2Fet@host/db", "postgresql://user:***@host/db"),  # @ : / encoded
        ("postgresql+psycopg://user@host:5432/db", "postgresql+psycopg://user@host:5432/db"),
        ("sqlite:///storage/tuner.db", "sqlite:///storage/tuner.db"),
        ("sqlite:////abs/path with space/t.db", "sqlite:////abs/path with space/t.db"),
        # garbage still comes out masked: everything between 'user:' and the last '@'
        ("postgresql://user:sec@ret@host/db", "postgresql://user:***@host/db"),
        ("user:secret@host", "user:***@host"),
        ("://:secret@", "://:***@"),
        ("nonsense", "nonsense"),
        ("", ""),
    ],
)
def test_mask_url_hides_the_password(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_mask_secrets_replaces_raw_and_decoded_password_and_the_url() -> None:
    url = "postgresql+psycopg://tuner:p%40ssw0rd!@db:5432/studies"
    text = f"could not connect to {url}: auth for p@ssw0rd! (typed as p%40ssw0rd!) failed"
    out = mask_secrets(text, url)
    assert out == (
        "could not connect to postgresql+psycopg://tuner:***@db:5432/studies: "
        "auth for *** (typed as ***) failed"
    )
    assert mask_secrets("no password here", "sqlite:///x.db") == "no password here"


# ---- SQLite --------------------------------------------------------------------------------------


def test_default_url_is_a_relative_sqlite_file() -> None:
    assert DEFAULT_URL == "sqlite:///storage/tuner.db"


def test_open_sqlite_creates_folder_wal_file_and_a_working_study(tmp_path: Path) -> None:
    path = tmp_path / "new" / "deeper" / "tuner.db"
    url = f"sqlite:///{path}"
    check_storage(url)
    assert entries(tmp_path) == []  # check_storage creates nothing

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        storage = open_storage(url)
    assert [w for w in caught if issubclass(w.category, optuna.exceptions.ExperimentalWarning)] == []

    study = quiet_study(storage, direction="minimize")
    trial = ask(study)
    trial.report(2.5, step=0)
    study.tell(trial, 1.25)
    reloaded = optuna.load_study(study_name="s", storage=open_storage(url))
    assert reloaded.best_value == 1.25
    assert reloaded.trials[0].intermediate_values == {0: 2.5}

    with sqlite3.connect(path) as fresh:  # WAL is a property of the file, seen by any connection
        assert fresh.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert storage.engine_kwargs["connect_args"] == {"timeout": 60}
    assert is_heartbeat_enabled(storage) and storage.get_heartbeat_interval() == 10
    assert storage.grace_period == 30
    assert not is_heartbeat_enabled(open_storage(url, heartbeat_interval=None))
    check_storage(url)  # an existing database passes too


def test_stale_trial_is_failed_and_requeued_with_its_history(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 't.db'}", heartbeat_interval=1, grace_period=1)
    study = quiet_study(storage)
    dead = ask(study)
    dead.suggest_float("lr", 1e-4, 1e-2, log=True)
    dead.report(3.0, step=0)
    dead.report(2.0, step=1)
    storage.record_heartbeat(dead._trial_id)  # one beat, then the "worker" dies
    silent = ask(study)  # never beat: Optuna cannot tell it from a trial that has not started
    # SQLite's CURRENT_TIMESTAMP has 1 s resolution: 2.2 s is > 1 s grace whatever the rounding.
    time.sleep(2.2)
    fail_stale(study)

    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING]
    assert trials[1].number == silent.number
    retry = trials[2]
    assert retry.system_attrs["failed_trial"] == dead.number == 0
    assert retry.system_attrs["retry_history"] == [0]
    assert retry.params == trials[0].params
    assert retry.intermediate_values == {0: 3.0, 1: 2.0}  # inherit_intermediate_values=True
    assert ask(study).number == retry.number  # the next ask picks the re-queued trial up


WORKER = """
import sys, warnings
warnings.simplefilter("ignore")
import optuna
from tuner.store.urls import open_storage
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.load_study(study_name="shared", storage=open_storage(sys.argv[1]))
for _ in range(int(sys.argv[2])):
    trial = study.ask()
    x = trial.suggest_float("x", -1.0, 1.0)
    trial.report(x * x, step=0)
    study.tell(trial, x * x)
"""


def test_four_processes_write_one_sqlite_file_without_errors(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    quiet_study(open_storage(url), name="shared")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, url, "25"], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert results == [(0, "")] * 4

    trials = optuna.load_study(study_name="shared", storage=open_storage(url)).trials
    assert sorted(t.number for t in trials) == list(range(100))
    assert {t.state for t in trials} == {TrialState.COMPLETE}
    assert all(t.value == t.intermediate_values[0] == t.params["x"] * t.params["x"] for t in trials)


OPEN_AT = """
import sys, time
import optuna
from tuner.store.urls import open_storage
url, at = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, at - time.time()))  # every process imported, then all open the new store together
optuna.logging.set_verbosity(optuna.logging.WARNING)
optuna.create_study(study_name="s", storage=open_storage(url), load_if_exists=True)
print("ok")
"""


def open_new_store_at_once(url: str, cwd: Path, processes: int = 4) -> list[tuple[int, str, str]]:
    """``processes`` real processes opening the same brand-new store in the same instant."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    at = time.time() + 6.0  # after every interpreter has imported optuna (~2 s each on 2 cores)
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_AT, url, str(at)], cwd=cwd, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(processes)]
    return [(p.wait(timeout=120), *p.communicate()) for p in procs]


def test_processes_creating_one_new_sqlite_store_at_once_all_open_it(tmp_path: Path) -> None:
    # Optuna creates the tables and stamps the schema version without a lock: without a retry
    # the losers of that race die with "table ... already exists" or a unique-key violation.
    for round_ in range(3):
        url = f"sqlite:///{tmp_path / f'new-{round_}.db'}"
        assert open_new_store_at_once(url, tmp_path) == [(0, "ok\n", "")] * 4
        assert optuna.get_all_study_names(open_storage(url)) == ["s"]


def test_processes_creating_one_new_postgres_store_at_once_all_open_it(pg_url: str, tmp_path: Path) -> None:
    assert open_new_store_at_once(pg_url, tmp_path) == [(0, "ok\n", "")] * 4
    assert optuna.get_all_study_names(open_storage(pg_url)) == ["s"]


def test_readers_are_not_blocked_by_a_writer_holding_the_lock(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 't.db'}"
    study = quiet_study(open_storage(url))
    study.enqueue_trial({"x": 1.0})
    writer = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    writer.execute("BEGIN EXCLUSIVE")  # without WAL this blocks every reader for the busy timeout
    try:
        start = time.perf_counter()
        trials = optuna.load_study(study_name="s", storage=open_storage(url)).trials
        assert time.perf_counter() - start < 5.0
        assert [t.state for t in trials] == [TrialState.WAITING]
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_bad_sqlite_paths_raise_and_create_nothing(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "notes.db").write_text("not a database either")
    (tmp_path / "folder.db").mkdir()
    before = entries(tmp_path)
    cases = {
        f"sqlite:///{tmp_path / 'afile' / 'sub' / 't.db'}": "not a writable folder",
        f"sqlite:///{tmp_path / 'notes.db'}": "is not a SQLite database",
        f"sqlite:///{tmp_path / 'folder.db'}": "is a folder",
    }
    for url, cause in cases.items():
        with pytest.raises(TunerError, match=cause) as info:
            check_storage(url)
        assert str(info.value).startswith(f"storage '{url}': ") and "\n" not in str(info.value)
    with pytest.raises(TunerError, match=r"cannot create folder .*afile.* \(a file has that name\)"):
        open_storage(f"sqlite:///{tmp_path / 'afile' / 'sub' / 't.db'}")
    with pytest.raises(TunerError, match="is not a SQLite database"):
        open_storage(f"sqlite:///{tmp_path / 'notes.db'}")
    assert entries(tmp_path) == before
    assert (tmp_path / "notes.db").read_text() == "not a database either"


@pytest.mark.parametrize(
    "url",
    [
        "mysql://x",
        "nonsense",
        "sqlite://",
        "sqlite:///:memory:",
        "sqlite://host/t.db",
        "postgresql+psycopg2://u:secret@127.0.0.1/db",
        "postgresql+psycopg://u:secret@127.0.0.1:notaport/db",
        "postgresql+psycopg://u:secret@127.0.0.1:5432/",  # no database
        "postgresql+psycopg://u:sec@ret@127.0.0.1:5432/db",  # unescaped '@'
        "postgresql+psycopg://u:secret@127.0.0.1:1/db",  # valid, nobody listening
    ],
)
def test_bad_urls_raise_one_line_without_the_password(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for call in (check_storage, open_storage):
        with pytest.raises(TunerError) as info:
            call(url)
        message = str(info.value)
        assert "\n" not in message and "secret" not in message and "ret@" not in message
        assert f"'{mask_url(url)}'" in message
    assert entries(tmp_path) == []


def test_bad_heartbeat_settings_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(TunerError, match="grace_period must be a positive number .* but got 0"):
        open_storage(f"sqlite:///{tmp_path / 't.db'}", grace_period=0)
    assert entries(tmp_path) == []


# ---- PostgreSQL ----------------------------------------------------------------------------------


def test_postgres_round_trip_and_stale_trial_retry(pg_url: str) -> None:
    check_storage(pg_url)
    storage = open_storage(pg_url, heartbeat_interval=1, grace_period=1)
    try:
        assert storage.engine.url.drivername == "postgresql+psycopg"
        assert storage.engine.pool.size() == 2 and storage.engine_kwargs["max_overflow"] == 4
        assert storage.engine_kwargs["pool_pre_ping"] is True
        study = quiet_study(storage, direction="maximize")
        trial = ask(study)
        trial.suggest_int("latent", 2, 64)
        trial.report(0.5, step=3)
        study.tell(trial, 0.75)

        dead = ask(study)
        storage.record_heartbeat(dead._trial_id)
        time.sleep(1.5)  # PostgreSQL's now() has microseconds: just past the 1 s grace
        fail_stale(study)

        # postgresql:// is accepted and pointed at psycopg 3
        other = open_storage(pg_url.replace("postgresql+psycopg://", "postgresql://"))
        loaded = optuna.load_study(study_name="s", storage=other)
        assert loaded.best_value == 0.75
        assert loaded.best_trial.intermediate_values == {3: 0.5}
        assert [t.state for t in loaded.trials] == [
            TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
        assert loaded.trials[2].system_attrs["failed_trial"] == 1
        other.engine.dispose()
    finally:
        storage.engine.dispose()


def test_postgres_unreachable_port_is_one_line_without_password() -> None:
    url = "postgresql+psycopg://tuner:hunter2@127.0.0.1:1/studies"
    for call in (check_storage, open_storage):
        with pytest.raises(TunerError) as info:
            call(url)
        assert str(info.value) == (
            "storage 'postgresql+psycopg://tuner:***@127.0.0.1:1/studies': cannot reach PostgreSQL "
            "at 127.0.0.1:1 (connection refused); check host/port or start the server"
        )
        assert info.value.__cause__ is None and info.value.__suppress_context__


def test_postgres_unknown_database_and_user_are_named(pg_url: str) -> None:
    missing = pg_url.rsplit("/", 1)[0] + "/no_such_db_for_tuner"
    with pytest.raises(TunerError, match="database 'no_such_db_for_tuner' does not exist at "
                                         "127.0.0.1:5432; create it"):
        check_storage(missing)
    stranger = pg_url.replace("postgres@", "nobody_here:topsecret@")
    for call in (check_storage, open_storage):
        with pytest.raises(TunerError, match="user 'nobody_here' does not exist") as info:
            call(stranger)
        assert "topsecret" not in str(info.value) and "nobody_here:***@" in str(info.value)
