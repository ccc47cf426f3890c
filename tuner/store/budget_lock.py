"""One worker at a time between "is there budget left?" and ``study.ask()``.

Without it, workers that check the study's counts at the same moment all see one trial left and
all ask: a 200-trial budget ends with up to 200 + (workers - 1) trials. Optuna cannot delete the
surplus trials afterwards, so the check and the ask are serialized per study instead:

* PostgreSQL (many hosts): a session advisory lock (``pg_advisory_lock``) keyed by the study, held
  on a connection of its own while this worker counts and asks; the ask's own transactions run on
  other connections and commit before the lock is released, so the next worker's count sees them.
  A lost connection releases the lock on the server.
* SQLite (one host): an exclusive ``flock`` on a file beside the database (``DB.budget-lock``),
  one for all the file's studies (the critical section is a few ms). SQLite's own write lock
  cannot be used: the ask's write would wait on it.
* Other stores: no lock (the old, racy behaviour).

The same lock covers failing a trial and enqueueing its retry (a stale-trial check, a worker
handing its trials back): two transactions between which a counting worker would see neither the
trial running nor its retry waiting, and ask a trial too many. The lock covers only these few-ms
steps, never training.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy

__all__ = ["budget_lock", "file_lock"]


def _key(study_name: str) -> int:
    """A stable signed 64-bit advisory-lock key for the study (names are per database)."""
    digest = hashlib.sha256(f"tuner-budget:{study_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _pg_lock(engine: sqlalchemy.Engine, key: int) -> sqlalchemy.Connection:
    conn = engine.connect()
    try:
        conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        conn.commit()  # the lock is the session's, not a transaction's: nothing stays open
    except BaseException:
        conn.close()
        raise
    return conn


@contextlib.contextmanager
def budget_lock(storage: Any, study_name: str) -> Iterator[None]:
    """Hold the study's budget lock for the block (see the module doc for each store)."""
    engine: sqlalchemy.Engine | None = getattr(storage, "engine", None)
    if engine is None:
        yield
        return
    if engine.dialect.name == "postgresql":
        retry = getattr(storage, "_retry", None) or (lambda call, what: call())  # workers ride over outages
        conn = retry(lambda: _pg_lock(engine, _key(study_name)), f"study '{study_name}': budget lock")
        try:
            yield
        finally:
            try:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": _key(study_name)})
                conn.commit()
            except sqlalchemy.exc.DBAPIError:
                pass  # the connection died (a server restart): the server dropped its locks with it
            finally:
                conn.close()
    elif engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        with file_lock(Path(f"{engine.url.database}.budget-lock")):
            yield
    else:
        yield


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing) for one host's processes."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
