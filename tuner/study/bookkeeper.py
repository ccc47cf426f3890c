"""A worker's talk with the store, on a thread of its own: the training thread never waits for it.

Everything a worker says to Optuna goes through one :class:`Bookkeeper` thread, in the order the
training thread queued it: a trial's start (attrs), each epoch's report and prune check, its end
(attrs and tell), hand-backs. It also asks trials *ahead*: it keeps up to the trainer's demand of
trials asked, sampled and (for a retry) their checkpoint loaded, so a freed slot is refilled at the
next epoch boundary without a round trip. And it runs the stale-trial check of the study.

What this costs in behaviour, stated in the README: a prune decision reaches the training thread
one epoch late at most (the trainer does not start epoch n + 2 before the reports of epoch n are
done: :meth:`Bookkeeper.wait_processed`), so a pruned trial may train one epoch more than it is
credited with; its extra report is dropped.

Heartbeats keep their own thread (:class:`Heartbeats`): a long store call here must not make live
trials look dead to the other workers.
"""

from __future__ import annotations

import math
import queue
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import fail_stale_trials
from optuna.trial import TrialState

from tuner import __version__
from tuner.store.attrs import CONFIG_ATTR, set_trial_attrs, split_series
from tuner.store.budget_lock import budget_lock
from tuner.store.checkpoints import TrialFiles, config_hash, rank_key
from tuner.study import space, strategy
from tuner.study.heartbeats import Heartbeats
from tuner.study.open import study_counts
from tuner.study.pruned import tell_pruned
from tuner.study.uploads import upload_config, upload_images

if TYPE_CHECKING:
    from PIL import Image

    from tuner.spec import TrainConfig
    from tuner.store.checkpoints import CheckpointWriter
    from tuner.study.spec import StudySpec
    from tuner.vae.population import EpochResult
    from tuner.vae.slot_state import SlotSnapshot

__all__ = ["Bookkeeper", "Context", "Run"]

# ask/tell with a heartbeat storage is what Optuna's own optimize() does internally; its warnings
# about it (and about the experimental stale-trial check) would repeat on every trial
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

_POLL_S = 1.0  # idle wait of the bookkeeper between periodic checks


@dataclass(eq=False)
class Run:
    """One trial this worker holds, from its ask to its tell.

    ``ended`` is the bookkeeper's (the trial is told or let go: later events for it are dropped);
    ``key`` and ``slot`` are the trainer's (where it trains)."""

    trial: optuna.Trial
    config: TrainConfig
    resume: dict[str, Any] | None = None  # the checkpoint a retry resumes from
    resumed_from: int | None = None
    stamp: dict[str, Any] = field(default_factory=dict)  # identity fields its checkpoints carry
    resumed_epoch: int = 0
    curve: list[float] = field(default_factory=list)  # val -ELBO per epoch (multi: stored at the end)
    key: tuple[Any, ...] = ()
    slot: int = -1
    started: float = field(default_factory=time.time)
    saved_epoch: int = 0  # epoch of its last checkpoint (the cadence counts from there)
    saved_at: float = field(default_factory=time.monotonic)
    ended: bool = False

    @property
    def number(self) -> int:
        return self.trial.number


@dataclass
class Context:
    """What the bookkeeper works with, handed over by the worker."""

    study: optuna.Study
    spec: StudySpec
    files: TrialFiles
    writer: CheckpointWriter
    heartbeats: Heartbeats
    log: Callable[[str], None]
    worker_id: str
    device: str
    precision: str
    deadline: float
    summary: Any  # the worker's WorkerSummary (counts written here, read at the end)
    artifact_store: Any  # where trial images go (optuna's ArtifactStore protocol)


