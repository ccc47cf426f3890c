"""A per-process trial cache in front of Optuna's RDBStorage: the per-epoch cost stays flat as a study grows.

Every epoch a worker reports a value and asks ``should_prune``, and the pruner reads the study's
trials (``study.get_trials``). Optuna wraps an RDBStorage in its own ``_CachedStorage``, which keeps
finished trials in memory but, on every read, re-loads every unfinished trial of the study with all
its params, attrs and intermediate values (6 queries) whatever states were asked for, checks that the
study exists (1 more), and then sorts and filters every cached trial in Python. The Hyperband pruner
also re-reads the running trial whole (6 queries) to look at its rung attrs, and looks the study's id
up by name on every call. :class:`CachedStorage` does the same job with fewer round trips:

* one light query per read (``trial_id, state`` of the trials that are new or were unfinished at the
  last read); a trial's full rows are loaded when the caller first asks for its state: once if it is
  finished (then it is immutable and kept), on every such read if it is not. The median pruner asks
  for complete trials only and so never re-loads the running ones; counting trials by state (the
  worker's budget check) loads none;
* finished trials are kept in ``number`` order per state, so a read copies a list instead of
  sorting the whole study;
* another process's running trial's system attrs are one query on their own table; study ids,
  names and directions (immutable) are looked up once;
* a report is one statement in one round trip (Optuna: find the trial, find the value, insert, in a
  transaction) whose PostgreSQL commit does not wait for the WAL flush (that fsync was most of a
  report's time);
* the best trial is kept as finished trials arrive (Optuna sorts the study's values in SQL);
* the trials this process runs are kept too, written through: Optuna reads a running trial whole
  (6 queries) when the trial object is made, twice in ``tell`` and for every constraint, the worker
  once more for its retry history, and every worker's next read loads the trial it just told; those
  reads are answered from memory (the told trial's completion time is read back: one query). Only
  this process writes a trial it runs (its heartbeat keeps others off it), except another worker
  failing it as stale: every write still goes to the store, which refuses a write to a finished
  trial (``UpdateFinishedTrialError``), and the copy is dropped then, so such a trial is never told
  twice. (A write by another process to a trial this one runs, which tuner never makes, would not
  be seen here.)

Everything else (the writes behind tell and attrs, heartbeats, stale-trial checks) goes to the
RDBStorage as it is, so a retrying backend (:mod:`tuner.store.retry`) retries those; the statements of
this module go through the ``retry`` callable given here. Attributes this class does not define (``engine``,
``grace_period``, ...) are the backend's. Measured by ``benchmarks/storage_scale.py``.
"""

from __future__ import annotations

import bisect
import copy
import json
import threading
from collections import Counter
from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import sqlalchemy
import sqlalchemy.dialects.postgresql
import sqlalchemy.dialects.sqlite
from optuna import distributions
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages._rdb import models
from optuna.study import StudyDirection
from optuna.study._frozen import FrozenStudy
from optuna.trial import FrozenTrial, TrialState

__all__ = ["ON_CONFLICT_INSERT", "CachedStorage"]

T = TypeVar("T")
Retry = Callable[[Callable[[], Any], str], Any]  # retry(call, what) -> call()'s result

_FINISHED = tuple(s for s in TrialState if s.is_finished())
_TRIALS = models.TrialModel.__table__
_SYSTEM_ATTRS = models.TrialSystemAttributeModel.__table__
_VALUES = models.TrialIntermediateValueModel.__table__
_TOLD_KEPT = 64  # just-told trials kept until a refresh reads the store's copy


# INSERT .. ON CONFLICT of the two dialects tuner's stores use (also for tuner.store.attrs)
ON_CONFLICT_INSERT = {"sqlite": sqlalchemy.dialects.sqlite.insert, "postgresql": sqlalchemy.dialects.postgresql.insert}


def _once(call: Callable[[], T], what: str) -> T:
    return call()


