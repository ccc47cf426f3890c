"""Riding over a store outage: every store call of a worker is retried on a dropped connection.

A PostgreSQL restart or failover, or a network blip, breaks every open connection and refuses new
ones for a few seconds; a busy SQLite file can answer "database is locked". Without a retry, the
first report or heartbeat that lands in that window kills the worker, and with it every epoch its
running trials trained since their last checkpoint. :class:`RetryingRDBStorage` retries each store
call with exponential backoff (bounded: about a minute in all, then one-line
:class:`StorageUnavailableError`) and logs one line per retry, never a traceback.

Retrying is safe because the calls a worker makes are idempotent or made so here:
* reads, heartbeats, user/system attrs and intermediate values are upserts (a repeated report of the
  same epoch rewrites the same value);
* a param written twice hits the table's unique key, which Optuna ignores;
* a state change (``tell``) whose commit reached the server before the connection dropped finds the
  trial already finished on retry: when it holds the state and values this call wrote, the retry
  counts as done instead of failing the worker.
Two writes stay ambiguous: creating a trial and taking a WAITING one, when the commit succeeded but its
answer was lost. The retry then creates (or takes) another one, and the first is left RUNNING with no
heartbeat. A server that is shut down (even ``-m fast``) answers a commit it made before closing the
connection, so only a network cut at that exact moment can cause it.
"""

from __future__ import annotations

import functools
import math
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import optuna
import psycopg
import sqlalchemy
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from tuner.errors import TunerError

__all__ = ["RETRY_BUDGET_S", "RetryingRDBStorage", "StorageUnavailableError", "caused_by", "is_transient",
           "retry_transient"]

RETRY_BUDGET_S = 60.0  # how long a store call keeps retrying before the worker gives up (one line, exit 2)
_FIRST_DELAY_S = 0.5
_MAX_DELAY_S = 8.0  # doubling from 0.5 s: 0.5, 1, 2, 4, 8, 8, ... (each with up to -50% jitter)

T = TypeVar("T")


class StorageUnavailableError(TunerError):
    """The store stayed unreachable for the whole retry budget (a TunerError: one line, exit 2)."""