class Bookkeeper:
    """The store thread of one worker (module docstring). Methods without a leading underscore are
    called from the training thread; the handlers queued with :meth:`submit` run on this thread."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._inbox: queue.Queue[tuple[Callable[..., None], tuple[Any, ...]] | None] = queue.Queue()
        self._ready: deque[Run] = deque()
        self._demand = 0
        self._decisions: deque[tuple[Run, bool]] = deque()  # trials the trainer must let go, and whether
        # another worker failed them as stale (then the trainer saves their newest state for the retry)
        self._holds = 0  # such trials whose state is not on disk yet: no ask until it is (the retry needs it)
        self._failure: BaseException | None = None
        self._lock = threading.Condition()
        self._queued = 0  # items submitted
        self._version = 0  # see version
        self._processed = 0  # items done
        self._budget_met = False
        self._may_ask = True
        self._stale_check_s = max(_POLL_S * 5, ctx.spec.workers.grace_period / 3)
        self._last_stale_check = -math.inf
        self._last_count = -math.inf
        self.store_s = 0.0  # this thread's time in store calls and bookkeeping (for the time split)
        self._thread = threading.Thread(target=self._run, name="tuner-bookkeeper", daemon=True)

    # ------------------------------------------------------------------ the training thread's side
    def __enter__(self) -> Bookkeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._inbox.put(None)
        if exc[0] is None:  # a clean end waits for what is queued; an error (a second Ctrl-C) does not
            self._thread.join(timeout=120)

    def submit(self, handler: Callable[..., None], *args: Any) -> int:
        """Queue ``handler(*args)`` to run on the bookkeeper thread, after everything queued before;
        returns its sequence number (for :meth:`wait_processed`)."""
        with self._lock:
            self._queued += 1
            seq = self._queued
        self._inbox.put((handler, args))
        return seq

    def wait_processed(self, seq: int, timeout: float | None = None) -> bool:
        """Block until item ``seq`` (and everything before it) has run; False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: self._processed >= seq or self._failure is not None, timeout)

    def drain(self) -> None:
        """Wait until everything queued so far has run; re-raise a failure of this thread."""
        self.wait_processed(self.submit(_noop))
        self.raise_failure()

    def raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def set_demand(self, n: int) -> None:
        """How many asked trials the trainer could place now (free slots, plus some ahead)."""
        with self._lock:
            more, self._demand = n > self._demand, n
            self._lock.notify_all()
        if more:
            self._inbox.put(_WAKE)  # the thread may be waiting on an empty inbox: ask now, not after a poll

    def take_ready(self, n: int) -> list[Run]:
        """Up to ``n`` trials asked ahead, oldest first."""
        with self._lock:
            return [self._ready.popleft() for _ in range(min(n, len(self._ready)))]

    def put_back(self, runs: list[Run]) -> None:
        """Trials the trainer could not place after all (out of memory): first in line again."""
        with self._lock:
            self._ready.extendleft(reversed(runs))

    def decisions(self) -> list[tuple[Run, bool]]:
        """Trials the trainer must let go now: (run, failed as stale by another worker) pairs."""
        with self._lock:
            out = list(self._decisions)
            self._decisions.clear()
            return out

    @property
    def version(self) -> int:
        """Changes whenever this thread has done something the trainer may wait on (an item
        processed, a trial asked, a failure): read it before looking, wait on it after."""
        with self._lock:
            return self._version

    def wait_for_work(self, since: int, timeout: float) -> None:
        """Idle trainer: wait until :attr:`version` moves on from ``since`` (or ``timeout``)."""
        with self._lock:
            self._lock.wait_for(lambda: self._version != since, timeout)

    def idle(self) -> bool:
        """Everything queued so far has run."""
        with self._lock:
            return self._processed == self._queued

    def finished(self) -> bool:
        """Nothing left for this worker: the budget is met (or the time is up), nothing is queued
        here or asked ahead. Other workers may still run the last trials (they are retried here if
        they die, through the stale-trial check)."""
        with self._lock:
            return self._budget_met and not self._ready and self._processed == self._queued

    def held(self) -> list[Run]:
        """Trials asked ahead and not placed (handed back when the worker stops)."""
        with self._lock:
            out = list(self._ready)
            self._ready.clear()
            return out

    # ------------------------------------------------------------------------- this thread
    def _run(self) -> None:
        """Queued items first (a report waits on nothing else), then asks ahead, then idle checks."""
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                item = _IDLE if self._wants_more() else self._next(timeout=_POLL_S)
            if item is None:
                return
            if item is _WAKE:
                item = _IDLE
            started = time.perf_counter()
            try:
                self._periodic()
                if item is _IDLE:
                    if self._wants_more():
                        self._ask_ahead()
                else:
                    handler, args = item
                    handler(*args)
                    self._periodic()  # a tell recounts at once: the trainer may be waiting on the budget
            except BaseException as err:  # noqa: BLE001 - the trainer re-raises it (raise_failure)
                with self._lock:
                    self._failure = err
                    self._version += 1
                    self._lock.notify_all()
                return
            finally:
                self.store_s += time.perf_counter() - started
                if item is not _IDLE:
                    with self._lock:
                        self._processed += 1
                        self._version += 1
                        self._lock.notify_all()

    def _next(self, timeout: float) -> Any:
        try:
            return self._inbox.get(timeout=timeout)
        except queue.Empty:
            return _IDLE

    def _wants_more(self) -> bool:
        with self._lock:
            return self._may_ask and not self._holds and len(self._ready) < self._demand

    def _periodic(self) -> None:
        """When due: the stale-trial check (a dead worker's trials are failed and retried), and the
        study's counts (is the budget met, may this worker ask) about once per poll interval."""
        ctx, now = self.ctx, time.monotonic()
        if now - self._last_stale_check > self._stale_check_s:
            # FAIL and its retry's enqueue are two transactions: under the budget lock no worker
            # counts the study in between
            with budget_lock(ctx.study._storage, ctx.study.study_name):
                fail_stale_trials(ctx.study)
            self._last_stale_check = now
        if now - self._last_count < _POLL_S:
            return
        counts = study_counts(ctx.study)
        self._last_count = time.monotonic()
        late = time.time() > ctx.deadline
        with self._lock:
            met = late or counts.finished >= ctx.spec.budget.trials
            if met != self._budget_met:
                self._version += 1
            self._budget_met = met
            self._may_ask = not late and (counts.waiting > 0 or counts.finished + counts.running < ctx.spec.budget.trials)
            self._lock.notify_all()

    def _ask_ahead(self) -> None:
        """Ask one trial if the budget allows: sample it, resolve its config, load its checkpoint."""
        ctx = self.ctx
        with budget_lock(ctx.study._storage, ctx.study.study_name):  # no two workers ask for the last trial
            if time.time() > ctx.deadline:
                may = False
            else:
                counts = study_counts(ctx.study)
                may = counts.waiting > 0 or counts.finished + counts.running < ctx.spec.budget.trials
            trial = ctx.study.ask() if may else None
        if trial is None:
            with self._lock:
                self._may_ask = False
            return
        # beat at once: a trial without any heartbeat never goes stale, so a worker dying before its
        # first beat would leave the trial RUNNING forever
        ctx.heartbeats.add(trial._trial_id)
        params = space.sample(trial, ctx.spec)
        seed = int(trial.user_attrs.get("seed", ctx.spec.base.seed + trial.number))
        run = Run(trial, ctx.spec.train_config(params, seed))
        run.stamp = ctx.files.stamp(trial.number, run.config)
        history = ctx.study._storage.get_trial(trial._trial_id).system_attrs.get("retry_history", [])
        found = ctx.files.load_for_resume([*history, trial.number], run.config) if history else None
        if found is not None:
            number, run.resume = found
            run.resumed_from, run.resumed_epoch = history[-1], run.resume["epoch"]
            run.curve = [row["val_neg_elbo"] for row in run.resume["history"]]
            if number != trial.number:
                ctx.files.adopt(number, trial.number)
        with self._lock:
            self._ready.append(run)
            self._version += 1
            self._lock.notify_all()

    # ---------------------------------------------------------------- handlers (this thread)
    def started(self, run: Run, population: str) -> None:
        """A trial took a slot: its attrs, its config (:func:`tuner.store.attrs.trial_config` reads it,
        people read ``config.yaml``), and the log line."""
        ctx = self.ctx
        user = {"seed": run.config.seed, "worker": ctx.worker_id, "device": ctx.device, "precision": ctx.precision,
                "population": population}
        system = {CONFIG_ATTR: run.config.model_dump(mode="json"),
                  **upload_config(ctx.artifact_store, ctx.study.study_name, run.number, run.config, user, ctx.log)}
        set_trial_attrs(run.trial, user, system)
        resumed = (f" (resumed from trial {run.resumed_from}, epoch {run.resumed_epoch})"
                   if run.resumed_from is not None else "")
        if run.resumed_from is not None and ctx.spec.objective != "multi":
            # the retry inherited the reports its predecessor made; a checkpoint newer than the last
            # of them (a trial let go after another worker failed it) brings the epochs in between
            reported = ctx.study._storage.get_trial(run.trial._trial_id).intermediate_values
            for epoch, value in enumerate(run.curve, start=1):
                if epoch not in reported and math.isfinite(value):
                    run.trial.report(value, epoch)
        ctx.log(f"trial {run.number} started{resumed}")

    def epoch(self, run: Run, r: EpochResult) -> None:
        """Report the epoch's validation -ELBO; end the trial if it diverged or the pruner says so."""
        if run.ended:
            return  # pruned already: the epoch it trained meanwhile is not reported
        spec = self.ctx.spec
        run.curve.append(r.val_neg_elbo)
        try:
            if math.isfinite(r.val_neg_elbo) and spec.objective != "multi":
                run.trial.report(r.val_neg_elbo, r.epoch)  # (Optuna has no report for multi-objective)
            if r.status == "stopped":
                self._end(run, TrialState.PRUNED, reason=r.reason)
            elif r.status == "running" and spec.objective != "multi" and run.trial.should_prune():
                reason = f"pruned at epoch {r.epoch} by {spec.pruner.name}: val -ELBO {r.val_neg_elbo:.2f}"
                self._end(run, TrialState.PRUNED, reason=reason)
                self._let_go(run, stale=False)
        except UpdateFinishedTrialError:
            # another worker failed it as stale (our beats missed the grace period, e.g. in a long
            # store outage) and queued a retry: the trainer saves its newest state for that retry
            # (saved_for_retry), and until then this worker asks nothing (it might ask that retry)
            run.ended = True
            self.ctx.heartbeats.discard(run.trial._trial_id)
            with self._lock:
                self._holds += 1
            self._let_go(run, stale=True)
            self.ctx.log(f"trial {run.number} was failed as stale by another worker; its retry resumes from "
                         "the checkpoint")

    def saved_for_retry(self, run: Run) -> None:
        """The trainer queued the newest state of a trial failed as stale elsewhere: once it is on
        disk, asking may go on (the retry resumes from it)."""
        self.ctx.writer.flush(self.ctx.files.path(run.number))
        with self._lock:
            self._holds -= 1

    def complete(self, run: Run, values: list[float], attrs: dict[str, Any], images: dict[str, Image.Image],
                 final: SlotSnapshot | None) -> None:
        """Tell a finished, evaluated trial: its images stored, its checkpoint kept if it is among
        the study's best, else deleted."""
        if run.ended:
            return  # pruned while it was being evaluated
        ctx = self.ctx
        if not all(math.isfinite(v) for v in values):
            self._end(run, TrialState.PRUNED, reason=f"non-finite objective {values}", attrs=attrs)
            return
        # the images' and the collapse constraint's system attrs go with the user attrs, before tell
        system = upload_images(ctx.artifact_store, run.number, images, attrs, ctx.log)
        system.update(strategy.collapse_constraint_attrs(attrs["collapsed"]))  # the sampler avoids collapse
        path = ctx.files.path(run.number)
        keep = ctx.spec.checkpoints.keep_top
        if final is not None and keep and self._would_rank(run, values, attrs, keep):
            # on disk before the tell: a kill in between leaves the retry a finished slot to tell
            ctx.writer.put(final, path, **run.stamp)
            ctx.writer.flush(path)
        else:
            ctx.writer.cancel(path)
            ctx.writer.flush(path)
            ctx.files.discard(run.number)
        self._tell(run, TrialState.COMPLETE, values=values, attrs=attrs, system=system)
        ctx.files.retain(ctx.study, keep)

    def end(self, run: Run, state: TrialState, reason: str) -> None:
        """A trial that ends without its final evaluation (diverged at resume, non-finite objective)."""
        if not run.ended:
            self._end(run, state, reason=reason)

    def fail(self, run: Run, error: str) -> None:
        """A trial this host cannot train (data missing here, a batch larger than the split, ...)."""
        run.trial.set_user_attr("error", error)
        self.ctx.study.tell(run.trial, state=TrialState.FAIL)
        run.ended = True
        self.ctx.heartbeats.discard(run.trial._trial_id)
        self.ctx.summary.failed += 1
        self.ctx.log(f"trial {run.number} failed: {error}")

    def hand_back(self, run: Run, snap: SlotSnapshot | None, epoch: int, why: str) -> None:
        """Fail a held trial and queue its retry, which resumes from the checkpoint written here
        (``snap``; None: from its last checkpoint on disk, or from the start)."""
        if run.ended:
            return
        ctx = self.ctx
        path = ctx.files.path(run.number)
        if snap is not None:
            ctx.writer.put(snap, path, **run.stamp)
        ctx.writer.flush(path)
        run.trial.set_user_attr("handed_back", f"worker {ctx.worker_id} {why} at epoch {epoch}")
        retry = ctx.study._storage.get_heartbeat_stale_trial_callback()
        with budget_lock(ctx.study._storage, ctx.study.study_name):  # FAIL and its retry, counted together
            frozen = ctx.study.tell(run.trial, state=TrialState.FAIL)
            if retry is not None:
                retry(ctx.study, frozen)
        run.ended = True
        ctx.heartbeats.discard(run.trial._trial_id)
        ctx.summary.handed_back += 1
        ctx.log(f"trial {run.number} handed back at epoch {epoch}")

    # ---------------------------------------------------------------------------- helpers
    def _would_rank(self, run: Run, values: list[float], attrs: dict[str, Any], keep: int) -> bool:
        """Whether the trial, told with these values, is among the study's ``keep`` best now."""
        done = self.ctx.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        mine = rank_key(attrs.get("collapsed"), values[0], run.number)
        return sum(rank_key(t.user_attrs.get("collapsed"), t.values[0], t.number) < mine
                   for t in done if t.values) < keep

    def _end(self, run: Run, state: TrialState, *, reason: str, attrs: dict[str, Any] | None = None) -> None:
        """Tell a pruned (or diverged) trial; its checkpoint is deleted."""
        ctx = self.ctx
        path = ctx.files.path(run.number)
        ctx.writer.cancel(path)
        ctx.writer.flush(path)
        ctx.files.discard(run.number)
        self._tell(run, state, reason=reason, attrs=attrs)

    def _tell(self, run: Run, state: TrialState, *, values: list[float] | None = None, reason: str | None = None,
              attrs: dict[str, Any] | None = None, system: dict[str, Any] | None = None) -> None:
        ctx, elapsed = self.ctx, time.time() - run.started
        attrs = dict(attrs or {})
        attrs.update(wall_s=round(elapsed, 3), config_hash=config_hash(run.config),
                     versions={"tuner": __version__, "torch": torch.__version__, "optuna": optuna.__version__})
        if reason is not None:
            attrs["prune_reason"] = reason
        if ctx.spec.objective == "multi":  # no intermediate values there: keep the curve here
            attrs["val_neg_elbo_curve"] = list(run.curve)
        system = {**(system or {}), **split_series(attrs)}  # lists: not one long line on the dashboard
        set_trial_attrs(run.trial, attrs, system)  # one transaction, not one per attr
        if state == TrialState.PRUNED:
            tell_pruned(ctx.study, run.trial)  # no value: Optuna would copy the last -ELBO into it
        else:
            ctx.study.tell(run.trial, values, state=state)
        self._last_count = -math.inf  # the study's counts changed: recount after this item
        run.ended = True
        ctx.heartbeats.discard(run.trial._trial_id)
        if state == TrialState.COMPLETE:
            ctx.summary.complete += 1
            ctx.log(f"trial {run.number} complete: {values} ({attrs.get('epochs')} epochs, {elapsed:.1f} s)")
        else:
            ctx.summary.pruned += 1
            ctx.log(f"trial {run.number} pruned: {reason}")

    def _let_go(self, run: Run, stale: bool) -> None:
        with self._lock:
            self._decisions.append((run, stale))


def _noop() -> None:
    pass


_IDLE = object()  # the inbox was empty for a poll interval
_WAKE = object()  # the trainer wants more trials (not a queued item: not counted)
