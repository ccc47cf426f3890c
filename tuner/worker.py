"""The loop tying Optuna to populations: ask, train, report, prune, tell, refill.

A worker holds up to `slots` running trials in populations (one per shape) and steps them epoch by
epoch. Every epoch each trial reports its validation -ELBO (beta = 1) and is asked `should_prune`;
a pruned, diverged or finished trial leaves its slot, which is refilled by `study.ask()` at once.
Each trial's slot is checkpointed every epoch under ``<artifacts>/<study>/<trial>/``, and a
heartbeat thread keeps its trial alive in the store: a worker killed with -9 loses at most the
epoch in flight. Its trials go stale, `fail_stale_trials` (run by every worker) fails them, Optuna's
RetryHeartbeatStaleTrialCallback enqueues a copy, and whichever worker asks next resumes the copy
from the dead trial's last checkpoint. A complete trial's images (reconstructions, prior samples,
and a latent traversal for a new best) go to the store's artifact store (:mod:`tuner.artifacts`).
"""

from __future__ import annotations

import hashlib
import math
import os
import queue
import socket
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.storages import fail_stale_trials
from optuna.trial import TrialState

from tuner import __version__, gaps, metrics, space, strategy
from tuner.artifacts import artifact_store, artifacts_root, beats_best, render_images, save_images
from tuner.attrs import set_trial_attrs
from tuner.budget_lock import budget_lock
from tuner.data import Splits, load_splits
from tuner.engine import EpochResult, Population, PopulationShape, latent_size
from tuner.errors import TunerError
from tuner.models import VAE
from tuner.spec import DataConfig, TrainConfig, config_to_yaml
from tuner.study_spec import StudySpec
from tuner.retry import StorageUnavailableError
from tuner.storage import mask_url, open_storage
from tuner.study import load_study, started_at, study_counts
from tuner.train import resolve_device, save_atomic

__all__ = ["Worker", "WorkerSummary", "auto_slots"]

# ask/tell with a heartbeat storage is what Optuna's own optimize() does internally; its warnings
# about it (and about the experimental stale-trial check) would repeat on every trial
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

_POLL_S = 1.0  # idle wait while other workers run the study's last trials


