"""Many attrs of one trial, user and system, in one store transaction.

Optuna writes each ``trial.set_user_attr`` (and each artifact's and constraint's system attr) in a
transaction of its own, and a finished trial leaves about 30 user attrs (metrics, test metrics,
config, hash, versions, ...) plus its image artifacts and collapse constraint: on SQLite each
commit is a WAL write, on PostgreSQL several round trips, together ~50 ms per trial, the largest
piece of the worker's own work on short trials (``benchmarks/overhead.py``). :func:`set_trial_attrs`
upserts them all in one transaction, one multi-row statement per table on SQLite and PostgreSQL
(other storages, and RDB dialects tuner does not open, get one call per attr).

The upsert is idempotent, so a retry after a dropped connection (:mod:`tuner.store.retry`) writes the
same rows again. The rows are exactly what ``trial.set_user_attr`` / ``set_trial_system_attr``
would have written, so the dashboard, ranking, export and Optuna's samplers read them as before.

What people read and what programs read are apart: the dashboard shows every user attr of a trial
as one unwrapped line (a config, or 32 floats of KL per dim, made the trial page wider than the
window) and no system attr. So a trial's resolved config is the system attr :data:`CONFIG_ATTR`
(read by :func:`trial_config`; people read the ``config.yaml`` artifact beside the trial's images),
and its lists (:data:`SERIES`: KL per latent dim, the multi objective's -ELBO curve) are system
attrs ``tuner:<name>`` (read by :func:`trial_series`); both readers take a study an older tuner
wrote, with these as user attrs.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import RDBStorage
from optuna.storages._rdb import models
from optuna.trial import FrozenTrial

from tuner.store.cache import ON_CONFLICT_INSERT

__all__ = ["CONFIG_ATTR", "SERIES", "set_trial_attrs", "split_series", "trial_config", "trial_series"]

CONFIG_ATTR = "tuner:config"  # trial system attr: the resolved TrainConfig, as a JSON object
_OLD_CONFIG_ATTR = "config"  # the user attr tuner stored it in before


def trial_config(trial: FrozenTrial) -> dict[str, Any] | None:
    """The trial's resolved TrainConfig as stored (a plain mapping for ``parse_config``), or None for
    a trial no tuner worker started; reads the user attr of studies run by an older tuner too."""
    stored = trial.system_attrs.get(CONFIG_ATTR, trial.user_attrs.get(_OLD_CONFIG_ATTR))
    return stored if isinstance(stored, dict) else None


SERIES = ("kl_per_dim", "val_neg_elbo_curve")  # a trial's lists: one value per latent dim, per epoch


def split_series(attrs: dict[str, Any]) -> dict[str, Any]:
    """Take the :data:`SERIES` out of ``attrs`` (a trial's user attrs to be): the system attrs that keep them."""
    return {f"tuner:{name}": attrs.pop(name) for name in SERIES if name in attrs}


def trial_series(trial: FrozenTrial, name: str) -> list[float] | None:
    """One of the trial's :data:`SERIES` (nats), or None where it has none."""
    if name not in SERIES:
        raise ValueError(f"a trial's series are {SERIES}, but got {name=}.")
    return trial.system_attrs.get(f"tuner:{name}", trial.user_attrs.get(name))


def set_trial_attrs(
    trial: optuna.Trial, user: Mapping[str, Any] | None = None, system: Mapping[str, Any] | None = None
) -> None:
    """``trial.set_user_attr(k, v)`` for every item of ``user`` and the storage's
    ``set_trial_system_attr`` for every item of ``system``, in one transaction where the store allows it."""
    user, system = dict(user or {}), dict(system or {})
    if not user and not system:
        return
    storage = trial.storage
    backend = getattr(storage, "_backend", storage)  # tuner's CachedStorage writes through to it
    if not isinstance(backend, RDBStorage) or backend.engine.dialect.name not in ON_CONFLICT_INSERT:
        for key, value in user.items():
            trial.set_user_attr(key, value)
        for key, value in system.items():
            storage.set_trial_system_attr(trial._trial_id, key, value)
        return
    # a value that is not JSON fails here, before any write
    rows = {"user": {k: json.dumps(v) for k, v in user.items()},
            "system": {k: json.dumps(v) for k, v in system.items()}}

    def write() -> None:
        _upsert(backend, trial._trial_id, rows)

    retry: Callable[[Callable[[], None], str], None] | None = getattr(backend, "_retry", None)
    if retry is not None:
        retry(write, f"trial {trial.number}: attrs")
    else:
        write()
    trial._cached_frozen_trial.user_attrs.update(user)
    trial._cached_frozen_trial.system_attrs.update(system)
    written = getattr(storage, "attrs_written", None)  # CachedStorage: its copy of the running trial
    if written is not None:
        written(trial._trial_id, user=user, system=system)


def _upsert(storage: RDBStorage, trial_id: int, rows: dict[str, dict[str, str]]) -> None:
    # Optuna's tables and its finished-trial check; core statements, not an ORM session
    trials = models.TrialModel.__table__
    with storage.engine.begin() as db:
        state = db.execute(sqlalchemy.select(trials.c.state).where(trials.c.trial_id == trial_id)).scalar_one_or_none()
        if state is None:
            raise KeyError(f"No trial with trial_id {trial_id} exists.")
        storage.check_trial_is_updatable(trial_id, state)  # a finished trial is immutable
        for kind, values in rows.items():
            if values:
                db.execute(_upsert_statement(db.dialect.name, kind),
                           [{"trial_id": trial_id, "key": key, "value_json": value} for key, value in values.items()])


@functools.cache
def _upsert_statement(dialect: str, kind: str) -> Any:
    """One attr's upsert with bound values, built (and compiled) once, run for many rows (executemany)."""
    table = {"user": models.TrialUserAttributeModel, "system": models.TrialSystemAttributeModel}[kind].__table__
    stmt = ON_CONFLICT_INSERT[dialect](table).values(
        trial_id=sqlalchemy.bindparam("trial_id"), key=sqlalchemy.bindparam("key"),
        value_json=sqlalchemy.bindparam("value_json"))
    return stmt.on_conflict_do_update(index_elements=[table.c.trial_id, table.c.key],
                                      set_={"value_json": stmt.excluded.value_json})
