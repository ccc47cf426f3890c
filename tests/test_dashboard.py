"""`tuner dashboard` as a user meets it: a real server process on a real store of worker-trained
trials, opened in headless Chromium (the page must show the study and the trial's images), the
images fetched over HTTP, and the refusals (bad store, busy port) and the warning off loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from test_worker import run_cli, study_yaml

from tuner.study.open import create_or_resume
from tuner.study.spec import parse_study_spec
from tuner.study.worker import Worker

CHROMIUM = Path("/usr/bin/chromium")
TUNER = [sys.executable, "-m", "tuner"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, dict(response.headers), response.read()


@dataclass
class Server:
    base: str
    proc: subprocess.Popen
    stdout: Path
    stderr: Path


def start(tmp: Path, *args: str) -> Server:
    """`tuner dashboard ARGS` in the background; returns once it answers HTTP 200."""
    port = free_port()
    out, err = tmp / f"dash-{port}.out", tmp / f"dash-{port}.err"
    proc = subprocess.Popen([*TUNER, "dashboard", "--port", str(port), *args],
                            stdout=out.open("w"), stderr=err.open("w"), env=dict(os.environ, PYTHONUNBUFFERED="1"))
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"dashboard exited {proc.returncode}: {err.read_text()}")
        try:
            if get(f"{base}/api/studies", timeout=2)[0] == 200:
                return Server(base, proc, out, err)
        except OSError:
            pass
        if time.time() > deadline:
            stop(Server(base, proc, out, err))
            raise AssertionError(f"dashboard did not answer within 60 s: {err.read_text()}")
        time.sleep(0.2)


def stop(server: Server) -> None:
    """Ctrl-C, again every 5 s as a user would: wsgiref swallows one that lands inside a request."""
    for _ in range(6):
        server.proc.send_signal(signal.SIGINT)
        try:
            server.proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue
    server.proc.kill()
    server.proc.wait()


@dataclass
class Served:
    server: Server
    art: Path
    tmp: Path
    study_id: int
    trials: list[dict]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, small_npz: Path) -> Iterator[Served]:
    """Two trials trained by a real worker, and the dashboard serving their store."""
    tmp = tmp_path_factory.mktemp("dashboard")
    url = f"sqlite:///{tmp}/d.db"
    spec = study_yaml(tmp, small_npz, "dash-study", url, budget={"trials": 2, "epochs": 2})
    create_or_resume(parse_study_spec(yaml.safe_load(spec.read_text())))
    Worker(url, "dash-study", slots=1, device="cpu", artifacts=tmp / "art", log=lambda s: None).run()
    server = start(tmp, "--storage", url, "--artifacts", str(tmp / "art"))
    try:
        studies = json.loads(get(f"{server.base}/api/studies")[2])["study_summaries"]
        (study_id,) = [s["study_id"] for s in studies if s["study_name"] == "dash-study"]
        trials = json.loads(get(f"{server.base}/api/studies/{study_id}")[2])["trials"]
        yield Served(server, tmp / "art", tmp, study_id, trials)
    finally:
        stop(server)


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: the browser test needs Debian's Chromium; run "
                    "`apt-get install -y chromium` (CI's .ci/run installs it)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--virtual-time-budget=15000"]
    return subprocess.run([str(CHROMIUM), *flags, *args], capture_output=True, text=True, timeout=120)


def test_browser_shows_the_study_and_the_trials_images(served: Served, tmp_path: Path) -> None:
    trial = next(t for t in served.trials if t["number"] == 0)
    assert trial["state"] == "Complete"
    ids = {a["filename"]: a["artifact_id"] for a in trial["artifacts"]}
    assert {"reconstructions.png", "samples.png"} <= set(ids)  # (and a traversal if it was a new best)
    page = f"{served.server.base}/dashboard/studies/{served.study_id}/trials?numbers=0"  # the trial's page

    dom = chromium(f"--user-data-dir={tmp_path / 'profile-dom'}", "--dump-dom", page)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert "dash-study" in html  # the study's name in the header
    assert "Trial 0" in html
    for name in ("reconstructions.png", "samples.png"):
        src = f'src="/artifacts/{served.study_id}/{trial["trial_id"]}/{ids[name]}"'
        tags = [tag for tag in html.split("<img")[1:] if src in tag.split(">")[0]]
        assert tags and f'alt="{name}"' in tags[0], f"no <img> for {name} in the page"

    shot = tmp_path / "dash.png"
    run = chromium(f"--user-data-dir={tmp_path / 'profile-shot'}", "--hide-scrollbars", "--window-size=1280,900",
                   f"--screenshot={shot}", page)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size == (1280, 900)
        pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert pixels.std() > 20 and colours > 50, (pixels.std(), colours)  # a drawn page, not a blank one


def test_artifact_bytes_over_http_are_the_stored_files(served: Served) -> None:
    for trial in served.trials:
        assert trial["artifacts"], trial["number"]
        for meta in trial["artifacts"]:
            url = f"{served.server.base}/artifacts/{served.study_id}/{trial['trial_id']}/{meta['artifact_id']}"
            status, headers, body = get(url)
            assert status == 200 and headers["Content-Type"] == "image/png"
            assert body == (served.art / "optuna" / meta["artifact_id"]).read_bytes()
            assert body.startswith(b"\x89PNG\r\n\x1a\n")


def test_default_binds_loopback_and_says_where(served: Served) -> None:
    port = served.server.base.rsplit(":", 1)[1]
    assert f"dashboard: http://127.0.0.1:{port}/dashboard" in served.server.stdout.read_text()
    assert "warning" not in served.server.stderr.read_text()
    assert f"Listening on http://127.0.0.1:{port}/" in served.server.stderr.read_text()  # bottle's own line


def test_warns_once_when_bound_beyond_loopback(served: Served) -> None:
    url = f"sqlite:///{served.tmp}/d.db"
    server = start(served.tmp, "--storage", url, "--artifacts", str(served.art), "--host", "0.0.0.0")
    try:
        assert get(f"{server.base}/api/studies")[0] == 200  # every interface, loopback included
        warnings = [line for line in server.stderr.read_text().splitlines() if line.startswith("warning")]
    finally:
        stop(server)
    assert len(warnings) == 1 and "no login" in warnings[0] and "0.0.0.0" in warnings[0]
    assert server.proc.returncode == 0  # Ctrl-C is a clean stop


@pytest.mark.parametrize(
    ("storage", "phrase"),
    [("mysql://nobody@nowhere/db", "not supported"), ("sqlite:///{tmp}/nothing-here.db", "no such file")],
)
def test_bad_storage_is_one_line_exit_2(storage: str, phrase: str, tmp_path: Path) -> None:
    proc = run_cli("dashboard", "--storage", storage.format(tmp=tmp_path), "--port", str(free_port()), timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and phrase in lines[0], proc.stderr
    assert not (tmp_path / "nothing-here.db").exists()  # a typo creates no empty store


def test_busy_port_is_one_line_exit_2(served: Served) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_cli("dashboard", "--storage", f"sqlite:///{served.tmp}/d.db", "--port", str(port), timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"--port {port} is in use" in lines[0] and "another --port" in lines[0]
