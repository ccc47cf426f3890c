"""`tuner run --launcher ray`: real Ray (a 2-CPU head node started here), real worker actors, a real
SQLite store; Ctrl-C hands trials back; the package works without Ray installed."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from optuna.trial import TrialState
from test_worker import by_state, checkpoint_file, run_cli, study_yaml, trials
from typer.testing import CliRunner

from tuner.cli import app
from tuner.errors import TunerError
from tuner.study.ray_launch import INSTALL_HINT, worker_resources

TUNER = [sys.executable, "-m", "tuner"]
RAY = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ray clusters ask drivers for a token: this cluster's own, given to it and to `tuner run` (nothing in ~/.ray)
RAY_ENV = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A Ray head node with 2 CPUs, in its own process group; that group is stopped afterwards."""
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    out = Path(temp) / "start.log"
    env = dict(os.environ, **RAY_ENV, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # no 30 s drain when stopped
    with open(out, "w") as log:
        head = subprocess.Popen(
            [str(RAY), "start", "--head", "--block", "--num-cpus", "2", "--num-gpus", "0", "--port", str(port),
             "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
        )
    try:
        deadline = time.time() + 60
        while "Ray runtime started" not in out.read_text():
            assert head.poll() is None and time.time() < deadline, out.read_text()
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops the node's processes on SIGTERM
        try:
            head.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):  # what is left of the group (GCS, monitor) after 15 s
            os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        shutil.rmtree(temp, ignore_errors=True)


def test_worker_resources_rule() -> None:
    cpus = {"CPU": 8.0}
    assert worker_resources("cpu", 2, cpus, node_cpus=8) == worker_resources("auto", 2, cpus, node_cpus=8)
    assert worker_resources("cpu", 2, cpus, node_cpus=8).num_cpus == 4
    assert worker_resources("cpu", 2, {"CPU": 16.0}, node_cpus=4).threads == 4  # never more than one node has
    assert worker_resources("cpu", 16, cpus, node_cpus=8).num_cpus == 1
    gpus = {"CPU": 8.0, "GPU": 2.0}
    one_each = worker_resources("auto", 2, gpus, node_cpus=8)
    assert (one_each.num_gpus, one_each.device, one_each.num_cpus) == (1.0, "cuda", 1)
    assert worker_resources("cuda:1", 5, gpus, node_cpus=8).num_gpus == pytest.approx(1 / 3)  # 3 share a GPU
    assert worker_resources("cpu", 2, gpus, node_cpus=8).num_gpus == 0  # the spec asked for CPU
    with pytest.raises(TunerError, match="has no GPU"):
        worker_resources("cuda", 2, cpus, node_cpus=8)


BLOCK_RAY = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'ray':
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
"""


def test_without_ray_the_core_imports_and_the_ray_launcher_says_what_to_install(tmp_path: Path,
                                                                                 small_npz: Path) -> None:
    spec = study_yaml(tmp_path, small_npz, "noray", f"sqlite:///{tmp_path}/n.db")
    code = BLOCK_RAY + (
        "import tuner.cli, tuner.study.launch, tuner.study.ray_launch, tuner.study.worker\n"
        f"sys.argv = ['tuner', 'run', {str(spec)!r}, '--launcher', 'ray']\n"
        "tuner.cli.main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"error: {INSTALL_HINT}"
    assert not (tmp_path / "n.db").exists()  # refused before the study was created


def test_launcher_options_are_checked_before_anything_runs(tmp_path: Path, small_npz: Path) -> None:
    spec = study_yaml(tmp_path, small_npz, "opts", f"sqlite:///{tmp_path}/o.db")
    runner = CliRunner()
    for args, says in (
        (["--launcher", "slurm"], "--launcher 'slurm' is not a launcher; use local or ray"),
        (["--launcher", "ray", "--devices", "0,1"], "--devices is for the local launcher"),
    ):
        result = runner.invoke(app, ["run", str(spec), *args])
        assert isinstance(result.exception, TunerError) and says in str(result.exception), result.output
    # the same rule through the real command: one line, exit 2
    proc = run_cli("run", str(spec), "--address", "127.0.0.1:6379", timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--address names a Ray cluster; add --launcher ray" in proc.stderr
    assert not (tmp_path / "o.db").exists()


# ---- against a real Ray cluster (started once for the tests below; the ones above need none)
def test_two_ray_workers_complete_the_budget(ray_address: str, tmp_path: Path, small_npz: Path) -> None:
    url = f"sqlite:///{tmp_path}/r.db"
    spec = study_yaml(tmp_path, small_npz, "ray", url, base={"model": {"hidden": 64, "depth": 1}},
                      budget={"trials": 4, "epochs": 4}, workers={"device": "cpu"})
    proc = run_cli("run", str(spec), "--launcher", "ray", "--address", ray_address, "--workers", "2",
                   "--artifacts", str(tmp_path / "art"), timeout=180, env=RAY_ENV)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "2 worker(s) on cpu (1 CPU, 0 GPU each)" in proc.stderr  # 2 CPUs shared by 2 workers
    ts = trials(url, "ray")
    complete = by_state(ts, TrialState.COMPLETE)
    assert len(complete) == 4 and len(ts) == 4
    assert sorted(t.number for t in ts) == [0, 1, 2, 3]  # unique numbers, none lost or doubled
    assert all(sorted(t.intermediate_values) == [1, 2, 3, 4] for t in complete)
    assert len({t.user_attrs["worker"] for t in complete}) == 2  # two actors (host:pid) trained them
    logs = sorted((tmp_path / "art" / "ray" / "workers").glob("ray-worker-*.log"))
    assert len(logs) == 2 and all("worker done:" in log.read_text() for log in logs)
    assert "rank" in proc.stdout and "val NLL" in proc.stdout  # the ranking is printed, as with local workers


def test_ctrl_c_hands_the_running_trials_back(ray_address: str, tmp_path: Path, small_npz: Path) -> None:
    url = f"sqlite:///{tmp_path}/c.db"
    spec = study_yaml(tmp_path, small_npz, "stop", url, budget={"trials": 4, "epochs": 200},
                      workers={"device": "cpu"})
    proc = subprocess.Popen(
        [*TUNER, "run", str(spec), "--launcher", "ray", "--address", ray_address, "--workers", "2",
         "--artifacts", str(tmp_path / "art")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1", **RAY_ENV),
    )
    try:
        deadline = time.time() + 90
        while not all(len(t.intermediate_values) >= 2 for t in by_state(trials(url, "stop"), TrialState.RUNNING)
                      ) or len(by_state(trials(url, "stop"), TrialState.RUNNING)) < 2:
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal does
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err + out
    assert "stopped; run `tuner run" in out
    ts = trials(url, "stop")
    handed = by_state(ts, TrialState.FAIL)  # both workers' running trials, told as failed by their worker
    assert len(handed) == 2 and all(t.user_attrs["handed_back"].endswith(" stopped at epoch "
                                                                        f"{max(t.intermediate_values)}") for t in handed)
    assert not by_state(ts, TrialState.RUNNING)  # nothing left to go stale
    retries = by_state(ts, TrialState.WAITING)  # re-enqueued copies, resumed from the checkpoints by the next run
    assert sorted(t.system_attrs["failed_trial"] for t in retries) == sorted(t.number for t in handed)
    for t in handed:
        assert checkpoint_file(tmp_path / "art", url, "stop", t.number).is_file()
