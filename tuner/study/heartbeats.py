"""A worker's heartbeats: one thread beating for every trial it holds.

Optuna fails a trial as stale when its heartbeat is older than the grace period; it beats only
inside ``study.optimize``. A worker using ask/tell beats itself, on a thread of its own, so that a
long epoch, a long evaluation or a slow store call elsewhere never makes a live trial look dead.
"""

from __future__ import annotations

import threading

import optuna

__all__ = ["Heartbeats"]


class Heartbeats:
    """One thread recording heartbeats for every trial this worker holds (epochs may be long)."""

    def __init__(self, storage: optuna.storages.BaseStorage) -> None:
        self._storage, self._ids, self._lock = storage, set(), threading.Lock()
        self._stop = threading.Event()
        self._interval = storage.get_heartbeat_interval() or 60
        self._thread = threading.Thread(target=self._run, name="tuner-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeats:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def add(self, trial_id: int) -> None:
        with self._lock:
            self._ids.add(trial_id)
        self._storage.record_heartbeat(trial_id)

    def discard(self, trial_id: int) -> None:
        with self._lock:
            self._ids.discard(trial_id)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                ids = list(self._ids)
            for trial_id in ids:
                try:
                    self._storage.record_heartbeat(trial_id)
                except Exception:  # noqa: BLE001 - a missed beat is retried next interval; the grace period covers it
                    pass
