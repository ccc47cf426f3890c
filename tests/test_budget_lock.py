"""budget_lock serializes "budget left?" + ask across workers, on real SQLite and PostgreSQL stores."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import optuna
import pytest

from tuner.store.budget_lock import budget_lock
from tuner.store.urls import open_storage


@pytest.fixture(params=["sqlite", "postgres"])
def url(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'lock.db'}"
    return request.getfixturevalue("pg_url")


def test_a_second_worker_waits_for_the_first(url: str) -> None:
    first, second = open_storage(url), open_storage(url)  # two workers: their own engines and connections
    inside, events = threading.Event(), []

    def hold() -> None:
        with budget_lock(first, "s"):
            events.append(("first in", time.monotonic()))
            inside.set()
            time.sleep(0.6)
            events.append(("first out", time.monotonic()))

    holder = threading.Thread(target=hold)
    holder.start()
    inside.wait(10)
    start = time.monotonic()
    if url.startswith("postgresql"):
        with budget_lock(second, "other-study"):
            assert time.monotonic() - start < 0.3  # another study's lock is another lock
    with budget_lock(second, "s"):
        events.append(("second in", time.monotonic()))
    holder.join()
    assert [e[0] for e in events] == ["first in", "first out", "second in"]
    with budget_lock(first, "s"):  # released: taken again at once
        pass


def test_stores_without_an_engine_get_no_lock() -> None:
    with budget_lock(optuna.storages.InMemoryStorage(), "s"):
        pass
