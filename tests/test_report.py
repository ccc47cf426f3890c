"""The HTML report of a real tiny study (real workers, real SQLite store, real artifact store): its
sections, figures and images, that it opens offline, that headless Chromium draws every plot
without a script error, and that bad input is one line, exit 2, with nothing (half-)written."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from PIL import Image
from plotly.offline import get_plotlyjs
from test_worker import study_yaml

from tuner.cli import main
from tuner.results.ranking import ranking_frame
from tuner.results.report import write_report
from tuner.store.artifacts import artifact_store, trial_images
from tuner.study.open import create_or_resume
from tuner.study.spec import parse_study_spec
from tuner.study.worker import Worker

FIGURES = ("history", "curves", "importances", "collapse")
SECTIONS = {"ranking": "Ranking", "history": "Optimization history", "curves": "Learning curves",
            "importances": "Hyperparameter importances", "collapse": "NLL vs active units",
            "images": "Top trials&#x27; images"}
WINDOW = (1280, 4000)  # tall enough to hold every section in the screenshot


@dataclass
class Built:
    url: str
    art: Path
    study: optuna.Study
    out: Path
    html: str


def make_study(
    tmp: Path, npz: Path, name: str, url: str, enqueue: list[dict], seed: int | None = None, **over
) -> optuna.Study:
    """A tiny study trained to its budget by one real worker (one slot: trials run in order);
    `enqueue`: params of its first trials, with `seed` (if given) instead of one per trial number."""
    spec = study_yaml(tmp, npz, name, url, **over)
    study = create_or_resume(parse_study_spec(yaml.safe_load(spec.read_text())))
    for params in enqueue:
        study.enqueue_trial(params, user_attrs=None if seed is None else {"seed": seed})
    Worker(url, name, slots=1, device="cpu", artifacts=tmp / "art", log=lambda s: None).run()
    return study


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, small_npz: Path) -> Built:
    """Two good trials complete; two with lr 1e-6 are pruned by the median rule at epoch 2 of 3.
    """
    tmp = tmp_path_factory.mktemp("report")
    url = f"sqlite:///{tmp}/r.db"
    study = make_study(
        tmp, small_npz, "rep", url,
        [{"optim.lr": lr, "model.latent": z} for lr, z in ((3e-3, 2), (3e-3, 8), (1e-6, 4), (1e-6, 6))],
        space={"optim.lr": {"type": "categorical", "choices": [3e-3, 1e-6]},
               "model.latent": {"type": "int", "low": 2, "high": 8}},
        pruner={"name": "median", "n_startup_trials": 2, "n_warmup_steps": 2},
        budget={"trials": 4, "epochs": 3},
    )
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.COMPLETE] * 2 + [TrialState.PRUNED] * 2, states
    out = write_report(url, "rep", tmp / "report.html", artifacts=tmp / "art")
    return Built(url, tmp / "art", study, out, out.read_text(encoding="utf-8"))


def sections(page: str) -> dict[str, str]:
    """Section id -> its HTML (or, for a dumped DOM, its rendered markup)."""
    parts = re.split(r'<section id="', page)[1:]
    return {part.split('"', 1)[0]: part for part in parts}


def test_report_has_every_section_and_opens_offline(built: Built) -> None:
    page, parts = built.html, sections(built.html)
    assert list(parts) == list(SECTIONS)
    for key, title in SECTIONS.items():
        assert f"<h2>{title}</h2>" in parts[key]
    # four plotly figures, one per plot section, drawn by plotly.js inlined exactly once
    assert page.count('class="plotly-graph-div"') == len(FIGURES) and page.count("Plotly.newPlot(") == len(FIGURES)
    for name in FIGURES:
        assert f'id="fig-{name}"' in parts[name]
    assert page.count(get_plotlyjs()) == 1 and page.count("* plotly.js v") == 1
    # nothing fetched from the network: no external script, stylesheet, image or frame
    assert not re.search(r"<(script|link|img|iframe)\b[^>]*\b(src|href)\s*=\s*[\"']?(https?:)?//", page, re.I)
    # the ranking table: one row per complete trial, in ranking_frame's order
    complete = built.study.get_trials(states=(TrialState.COMPLETE,))
    rows = re.findall(r"<tr>\s*<td>(\d+)</td>\s*<td>(\d+)</td>", parts["ranking"])
    assert [(int(rank), int(n)) for rank, n in rows] == list(enumerate(ranking_frame(built.study)["trial"], 1))
    assert len(rows) == len(complete) == 2
    assert "model.latent" in parts["ranking"] and "iwae_nll" in parts["ranking"]
    # learning curves: the complete trials by name, the pruned ones as one dashed grey trace
    for t in complete:
        assert f'"name":"trial {t.number}"' in parts["curves"]
    assert '"name":"pruned"' in parts["curves"] and '"dash":"dash"' in parts["curves"]
    assert "pruned at epoch 2 by median" in parts["curves"]  # the reason shows on hover
    assert '"name":"collapsed"' in parts["collapse"] and '"name":"best so far"' in parts["history"]


def test_top_trials_images_are_embedded(built: Built) -> None:
    part = sections(built.html)["images"]
    store = artifact_store(built.url, built.art)
    expected = {t.number: trial_images(built.study, t, store)
                for t in built.study.get_trials(states=(TrialState.COMPLETE,))}
    assert all("reconstructions.png" in imgs and "samples.png" in imgs for imgs in expected.values())
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', part)
    assert len(uris) == sum(len(imgs) for imgs in expected.values())
    embedded = {base64.b64decode(uri) for uri in uris}
    assert embedded == {png for imgs in expected.values() for png in imgs.values()}  # the stored bytes, intact
    assert f"Rank 1: trial {ranking_frame(built.study)['trial'].iloc[0]} " in part  # in ranking order


def test_report_draws_in_headless_chromium(built: Built, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).is_file():
        pytest.fail("Chromium is not installed; install it (as root): apt-get update && apt-get install -y chromium")
    shot = tmp_path / "report.png"
    proc = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=10000", "--enable-logging=stderr", "--v=0", f"--window-size={WINDOW[0]},{WINDOW[1]}",
         f"--screenshot={shot}", "--dump-dom", built.out.as_uri()],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert "Uncaught" not in proc.stderr and not [line for line in console if "rror" in line], console
    dom = sections(proc.stdout)
    assert list(dom) == list(SECTIONS)
    for name in FIGURES:  # plotly replaced each empty div by its SVG layers
        assert re.search(rf'id="fig-{name}"[^>]*>.*?class="main-svg"', dom[name], re.S), name
        assert 'class="point"' in dom[name] and '<g class="xtick">' in dom[name]  # data and axes drawn
    assert "stroke-dasharray" in dom["curves"]  # the pruned trials' dashed line was drawn
    assert 'class="legendtext"' in dom["curves"] and ">pruned<" in dom["curves"]
    assert dom["images"].count("<img") == len(re.findall("<img", sections(built.html)["images"])) > 0
    with Image.open(shot) as image:
        assert image.format == "PNG" and image.size == WINDOW
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, axes, lines and digits: not a blank page


def test_without_images_the_page_says_so(built: Built, tmp_path: Path) -> None:
    out = write_report(built.url, "rep", tmp_path / "r.html", artifacts=tmp_path / "elsewhere")
    part = sections(out.read_text())["images"]
    assert "No images are stored for the top 2 trial(s)" in part and "<img" not in part


TWINS = [{"model.latent": 4, "optim.lr": 3e-3}] * 2  # the same params...


@pytest.mark.parametrize(
    ("name", "budget", "space", "enqueue", "note"),
    [
        ("one", 1, {}, [], "Importances need at least 2 complete trials; this study has 1."),
        ("single", 2, {"optim.lr": {"type": "fixed", "value": 3e-3}}, [],  # (study_yaml merges into its space)
         "Importances need at least 2 hyperparameters shared by all complete trials; searched here: model.latent."),
        ("twins", 2, {}, TWINS, "Importances are undefined"),
    ],
)
def test_importances_that_cannot_be_computed_are_a_note(
    name: str, budget: int, space: dict, enqueue: list[dict], note: str, tmp_path: Path, small_npz: Path
) -> None:
    url = f"sqlite:///{tmp_path}/i.db"
    # (enqueued twins get the same seed too, so the same value)
    study = make_study(tmp_path, small_npz, name, url, enqueue, 7, space=space, budget={"trials": budget, "epochs": 1})
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == budget
    page = write_report(url, name, tmp_path / "r.html", artifacts=tmp_path / "art").read_text()
    assert note in sections(page)["importances"]
    assert page.count("Plotly.newPlot(") == len(FIGURES) - 1 and 'id="fig-importances"' not in page


def run_main(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str, str]:
    """`tuner ARGS` in-process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["tuner", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_report_command_writes_the_page(
    built: Built, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "cli.html"
    code, stdout, err = run_main(capsys, monkeypatch, "report", "rep", "--storage", built.url,
                                 "--artifacts", str(built.art), "--out", str(out), "--top", "1")
    assert code == 0, err
    assert stdout.strip() == f"report: {out} ({out.stat().st_size / 1e6:.1f} MB)"
    parts = sections(out.read_text())
    assert list(parts) == list(SECTIONS) and parts["images"].count("<h3>Rank ") == 1  # --top 1
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed, not left behind


@pytest.mark.parametrize(
    ("case", "phrase"),
    [
        ("unknown study", "no study 'nope'"),
        ("empty study", "has no complete trial yet"),
        ("unreachable storage", "127.0.0.1:1"),
        ("missing store file", "file does not exist"),
        ("missing out folder", "does not exist"),
        ("out is a folder", "is a folder"),
        ("unwritable out folder", "writable folder"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    case: str, phrase: str, built: Built, tmp_path: Path, small_npz: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    study, url, out = "rep", built.url, tmp_path / "report.html"
    out.write_text("the previous report")  # a failed run must leave it as it was
    if case == "unknown study":
        study = "nope"
    elif case == "empty study":
        url, study = f"sqlite:///{tmp_path}/e.db", "empty"
        create_or_resume(parse_study_spec(yaml.safe_load(study_yaml(tmp_path, small_npz, study, url).read_text())))
    elif case == "unreachable storage":
        url = "postgresql+psycopg://u:hunter2@127.0.0.1:1/db"
    elif case == "missing store file":
        url = f"sqlite:///{tmp_path}/missing.db"
    elif case == "missing out folder":
        out = tmp_path / "no" / "report.html"
    elif case == "out is a folder":
        out = tmp_path
    else:
        out = Path("/sys/tuner-report.html")  # not writable, even by root
    code, _, err = run_main(capsys, monkeypatch, "report", study, "--storage", url, "--out", str(out))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and phrase in lines[0], err
    assert "hunter2" not in err
    assert (tmp_path / "report.html").read_text() == "the previous report"
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "missing.db").exists()
    assert not (tmp_path / "no").exists()
