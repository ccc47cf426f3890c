"""A per-process trial cache in front of Optuna's RDBStorage: the per-epoch cost stays flat as a study grows.

Every epoch a worker reports a value and asks ``should_prune``, and the pruner reads the study's
trials (``study.get_trials``). Optuna wraps an RDBStorage in its own ``_CachedStorage``, which keeps
finished trials in memory but, on every read, re-loads every unfinished trial of the study with all
its params, attrs and intermediate values (6 queries) whatever states were asked for, checks that the
study exists (1 more), and then sorts and filters every cached trial in Python. The Hyperband pruner
also re-reads the running trial whole (6 queries) to look at its rung attrs, and looks the study's id
up by name on every call. :class:`CachedStorage` does the same job with fewer round trips:

* one light query per read (``trial_id, state`` of the trials that are new or were unfinished at the
  last read); a trial's full rows are loaded when it first shows up finished (then it is immutable
  and kept) or when the caller asked for its (unfinished) state: the median pruner asks for complete
  trials only and so never re-loads the running ones;
* finished trials are kept in ``number`` order per state, so a read copies a list instead of
  sorting the whole study;
* a running trial's system attrs are one query on their own table; study ids, names and directions
  (immutable) are looked up once;
* a report is one upsert (Optuna: find the trial, find the value, insert) whose PostgreSQL commit
  does not wait for the WAL flush (that fsync was most of a report's time).

Everything else (tell, attrs, heartbeats, stale-trial checks, best trial) goes to the RDBStorage as
it is, so a retrying backend (:mod:`tuner.retry`) retries those; the statements of this module go
through the ``retry`` callable given here. Attributes this class does not define (``engine``,
``grace_period``, ...) are the backend's. Measured by ``benchmarks/storage_scale.py``.
"""

from __future__ import annotations

import bisect
import copy
import json
import threading
from collections.abc import Callable, Container, Sequence
from typing import Any, TypeVar

import sqlalchemy
import sqlalchemy.dialects.postgresql
import sqlalchemy.dialects.sqlite
from optuna import distributions
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages._rdb import models
from optuna.study import StudyDirection
from optuna.study._frozen import FrozenStudy
from optuna.trial import FrozenTrial, TrialState

__all__ = ["CachedStorage"]

T = TypeVar("T")
Retry = Callable[[Callable[[], Any], str], Any]  # retry(call, what) -> call()'s result

_FINISHED = tuple(s for s in TrialState if s.is_finished())
_TRIALS = models.TrialModel.__table__
_SYSTEM_ATTRS = models.TrialSystemAttributeModel.__table__
_VALUES = models.TrialIntermediateValueModel.__table__


def _dialect_insert(engine: sqlalchemy.Engine) -> Any:
    """The INSERT with ON CONFLICT of the engine's dialect (the two tuner supports)."""
    if engine.dialect.name == "postgresql":
        return sqlalchemy.dialects.postgresql.insert
    return sqlalchemy.dialects.sqlite.insert


def _once(call: Callable[[], T], what: str) -> T:
    return call()


class _Study:
    """What one process knows of one study's trials."""

    def __init__(self) -> None:
        self.finished: list[FrozenTrial] = []  # every finished trial, by number
        self.by_state: dict[TrialState, list[FrozenTrial]] = {s: [] for s in _FINISHED}  # each by number
        self.finished_ids: set[int] = set()
        self.pending_ids: set[int] = set()  # seen, not cached as finished (running, waiting, or not loaded yet)
        self.seen_up_to = -1  # the largest finished trial_id read: every trial below is cached or pending
        self.checked = False  # the study's existence was checked (Optuna raises KeyError for a missing one)

    def add_finished(self, trial: FrozenTrial) -> None:
        self.finished_ids.add(trial._trial_id)
        self.pending_ids.discard(trial._trial_id)
        for ordered in (self.finished, self.by_state[trial.state]):
            if ordered and ordered[-1].number > trial.number:  # trials mostly finish in order: append
                bisect.insort(ordered, trial, key=lambda t: t.number)
            else:
                ordered.append(trial)