def auto_slots(device: torch.device, spec: StudySpec, data_dim: int) -> int:
    """Slots per worker: 1 on CPU; on a GPU as many as half the free memory holds (capped by the spec).

    Per slot: 6 copies of the weights (weights, gradient, two Adam moments, best weights, scratch)
    plus the activations of one batch (a generous 8 floats per unit per example).
    """
    if device.type != "cuda":
        return spec.workers.slots or 1
    if spec.workers.slots:
        return min(spec.workers.slots, spec.workers.max_slots)
    latent, hidden = space.size_bounds(spec)
    depth = spec.base.model.depth
    weights = data_dim * hidden * 2 + hidden * hidden * 2 * max(depth - 1, 0) + hidden * latent * 3
    batch = spec.base.optim.batch_size
    per_slot = 4 * (6 * weights + 8 * batch * (2 * data_dim + 2 * depth * hidden))
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(spec.workers.max_slots, int(0.5 * free // per_slot)))


class _Heartbeats:
    """One thread recording heartbeats for every trial this worker runs (epochs may be long)."""

    def __init__(self, storage: optuna.storages.RDBStorage) -> None:
        self._storage, self._ids, self._lock = storage, set(), threading.Lock()
        self._stop = threading.Event()
        self._interval = storage.get_heartbeat_interval() or 60
        self._thread = threading.Thread(target=self._run, name="tuner-heartbeat", daemon=True)

    def __enter__(self) -> _Heartbeats:
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


class _CheckpointWriter:
    """Writes checkpoints on a background thread: the epoch loop hands over CPU copies and trains on.

    Each write is atomic (temp file, then rename), so a kill leaves the previous complete checkpoint;
    with writes far shorter than epochs, at most the epoch in flight is lost. `flush` waits for the
    queue before a trial is told or handed back, so its retry always finds its newest checkpoint.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[dict[str, Any], Path] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._path_hint: Path | None = None
        self._thread = threading.Thread(target=self._run, name="tuner-checkpoints", daemon=True)
        self._thread.start()

    def put(self, checkpoint: dict[str, Any], path: Path) -> None:
        self._queue.put((checkpoint, path))

    def flush(self) -> None:
        self._queue.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise TunerError(f"cannot write a checkpoint under {self._path_hint}: {error}; check the artifact folder")

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            checkpoint, path = item
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                save_atomic(checkpoint, path)
            except BaseException as err:  # noqa: BLE001 - reported to the main thread by flush()
                self._error, self._path_hint = err, path.parent
            finally:
                self._queue.task_done()
        self._queue.task_done()


@dataclass
class _Running:
    trial: optuna.Trial
    config: TrainConfig
    key: tuple[Any, ...]
    slot: int
    started: float


@dataclass
class WorkerSummary:
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    handed_back: int = 0
    resumed: int = 0
    model_epochs: int = 0

    def __str__(self) -> str:
        """The worker's last log line, whichever launcher ran it (tests read its model-epochs)."""
        return (f"{self.complete} complete, {self.pruned} pruned, {self.handed_back} handed back, "
                f"{self.resumed} resumed, {self.model_epochs} model-epochs")


class Worker:
    """Joins a study by storage URL and name and trains its trials until the budget is met."""

    def __init__(
        self, storage_url: str, study_name: str, *, slots: int | None = None, device: str | None = None,
        artifacts: str | Path | None = None, log: Callable[[str], None] = print,
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
        self.artifacts = artifacts_root(storage_url, artifacts) / study_name
        self.artifact_store = artifact_store(storage_url, artifacts)  # trial images, for the dashboard
        self.latent_max, self.hidden_max = space.size_bounds(self.spec)
        self.splits: dict[DataConfig, Splits] = {}
        self.populations: dict[tuple[Any, ...], Population] = {}
        self.running: dict[tuple[tuple[Any, ...], int], _Running] = {}
        # the base data loads here, before any trial is taken: a host without the dataset (or the GPU
        # above) fails with one line instead of failing trials in the store
        base = self._splits(self.spec.base.data)
        self.slots = slots or auto_slots(self.device, self.spec, base.dim)
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self.summary = WorkerSummary()
        self._stop = threading.Event()
        # a dead worker's trials are retried within grace + grace/3 s; the check is a query per worker
        self._stale_check_s = max(_POLL_S * 5, self.spec.workers.grace_period / 3)
        self._deadline = started_at(self.study) + self.spec.budget.timeout if self.spec.budget.timeout else math.inf

    # ------------------------------------------------------------------------------ the loop
    def request_stop(self) -> None:
        """Finish the epoch in flight, checkpoint and hand back running trials, then return."""
        self._stop.set()

    def run(self) -> WorkerSummary:
        self.log(
            f"worker {self.worker_id}: study '{self.study.study_name}' in {mask_url(self.url)}, "
            f"device {self.device}, {self.slots} slot(s)"
        )
        last_stale_check = 0.0
        self._checkpoints = _CheckpointWriter()
        with _Heartbeats(self.storage) as self._heartbeats:
            while True:
                if time.monotonic() - last_stale_check > self._stale_check_s:
                    # retries the trials of workers that died; FAIL and its retry's enqueue are two
                    # transactions: under the budget lock no worker counts the study in between
                    with budget_lock(self.storage, self.study.study_name):
                        fail_stale_trials(self.study)
                    last_stale_check = time.monotonic()
                if not self._stop.is_set():
                    self._fill()
                if self._stop.is_set():
                    self._hand_back()
                    break
                if self.running:
                    self._epoch()
                elif self._budget_met():
                    break
                else:
                    time.sleep(_POLL_S)  # other workers hold the last trials: retry them if they die
        self._checkpoints.flush()
        self._checkpoints.close()
        return self.summary

    def _budget_met(self) -> bool:
        return time.time() > self._deadline or study_counts(self.study).finished >= self.spec.budget.trials

    def _may_ask(self) -> bool:
        if time.time() > self._deadline:
            return False
        counts = study_counts(self.study)
        return counts.waiting > 0 or counts.finished + counts.running < self.spec.budget.trials

    def _fill(self) -> None:
        """Refill free slots with new (or retried) trials while the budget allows."""
        while len(self.running) < self.slots:
            with budget_lock(self.storage, self.study.study_name):  # no two workers ask for the last trial
                if not self._may_ask():
                    break
                trial = self.study.ask()
            # beat at once: a trial without any heartbeat never goes stale, so a worker dying
            # before its first beat would leave the trial RUNNING forever
            self._heartbeats.add(trial._trial_id)
            try:
                self._start(trial)
            except TunerError as err:
                if isinstance(err, StorageUnavailableError):
                    raise  # the store is gone: nothing can be written to it
                # a config this host cannot train (data missing here, batch larger than the split...)
                trial.set_user_attr("error", str(err))
                self.study.tell(trial, state=TrialState.FAIL)
                self._heartbeats.discard(trial._trial_id)
                self.summary.failed += 1
                self.log(f"trial {trial.number} failed: {err}")
                raise

    # ----------------------------------------------------------------------------- a trial
    def _splits(self, data: DataConfig) -> Splits:
        if data not in self.splits:
            self.splits[data] = load_splits(data, 1, self.device)
        return self.splits[data]

    def _population(self, config: TrainConfig) -> tuple[tuple[Any, ...], Population]:
        """The population this config trains in. With one slot it is sized to the config exactly:
        padding to the space's maxima buys nothing there and cost +35% epoch time on CPU."""
        key: tuple[Any, ...] = (PopulationShape.of(config), config.data)
        latent, hidden = self.latent_max, self.hidden_max
        if self.slots == 1:
            latent, hidden = latent_size(config), config.model.hidden
            key += (latent, hidden)
            for idle in [k for k, pop in self.populations.items() if k != key and not pop.running()]:
                del self.populations[idle]  # one trial at a time: drop populations of finished sizes
        if key not in self.populations:
            self.populations[key] = Population(
                key[0], self._splits(config.data), slots=self.slots, latent_max=latent,
                hidden_max=hidden, device=self.device,
            )
        return key, self.populations[key]

    def _checkpoint_path(self, number: int) -> Path:
        return self.artifacts / str(number) / "checkpoint.pt"

    def _start(self, trial: optuna.Trial) -> None:
        params = space.sample(trial, self.spec)
        seed = int(trial.user_attrs.get("seed", self.spec.base.seed + trial.number))
        config = self.spec.train_config(params, seed)
        splits = self._splits(config.data)
        if splits.train.shape[0] < config.optim.batch_size:
            raise TunerError(
                f"optim.batch_size {config.optim.batch_size} is larger than the {splits.train.shape[0]}-example "
                "train split; lower the space's batch sizes"
            )
        key, pop = self._population(config)
        slot = next(s for s in range(pop.slots) if (key, s) not in self.running)
        history = self.storage.get_trial(trial._trial_id).system_attrs.get("retry_history", [])
        resumed = next((n for n in reversed(history) if self._checkpoint_path(n).is_file()), None)
        if resumed is not None:
            ckpt = torch.load(self._checkpoint_path(resumed), map_location="cpu", weights_only=True)
            pop.load_slot_checkpoint(slot, ckpt)
            self.summary.resumed += 1
        else:
            pop.assign(slot, config)
        set_trial_attrs(trial, {"seed": seed, "worker": self.worker_id, "device": str(self.device),
                                "config": config.model_dump(mode="json")})
        run = self.running[(key, slot)] = _Running(trial, config, key, slot, time.time())
        self.log(f"trial {trial.number} started" + (f" (resumed from trial {resumed}, epoch {pop.state[slot].epoch})"
                                                     if resumed is not None else ""))
        # killed after its last epoch's checkpoint, before it was told: no epoch is left to run,
        # only its ending (the loop trains running slots only, so it would wait on it forever)
        if pop.state[slot].status == "finished":
            self._complete(run, pop)
        elif pop.state[slot].status == "stopped":
            self._end(run, pop, TrialState.PRUNED, reason=pop.state[slot].reason)

    def _epoch(self) -> None:
        """One epoch of every population with running trials; report, prune, finish, checkpoint."""
        for key, pop in self.populations.items():
            if not pop.running():
                continue
            for r in pop.run_epoch():
                run = self.running[(key, r.slot)]
                self.summary.model_epochs += 1
                try:
                    self._after_epoch(run, pop, r)
                except optuna.exceptions.UpdateFinishedTrialError:
                    # another worker failed it as stale (our beats missed the grace period, e.g. in a
                    # long store outage) and queued a retry that resumes from its checkpoint: let go
                    self._release(run, pop)
                    self.log(f"trial {run.trial.number} was failed as stale by another worker; its retry "
                             "resumes from the checkpoint")

    def _after_epoch(self, run: _Running, pop: Population, r: EpochResult) -> None:
        """Report a trial's epoch, checkpoint it, then end it if it finished, stopped or is pruned."""
        # report, then checkpoint: a kill in between re-trains this epoch on resume, and the
        # counter-based noise makes that epoch's numbers the same as the ones reported
        if math.isfinite(r.val_neg_elbo) and self.spec.objective != "multi":
            run.trial.report(r.val_neg_elbo, r.epoch)  # (Optuna has no report for multi-objective)
        self._checkpoints.put(pop.slot_checkpoint(r.slot), self._checkpoint_path(run.trial.number))
        if r.status == "stopped":
            self._end(run, pop, TrialState.PRUNED, reason=r.reason)
        elif r.status == "finished":
            self._complete(run, pop)
        elif self.spec.objective != "multi" and run.trial.should_prune():
            reason = f"pruned at epoch {r.epoch} by {self.spec.pruner.name}: val -ELBO {r.val_neg_elbo:.2f}"
            self._end(run, pop, TrialState.PRUNED, reason=reason)

    def _complete(self, run: _Running, pop: Population) -> None:
        state = pop.state[run.slot]
        model = pop.slot_model(run.slot, best=run.config.train.restore_best and state.best_epoch > 0)
        splits, k, seed = pop.splits, run.config.train.iwae_k, run.config.seed
        val = metrics.evaluate(model, splits.val, k=k, seed=seed).slot(0)
        test = metrics.evaluate(model, splits.test, k=k, seed=seed).slot(0)
        attrs: dict[str, Any] = dict(val)
        attrs.update({f"test_{name}": test[name] for name in ("iwae_nll", "neg_elbo", "recon", "kl", "active_units")})
        attrs.update(gaps.trial_gaps(model, splits.test, run.config))  # amortization/approximation gaps, test split
        attrs.update(best_epoch=state.best_epoch, best_val_neg_elbo=state.best_val, epochs=state.epoch,
                     end_reason=state.reason)
        if self.spec.objective == "iwae_nll":
            values: list[float] = [val["iwae_nll"]]
        elif self.spec.objective == "neg_elbo":
            values = [state.best_val]
        else:
            values = [val["iwae_nll"], val["inactive_fraction"]]
        if not all(math.isfinite(v) for v in values):
            self._end(run, pop, TrialState.PRUNED, reason=f"non-finite objective {values}")
            return
        # the images' and the collapse constraint's system attrs go with the user attrs, before tell
        system = self._save_images(run, model, splits, values, attrs)
        system.update(strategy.collapse_constraint_attrs(attrs["collapsed"]))  # the sampler avoids collapse
        self._end(run, pop, TrialState.COMPLETE, values=values, attrs=attrs, system=system)

    def _save_images(
        self, run: _Running, model: VAE, splits: Splits, values: list[float], attrs: dict[str, Any]
    ) -> dict[str, str]:
        """Reconstructions and samples on the val split, plus a traversal for a new best, as
        artifacts: returns the system attrs that attach them to the trial.

        An image never costs a trained trial: any error (a full disk, an unreachable store) is kept
        in the user attr ``artifact_error`` (added to ``attrs``) and logged, and the trial completes
        all the same.
        """
        try:
            images = render_images(model, splits.val, splits.image_shape, run.config.seed,
                                   traversal=beats_best(self.study, values, feasible=not attrs["collapsed"]))
            return save_images(images, self.artifact_store)
        except Exception as err:  # noqa: BLE001 - stores are plug-ins (file system, S3...) with their own errors
            attrs["artifact_error"] = f"{type(err).__name__}: {err}"
            self.log(f"trial {run.trial.number}: images not stored ({type(err).__name__}: {err})")
            return {}

    def _end(
        self, run: _Running, pop: Population, state: TrialState, *, values: list[float] | None = None,
        reason: str | None = None, attrs: dict[str, Any] | None = None, system: dict[str, Any] | None = None,
    ) -> None:
        trial, elapsed = run.trial, time.time() - run.started
        attrs = dict(attrs or {})
        config_yaml = config_to_yaml(run.config)
        attrs.update(wall_s=round(elapsed, 3), config_hash=hashlib.sha256(config_yaml.encode()).hexdigest()[:16],
                     versions={"tuner": __version__, "torch": torch.__version__, "optuna": optuna.__version__})
        if reason is not None:
            attrs["prune_reason"] = reason
        if self.spec.objective == "multi":  # no intermediate values there: keep the curve here
            attrs["val_neg_elbo_curve"] = [row["val_neg_elbo"] for row in pop.state[run.slot].history]
        set_trial_attrs(trial, attrs, system)  # one transaction, not one per attr
        self._checkpoints.flush()  # the trial's final checkpoint is on disk before it is told
        self.study.tell(trial, values, state=state)
        self._release(run, pop)
        if state == TrialState.COMPLETE:
            self.summary.complete += 1
            self.log(f"trial {trial.number} complete: {values} ({pop.state[run.slot].epoch} epochs, {elapsed:.1f} s)")
        else:
            self.summary.pruned += 1
            self.log(f"trial {trial.number} pruned: {reason}")

    def _release(self, run: _Running, pop: Population) -> None:
        pop.release(run.slot)
        self._heartbeats.discard(run.trial._trial_id)
        del self.running[(run.key, run.slot)]

    def _hand_back(self) -> None:
        """Stop cleanly: every running trial is failed and re-enqueued; its checkpoint resumes it."""
        retry = self.storage.get_heartbeat_stale_trial_callback()
        for run in list(self.running.values()):
            pop = self.populations[run.key]
            self._checkpoints.flush()  # the newest checkpoint is on disk: the retry resumes from it
            path = self._checkpoint_path(run.trial.number)
            if pop.state[run.slot].epoch > 0 and not path.is_file():
                self._checkpoints.put(pop.slot_checkpoint(run.slot), path)
                self._checkpoints.flush()
            run.trial.set_user_attr("handed_back", f"worker {self.worker_id} stopped at epoch {pop.state[run.slot].epoch}")
            with budget_lock(self.storage, self.study.study_name):  # FAIL and its retry, counted together
                frozen = self.study.tell(run.trial, state=TrialState.FAIL)
                if retry is not None:
                    retry(self.study, frozen)
            self._release(run, pop)
            self.summary.handed_back += 1
            self.log(f"trial {run.trial.number} handed back at epoch {pop.state[run.slot].epoch}")

