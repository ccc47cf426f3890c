"""Many user attrs of one trial in one store transaction.

Optuna writes each ``trial.set_user_attr`` in a transaction of its own, and a finished trial leaves
about 30 attrs (metrics, test metrics, config, hash, versions, ...): on SQLite each commit is a
WAL write, on PostgreSQL a round trip, together ~45 ms per trial, the largest piece of the worker's
own work on short trials (``benchmarks/overhead.py``). :func:`set_user_attrs` upserts them all in
one transaction with a single multi-row statement on SQLite and PostgreSQL (other RDB dialects get
Optuna's per-attr upsert inside the same transaction; other storages one call per attr).

The upsert is idempotent, so a retry after a dropped connection (:mod:`tuner.retry`) writes the
same rows again. The names stay flat user attrs, exactly what ``trial.set_user_attr`` would have
written, so the dashboard, ranking and export read them as before.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import optuna
from optuna.storages import RDBStorage

__all__ = ["set_user_attrs"]


def set_user_attrs(trial: optuna.Trial, attrs: Mapping[str, Any]) -> None:
    """``trial.set_user_attr(k, v)`` for every item, in one transaction where the store allows it."""
    if not attrs:
        return
    storage = trial.storage
    backend = getattr(storage, "_backend", storage)  # tuner's CachedStorage writes through to it
    if not isinstance(backend, RDBStorage):
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return
    values = {key: json.dumps(value) for key, value in attrs.items()}  # a bad value fails before any write

    def write() -> None:
        _upsert(backend, trial._trial_id, values)

    retry: Callable[[Callable[[], None], str], None] | None = getattr(backend, "_retry", None)
    if retry is not None:
        retry(write, f"trial {trial.number}: user attrs")
    else:
        write()
    trial._cached_frozen_trial.user_attrs.update(attrs)


def _upsert(storage: RDBStorage, trial_id: int, values: dict[str, str]) -> None:
    # Optuna's own session helper and models: the same commit/rollback and error mapping as its writes
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    table = models.TrialUserAttributeModel
    with _create_scoped_session(storage.scoped_session) as session:
        trial = models.TrialModel.find_or_raise_by_id(trial_id, session)
        storage.check_trial_is_updatable(trial_id, trial.state)  # a finished trial is immutable
        dialect = storage.engine.name
        if dialect in ("sqlite", "postgresql"):
            if dialect == "sqlite":
                from sqlalchemy.dialects.sqlite import insert
            else:
                from sqlalchemy.dialects.postgresql import insert
            stmt = insert(table).values(
                [{"trial_id": trial_id, "key": key, "value_json": value} for key, value in values.items()]
            )
            session.execute(stmt.on_conflict_do_update(
                index_elements=[table.trial_id, table.key], set_={"value_json": stmt.excluded.value_json},
            ))
        else:
            for key, value in values.items():
                storage._set_trial_attr_without_commit(session, table, trial_id, key, json.loads(value))