def caused_by(error: BaseException, matches: Callable[[BaseException], bool]) -> bool:
    """Whether ``error`` or an error it wraps ``matches``.

    Only explicit wrapping is followed (``__cause__``, SQLAlchemy's ``.orig``), not ``__context__``:
    an error raised while another was being handled is not caused by it.
    """
    seen: set[int] = set()
    stack: list[BaseException | None] = [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if matches(e):
            return True
        stack += [getattr(e, "orig", None), e.__cause__]
    return False


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` (or what it wraps) is a lost or refused connection or a SQLite lock.

    Programming errors (no such table, bad SQL, a finished trial) are not transient and are raised
    at once.
    """
    return caused_by(error, _is_transient_one)


def _is_transient_one(e: BaseException) -> bool:
    """:func:`is_transient` for one error, not what it wraps."""
    if isinstance(e, (psycopg.OperationalError, psycopg.InterfaceError)):
        return True  # refused, reset, server shutting down (AdminShutdown), serialization conflicts
    if isinstance(e, sqlite3.OperationalError) and any(w in str(e).lower() for w in ("locked", "busy")):
        return True
    return isinstance(e, sqlalchemy.exc.DBAPIError) and e.connection_invalidated


def retry_transient(
    call: Callable[[], T], what: str, *, log: Callable[[str], None], describe: Callable[[BaseException], str],
    budget_s: float = RETRY_BUDGET_S,
) -> T:
    """``call()``, retried with exponential backoff while it fails with a transient error.

    describe(error) -> the one-line cause (URL masked) that each retry's log line starts with. After
    ``budget_s`` seconds of failures: :class:`StorageUnavailableError`, one line, no traceback.
    """
    deadline, delay = time.monotonic() + budget_s, _FIRST_DELAY_S
    attempt = 0
    while True:
        attempt += 1
        try:
            return call()
        except Exception as err:
            if not is_transient(err):
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                raise StorageUnavailableError(f"{describe(err)}; gave up on {what} after {budget_s:.0f} s of "
                                              "retries; restart the worker once the store is back") from None
            wait = min(delay * random.uniform(0.5, 1.0), left)  # jitter: workers do not reconnect in lockstep
            log(f"{describe(err)}; retrying {what} in {wait:.1f} s (attempt {attempt})")
            time.sleep(wait)
            delay = min(2 * delay, _MAX_DELAY_S)


class RetryingRDBStorage(RDBStorage):
    """An Optuna RDBStorage whose store calls ride over a dropped connection (see the module doc).

    Retries happen at the storage level, not around ``study.ask()`` or ``study.tell()``: those make
    several store calls, and retrying one of them whole after its first call committed would leave a
    half-made trial behind. Only the outermost call of a thread retries (RDBStorage methods call each
    other), so one outage costs one budget, not one per level.
    """

    def __init__(
        self, url: str, *, log: Callable[[str], None], describe: Callable[[BaseException], str],
        budget_s: float = RETRY_BUDGET_S, **kwargs: Any,
    ) -> None:
        # set before RDBStorage.__init__, which already makes store calls
        self._log, self._describe, self._budget_s = log, describe, budget_s
        self._retrying = threading.local()
        super().__init__(url, **kwargs)

    def _retry(self, call: Callable[[], T], what: str) -> T:
        if getattr(self._retrying, "active", False):
            return call()  # an inner call: the outermost one retries the whole
        self._retrying.active = True
        try:
            return retry_transient(call, what, log=self._log, describe=self._describe, budget_s=self._budget_s)
        finally:
            self._retrying.active = False

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        """Optuna's, plus: a retry finding the trial already in ``state`` with ``values`` is done."""
        attempts = 0

        def attempt() -> bool:
            nonlocal attempts
            attempts += 1
            try:
                return RDBStorage.set_trial_state_values(self, trial_id, state, values)
            except optuna.exceptions.UpdateFinishedTrialError:
                if attempts == 1 or not self._holds(trial_id, state, values):
                    raise  # finished by someone else (e.g. failed as stale by another worker)
                self._log(f"trial id {trial_id}: already {state.name}, the commit before the connection "
                          "dropped went through")
                return True

        return self._retry(attempt, "set_trial_state_values")

    def _holds(self, trial_id: int, state: TrialState, values: Sequence[float] | None) -> bool:
        trial = RDBStorage.get_trial(self, trial_id)
        if trial.state != state:
            return False
        if values is None:
            return True
        return trial.values is not None and len(trial.values) == len(values) and all(
            math.isclose(a, b) or (math.isnan(a) and math.isnan(b)) for a, b in zip(trial.values, values)
        )


def _retrying(name: str) -> Callable[..., Any]:
    # AttributeError at import if Optuna renames one: loud, not silent
    @functools.wraps(getattr(RDBStorage, name))
    def call(self: RetryingRDBStorage, *args: Any, **kwargs: Any) -> Any:
        method = getattr(RDBStorage, name)  # per call, like RDBStorage.set_trial_state_values above
        return self._retry(lambda: method(self, *args, **kwargs), name)

    return call


# Every store call a worker makes, through Optuna's _CachedStorage too (it calls the underscored
# ones). Left out on purpose: create_new_study and delete_study (not idempotent, not worker calls).
for _name in (
    "get_all_studies", "get_study_id_from_name", "get_study_name_from_id", "get_study_directions",
    "get_study_user_attrs", "get_study_system_attrs", "set_study_user_attr", "set_study_system_attr",
    "create_new_trial", "_create_new_trial", "set_trial_param", "_set_trial_param", "get_trial_param",
    "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr",
    "get_trial_user_attrs", "get_trial_system_attrs", "get_trial_id_from_study_id_trial_number",
    "get_trial", "get_all_trials", "_get_trials", "get_best_trial", "_get_best_trial_id",
    "record_heartbeat", "_get_stale_trial_ids",
):
    setattr(RetryingRDBStorage, _name, _retrying(_name))
