"""Start and watch local worker processes for a study (`tuner run`).

One `tuner worker` process per slot of work: one per listed GPU (CUDA_VISIBLE_DEVICES), or N on
CPU with the cores shared out (torch threads per worker). The storage URL reaches the workers
through the environment, never the command line (`ps` would show a password). A live table reads
the study's counts from the store; Ctrl-C asks every worker to stop cleanly (its running trials are
checkpointed and handed back) and running `tuner run` again continues the study.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table

from tuner.store.artifacts import artifacts_root
from tuner.store.retry import is_transient
from tuner.study.open import create_or_resume, open_study, study_counts
from tuner.study.spec import StudySpec
from tuner.study.start import WarmStart, warm_start

__all__ = ["STATUS_COLUMNS", "STOP_WAIT_S", "LaunchResult", "launch", "prepare", "status_table", "study_summary", "watch_progress"]

STATUS_COLUMNS = ("complete", "pruned", "failed", "run", "wait", "best", "/min", "ETA", "workers")
STOP_WAIT_S = 120  # how long workers get to finish their epoch and hand trials back


@dataclass
class LaunchResult:
    study: optuna.Study
    exit_codes: list[int] = field(default_factory=list)
    interrupted: bool = False
    logs: list[Path] = field(default_factory=list)


def status_table(study: optuna.Study, spec: StudySpec, started: float, finished0: int, alive: int) -> Table:
    counts = study_counts(study)
    minutes = max((time.time() - started) / 60.0, 1e-9)
    rate = (counts.finished - finished0) / minutes
    left = max(spec.budget.trials - counts.finished, 0)
    eta = f"{left / rate:.1f}m" if rate > 0 else "-"
    try:
        best = study.best_trial if spec.objective != "multi" else None
        best_text = f"{best.value:.2f} #{best.number}" if best else "-"
    except ValueError:
        best_text = "-"
    # fits an 80-column terminal with every header whole: no vertical rules, short names for the
    # states (run, wait), trials finished per minute as /min
    table = Table(title=f"study {spec.study}: {counts.finished}/{spec.budget.trials} trials", box=box.SIMPLE_HEAD,
                  pad_edge=False)
    for name in STATUS_COLUMNS:
        table.add_column(name, justify="right", no_wrap=True)
    table.add_row(str(counts.complete), str(counts.pruned), str(counts.failed), str(counts.running),
                  str(counts.waiting), best_text, f"{rate:.1f}", eta, str(alive))
    return table


def study_summary(study: optuna.Study, spec: StudySpec) -> str:
    """What `tuner run` prints at the end where pandas (the ranking's) is missing, in one line: the
    trial counts and the best feasible trial, or the size of the Pareto front (objective multi)."""
    c = study_counts(study)
    counts = f"{c.complete} complete, {c.pruned} pruned, {c.failed} failed trials"
    if spec.objective == "multi":
        return f"{counts}; {len(study.best_trials)} on the Pareto front (validation iwae_nll, inactive fraction)"
    try:
        best = study.best_trial  # feasible (not collapsed) trials only
    except ValueError:  # none complete, or all collapsed
        return f"{counts}; no complete trial without collapse yet"
    return f"{counts}; best: trial {best.number}, validation {spec.objective} {best.value:.2f} nats"


def watch_progress(
    study: optuna.Study, spec: StudySpec, alive: Callable[[], int], console: Console, refresh_s: float = 1.0
) -> None:
    """Show the live study table until ``alive()`` (workers still running) is 0.

    Any launcher's watch: the table reads only the store, so it looks the same whoever runs the
    workers. A Ctrl-C raises KeyboardInterrupt here for the launcher to stop its workers.
    """
    started, finished0 = time.time(), study_counts(study).finished
    with Live(console=console, refresh_per_second=2, transient=False) as live:
        while (n := alive()) > 0:
            _refresh(live, study, spec, started, finished0, n)
            time.sleep(refresh_s)
        _refresh(live, study, spec, started, finished0, 0)


def _refresh(live: Live, study: optuna.Study, spec: StudySpec, started: float, finished0: int, alive: int) -> None:
    """Redraw the table; a store outage (a PostgreSQL restart) keeps the last table, since the
    workers ride over it with their own retries and the launcher must not die before them."""
    try:
        live.update(status_table(study, spec, started, finished0, alive))
    except Exception as err:  # noqa: BLE001 - only store outages are swallowed, the rest re-raised
        if not is_transient(err):
            raise


def prepare(spec: StudySpec, url: str, artifacts: str | Path | None, warm: WarmStart | None = None,
            console: Console | None = None) -> tuple[LaunchResult, Path | None]:
    """What every launcher does first: read a warm start's configs from its study (a missing one
    fails here, before anything is written), create or resume the study with them enqueued first,
    then make the workers' log folder; None for the folder when the budget is already met."""
    first = None
    if warm is not None:
        source = open_study(warm.url or url, warm.study)
        first = warm_start(spec, source, warm, (console or Console(stderr=True)).print)
    study = create_or_resume(spec, url, first=first)
    result = LaunchResult(study=study)
    if study_counts(study).finished >= spec.budget.trials:
        return result, None
    log_dir = artifacts_root(url, artifacts) / spec.study / "workers"
    log_dir.mkdir(parents=True, exist_ok=True)
    return result, log_dir


def _worker_env(storage_url: str, threads: int, device: str | None) -> dict[str, str]:
    env = dict(os.environ, TUNER_STORAGE=storage_url, TUNER_THREADS=str(threads), PYTHONUNBUFFERED="1")
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    return env


def launch(
    spec: StudySpec, *, workers: int | None = None, storage_url: str | None = None, devices: list[str] | None = None,
    artifacts: str | Path | None = None, console: Console | None = None, refresh_s: float = 1.0,
    warm: WarmStart | None = None,
) -> LaunchResult:
    """Create or resume the study (a warm start's configs enqueued first), run `workers` local
    worker processes until the budget is met."""
    console = console or Console(stderr=True)
    url = storage_url or spec.storage
    result, log_dir = prepare(spec, url, artifacts, warm, console)
    if log_dir is None:
        return result
    study = result.study
    n = workers or (len(devices) if devices else spec.workers.count)
    threads = max(1, (os.cpu_count() or 1) // n) if not devices else 1
    procs = []
    for i in range(n):
        device = devices[i % len(devices)] if devices else None
        cmd = [sys.executable, "-m", "tuner", "worker", "--study", spec.study]
        cmd += ["--device", "cuda"] if device is not None else []
        cmd += ["--artifacts", str(artifacts)] if artifacts else []
        log = log_dir / f"worker-{int(time.time())}-{i}.log"
        result.logs.append(log)
        with open(log, "w") as out:
            # own session: a terminal's Ctrl-C reaches the launcher only, which forwards exactly one SIGINT
            procs.append(subprocess.Popen(
                cmd, env=_worker_env(url, threads, device), stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            ))
    try:
        watch_progress(study, spec, lambda: sum(p.poll() is None for p in procs), console, refresh_s)
    except KeyboardInterrupt:
        result.interrupted = True
        console.print("stopping: workers finish their epoch and hand their trials back (Ctrl-C again to kill)")
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        deadline = time.time() + STOP_WAIT_S
        try:
            for p in procs:
                try:
                    p.wait(timeout=max(deadline - time.time(), 0.1))
                except subprocess.TimeoutExpired:
                    p.kill()
        except KeyboardInterrupt:  # the second Ctrl-C: kill (the heartbeat check retries their trials)
            for p in procs:
                p.kill()
    result.exit_codes = [p.wait() for p in procs]
    return result
