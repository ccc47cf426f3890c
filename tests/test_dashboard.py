"""`tuner dashboard` as a user meets it: a real server process on a real store of worker-trained
trials, opened in headless Chromium (the page must show the study and the trial's images, the
objective's name and unit, the spec as a note, a config that reads and a trial page no wider than
the window), the artifacts fetched over HTTP, and the refusals (bad store, busy port) and the
warning off loopback."""

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
import optuna
import pytest
import yaml
from browser import CHROMIUM, Browser
from PIL import Image
from test_worker import run_cli, study_yaml

from tuner.spec import parse_config
from tuner.store.attrs import trial_config
from tuner.study.open import create_or_resume, load_study
from tuner.study.pruned import tell_pruned
from tuner.study.spec import parse_study_spec
from tuner.study.worker import Worker

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
    """Two trials trained by a real worker, a pruned one told as the worker tells it, and the
    dashboard serving their store."""
    tmp = tmp_path_factory.mktemp("dashboard")
    url = f"sqlite:///{tmp}/d.db"
    spec = study_yaml(tmp, small_npz, "dash-study", url, budget={"trials": 2, "epochs": 2})
    study = create_or_resume(parse_study_spec(yaml.safe_load(spec.read_text())))
    Worker(url, "dash-study", slots=1, device="cpu", artifacts=tmp / "art", log=lambda s: None).run()
    pruned = study.ask({"model.latent": optuna.distributions.IntDistribution(2, 8)})
    pruned.report(540.0, 1)  # a val -ELBO far from any IWAE NLL of the study
    tell_pruned(study, pruned)
    server = start(tmp, "--storage", url, "--artifacts", str(tmp / "art"))
    try:
        studies = json.loads(get(f"{server.base}/api/studies")[2])["study_summaries"]
        (study_id,) = [s["study_id"] for s in studies if s["study_name"] == "dash-study"]
        trials = json.loads(get(f"{server.base}/api/studies/{study_id}")[2])["trials"]
        yield Served(server, tmp / "art", tmp, study_id, trials)
    finally:
        stop(server)


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    """One headless Chromium run with ``args`` (--dump-dom, --screenshot); :class:`browser.Browser`
    for a page the test asks questions."""
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
    assert set(ids) == {"config.yaml", "reconstructions.png", "samples.png", "traversal.png"}
    page = f"{served.server.base}/dashboard/studies/{served.study_id}/trials?numbers=0"  # the trial's page

    dom = chromium(f"--user-data-dir={tmp_path / 'profile-dom'}", "--dump-dom", page)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert "dash-study" in html  # the study's name in the header
    assert "Trial 0" in html
    for name in ("reconstructions.png", "samples.png", "traversal.png"):
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
        if trial["state"] == "Pruned":
            continue  # told by hand in the fixture: nothing uploaded
        assert trial["artifacts"], trial["number"]
        for meta in trial["artifacts"]:
            url = f"{served.server.base}/artifacts/{served.study_id}/{trial['trial_id']}/{meta['artifact_id']}"
            status, headers, body = get(url)
            assert status == 200 and body == (served.art / "optuna" / meta["artifact_id"]).read_bytes()
            if meta["filename"] == "config.yaml":
                assert headers["Content-Type"] == "text/yaml; charset=utf-8"  # Chromium shows it as text
            else:
                assert headers["Content-Type"] == "image/png" and body.startswith(b"\x89PNG\r\n\x1a\n")


def _study(served: Served) -> optuna.Study:
    return optuna.load_study(study_name="dash-study", storage=f"sqlite:///{served.tmp}/d.db")


def _fits(page: Browser) -> None:
    """No horizontal scroll: the page is no wider than the window."""
    width, window = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert width <= window, f"the page is {width} px wide in a {window} px window"


