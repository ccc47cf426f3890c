"""Run a study's workers as Ray actors (`tuner run SPEC --launcher ray [--address ADDR]`).

The local launcher starts processes on this host; this one asks a Ray cluster (a local instance
by default, or the one at --address) for them, so one `tuner run` can fill many hosts. Nothing
else changes: each actor runs the same :class:`tuner.study.worker.Worker` loop against the same SQL
store, the study lives there (not in Ray), and the live table is the local launcher's
(:func:`tuner.study.launch.watch_progress`). Ray is an optional extra (``pip install 'tuner[ray]'``),
imported only here and only when this launcher runs.

Resources per worker (:func:`worker_resources`), from the spec's ``workers.device``:

* a GPU is wanted when the device is ``cuda``/``cuda:N``, or ``auto`` on a cluster with GPUs.
  While workers <= GPUs each worker holds one GPU (``num_gpus=1``); with more workers than GPUs,
  k = ceil(workers / GPUs) workers share each GPU (``num_gpus=1/k``). A population worker sizes
  its population from the GPU memory it finds free, so workers sharing a GPU split it between
  them. Each GPU worker also holds one CPU.
* on CPU each worker holds an equal share of the cluster's CPUs (at least 1, at most one
  node's), and trains with that many torch threads.

The storage URL reaches the actors as a constructor argument (not the runtime environment,
which Ray shows in its dashboard) and is printed masked only. Ctrl-C asks every actor to stop:
it finishes the epoch in flight, checkpoints and hands its running trials back, as a local worker
does; a second Ctrl-C (or STOP_WAIT_S without an answer) kills the actors, and the heartbeat
check retries their trials.
"""

from __future__ import annotations

import math
import os
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from rich.console import Console

from tuner.errors import TunerError
from tuner.store.artifacts import artifacts_root
from tuner.store.urls import mask_url
from tuner.study.launch import STOP_WAIT_S, LaunchResult, prepare, watch_progress
from tuner.study.spec import StudySpec
from tuner.study.start import WarmStart

if TYPE_CHECKING:
    from tuner.study.worker_stats import WorkerSummary

__all__ = ["WorkerResources", "launch_ray", "worker_resources"]

INSTALL_HINT = "the ray launcher needs Ray; install tuner[ray] (pip install -e '.[ray]'), or use --launcher local"


@dataclass(frozen=True)
class WorkerResources:
    """What one worker actor asks Ray for, and the torch device and threads it trains with."""

    num_cpus: float
    num_gpus: float
    device: str  # "cuda" (Ray sets CUDA_VISIBLE_DEVICES to the actor's GPU) or "cpu"
    threads: int


