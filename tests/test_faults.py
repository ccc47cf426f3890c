"""Faults, with real processes and real stores: a worker killed with -9 mid-trial, PostgreSQL
restarted under four workers, four SQLite workers on one file, and workers on a host that cannot run
the study (no GPU, no dataset). Each ends with every budgeted trial accounted for, or nothing taken."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import psycopg
import pytest
import yaml
from optuna.trial import TrialState
from test_worker import TUNER, by_state, run_cli, study_yaml, trials, wait_for

from tuner.store.budget_lock import budget_lock
from tuner.store.urls import open_storage
from tuner.study.bookkeeper import Bookkeeper
from tuner.study.open import create_or_resume
from tuner.study.spec import parse_study_spec
from tuner.study.worker import Worker

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def create_study(spec_path: Path) -> None:
    create_or_resume(parse_study_spec(yaml.safe_load(spec_path.read_text())))


@dataclass
class WorkerProc:
    proc: subprocess.Popen[bytes]
    out: Path  # stdout: the worker's own log lines
    err: Path  # stderr: TunerError lines, warnings, tracebacks

    def text(self) -> str:
        return self.out.read_text() + self.err.read_text()


def start_workers(n: int, study: str, url: str, tmp_path: Path, *extra: str) -> list[WorkerProc]:
    """n `tuner worker` processes on CPU (one torch thread each), stdout and stderr to files."""
    env = dict(os.environ, TUNER_STORAGE=url, TUNER_THREADS="1", PYTHONUNBUFFERED="1")
    workers = []
    for i in range(n):
        out, err = tmp_path / f"worker-{i}.out", tmp_path / f"worker-{i}.err"
        with open(out, "wb") as o, open(err, "wb") as e:
            cmd = [*TUNER, "worker", "--study", study, "--device", "cpu", "--slots", "1",
                   "--artifacts", str(tmp_path / "art"), *extra]
            workers.append(WorkerProc(subprocess.Popen(cmd, env=env, stdout=o, stderr=e), out, err))
    return workers


def finish_workers(workers: list[WorkerProc], timeout: float) -> None:
    """Wait for every worker (killing the rest on timeout, so a hang fails the test, not the suite)."""
    deadline = time.time() + timeout
    try:
        for w in workers:
            w.proc.wait(timeout=max(deadline - time.time(), 0.1))
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()


def done_counts(text: str) -> int:
    """Trials a worker told as complete, from its last line ``worker done: N complete, ...``."""
    found = re.search(r"worker done: (\d+) complete", text)
    assert found, text[-2000:]
    return int(found.group(1))


# ------------------------------------------------------------------------------- 1. kill -9


def test_kill_9_mid_trial_loses_nothing_and_resumes_from_the_checkpoint(
    tmp_path: Path, small_npz: Path, pg_url: str
) -> None:
    url = pg_url
    epochs = 30  # enough that the kill lands mid-trial (a trial ending after it is the next test's case)
    spec = study_yaml(tmp_path, small_npz, "kill", url, budget={"trials": 3, "epochs": epochs})
    create_study(spec)
    env = dict(os.environ, TUNER_STORAGE=url, PYTHONUNBUFFERED="1")
    art = str(tmp_path / "art")
    victim = subprocess.Popen([*TUNER, "worker", "--study", "kill", "--device", "cpu", "--artifacts", art],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # kill it once its first trial has checkpointed (every 5 epochs by default: a kill loses at most that)
    wait_for(lambda: any((tmp_path / "art").rglob("checkpoint.pt")), 120, "a checkpoint")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    at_kill = trials(url, "kill")
    killed, done_before = by_state(at_kill, TrialState.RUNNING), len(by_state(at_kill, TrialState.COMPLETE))
    assert len(killed) == 1
    killed_number = killed[0].number
    survivor = run_cli("worker", "--study", "kill", "--device", "cpu", "--artifacts", art, env={"TUNER_STORAGE": url})
    assert survivor.returncode == 0, survivor.stdout + survivor.stderr

    ts = trials(url, "kill")
    numbers = [t.number for t in ts]
    assert len(set(numbers)) == len(numbers)  # no trial duplicated
    assert len(by_state(ts, TrialState.COMPLETE)) == 3  # == budget: none lost
    assert [t.number for t in by_state(ts, TrialState.FAIL)] == [killed_number]
    assert len(ts) == 4  # the 3 budgeted + the killed one: nothing pruned, waiting or left running
    retry = [t for t in ts if t.system_attrs.get("failed_trial") == killed_number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE  # exactly one retry
    assert retry[0].system_attrs["retry_history"] == [killed_number]
    assert retry[0].params == killed[0].params
    # resumed, not restarted: it loaded the killed trial's checkpoint at epoch >= 5 (the cadence) ...
    found = re.search(rf"trial {retry[0].number} started \(resumed from trial {killed_number}, epoch (\d+)\)",
                      survivor.stdout)
    assert found, survivor.stdout
    resumed_at = int(found.group(1))
    assert 5 <= resumed_at < epochs and resumed_at % 5 == 0
    # ... kept the epochs reported before the kill, and trained only the rest: the survivor's
    # model-epochs are its fresh trials' `epochs` each plus the retry's remaining epochs - resumed_at
    assert sorted(retry[0].intermediate_values) == list(range(1, epochs + 1))
    fresh = 3 - done_before - 1
    assert f"{epochs * fresh + epochs - resumed_at} model-epochs" in survivor.stdout, survivor.stdout
    assert done_counts(survivor.stdout) == 3 - done_before


# ------------------------------------------------------------------ 2. PostgreSQL restarted


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgCluster:
    """A throwaway PostgreSQL 15 cluster on a free port, owned by this test (initdb, pg_ctl)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="tuner-pg-"))  # not under pytest's 0700 tmp: postgres reads it
        self.data, self.log, self.port = self.root / "data", self.root / "server.log", _free_port()
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(PG_BIN / "initdb", "-D", self.data, "-U", "postgres", "-A", "trust", "--no-sync",
                  "--no-instructions")

    def _run(self, *cmd: object) -> None:
        """Run a PostgreSQL tool as the postgres OS user (initdb and pg_ctl refuse root)."""
        args = [str(c) for c in cmd]
        if os.geteuid() == 0:
            args = ["runuser", "-u", "postgres", "--", *args]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{args}: {proc.stdout}{proc.stderr}"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=60"
        self._run(PG_BIN / "pg_ctl", "-D", self.data, "-l", self.log, "-o", options, "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(PG_BIN / "pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "60", "stop")

    def create_database(self, name: str) -> None:
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')

    def remove(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(PG_BIN / "pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def pg_cluster() -> Iterator[PgCluster]:
    cluster = PgCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()  # stopped and deleted, whatever the test did


def test_postgres_restart_under_four_workers_loses_no_trial(tmp_path: Path, small_npz: Path, pg_cluster: PgCluster) -> None:
    pg_cluster.create_database("tuner")
    secret = "s3cret-pw"  # trust auth ignores it: here to prove no log line shows it
    url = f"postgresql+psycopg://postgres:{secret}@127.0.0.1:{pg_cluster.port}/tuner"
    budget, epochs = 12, 25
    spec = study_yaml(tmp_path, small_npz, "restart", url, budget={"trials": budget, "epochs": epochs},
                      workers={"count": 4, "heartbeat_interval": 1, "grace_period": 30})
    create_study(spec)
    workers = start_workers(4, "restart", url, tmp_path)
    try:
        # every worker holds a trial a few epochs in, far from its last epoch: trials are mid-flight
        wait_for(lambda: sum(t.state == TrialState.RUNNING and 2 <= len(t.intermediate_values) < epochs - 5
                             for t in trials(url, "restart")) >= 3, 240, "3 trials mid-flight")
        in_flight = {t.number for t in by_state(trials(url, "restart"), TrialState.RUNNING)}
        # pg_ctl restart -m fast, with the server down for 3 s between: longer than the 1 s
        # heartbeat, so every worker meets the outage (a refused connection) and must retry
        pg_cluster.stop("fast")
        time.sleep(3)
        pg_cluster.start()
        finish_workers(workers, timeout=400)
    finally:
        finish_workers(workers, timeout=0)

    masked = f"postgresql+psycopg://postgres:***@127.0.0.1:{pg_cluster.port}/tuner"
    for w in workers:
        text = w.text()
        assert w.proc.returncode == 0, text[-3000:]
        assert "Traceback" not in text and secret not in text
        retries = [line for line in text.splitlines() if "retrying" in line]
        assert retries, text[-3000:]  # it met the outage ...
        assert all(line.startswith(f"storage '{masked}'") for line in retries), retries  # ... one masked line each
    ts = trials(url, "restart")
    numbers = [t.number for t in ts]
    assert len(set(numbers)) == len(numbers)
    assert len(by_state(ts, TrialState.COMPLETE)) == budget == len(ts)  # none lost, failed or left over
    assert sum(done_counts(w.text()) for w in workers) == budget  # each told once, by one worker
    assert in_flight <= set(numbers)
    for t in ts:  # the trials in flight rode over the restart: every epoch reported, none skipped
        assert sorted(t.intermediate_values) == list(range(1, epochs + 1)), t.number


def test_a_trial_failed_as_stale_elsewhere_is_let_go_and_its_retry_resumes(tmp_path: Path, small_npz: Path) -> None:
    """An outage longer than the grace period: another worker fails our trial as stale and queues
    its retry. Our next report finds it finished; the worker must let it go, not crash, and the
    retry resumes from the checkpoint."""
    url = f"sqlite:///{tmp_path}/stale.db"
    create_study(study_yaml(tmp_path, small_npz, "stale", url, budget={"trials": 1, "epochs": 60}))
    workers = start_workers(1, "stale", url, tmp_path)
    try:
        wait_for(lambda: any(len(t.intermediate_values) >= 2 for t in trials(url, "stale")), 120, "2 epochs")
        # what another worker's stale-trial check does to a trial whose beats stopped: FAIL + a
        # WAITING retry, under the study's budget lock
        storage = open_storage(url)
        study = optuna.load_study(study_name="stale", storage=storage)
        victim = by_state(study.get_trials(), TrialState.RUNNING)[0]
        with budget_lock(storage, "stale"):
            assert storage.set_trial_state_values(victim._trial_id, TrialState.FAIL)
            storage.get_heartbeat_stale_trial_callback()(study, storage.get_trial(victim._trial_id))
        finish_workers(workers, timeout=240)
    finally:
        finish_workers(workers, timeout=0)
    text = workers[0].text()
    assert workers[0].proc.returncode == 0 and "Traceback" not in text, text[-3000:]
    assert f"trial {victim.number} was failed as stale by another worker" in text
    ts = trials(url, "stale")
    assert [t.number for t in by_state(ts, TrialState.FAIL)] == [victim.number] and len(ts) == 2, (
        text + "\n".join(f"{t.number} {t.state} {t.system_attrs}" for t in ts))
    retry = by_state(ts, TrialState.COMPLETE)
    assert len(retry) == 1 and retry[0].system_attrs["failed_trial"] == victim.number
    assert f"(resumed from trial {victim.number}, epoch" in text
    assert sorted(retry[0].intermediate_values) == list(range(1, 61))


def test_a_trial_killed_after_its_last_epoch_is_completed_by_its_retry_without_training(
    tmp_path: Path, small_npz: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kill lands after the last epoch's checkpoint, before tell: the retry loads a finished
    slot, which has no epoch left to run; the worker must complete it, not wait on it."""
    url = f"sqlite:///{tmp_path}/done.db"
    create_study(study_yaml(tmp_path, small_npz, "done", url, budget={"trials": 1, "epochs": 2}))

    class Killed(Exception):
        pass

    real_tell = Bookkeeper._tell

    def killed(self: Bookkeeper, run, state, **kwargs) -> None:
        if state == TrialState.COMPLETE:  # the final checkpoint is on disk by now, as after a real kill
            raise Killed
        real_tell(self, run, state, **kwargs)

    monkeypatch.setattr(Bookkeeper, "_tell", killed)
    with pytest.raises(Killed):
        Worker(url, "done", slots=1, device="cpu", artifacts=tmp_path / "art", log=lambda line: None).run()
    monkeypatch.undo()
    storage = open_storage(url)
    study = optuna.load_study(study_name="done", storage=storage)
    (victim,) = study.get_trials()
    with budget_lock(storage, "done"):  # what the stale-trial check of another worker does
        assert storage.set_trial_state_values(victim._trial_id, TrialState.FAIL)
        storage.get_heartbeat_stale_trial_callback()(study, storage.get_trial(victim._trial_id))
    log: list[str] = []
    summary = Worker(url, "done", slots=1, device="cpu", artifacts=tmp_path / "art", log=log.append).run()
    assert summary.complete == 1 and summary.resumed == 1 and summary.model_epochs == 0, log
    (retry,) = by_state(optuna.load_study(study_name="done", storage=url).get_trials(), TrialState.COMPLETE)
    assert retry.system_attrs["failed_trial"] == victim.number and sorted(retry.intermediate_values) == [1, 2]
    assert retry.user_attrs["epochs"] == 2 and retry.values[0] == pytest.approx(retry.user_attrs["iwae_nll"])


# ---------------------------------------------------------------- 3. SQLite, four workers


def test_four_sqlite_workers_200_trials_without_a_lock_error(tmp_path: Path, small_npz: Path) -> None:
    url = f"sqlite:///{tmp_path}/lock.db"
    spec = study_yaml(tmp_path, small_npz, "lock", url, budget={"trials": 200, "epochs": 1},
                      workers={"count": 4, "heartbeat_interval": 1, "grace_period": 30},
                      base={"data": {"dataset": f"npz:{small_npz}"}, "model": {"hidden": 32, "depth": 1},
                            "optim": {"batch_size": 64}, "kl": {"schedule": "constant"},
                            "train": {"iwae_k": 5, "gap_examples": 0}})  # the store's work, not the gaps
    create_study(spec)
    started = time.time()
    workers = start_workers(4, "lock", url, tmp_path)
    finish_workers(workers, timeout=600)
    wall = time.time() - started
    for w in workers:
        text = w.text()
        assert w.proc.returncode == 0, text[-3000:]
        assert "locked" not in text.lower() and "Traceback" not in text, text[-3000:]
        assert "retrying" not in text  # not even a retried lock
    ts = trials(url, "lock")
    numbers = [t.number for t in ts]
    assert len(set(numbers)) == len(numbers) == 200
    assert len(by_state(ts, TrialState.COMPLETE)) + len(by_state(ts, TrialState.PRUNED)) == 200
    assert not by_state(ts, TrialState.FAIL)
    counts = [done_counts(w.text()) for w in workers]
    assert sum(counts) == 200 and min(counts) > 0, counts  # all four took part
    print(f"200 trials on 4 SQLite workers: {wall:.0f} s, per worker {counts}")


# ------------------------------------------------- 4. a host that cannot run the study


def test_worker_without_the_specs_gpu_takes_no_trial(tmp_path: Path, small_npz: Path) -> None:
    url = f"sqlite:///{tmp_path}/gpu.db"
    create_study(study_yaml(tmp_path, small_npz, "gpu", url, workers={"device": "cuda"}))
    # no GPU visible to the worker, whatever this host has
    proc = run_cli("worker", "--study", "gpu", "--slots", "1", env={"TUNER_STORAGE": url, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "study 'gpu' workers.device 'cuda'" in lines[0] and "0 CUDA device(s)" in lines[0]
    assert trials(url, "gpu") == []  # no trial taken: none RUNNING, none FAIL


def test_worker_without_the_dataset_takes_no_trial(tmp_path: Path, small_npz: Path) -> None:
    data = tmp_path / "here-only.npz"
    shutil.copy(small_npz, data)
    url = f"sqlite:///{tmp_path}/data.db"
    create_study(study_yaml(tmp_path, data, "nodata", url))  # created where the data exists ...
    data.unlink()  # ... joined from a host where it does not
    # --slots: the slot count no longer needs the data, so only the preflight stops it before ask()
    proc = run_cli("worker", "--study", "nodata", "--slots", "2", "--device", "cpu", env={"TUNER_STORAGE": url})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(data) in lines[0] and "does not exist" in lines[0]
    assert trials(url, "nodata") == []