def test_the_study_page_names_the_metric_and_the_note_shows_the_spec(served: Served, tmp_path: Path) -> None:
    base = f"{served.server.base}/dashboard/studies/{served.study_id}"
    with Browser(tmp_path / "profile", width=1280, height=900) as page:
        # the study's data arrived (its attrs table) and the History plot is drawn
        page.open(base, "document.body.innerText.includes('tuner_created_at') && document.querySelector('.xtitle')")
        text = page.evaluate("document.body.innerText")
        assert "val IWAE NLL (nats)" in text and "Objective 0" not in text  # History's axis and its picker
        created = text.split("tuner_created_at")[1].split()[0]  # the Study User Attributes table
        assert created == _study(served).user_attrs["tuner_created_at"] and created.endswith("Z") and "T" in created
        assert "tuner_spec" not in text  # the spec is not a cut-off line of JSON any more
        _fits(page)
        page.open(f"{base}/note", "document.body.innerText.includes('sampler:')")
        code = page.evaluate("[...document.querySelectorAll('pre code')].map(c => c.innerText)")
        assert len(code) == 1  # the spec, as YAML in one block, each setting on its own line
        _, spec = load_study(f"sqlite:///{served.tmp}/d.db", "dash-study")
        assert yaml.safe_load(code[0]) == spec.model_dump(mode="json", exclude={"storage"})
        assert "Study 'dash-study'" in page.evaluate("document.body.innerText")
        _fits(page)


def test_a_trial_page_shows_a_readable_config_and_fits_the_window(served: Served, tmp_path: Path) -> None:
    trial = next(t for t in served.trials if t["number"] == 0)
    base = f"{served.server.base}/dashboard/studies/{served.study_id}"
    with Browser(tmp_path / "profile", width=1280, height=900) as page:
        page.open(f"{base}/trials?numbers=0", "document.body.innerText.includes('config.yaml')")
        lines = page.evaluate("document.body.innerText").splitlines()
        assert "config.yaml" in lines  # the artifact card, beside the images
        assert not [line for line in lines if line.startswith(("config ", "kl_per_dim "))]  # no one-line JSON
        _fits(page)
        # the config itself, as the card's link serves it: YAML, one setting a line, `tuner train` reads it
        (meta,) = [a for a in trial["artifacts"] if a["filename"] == "config.yaml"]
        page.open(f"{served.server.base}/artifacts/{served.study_id}/{trial['trial_id']}/{meta['artifact_id']}",
                  "document.body.innerText.includes('optim:')")
        shown = page.evaluate("document.body.innerText")
        _fits(page)
    assert shown.startswith("# study 'dash-study', trial 0; rerun: tuner train config.yaml --out DIR")
    assert len(shown.splitlines()) > 40 and max(len(line) for line in shown.splitlines()) < 90
    stored = trial_config(_study(served).trials[0])
    assert parse_config(yaml.safe_load(shown)) == parse_config(stored) and stored["model"]["hidden"] == 32


def test_the_selection_table_rows_stay_short(served: Served, tmp_path: Path) -> None:
    """Each row of the Smart Selection table was ~650 px tall with the config as a user attr."""
    with Browser(tmp_path / "profile", width=1280, height=900) as page:
        page.open(f"{served.server.base}/dashboard/studies/{served.study_id}/smartSelection",
                  "document.querySelectorAll('tbody tr').length >= 3")
        heights = page.evaluate("[...document.querySelectorAll('tbody tr')].map(r => r.getBoundingClientRect().height)")
        _fits(page)
    assert len(heights) == 3 and max(heights) < 200, heights


def test_a_pruned_trial_has_no_value_on_the_dashboard(served: Served) -> None:
    """Its last val -ELBO stays an intermediate value; no plot puts it on the objective's axis."""
    trials = json.loads(get(f"{served.server.base}/api/studies/{served.study_id}")[2])["trials"]
    (pruned,) = [t for t in trials if t["state"] == "Pruned"]
    assert "values" not in pruned and pruned["intermediate_values"] == [{"step": 1, "value": 540.0}]
    iwae = {t.number: t.user_attrs.get("iwae_nll") for t in _study(served).trials}
    for t in trials:  # a complete trial's value is its val IWAE NLL, the quantity the axis names
        if t["state"] == "Complete":
            assert t["values"] == [pytest.approx(iwae[t["number"]])]


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