def worker_resources(device: str, workers: int, cluster: dict[str, float], node_cpus: float) -> WorkerResources:
    """The resource rule in the module docstring, as a pure function of the cluster's totals.

    device: the spec's workers.device; cluster: ``ray.cluster_resources()``; node_cpus: the CPUs
    of the largest live node (a bigger share could never be placed)."""
    gpus = int(cluster.get("GPU", 0))
    wants_gpu = device.startswith("cuda") or (device == "auto" and gpus > 0)
    if wants_gpu and gpus == 0:
        raise TunerError(
            f"workers.device is '{device}' but the Ray cluster has no GPU; "
            "set workers.device to auto or cpu, or add GPU nodes to the cluster"
        )
    if wants_gpu:
        per_gpu = math.ceil(workers / gpus)  # workers sharing one GPU
        return WorkerResources(num_cpus=1, num_gpus=1 / per_gpu, device="cuda", threads=1)
    share = max(1, min(int(cluster.get("CPU", 1) // workers), int(node_cpus) or 1))
    return WorkerResources(num_cpus=share, num_gpus=0, device="cpu", threads=share)


class _WorkerActor:
    """One :class:`tuner.study.worker.Worker` in a Ray actor (a process of its own).

    A threaded actor (max_concurrency=2): `run` holds one thread for the whole study, so
    `request_stop` can still reach the worker on the other."""

    def __init__(self, storage_url: str, study_name: str, device: str, artifacts: str, threads: int, cwd: str,
                 log_path: str) -> None:
        import torch

        if os.path.isdir(cwd):  # relative paths in the spec (SQLite file, npz data) mean what they do for `tuner run`
            os.chdir(cwd)
        torch.set_num_threads(threads)
        self._args = (storage_url, study_name, device, artifacts)
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(log_path, "a", buffering=1)  # noqa: SIM115 - the actor's lifetime
        self._lock, self._stop, self._worker = threading.Lock(), False, None

    def _log(self, line: str) -> None:
        self._log_file.write(line + "\n")

    def run(self) -> WorkerSummary:
        """Train until the budget is met or a stop is requested."""
        from tuner.study.worker import Worker

        storage_url, study_name, device, artifacts = self._args
        try:
            worker = Worker(storage_url, study_name, device=device, artifacts=artifacts, log=self._log)
            with self._lock:
                self._worker = worker
                if self._stop:  # Ctrl-C came while the worker was loading its data
                    worker.request_stop()
            s = worker.run()
        except BaseException:
            self._log(traceback.format_exc())
            raise
        self._log(f"worker done: {s}")
        return s

    def request_stop(self) -> None:
        with self._lock:
            self._stop = True
            if self._worker is not None:
                self._worker.request_stop()


def _import_ray() -> ModuleType:
    try:
        import ray
    except ImportError:
        raise TunerError(INSTALL_HINT) from None
    return ray


def _connect(ray: ModuleType, address: str | None) -> None:
    """Join the cluster at `address`, or start a local instance with this host's CPUs and GPUs."""
    import logging

    options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}  # worker logs go to files
    try:
        if address:
            ray.init(address=address, **options)
        else:
            ray.init(include_dashboard=False, **options)
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        chain, cause = [], err
        while cause is not None:
            chain.append(str(cause))
            cause = cause.__cause__
        if any("InvalidAuthToken" in text for text in chain):  # token auth: recent Ray's default
            raise TunerError(f"{where} refused the connection: it wants its auth token; set RAY_AUTH_MODE=token "
                             "and RAY_AUTH_TOKEN (or ~/.ray/auth_token) as on its head node") from None
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise TunerError(f"cannot start or reach {where} ({first}); check --address, or start one with "
                         "`ray start --head`") from None


def _exit_code(ray: ModuleType, ref: Any) -> int:
    """0 for a worker that returned, 2 for one stopped by a TunerError (bad input), 1 otherwise."""
    try:
        ray.get(ref, timeout=0)
        return 0
    except ray.exceptions.RayTaskError as err:
        return 2 if isinstance(err.cause, TunerError) else 1
    except Exception:  # noqa: BLE001 - killed actor, lost node, unfinished after a kill
        return 1


def launch_ray(
    spec: StudySpec, *, workers: int | None = None, storage_url: str | None = None, address: str | None = None,
    artifacts: str | Path | None = None, console: Console | None = None, refresh_s: float = 1.0,
    warm: WarmStart | None = None,
) -> LaunchResult:
    """Create or resume the study (a warm start's configs enqueued first) and run `workers` Ray
    worker actors until its budget is met."""
    ray = _import_ray()
    console = console or Console(stderr=True)
    url = storage_url or spec.storage
    result, log_dir = prepare(spec, url, artifacts, warm, console)
    if log_dir is None:
        return result
    study, root = result.study, artifacts_root(url, artifacts)
    n = workers or spec.workers.count
    _connect(ray, address)
    try:
        node_cpus = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]), default=1)
        res = worker_resources(spec.workers.device, n, ray.cluster_resources(), node_cpus)
        console.print(f"ray: {n} worker(s) on {res.device} ({res.num_cpus:g} CPU, {res.num_gpus:g} GPU each), "
                      f"study '{spec.study}' in {mask_url(url)}")
        actor_cls = ray.remote(_WorkerActor).options(
            num_cpus=res.num_cpus, num_gpus=res.num_gpus, max_concurrency=2, max_restarts=0,
        )
        actors, stamp = [], int(time.time())
        for i in range(n):
            log = log_dir / f"ray-worker-{stamp}-{i}.log"
            result.logs.append(log)
            actors.append(actor_cls.remote(url, spec.study, res.device, str(root), res.threads, os.getcwd(), str(log)))
        refs = [a.run.remote() for a in actors]

        def alive() -> int:
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            return len(refs) - len(done)

        try:
            watch_progress(study, spec, alive, console, refresh_s)
        except KeyboardInterrupt:
            result.interrupted = True
            _stop(ray, actors, refs, console)
        result.exit_codes = [_exit_code(ray, ref) for ref in refs]
    finally:
        ray.shutdown()  # a local instance stops; a cluster is only left
    return result


def _stop(ray: ModuleType, actors: list[Any], refs: list[Any], console: Console) -> None:
    """Ask every actor to hand its trials back; kill those that do not finish in STOP_WAIT_S."""
    console.print("stopping: workers finish their epoch and hand their trials back (Ctrl-C again to kill)")
    for actor in actors:
        actor.request_stop.remote()
    try:
        ray.wait(refs, num_returns=len(refs), timeout=STOP_WAIT_S)
    except KeyboardInterrupt:  # the second Ctrl-C: kill (the heartbeat check retries their trials)
        pass
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
    for actor, ref in zip(actors, refs):
        if ref not in done:
            ray.kill(actor)