class _Study:
    """What one process knows of one study's trials."""

    def __init__(self) -> None:
        self.finished: list[FrozenTrial] = []  # every finished trial, by number
        self.by_state: dict[TrialState, list[FrozenTrial]] = {s: [] for s in _FINISHED}  # each by number
        self.finished_ids: set[int] = set()
        self.pending_ids: set[int] = set()  # seen unfinished (running or waiting), or made here and not read yet
        self.live: dict[int, TrialState] = {}  # pending trial_id -> its state at the last read
        self.unloaded: dict[int, TrialState] = {}  # trial_id -> state of a trial seen finished, not loaded yet
        self.seen_up_to = -1  # the largest finished trial_id read: every trial below is cached, unloaded or pending
        self.lowest: FrozenTrial | None = None  # the complete trial with the smallest (single) value, then
        self.highest: FrozenTrial | None = None  # the largest; ties go to the lower number
        self.checked = False  # the study's existence was checked (Optuna raises KeyError for a missing one)

    def add_finished(self, trial: FrozenTrial) -> None:
        self.finished_ids.add(trial._trial_id)
        self.pending_ids.discard(trial._trial_id)
        self.live.pop(trial._trial_id, None)
        self.unloaded.pop(trial._trial_id, None)
        for ordered in (self.finished, self.by_state[trial.state]):
            if ordered and ordered[-1].number > trial.number:  # trials mostly finish in order: append
                bisect.insort(ordered, trial, key=lambda t: t.number)
            else:
                ordered.append(trial)
        if trial.state == TrialState.COMPLETE and trial.values is not None and len(trial.values) == 1:
            key = (trial.values[0], trial.number)
            if self.lowest is None or key < (self.lowest.values[0], self.lowest.number):
                self.lowest = trial
            if self.highest is None or (-key[0], key[1]) < (-self.highest.values[0], self.highest.number):
                self.highest = trial


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
        self._own: dict[int, FrozenTrial] = {}  # trial_id -> a running trial this process holds, written through
        self._told: dict[int, FrozenTrial] = {}  # trial_id -> one this process just finished, until a refresh takes it
        self._report: Any = None  # the report statement (see _report_statement)

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
        state["_report"] = None  # a statement: rebuilt where it is unpickled
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
            if trial.state == TrialState.RUNNING:  # (the store holds exactly this: it was just written)
                self._own[trial._trial_id] = trial
        return trial._trial_id

    def set_trial_param(
        self, trial_id: int, param_name: str, param_value_internal: float, distribution: distributions.BaseDistribution
    ) -> None:
        # a param's distribution is checked against the study's once per process, not on every suggest
        key = (self._trial_study.get(trial_id, -1), param_name)
        known = self._param_distributions.get(key) if key[0] >= 0 else None
        with self._writing(trial_id) as own:
            self._backend._set_trial_param(trial_id, param_name, param_value_internal, distribution, known)
            if own is not None:
                own.params = {**own.params, param_name: distribution.to_external_repr(param_value_internal)}
                own.distributions = {**own.distributions, param_name: distribution}
        if key[0] >= 0 and known is None:
            self._param_distributions[key] = distribution

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self._backend.get_trial_id_from_study_id_trial_number(study_id, trial_number)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        with self._writing(trial_id):
            changed = self._backend.set_trial_state_values(trial_id, state=state, values=values)
        if changed and state == TrialState.RUNNING:  # popped from the queue: it is this process's now
            trial = self._backend.get_trial(trial_id)
            with self._lock:
                self._own[trial_id] = trial
        elif changed and state.is_finished():
            self._finish_own(trial_id, values)
        return changed

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        """One statement (Optuna: find trial, find value, insert, each a round trip) that writes only
        while the trial runs; see :meth:`_report_statement`."""
        value, kind = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(intermediate_value)
        params = {"trial_id": trial_id, "step": step, "value": value, "kind": kind}
        with self._writing(trial_id) as own:
            written = self._retry(
                lambda: self._execute(lambda db: db.execute(self._report_statement(), params).all()),
                "set_trial_intermediate_value")
            if not written:  # not running (finished, or no such trial): Optuna's own call raises the right error
                self._backend.set_trial_intermediate_value(trial_id, step, intermediate_value)
            if own is not None:
                own.intermediate_values = {**own.intermediate_values, step: intermediate_value}

    def count_trials(self, study_id: int) -> dict[TrialState, int]:
        """The study's trials per state, from the light query alone: the finished trials need not
        be loaded (6 queries each) to be counted, as Optuna's ``get_n_trials`` loads them."""
        self._refresh(study_id, (), load=False)
        with self._lock:
            study = self._studies[study_id]
            counts = Counter({state: len(trials) for state, trials in study.by_state.items()})
            counts.update(study.unloaded.values())
            counts.update(study.live[trial_id] for trial_id in study.pending_ids if trial_id in study.live)
        return dict(counts)

    def _report_statement(self) -> Any:
        """The report upsert, built once: ``INSERT .. SELECT`` of the value where the trial is RUNNING,
        ``ON CONFLICT`` overwriting a repeated step (retry-safe), returning the step if written.

        It runs alone in autocommit mode: one round trip. On PostgreSQL its commit does not wait for
        the WAL flush (an fsync: ~5 ms, most of a report): ``set_config(.., is_local)`` switches
        ``synchronous_commit`` off for this statement's own transaction only, so PostgreSQL crashing
        within ~0.5 s of it may lose the value (never the database's consistency); tells and every
        other write stay synchronous. SQLite already commits without an fsync
        (:func:`tuner.store.urls.open_storage`).
        """
        if self._report is None:
            columns = _VALUES.c
            running = sqlalchemy.exists().where(
                _TRIALS.c.trial_id == sqlalchemy.bindparam("trial_id"), _TRIALS.c.state == TrialState.RUNNING)
            condition = running
            if self._backend.engine.dialect.name == "postgresql":
                condition = sqlalchemy.and_(running, sqlalchemy.func.set_config(
                    "synchronous_commit", "off", sqlalchemy.true()).is_not(None))
            source = sqlalchemy.select(
                sqlalchemy.bindparam("trial_id", type_=columns.trial_id.type),
                sqlalchemy.bindparam("step", type_=columns.step.type),
                sqlalchemy.bindparam("value", type_=columns.intermediate_value.type),
                sqlalchemy.bindparam("kind", type_=columns.intermediate_value_type.type),
            ).where(condition)
            insert = ON_CONFLICT_INSERT[self._backend.engine.dialect.name](_VALUES).from_select(
                ["trial_id", "step", "intermediate_value", "intermediate_value_type"], source)
            upsert = insert.on_conflict_do_update(index_elements=["trial_id", "step"], set_={
                "intermediate_value": insert.excluded.intermediate_value,
                "intermediate_value_type": insert.excluded.intermediate_value_type})
            self._report = upsert.returning(_VALUES.c.step)  # (rowcount of INSERT ... SELECT is -1 under psycopg)
        return self._report

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        with self._writing(trial_id):
            self._backend.set_trial_user_attr(trial_id, key=key, value=value)
        self.attrs_written(trial_id, user={key: value})

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        with self._writing(trial_id):
            self._backend.set_trial_system_attr(trial_id, key=key, value=value)
        self.attrs_written(trial_id, system={key: value})

    def attrs_written(
        self, trial_id: int, user: Mapping[str, Any] | None = None, system: Mapping[str, Any] | None = None
    ) -> None:
        """Keep the copy of a trial this process runs in step with attrs written to the store
        (here, or in one transaction by :func:`tuner.store.attrs.set_trial_attrs`)."""
        with self._lock:
            own = self._own.get(trial_id)
            if own is not None:
                own.user_attrs = {**own.user_attrs, **copy.deepcopy(dict(user or {}))}
                own.system_attrs = {**own.system_attrs, **copy.deepcopy(dict(system or {}))}

    @contextmanager
    def _writing(self, trial_id: int) -> Iterator[FrozenTrial | None]:
        """A write to a trial: yields this process's copy of it (None if it runs elsewhere); a store
        that refuses the write because the trial finished elsewhere drops the copy."""
        try:
            with self._lock:
                own = self._own.get(trial_id)
            yield own
        except UpdateFinishedTrialError:
            with self._lock:
                self._own.pop(trial_id, None)
            raise

    def _finish_own(self, trial_id: int, values: Sequence[float] | None) -> None:
        """A trial this process ran was told: keep it as told (its row read back for the store's
        completion time); Optuna's tell reads it at once, and the next refresh caches it as finished."""
        with self._lock:
            own = self._own.pop(trial_id, None)
        if own is None:
            return
        query = sqlalchemy.select(_TRIALS.c.state, _TRIALS.c.datetime_complete).where(_TRIALS.c.trial_id == trial_id)
        rows = self._retry(lambda: self._execute(lambda db: db.execute(query).all()), "get_trial")
        with self._lock:
            own.state, own.datetime_complete = rows[0]
            own.values = None if values is None else [float(v) for v in values]
            self._told[trial_id] = own
            while len(self._told) > _TOLD_KEPT:  # a process that never reads the study again
                del self._told[next(iter(self._told))]

    # ---------------------------------------------------------------------------- trial reads
    def get_trial(self, trial_id: int) -> FrozenTrial:
        with self._lock:
            trial = self._finished.get(trial_id)
            if trial is None:  # a copy: callers (optuna.Trial) change what they get
                mine = self._own.get(trial_id) or self._told.get(trial_id)
                trial = copy.deepcopy(mine) if mine is not None else None
        return trial if trial is not None else self._backend.get_trial(trial_id)

    def get_trial_system_attrs(self, trial_id: int) -> dict[str, Any]:
        """A running trial's rung attrs (Hyperband reads them every epoch): one query, not a whole trial."""
        with self._lock:
            trial = self._finished.get(trial_id) or self._own.get(trial_id)
            if trial is not None:
                return copy.deepcopy(trial.system_attrs)

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
        """The complete trial with the best value, from the cache (kept as trials arrive): no query
        past the refresh, where Optuna sorts the study's values in SQL on every call."""
        directions = self.get_study_directions(study_id)
        if len(directions) > 1:
            raise RuntimeError("Best trial can be obtained only for single-objective optimization.")
        self._refresh(study_id, (TrialState.COMPLETE,))
        with self._lock:
            study = self._studies[study_id]
            best = study.lowest if directions[0] == StudyDirection.MINIMIZE else study.highest
        if best is None:
            raise ValueError("Record does not exist.")  # Optuna's words: Study.best_trial turns it into its own
        return best

    def _execute(self, statement: Callable[[sqlalchemy.Connection], T]) -> T:
        """One statement on a pooled connection in autocommit mode: no BEGIN and no ROLLBACK round trips."""
        with self._backend.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as db:
            return statement(db)

    def _study(self, study_id: int) -> _Study:
        if study_id not in self._studies:
            self._studies[study_id] = _Study()
        return self._studies[study_id]

    def _refresh(self, study_id: int, states: Container[TrialState] | None, load: bool = True) -> list[FrozenTrial]:
        """Cache the trials finished since the last read; return the unfinished ones in ``states``.

        A finished trial is loaded (whole, then kept) by the first read that asks for its state:
        Optuna's ``ask`` reads the waiting trials only and loads none. ``load=False`` runs the light
        query alone, keeping the states of new and unfinished trials (for :meth:`count_trials`).
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
            for trial_id, state in rows:
                if trial_id in study.finished_ids:
                    continue
                told = self._told.pop(trial_id, None)
                if told is not None and told.state == state:  # told here: this process's copy is the store's
                    study.seen_up_to = max(study.seen_up_to, trial_id)
                    study.add_finished(told)
                    self._finished[trial_id] = told
                elif state.is_finished():  # immutable from now on: loaded once, by the first read asking for it
                    self._own.pop(trial_id, None)  # finished by another process (a stale-trial check)
                    study.unloaded[trial_id] = state
                    study.pending_ids.discard(trial_id)
                    study.live.pop(trial_id, None)
                    study.seen_up_to = max(study.seen_up_to, trial_id)
                else:
                    study.pending_ids.add(trial_id)
                    study.live[trial_id] = state
            if not load:
                return []
            wanted = {trial_id for known in (study.unloaded, study.live) for trial_id, state in known.items()
                      if states is None or state in states}  # (finished ones load when first asked for)
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
                self._told.pop(trial._trial_id, None)  # the store's copy from now on
                self._own.pop(trial._trial_id, None)  # (finished by another process: a stale-trial check)
                if trial._trial_id not in study.finished_ids:
                    study.add_finished(trial)
                    self._finished[trial._trial_id] = trial
            else:
                study.pending_ids.add(trial._trial_id)
                study.live[trial._trial_id] = trial.state
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