class CachedStorage(BaseStorage, BaseHeartbeat):
    """``backend`` (an RDBStorage) with finished trials cached in memory; see the module doc.

    retry(call, what): runs this class's own queries (the backend retries its own); None: once.
    """

    def __init__(self, backend: RDBStorage, retry: Retry | None = None) -> None:
        self._backend = backend
        self._retry: Retry = retry or _once
        self._lock = threading.RLock()
        self._studies: dict[int, _Study] = {}
        self._ids: dict[str, int] = {}  # study name -> id
        self._names: dict[int, str] = {}
        self._directions: dict[int, list[StudyDirection]] = {}
        self._finished: dict[int, FrozenTrial] = {}  # trial_id -> finished trial, any study
        self._param_distributions: dict[tuple[int, str], distributions.BaseDistribution] = {}
        self._trial_study: dict[int, int] = {}  # trial_id -> study_id, for trials this process made

    @property
    def backend(self) -> RDBStorage:
        """The RDBStorage behind the cache, for tools that want Optuna's own class (the dashboard
        sorts studies and offers schema migration only for an RDBStorage) and read, not train."""
        return self._backend

    def __getattr__(self, name: str) -> Any:
        # only called for names this class lacks: engine, url, grace_period, engine_kwargs, ...
        if name.startswith("__") or name == "_backend":
            raise AttributeError(name)
        return getattr(self._backend, name)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    # ------------------------------------------------------------------------------- studies
    def create_new_study(self, directions: Sequence[StudyDirection], study_name: str | None = None) -> int:
        return self._backend.create_new_study(directions, study_name)

    def delete_study(self, study_id: int) -> None:
        self._backend.delete_study(study_id)
        with self._lock:
            study = self._studies.pop(study_id, None)
            for trial in study.finished if study else []:
                self._finished.pop(trial._trial_id, None)
            name = self._names.pop(study_id, None)
            self._ids.pop(name, None)  # type: ignore[arg-type]
            self._directions.pop(study_id, None)

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self._backend.set_study_user_attr(study_id, key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self._backend.set_study_system_attr(study_id, key, value)

    def get_study_id_from_name(self, study_name: str) -> int:
        # the Hyperband pruner builds a study object (so: this lookup) on every should_prune
        if study_name not in self._ids:
            study_id = self._backend.get_study_id_from_name(study_name)
            self._ids[study_name], self._names[study_id] = study_id, study_name
        return self._ids[study_name]

    def get_study_name_from_id(self, study_id: int) -> str:
        if study_id not in self._names:
            self._names[study_id] = self._backend.get_study_name_from_id(study_id)
        return self._names[study_id]

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        if study_id not in self._directions:
            self._directions[study_id] = self._backend.get_study_directions(study_id)
        return self._directions[study_id]

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self._backend.get_study_user_attrs(study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self._backend.get_study_system_attrs(study_id)

    def get_all_studies(self) -> list[FrozenStudy]:
        return self._backend.get_all_studies()

    # --------------------------------------------------------------------------- trial writes
    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        trial = self._backend._create_new_trial(study_id, template_trial)
        with self._lock:
            self._trial_study[trial._trial_id] = study_id
            if trial.state.is_finished():  # add_trials of finished trials: read back at the next refresh
                return trial._trial_id
            self._study(study_id).pending_ids.add(trial._trial_id)
        return trial._trial_id

    def set_trial_param(
        self, trial_id: int, param_name: str, param_value_internal: float, distribution: distributions.BaseDistribution
    ) -> None:
        # a param's distribution is checked against the study's once per process, not on every suggest
        key = (self._trial_study.get(trial_id, -1), param_name)
        known = self._param_distributions.get(key) if key[0] >= 0 else None
        self._backend._set_trial_param(trial_id, param_name, param_value_internal, distribution, known)
        if key[0] >= 0 and known is None:
            self._param_distributions[key] = distribution

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self._backend.get_trial_id_from_study_id_trial_number(study_id, trial_number)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        return self._backend.set_trial_state_values(trial_id, state=state, values=values)

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        """One upsert that writes only while the trial runs (Optuna: find trial, find value, insert)."""
        value, kind = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(intermediate_value)
        columns = _VALUES.c
        source = sqlalchemy.select(
            sqlalchemy.literal(trial_id, type_=columns.trial_id.type),
            sqlalchemy.literal(step, type_=columns.step.type),
            sqlalchemy.literal(value, type_=columns.intermediate_value.type),
            sqlalchemy.literal(kind, type_=columns.intermediate_value_type.type),
        ).where(sqlalchemy.exists().where(_TRIALS.c.trial_id == trial_id, _TRIALS.c.state == TrialState.RUNNING))
        insert = _dialect_insert(self._backend.engine)(_VALUES).from_select(
            ["trial_id", "step", "intermediate_value", "intermediate_value_type"], source)
        upsert = insert.on_conflict_do_update(index_elements=["trial_id", "step"], set_={
            "intermediate_value": insert.excluded.intermediate_value,
            "intermediate_value_type": insert.excluded.intermediate_value_type})
        upsert = upsert.returning(_VALUES.c.step)  # (rowcount of INSERT ... SELECT is -1 under psycopg)
        written = self._retry(lambda: self._write_report(upsert), "set_trial_intermediate_value")
        if not written:  # not running (finished, or no such trial): Optuna's own call raises the right error
            self._backend.set_trial_intermediate_value(trial_id, step, intermediate_value)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._backend.set_trial_user_attr(trial_id, key=key, value=value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._backend.set_trial_system_attr(trial_id, key=key, value=value)

    # ---------------------------------------------------------------------------- trial reads
    def get_trial(self, trial_id: int) -> FrozenTrial:
        with self._lock:
            trial = self._finished.get(trial_id)
        return trial if trial is not None else self._backend.get_trial(trial_id)

    def get_trial_system_attrs(self, trial_id: int) -> dict[str, Any]:
        """A running trial's rung attrs (Hyperband reads them every epoch): one query, not a whole trial."""
        with self._lock:
            trial = self._finished.get(trial_id)
        if trial is not None:
            return trial.system_attrs

        attrs = _SYSTEM_ATTRS.c
        query = (  # the trial's row too: no attrs and no trial are told apart
            sqlalchemy.select(_TRIALS.c.trial_id, attrs.key, attrs.value_json)
            .select_from(_TRIALS.outerjoin(_SYSTEM_ATTRS, attrs.trial_id == _TRIALS.c.trial_id))
            .where(_TRIALS.c.trial_id == trial_id)
        )
        rows = self._retry(lambda: self._execute(lambda db: db.execute(query).all()), "get_trial_system_attrs")
        if not rows:
            raise KeyError(f"No trial with trial_id {trial_id} exists.")
        return {key: json.loads(value) for _, key, value in rows if key is not None}

    def get_all_trials(
        self, study_id: int, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        live = self._refresh(study_id, states)
        with self._lock:
            study = self._studies[study_id]
            if states is None or all(s in states for s in _FINISHED):
                trials = list(study.finished)
            elif sum(s in states for s in _FINISHED) == 1:
                trials = list(next(study.by_state[s] for s in _FINISHED if s in states))
            else:
                trials = [t for t in study.finished if t.state in states]
        for trial in live:  # the few running/waiting trials the caller asked for, into number order
            bisect.insort(trials, trial, key=lambda t: t.number)
        return copy.deepcopy(trials) if deepcopy else trials

    def get_best_trial(self, study_id: int) -> FrozenTrial:
        directions = self.get_study_directions(study_id)
        if len(directions) > 1:
            raise RuntimeError("Best trial can be obtained only for single-objective optimization.")
        return self.get_trial(self._backend._get_best_trial_id(study_id, directions[0]))

    def _write_report(self, upsert: Any) -> list[Any]:
        """The report's upsert in a transaction whose commit does not wait for the WAL flush (an fsync:
        ~5 ms, most of a report). PostgreSQL crashing within ~0.5 s of it may lose the value (never
        the database's consistency); tells and every other write stay synchronous. SQLite: the
        connection already commits without an fsync (:func:`tuner.storage.open_storage`)."""
        with self._backend.engine.begin() as db:
            if db.dialect.name == "postgresql":
                db.exec_driver_sql("SET LOCAL synchronous_commit = off")
            return db.execute(upsert).all()

    def _execute(self, statement: Callable[[sqlalchemy.Connection], T]) -> T:
        """One statement on a pooled connection in autocommit mode: no BEGIN and no ROLLBACK round trips."""
        with self._backend.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as db:
            return statement(db)

    def _study(self, study_id: int) -> _Study:
        if study_id not in self._studies:
            self._studies[study_id] = _Study()
        return self._studies[study_id]

    def _refresh(self, study_id: int, states: Container[TrialState] | None) -> list[FrozenTrial]:
        """Cache the trials finished since the last read; return the unfinished ones in ``states``.

        The watermark is Optuna's: ``seen_up_to`` only passes finished trials, so a trial is missed
        only if its creation commits after a trial with a higher id was created, run and finished.
        """
        with self._lock:
            study = self._study(study_id)
            if not study.checked:  # first read: everything, as Optuna loads it (a missing study: KeyError)
                trials = self._backend._get_trials(study_id, None, set(), -1)
                study.checked = True
                return self._absorb(study, trials, states)
            seen_up_to, pending = study.seen_up_to, set(study.pending_ids)

            # Two primary-key range scans, O(new trials). As one OR, SQLite scans every trial of the
            # study; and PostgreSQL, its statistics stale after a burst of trials, picks the study_id
            # index (every trial of the study, 3 ms at 10,000) unless "study_id + 0" rules it out.
            light = sqlalchemy.select(_TRIALS.c.trial_id, _TRIALS.c.state)
            in_study = _TRIALS.c.study_id + 0 == study_id
            query = sqlalchemy.union_all(
                light.where(_TRIALS.c.trial_id > seen_up_to, in_study),
                light.where(_TRIALS.c.trial_id.in_(pending), in_study),
            )
            rows = self._retry(lambda: self._execute(lambda db: db.execute(query).all()), "get_all_trials")
            study.pending_ids.update(trial_id for trial_id, _ in rows if trial_id not in study.finished_ids)
            wanted = {trial_id for trial_id, state in rows if trial_id not in study.finished_ids and (
                state.is_finished() or states is None or state in states)}
            if not wanted:
                return []
            # the wanted ids, and any trial made since the light query (cached or returned as well)
            trials = self._backend._get_trials(study_id, None, wanted, max(wanted))
            return self._absorb(study, trials, states)

    def _absorb(
        self, study: _Study, trials: list[FrozenTrial], states: Container[TrialState] | None
    ) -> list[FrozenTrial]:
        """Keep the finished ``trials``; return the unfinished ones in ``states``."""
        live = []
        for trial in trials:
            if trial.state.is_finished():
                study.seen_up_to = max(study.seen_up_to, trial._trial_id)
                if trial._trial_id not in study.finished_ids:
                    study.add_finished(trial)
                    self._finished[trial._trial_id] = trial
            else:
                study.pending_ids.add(trial._trial_id)
                if states is None or trial.state in states:
                    live.append(trial)
        return live

    # ------------------------------------------------------------------------------ heartbeats
    def record_heartbeat(self, trial_id: int) -> None:
        self._backend.record_heartbeat(trial_id)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        return self._backend._get_stale_trial_ids(study_id)

    def get_heartbeat_interval(self) -> int | None:
        return self._backend.get_heartbeat_interval()

    def get_heartbeat_stale_trial_callback(self) -> Any:
        return self._backend.get_heartbeat_stale_trial_callback()
