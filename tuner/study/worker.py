"""A worker: trials from the store, trained as populations, told back. The training thread only trains.

The worker is a pipeline, so the device never waits for the store, the disk or the final scores:

* the **training thread** (this module) places asked trials in slots, runs epochs, and hands on what
  each epoch produced: the epoch's results to the bookkeeper, finished slots to the evaluator,
  checkpoints (on the spec's cadence) to the writer. It waits on none of them, except that it does
  not start epoch n + 2 before the bookkeeper has done epoch n's reports (prune decisions lag one
  epoch at most);
* the **bookkeeper** (:mod:`tuner.study.bookkeeper`) makes every Optuna call in order: attrs, reports,
  prune checks, tells, asks ahead, the stale-trial check;
* the **evaluator** (:mod:`tuner.study.evaluator`) scores the slots that finished in an epoch together
  (IWAE NLL, collapse metrics, gaps, images) and passes each trial on for its tell;
* the **checkpoint writer** (:mod:`tuner.store.checkpoints`) writes true-size slot snapshots to disk;
* a **heartbeat** thread keeps every held trial alive in the store.

Populations are keyed by shape and by size bucket (:mod:`tuner.study.memory`): they are made, grown,
shrunk and dropped as trials come and go, within the worker's slot budget, which on a GPU is measured
and halved on an out-of-memory error (the evicted trials are handed back and resume elsewhere).

A worker killed with -9 loses at most the checkpoint cadence of each trial: its trials go stale,
another worker's stale-trial check fails them, Optuna's retry callback enqueues copies, and whichever
worker asks next resumes a copy from the dead trial's last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from optuna.trial import TrialState

from tuner.atomic import write_atomic
from tuner.errors import TunerError
from tuner.spec import DataConfig, TrainConfig
from tuner.store.artifacts import artifact_store, artifacts_root
from tuner.store.checkpoints import Cadence, CheckpointWriter, TrialFiles
from tuner.store.urls import mask_url, open_storage
from tuner.study import space, strategy
from tuner.study.bookkeeper import Bookkeeper, Context, Run
from tuner.study.evaluator import Evaluator, Finished
from tuner.study.heartbeats import Heartbeats
from tuner.study.memory import CudaMemory, MemoryProbe, SlotBudget, auto_slots, bucket, next_pow2
from tuner.study.open import load_study, started_at, study_key
from tuner.study.worker_stats import DeviceBusy, PhaseClock, WorkerSummary
from tuner.vae.data import Splits, load_splits
from tuner.vae.device import resolve_device
from tuner.vae.engine import Population, resolve_precision
from tuner.vae.population import EpochResult, PopulationShape, latent_size
from tuner.vae.slot_state import snapshot, true_size

__all__ = ["SUMMARY_ENV", "Worker"]

_POLL_S = 1.0  # idle wait while other workers run the study's last trials
SUMMARY_ENV = "TUNER_WORKER_SUMMARY"  # a folder: each worker writes its WorkerSummary there as JSON
_PENDING_CHECKPOINTS = 16  # snapshots waiting for the disk before the training thread waits too


class Worker:
    """Joins a study by storage URL and name and trains its trials until the budget is met."""

    def __init__(
        self, storage_url: str, study_name: str, *, slots: int | None = None, device: str | None = None,
        artifacts: str | Path | None = None, log: Callable[[str], None] = print,
        memory_probe: MemoryProbe | None = None,
    ) -> None:
        _, spec = load_study(storage_url, study_name)
        # the spec says how often to beat and when a silent trial counts as dead
        # ... and its store calls retry through an outage (a PostgreSQL restart) instead of killing the worker
        self.storage = open_storage(
            storage_url, heartbeat_interval=spec.workers.heartbeat_interval, grace_period=spec.workers.grace_period,
            retry_log=log,
        )
        self.study, self.spec = load_study(storage_url, study_name, storage=self.storage, worker=os.getpid())
        self.url, self.log = storage_url, log
        source = "--device" if device else f"study '{study_name}' workers.device"
        self.device = resolve_device(device or self.spec.workers.device, source=source)
        self.study_id = study_key(self.study)
        self.files = TrialFiles(artifacts_root(storage_url, artifacts) / self.study_id, self.study_id, log)
        self.artifact_store = artifact_store(storage_url, artifacts)  # trial images, for the dashboard
        self.latent_max, self.hidden_max = space.size_bounds(self.spec)
        c = self.spec.checkpoints
        self.cadence = Cadence(c.every_epochs, c.every_seconds, strategy.rung_epochs(self.spec) if c.at_rungs else frozenset())
        self.splits: dict[DataConfig, Splits] = {}
        self.populations: dict[tuple[Any, ...], Population] = {}
        self.running: dict[tuple[tuple[Any, ...], int], Run] = {}
        # the base data loads here, before any trial is taken: a host without the dataset (or the GPU
        # above) fails with one line instead of failing trials in the store
        base = self._splits(self.spec.base.data)
        if memory_probe is None and self.device.type == "cuda":
            memory_probe = CudaMemory(self.device)
        self.budget = SlotBudget(
            slots or auto_slots(self.device, self.spec, base.dim), self.spec.workers.max_slots, memory_probe,
            adaptive=slots is None and self.spec.workers.slots is None, log=log,
        )
        self.precision = resolve_precision(self.spec.workers.precision, self.device)  # recorded on every trial
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self.summary = WorkerSummary()
        self.clock = PhaseClock()
        self._busy = DeviceBusy(self.device)
        self._stop = threading.Event()
        self._deadline = started_at(self.study) + self.spec.budget.timeout if self.spec.budget.timeout else math.inf
        self._unmeasured: dict[tuple[Any, ...], int] = {}  # new populations -> memory in use before them
        self._padding: dict[tuple[Any, ...], list[float]] = defaultdict(lambda: [0.0, 0.0])
        self._markers: list[int] = []  # the bookkeeper's sequence numbers of epoch ends

    @property
    def slots(self) -> int:
        """The most trials this worker trains at once (measured on a GPU, halved on out-of-memory)."""
        return self.budget.limit

    # ------------------------------------------------------------------------------ the loop
    def request_stop(self) -> None:
        """Finish the epoch in flight, checkpoint and hand back held trials, then return."""
        self._stop.set()

    def run(self) -> WorkerSummary:
        self.log(
            f"worker {self.worker_id}: study '{self.study.study_name}' in {mask_url(self.url)}, "
            f"device {self.device}, {self.slots} slot(s), precision {self.precision}"
        )
        started = time.perf_counter()
        self._writer = CheckpointWriter(max_pending=_PENDING_CHECKPOINTS)
        try:
            with Heartbeats(self.storage) as heartbeats:
                ctx = Context(
                    study=self.study, spec=self.spec, files=self.files, writer=self._writer, heartbeats=heartbeats,
                    log=self.log, worker_id=self.worker_id, device=str(self.device), precision=self.precision,
                    deadline=self._deadline, summary=self.summary, artifact_store=self.artifact_store,
                )
                self._bk = Bookkeeper(ctx)
                self._ev = Evaluator(self.spec, self._bk, self.device, self.log, inline=self.slots == 1)
                with self._bk, self._ev:
                    self._loop()
            self._writer.flush()
        finally:
            self._writer.close()
            self._summarize(time.perf_counter() - started)
        return self.summary

    def _loop(self) -> None:
        """Let go of pruned trials, place asked ones, train an epoch; until the budget is met."""
        while True:
            self._bk.raise_failure()
            self._ev.raise_failure()
            if self._stop.is_set():
                self._hand_back("stopped")
                return
            version = self._bk.version
            with self.clock("bookkeeping"):
                self._let_go(self._bk.decisions())
                self._fill()
            if self.running:
                self._epoch()
            elif self._ev.pending == 0 and self._bk.finished():
                return
            else:  # no trial yet, the last one being told, or other workers hold the study's last trials
                with self.clock("idle"):
                    self._bk.wait_for_work(version, _POLL_S)

    def _fill(self) -> None:
        """Place asked trials in free slots, then tell the bookkeeper how many more to ask ahead.

        A one-slot worker keeps Optuna's sequential semantics: it asks a trial only once the last
        one is told, so the sampler and the pruner (median, percentile: they compare with complete
        trials) see every trial before the next. With more slots trials overlap anyway, so asks run
        ahead: a freed slot is refilled at the next epoch without a round trip."""
        if self.slots == 1 and (self.running or self._ev.pending or not self._bk.idle()):
            self._bk.set_demand(0)
            return
        runs = self._bk.take_ready(self.slots - len(self.running))
        coming = Counter(self._key(run.config) for run in runs)
        for i, run in enumerate(runs):
            key = self._key(run.config)
            try:
                pop = self._population_for(key, run.config, coming[key])
            except torch.OutOfMemoryError:
                self._out_of_memory(None)
                self._bk.put_back(runs[i:])
                return
            except TunerError as err:  # a host without this trial's data: fail it, stop with one line
                self._fail(run, err)
            coming[key] -= 1
            self._start(run, key, pop)
        ahead = 0 if self.slots == 1 else max(1, self.slots // 8)  # asked before a slot frees
        self._bk.set_demand(self.slots - len(self.running) + ahead)

    def _fail(self, run: Run, err: TunerError) -> None:
        """A trial this host cannot train: told FAIL, then the worker stops with the one-line error."""
        self._bk.submit(self._bk.fail, run, str(err))
        self._bk.drain()
        raise err

    # ----------------------------------------------------------------------------- a trial
    def _splits(self, data: DataConfig) -> Splits:
        if data not in self.splits:
            self.splits[data] = load_splits(data, 1, self.device)
        return self.splits[data]

    def _key(self, config: TrainConfig) -> tuple[Any, ...]:
        """The population a config trains in: its shape, data and size bucket (exact sizes when the
        worker trains one trial at a time: padding buys nothing there and cost +35% epoch time on CPU)."""
        latent, hidden = latent_size(config), config.model.hidden
        if self.slots > 1:
            latent, hidden = bucket(latent, self.latent_max), bucket(hidden, self.hidden_max)
        return (PopulationShape.of(config), config.data, latent, hidden)

    def _population_for(self, key: tuple[Any, ...], config: TrainConfig, coming: int) -> Population:
        """The population for ``key`` with a free slot: made, or grown to hold ``coming`` more
        trials (capacities are powers of two, within the slot budget)."""
        pop = self.populations.get(key)
        elsewhere = len(self.running) - (len(pop.running()) if pop else 0)
        room = max(1, self.slots - elsewhere)
        if pop is None:
            splits = self._splits(config.data)  # a host without this data fails here (TunerError)
            self._unmeasured[key] = self.budget.baseline()
            pop = self.populations[key] = Population(
                key[0], splits, slots=min(next_pow2(coming), room), latent_max=key[2], hidden_max=key[3],
                device=self.device, precision=self.precision, cuda_graph=self.spec.workers.cuda_graph,
            )
            self._log_population(key, pop, "new")
        elif not self._free_slots(pop):
            pop = self._resize(key, pop, min(next_pow2(len(pop.running()) + coming), max(room, pop.slots + 1)))
        return pop

    @staticmethod
    def _free_slots(pop: Population) -> list[int]:
        return [s for s, st in enumerate(pop.state) if st.status == "empty"]

    def _start(self, run: Run, key: tuple[Any, ...], pop: Population) -> None:
        """Put a trial in a free slot: fresh weights, or its retried checkpoint."""
        config = run.config
        if pop.splits.train.shape[0] < config.optim.batch_size:
            self._fail(run, TunerError(
                f"optim.batch_size {config.optim.batch_size} is larger than the {pop.splits.train.shape[0]}-example "
                "train split; lower the space's batch sizes"
            ))
        slot = self._free_slots(pop)[0]
        if run.resume is not None:
            pop.load_slot_checkpoint(slot, run.resume)
            run.resume = None  # loaded: the host copy is not kept
            run.saved_epoch = pop.state[slot].epoch
            self.summary.resumed += 1
        else:
            pop.assign(slot, config)
        run.key, run.slot, run.started, run.saved_at = key, slot, time.time(), time.monotonic()
        self.running[(key, slot)] = run
        self._bk.submit(self._bk.started, run, _describe(key))
        # a retry of a trial killed after its last epoch's checkpoint, before it was told: no epoch is
        # left to run, only its ending (the loop trains running slots only)
        state = pop.state[slot]
        if state.status == "finished":
            self._finish(pop, [run])
        elif state.status == "stopped":
            self._bk.submit(self._bk.end, run, TrialState.PRUNED, state.reason)
            self._release(run)

    def _epoch(self) -> None:
        """One epoch of every population with running trials, and what it hands on."""
        for key, pop in list(self.populations.items()):
            if not pop.running():
                continue
            self._account_padding(key, pop)
            try:
                with self.clock("compute"), self._busy():
                    results = pop.run_epoch()
            except torch.OutOfMemoryError:
                self._out_of_memory(key)
                continue
            if key in self._unmeasured:
                self.budget.measure(self._unmeasured.pop(key), pop.slots, len(self.running))
            with self.clock("bookkeeping"):
                finished = self._hand_on(key, results)
            with self.clock("checkpoints"):
                self._checkpoint_due(key, pop, results)
            if finished:
                with self.clock("evaluation"):
                    self._finish(pop, finished)
        with self.clock("bookkeeping"):
            self._resize_all()
            self._markers = [*self._markers[-1:], self._bk.submit(_epoch_end)]
        if len(self._markers) == 2:  # epoch n's reports are done before epoch n + 2 starts
            with self.clock("store wait"):
                self._bk.wait_processed(self._markers[0])

    def _hand_on(self, key: tuple[Any, ...], results: list[EpochResult]) -> list[Run]:
        """Each slot's epoch to the bookkeeper; returns the trials that finished (for the evaluator)."""
        finished = []
        for r in results:
            run = self.running[(key, r.slot)]
            self.summary.model_epochs += 1
            self._bk.submit(self._bk.epoch, run, r)  # reports; ends a diverged (stopped) trial
            if r.status == "stopped":
                self._release(run)
            elif r.status == "finished":
                finished.append(run)
        return finished

    def _checkpoint_due(self, key: tuple[Any, ...], pop: Population, results: list[EpochResult]) -> None:
        """Snapshots of the running trials whose cadence is due, to the writer."""
        now = time.monotonic()
        for r in results:
            if r.status != "running":
                continue
            run = self.running[(key, r.slot)]
            if self.cadence.due(r.epoch, run.saved_epoch, run.saved_at, now):
                self._writer.put(snapshot(pop, r.slot), self.files.path(run.number), **run.stamp)
                run.saved_epoch, run.saved_at = r.epoch, now

    def _finish(self, pop: Population, runs: list[Run]) -> None:
        """Finished slots to the evaluator, as one model of their weights to score; slots freed."""
        slots = [run.slot for run in runs]
        keep = self.spec.checkpoints.keep_top > 0
        ends = [{"best_epoch": pop.state[s].best_epoch, "best_val_neg_elbo": pop.state[s].best_val,
                 "epochs": pop.state[s].epoch, "end_reason": pop.state[s].reason} for s in slots]
        batch = Finished(runs, pop.finished_model(slots), ends, [snapshot(pop, s) if keep else None for s in slots],
                         pop.splits, pop.model_factory())
        if self.device.type == "cuda":
            batch.copied = torch.cuda.Event()
            batch.copied.record()
        self._ev.put(batch)
        for run in runs:
            self._release(run)

    def _release(self, run: Run) -> None:
        self.populations[run.key].release(run.slot)
        del self.running[(run.key, run.slot)]

    def _let_go(self, decisions: list[tuple[Run, bool]]) -> None:
        """Trials the bookkeeper ended leave their slots; one that another worker failed as stale
        leaves its newest state on disk first, for its retry."""
        for run, stale in decisions:
            held = self.running.get((run.key, run.slot)) is run
            if stale:
                if held and self.populations[run.key].state[run.slot].epoch > 0:
                    snap = snapshot(self.populations[run.key], run.slot)
                    self._writer.put(snap, self.files.path(run.number), **run.stamp)
                self._bk.submit(self._bk.saved_for_retry, run)
            if held:
                self._release(run)

    # -------------------------------------------------------------------------- populations
    def _resize(self, key: tuple[Any, ...], pop: Population, capacity: int) -> Population:
        """Move a population's running slots into one of ``capacity`` slots (grown or shrunk)."""
        self._unmeasured[key] = self.budget.baseline()
        new, moved = pop.resized(capacity)
        self.populations[key] = new
        for old_slot, new_slot in moved.items():
            run = self.running.pop((key, old_slot))
            run.slot = new_slot
            self.running[(key, new_slot)] = run
        self._log_population(key, new, f"resized from {pop.slots}")
        return new

    def _resize_all(self) -> None:
        """Drop populations with no trial, halve those running a quarter of their slots or fewer."""
        for key, pop in list(self.populations.items()):
            n = len(pop.running())
            if n == 0:
                del self.populations[key]
                self._unmeasured.pop(key, None)
            elif pop.slots >= 4 and n <= pop.slots // 4:
                self._resize(key, pop, pop.slots // 2)

    def _out_of_memory(self, key: tuple[Any, ...] | None) -> None:
        """Halve the slot budget; hand back the trials that no longer fit (or, when the failed epoch
        had already updated weights, every trial of that population: their last checkpoints are
        consistent, their slots are not); log one line; go on."""
        before, limit = self.slots, self.budget.halve()
        evicted: list[Run] = []
        if key is not None:
            pop = self.populations[key]
            runs = sorted((r for r in self.running.values() if r.key == key), key=lambda r: r.slot)
            clean = pop.steps_done == 0  # the epoch failed before its first update
            room = max(0, limit - (len(self.running) - len(runs)))
            keep = runs[:room] if clean else []
            evicted = runs[len(keep):]
            for run in evicted:
                state = pop.state[run.slot]
                snap = self._try_snapshot(pop, run.slot) if clean and state.epoch > 0 else None
                self._bk.submit(self._bk.hand_back, run, snap, state.epoch, "ran out of device memory")
                self._release(run)
            if keep:
                self._resize(key, pop, next_pow2(len(keep)))
            else:
                del self.populations[key]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.log(f"out of device memory: slots {before} -> {limit}, {len(evicted)} trial(s) handed back")

    @staticmethod
    def _try_snapshot(pop: Population, slot: int) -> Any:
        try:
            return snapshot(pop, slot)
        except torch.OutOfMemoryError:
            return None  # resumed from its last checkpoint on disk instead

    def _account_padding(self, key: tuple[Any, ...], pop: Population) -> None:
        """Floats the epoch about to run trains for its trials, against the floats it moves."""
        useful = sum(true_size(pop, s) for s in pop.running())
        acc = self._padding[key]
        acc[0] += useful
        acc[1] += pop.slots * pop.flat.shape[1]

    def _log_population(self, key: tuple[Any, ...], pop: Population, what: str) -> None:
        self.log(f"population {_describe(key)}: {what}, {pop.slots} slot(s)")

    # ------------------------------------------------------------------------------- the end
    def _hand_back(self, why: str) -> None:
        """Stop cleanly: finished trials are scored and told; every held trial is checkpointed,
        failed and re-enqueued (its retry resumes from the checkpoint)."""
        self._ev.drain()
        self._bk.drain()
        for run in list(self.running.values()):
            pop = self.populations[run.key]
            state = pop.state[run.slot]
            snap = snapshot(pop, run.slot) if state.epoch > 0 else None
            self._bk.submit(self._bk.hand_back, run, snap, state.epoch, why)
            self._release(run)
        for run in self._bk.held():  # asked ahead, never placed
            self._bk.submit(self._bk.hand_back, run, None, run.resumed_epoch, why)
        self._bk.drain()

    def _summarize(self, wall: float) -> None:
        s = self.summary
        s.wall_s = wall
        s.phases = dict(self.clock.seconds)
        s.checkpoint_files, s.checkpoint_bytes = self._writer.stats.files, self._writer.stats.bytes
        s.threads = {"writer": self._writer.stats.seconds}
        if hasattr(self, "_bk"):
            s.threads.update(bookkeeper=self._bk.store_s, evaluator=self._ev.seconds)
        s.padding = {_describe(k): u / max(t, 1.0) for k, (u, t) in self._padding.items()}
        if self.device.type == "cuda":
            s.device_busy_s = self._busy.total()
            s.device_peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        if os.environ.get(SUMMARY_ENV):  # benchmarks read a worker's summary from a file
            folder = Path(os.environ[SUMMARY_ENV])
            folder.mkdir(parents=True, exist_ok=True)
            write_atomic(folder / f"worker-{os.getpid()}.json", json.dumps(dataclasses.asdict(s), indent=1))


def _describe(key: tuple[Any, ...]) -> str:
    """A population key in words (a trial's ``population`` attr; log lines)."""
    shape, _, latent, hidden = key
    return (f"{shape.arch} depth {shape.depth} batch {shape.batch_size} {shape.optimizer} "
            f"{shape.posterior}/{shape.prior}/{shape.hierarchy} latent<={latent} hidden<={hidden}")


def _epoch_end() -> None:
    """A marker in the bookkeeper's queue: everything an epoch queued before it is done."""
