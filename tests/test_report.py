"""The HTML report of a real tiny study (real workers, real SQLite store, real artifact store): its
sections, table groups, figures and images, that it opens offline (or, with --plotly cdn, is small
and loads plotly.js from its CDN), that headless Chromium draws every plot without a script error and
without widening the page, and that bad input is one line, exit 2, with nothing (half-)written.

Two numbers need a long run to reach their caveat (MI at its log N ceiling, a negative approximation
gap), and a trial from before every trial had a traversal needs an older worker: the ``planted``
study copies the real one into a new store and adds copies of its trials with those numbers, as a
worker would have stored them, so the report's notes are checked on exact values.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import yaml
from browser import Browser
from optuna.trial import FrozenTrial, TrialState, create_trial
from optuna_dashboard import _importance as dashboard_importance
from optuna_dashboard._inmemory_cache import InMemoryCache
from PIL import Image
import plotly.graph_objects as go
from plotly.colors import unlabel_rgb
from plotly.offline import get_plotlyjs
from test_worker import study_yaml

from tuner.cli import main
from tuner.results.ranking import ranking_frame
from tuner.results.report import write_report
from tuner.results.report_caveats import MI_CEILING_MARGIN
from tuner.store.artifacts import artifact_store, trial_images
from tuner.study.open import create_or_resume
from tuner.study.spec import parse_study_spec
from tuner.study.worker import Worker

FIGURES = ("history", "curves", "parallel", "slices", "importances", "collapse")
SECTIONS = {"ranking": "Ranking", "history": "Optimization history", "curves": "Learning curves",
            "parallel": "Hyperparameters to objective", "slices": "Objective vs each hyperparameter",
            "importances": "Hyperparameter importances (PED-ANOVA)", "collapse": "NLL vs active units",
            "images": "Top trials&#x27; images"}
WINDOW = (1280, 4000)  # tall enough to hold every section in the screenshot
VAL_EXAMPLES = 100  # conftest's 1,000 digits at the default 0.7/0.1/0.2 split
OBJECTIVE = "validation IWAE NLL (nats)"


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
    """Two good trials complete (one with a cyclical KL schedule, so the conditional kl.cycles is set
    in one complete trial only); two with lr 1e-6 are pruned by the median rule at epoch 2 of 3."""
    tmp = tmp_path_factory.mktemp("report")
    url = f"sqlite:///{tmp}/r.db"
    study = make_study(
        tmp, small_npz, "rep", url,
        [{"optim.lr": 3e-3, "model.latent": 2, "kl.schedule": "constant"},
         {"optim.lr": 3e-3, "model.latent": 8, "kl.schedule": "cyclical", "kl.cycles": 2},
         {"optim.lr": 1e-6, "model.latent": 4, "kl.schedule": "constant"},
         {"optim.lr": 1e-6, "model.latent": 6, "kl.schedule": "cyclical", "kl.cycles": 1}],
        space={"optim.lr": {"type": "categorical", "choices": [3e-3, 1e-6]},
               "model.latent": {"type": "int", "low": 2, "high": 8},
               "kl.schedule": {"type": "categorical", "choices": ["constant", "cyclical"]},
               "kl.cycles": {"type": "int", "low": 1, "high": 3, "when": {"kl.schedule": "cyclical"}}},
        pruner={"name": "median", "n_startup_trials": 2, "n_warmup_steps": 2},
        budget={"trials": 4, "epochs": 3},
    )
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.COMPLETE] * 2 + [TrialState.PRUNED] * 2, states
    assert [sorted(t.params) for t in study.get_trials()[:2]] == [
        ["kl.schedule", "model.latent", "optim.lr"], ["kl.cycles", "kl.schedule", "model.latent", "optim.lr"]]
    out = write_report(url, "rep", tmp / "report.html", artifacts=tmp / "art")
    return Built(url, tmp / "art", study, out, out.read_text(encoding="utf-8"))


@dataclass
class Planted:
    url: str
    study: optuna.Study
    html: str
    at_ceiling: int  # the trial whose MI sits at log N
    negative_gap: int  # the trial with a negative approximation gap
    no_traversal: int  # the trial stored without its traversal


def _copy(t: FrozenTrial, value: float, user: dict, *, traversal: bool = True) -> FrozenTrial:
    """``t`` as a new complete trial with objective ``value`` (and iwae_nll), ``user`` attrs changed;
    without the traversal image's artifact attr unless ``traversal``."""
    system = {k: v for k, v in t.system_attrs.items() if traversal or "traversal.png" not in str(v)}
    return create_trial(value=value, params=t.params, distributions=t.distributions,
                        user_attrs={**t.user_attrs, "iwae_nll": value, "collapsed": False, **user},
                        system_attrs=system, intermediate_values=t.intermediate_values)


@pytest.fixture(scope="module")
def planted(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Planted:
    """The built study copied to a new store, plus three copies of its cyclical trial (kl.cycles now
    set in 4 of 5 complete trials) that rank first: one at MI's ceiling log N, one with a negative
    approximation gap, one stored without its traversal image (as workers before this change did)."""
    tmp = tmp_path_factory.mktemp("planted")
    url = f"sqlite:///{tmp}/p.db"
    optuna.copy_study(from_study_name="rep", from_storage=built.url, to_storage=url)
    study = optuna.load_study(study_name="rep", storage=url)
    cyclical = study.get_trials()[1]
    assert "traversal.png" in trial_images(study, cyclical, artifact_store(built.url, built.art))
    base = len(study.get_trials())
    study.add_trial(_copy(cyclical, 90.0, {"mutual_info": math.log(VAL_EXAMPLES) - MI_CEILING_MARGIN / 2}))
    study.add_trial(_copy(cyclical, 91.0, {"approximation_gap": -0.25, "approximation_gap_se": 0.04}))
    study.add_trial(_copy(cyclical, 92.0, {}, traversal=False))
    out = write_report(url, "rep", tmp / "planted.html", artifacts=built.art)
    return Planted(url, study, out.read_text(encoding="utf-8"), base, base + 1, base + 2)


def sections(page: str) -> dict[str, str]:
    """Section id -> its HTML (or, for a dumped DOM, its rendered markup)."""
    parts = re.split(r'<section id="', page)[1:]
    return {part.split('"', 1)[0]: part for part in parts}


def table_columns(part: str) -> list[tuple[str, str]]:
    """(group class, label) of each column header of the ranking table, in order."""
    heads = re.search(r"</tr><tr>(.*?)</tr></thead>", part, re.S).group(1)
    return [(g, html.unescape(re.sub("<wbr>", "", label)))
            for g, label in re.findall(r'<th class="g-([a-z]+)[^"]*">(.*?)</th>', heads)]


def table_rows(part: str) -> list[tuple[str, list[str]]]:
    """(row class, cell texts) of each body row of the ranking table."""
    body = re.search(r"<tbody>(.*?)</tbody>", part, re.S).group(1)
    return [(cls, [html.unescape(re.sub(r"<[^>]+>", "", c)) for c in re.findall(r"<td[^>]*>(.*?)</td>", row)])
            for cls, row in re.findall(r'<tr(?: class="([a-z]+)")?>(.*?)</tr>', body, re.S)]


def figure(page: str, name: str) -> tuple[list[dict], dict]:
    """(data, layout) of the plotly figure div ``fig-NAME``, read back from the page's script."""
    match = re.search(rf'Plotly\.newPlot\(\s*"fig-{name}",\s*', page)
    decoder = json.JSONDecoder()
    data, end = decoder.raw_decode(page, match.end())
    layout, _ = decoder.raw_decode(page, re.compile(r",\s*").match(page, end).end())
    return data, layout


def test_report_has_every_section_and_opens_offline(built: Built) -> None:
    page, parts = built.html, sections(built.html)
    assert list(parts) == list(SECTIONS)
    for key, title in SECTIONS.items():
        assert f"<h2>{title}</h2>" in parts[key]
    # six plotly figures, one per plot section, drawn by plotly.js inlined exactly once
    assert page.count('class="plotly-graph-div"') == len(FIGURES) and page.count("Plotly.newPlot(") == len(FIGURES)
    for name in FIGURES:
        assert f'id="fig-{name}"' in parts[name]
    assert page.count(get_plotlyjs()) == 1 and page.count("* plotly.js v") == 1
    # nothing fetched from the network: no external script, stylesheet, image or frame
    assert not re.search(r"<(script|link|img|iframe)\b[^>]*\b(src|href)\s*=\s*[\"']?(https?:)?//", page, re.I)


def test_ranking_table_puts_hyperparameters_first_and_test_apart(built: Built) -> None:
    part = sections(built.html)["ranking"]
    columns = table_columns(part)
    groups = [g for g, _ in columns]
    # trial, then hyperparameters, validation, training, test: each group one run of columns
    assert list(dict.fromkeys(groups)) == ["trial", "hyperparameters", "validation", "training", "test"]
    assert groups == sorted(groups, key=["trial", "hyperparameters", "validation", "training", "test"].index)
    labels = dict((label, g) for g, label in columns)
    assert [label for g, label in columns if g == "hyperparameters"] == [
        "kl.cycles", "kl.schedule", "model.latent", "optim.lr"]
    assert labels["iwae_nll"] == labels["mutual_info"] == labels["pareto"] == "validation"
    assert labels["test_iwae_nll"] == labels["amortization_gap"] == labels["approximation_gap"] == "test"
    assert "value" not in labels and "objective" not in labels  # the objective is iwae_nll: not twice
    assert 'class="group g-test first">test: not for selection</th>' in part
    # one row per complete trial in ranking_frame's order, the best highlighted (and only it)
    rows = table_rows(part)
    frame = ranking_frame(built.study)
    assert [int(cells[1]) for _, cells in rows] == list(frame["trial"])
    assert [cls for cls, _ in rows] == ["best", ""] and rows[0][1][0] == "1 best"
    # numbers as stored, to 4 significant digits; a conditional parameter a trial did not set is blank
    nll = [label for _, label in columns].index("iwae_nll")
    cycles = [label for _, label in columns].index("kl.cycles")
    for (_, cells), (_, r) in zip(rows, frame.iterrows()):
        assert cells[nll] == f"{r['iwae_nll']:.4g}"
        assert cells[cycles] == ("" if math.isnan(r["params.kl.cycles"]) else str(int(r["params.kl.cycles"])))


def test_learning_curves_highlight_the_best_and_colour_by_value(planted: Planted, built: Built) -> None:
    for page, study in ((built.html, built.study), (planted.html, planted.study)):
        data, _ = figure(page, "curves")
        best = int(ranking_frame(study)["trial"].iloc[0])
        by_name = {trace.get("name"): trace for trace in data}
        assert by_name[f"trial {best} (best)"]["line"] == {"color": "#ff7f0e", "width": 5}
        assert data[-2]["name"] == f"trial {best} (best)"  # drawn last (the colour bar's carrier after it)
        pruned = by_name["pruned"]
        assert pruned["line"]["dash"] == "dash" and pruned["line"]["color"] == "#9a9a9a"
        assert "pruned at epoch 2 by median" in json.dumps(pruned)  # the reason shows on hover
    # the other complete trials: one colour each on one scale, darker for a better value
    data, _ = figure(planted.html, "curves")
    values = {t.number: t.values[0] for t in planted.study.get_trials(states=(TrialState.COMPLETE,))}
    others = [t for t in data if t.get("name", "").startswith("trial ") and "best" not in t["name"]]
    assert len(others) == len(values) - 1
    shade = {int(t["name"].split()[1]): sum(unlabel_rgb(t["line"]["color"])) for t in others}  # brightness
    ordered = sorted(shade, key=values.get)
    assert [shade[n] for n in ordered] == sorted(shade.values()) and len(set(shade.values())) == len(shade)


def test_parallel_coordinates_and_slices_plot_complete_trials_only(built: Built) -> None:
    page = built.html
    complete = built.study.get_trials(states=(TrialState.COMPLETE,))
    objective = {t.values[0] for t in complete}
    data, layout = figure(page, "parallel")
    assert layout["xaxis"]["ticktext"] == ["kl.cycles", "kl.schedule", "model.latent", "optim.lr", OBJECTIVE]
    lines = [t for t in data if t.get("mode") == "lines" and len(t["x"]) == 5]
    assert len(lines) == len(complete)  # one line per complete trial, none for the pruned ones
    # each line ends on the objective axis: its hover text is the trial's objective value
    assert {float(t["customdata"][-1][1]) for t in lines} == {float(f"{v:.3g}") for v in objective}
    data, layout = figure(page, "slices")
    titles = sorted(v["title"]["text"] for k, v in layout.items() if k.startswith("xaxis") and "title" in v)
    assert titles == ["kl.cycles", "kl.schedule", "model.latent", "optim.lr"]
    for trace in data:  # every point is a complete trial's objective value (a pruned trial has none)
        assert set(trace["y"]) <= objective, trace["name"]
    per_panel = {}
    for trace in data:
        per_panel.setdefault(trace.get("xaxis", "x"), []).extend(trace["y"])
    counts = sorted(len(set(ys)) for ys in per_panel.values())
    assert counts == [1, 2, 2, 2]  # kl.cycles is set in one complete trial


def test_importances_are_the_dashboards_with_conditional_parameters(built: Built, planted: Planted) -> None:
    for page, study in ((built.html, built.study), (planted.html, planted.study)):
        data, layout = figure(page, "importances")
        shown = dict(zip(data[0]["y"], data[0]["x"]))
        assert "PED-ANOVA" in layout["xaxis"]["title"]["text"]
        dashboard_importance.param_importance_cache.clear()  # keyed by study id: both stores have id 1
        trials = study.get_trials(deepcopy=False)
        theirs = {row["name"]: row["importance"] for row in dashboard_importance.get_param_importance_from_trials_cache(
            InMemoryCache(), study._storage, study._study_id, 0, trials)}
        assert set(shown) <= set(theirs)
        for name, share in shown.items():
            assert share == pytest.approx(theirs[name], abs=1e-12), name
    built_part, planted_part = sections(built.html)["importances"], sections(planted.html)["importances"]
    assert "Left out: kl.cycles (set in 1 of 2 complete trials)" in built_part
    assert "kl.cycles" not in figure(built.html, "importances")[0][0]["y"]
    assert "Conditional parameters, scored on the complete trials where they are set: kl.cycles (4 of 5)" in planted_part
    assert "kl.cycles" in figure(planted.html, "importances")[0][0]["y"] and "Left out" not in planted_part


def test_the_same_store_gives_the_same_importances(planted: Planted, built: Built, tmp_path: Path) -> None:
    again = write_report(planted.url, "rep", tmp_path / "again.html", artifacts=built.art).read_text()
    assert sections(again)["importances"] == sections(planted.html)["importances"]


def test_notes_mark_mi_at_its_ceiling_and_a_negative_gap(planted: Planted, built: Built) -> None:
    part = sections(planted.html)["ranking"]
    columns = [label for _, label in table_columns(part)]
    rows = {int(cells[1]): cells for _, cells in table_rows(part)}
    mi, gap = columns.index("mutual_info"), columns.index("approximation_gap")
    ceiling = math.log(VAL_EXAMPLES)
    assert rows[planted.at_ceiling][mi] == f"≥{ceiling - MI_CEILING_MARGIN / 2:.4g}"
    assert rows[planted.negative_gap][gap] == "-0.25†"
    marked_mi = [n for n, cells in rows.items() if cells[mi].startswith("≥")]
    marked_gap = [n for n, cells in rows.items() if cells[gap].endswith("†")]
    assert marked_mi == [planted.at_ceiling] and marked_gap == [planted.negative_gap]  # the real ones: not
    assert (f"mutual_info is an InfoNCE estimate over the N = {VAL_EXAMPLES} validation examples" in part
            and f"log N = {ceiling:.2f} nats. 1 of the 5 trials shown" in part)
    assert f"trial {planted.negative_gap}: -0.25 nats (se 0.04 of the optimized -ELBO alone)" in part
    assert "whose variance is the sum of both" in part
    # the tooltip says what the mark means
    assert f'title="at the estimator&#x27;s ceiling log N = {ceiling:.2f} nats' in part
    # no caveat hit, no note: the real trials' MI is far below log 100 and their gaps are positive
    real = built.study.get_trials(states=(TrialState.COMPLETE,))
    assert all(t.user_attrs["mutual_info"] < ceiling - MI_CEILING_MARGIN for t in real)
    assert all(t.user_attrs["approximation_gap"] > 0 for t in real)
    plain = sections(built.html)["ranking"]
    assert "InfoNCE" not in plain and "approximation_gap is the optimized" not in plain and "≥" not in plain


def test_top_trials_images_are_embedded(built: Built) -> None:
    part = sections(built.html)["images"]
    store = artifact_store(built.url, built.art)
    expected = {t.number: trial_images(built.study, t, store)
                for t in built.study.get_trials(states=(TrialState.COMPLETE,))}
    assert all(set(imgs) == {"reconstructions.png", "samples.png", "traversal.png"} for imgs in expected.values())
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', part)
    assert len(uris) == sum(len(imgs) for imgs in expected.values())
    embedded = {base64.b64decode(uri) for uri in uris}
    assert embedded == {png for imgs in expected.values() for png in imgs.values()}  # the stored bytes, intact
    best = ranking_frame(built.study).iloc[0]
    assert f"Rank 1: trial {best['trial']} ({OBJECTIVE} {best['iwae_nll']:.4g})" in part  # in ranking order
    assert "No latent traversal" not in part


def test_a_trial_without_a_traversal_says_why(planted: Planted) -> None:
    blocks = {int(n): block for n, block in re.findall(r"<h3>Rank \d+: trial (\d+) (.*?)</div>",
                                                        sections(planted.html)["images"], re.S)}
    assert list(blocks) == [planted.at_ceiling, planted.negative_gap, planted.no_traversal]  # --top 3
    note = ("No latent traversal for this trial: it ran before workers drew one for every complete trial; "
            "traversal images were kept then only for trials that were the study&#x27;s new best when they finished.")
    assert note in blocks[planted.no_traversal] and blocks[planted.no_traversal].count("<img") == 2
    for n in (planted.at_ceiling, planted.negative_gap):
        assert "No latent traversal" not in blocks[n] and blocks[n].count("<img") == 3


def chromium_dump(page: Path, profile: Path, shot: Path) -> subprocess.CompletedProcess[str]:
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).is_file():
        pytest.fail("Chromium is not installed; install it (as root): apt-get update && apt-get install -y chromium")
    return subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
         "--virtual-time-budget=10000", "--enable-logging=stderr", "--v=0", f"--window-size={WINDOW[0]},{WINDOW[1]}",
         f"--screenshot={shot}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=60,
    )


def test_report_draws_in_headless_chromium(built: Built, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    proc = chromium_dump(built.out, tmp_path / "profile", shot)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert "Uncaught" not in proc.stderr and not [line for line in console if "rror" in line], console
    dom = sections(proc.stdout)
    assert list(dom) == list(SECTIONS)
    for name in FIGURES:  # plotly replaced each empty div by its SVG layers
        assert re.search(rf'id="fig-{name}"[^>]*>.*?class="main-svg"', dom[name], re.S), name
        assert '<g class="xtick">' in dom[name], name  # axes drawn
        assert 'class="point"' in dom[name] or 'class="js-line"' in dom[name], name  # data drawn
    assert "stroke-dasharray" in dom["curves"]  # the pruned trials' dashed line was drawn
    assert 'class="legendtext"' in dom["curves"] and ">pruned<" in dom["curves"]
    assert dom["images"].count("<img") == len(re.findall("<img", sections(built.html)["images"])) > 0
    with Image.open(shot) as image:
        assert image.format == "PNG" and image.size == WINDOW
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, axes, lines and digits: not a blank page


@pytest.mark.parametrize("width", [1280, 900])
def test_the_page_fits_the_window_and_the_hyperparameters_show(planted: Planted, tmp_path: Path, width: int) -> None:
    """At 1280 and 900 CSS pixels: the page is no wider than the window (the table scrolls inside its
    own container), every hyperparameter column is in view without scrolling, and the best trial's
    curve is drawn thick and orange."""
    page = tmp_path / "planted.html"
    page.write_text(planted.html, encoding="utf-8")
    with Browser(tmp_path / "profile", width=width, height=900) as browser:
        browser.open(page.as_uri(), "document.readyState === 'complete' && [...document.querySelectorAll("
                                    "'.plotly-graph-div')].every(d => d.querySelector('.main-svg'))")
        seen = browser.evaluate("""JSON.stringify((() => {
            const wrap = document.querySelector('div.table-wrap').getBoundingClientRect();
            const params = [...document.querySelectorAll('table.ranking th.g-hyperparameters:not(.group)')];
            const best = [...document.querySelectorAll('#fig-curves .scatterlayer path.js-line')]
                .filter(p => p.style.strokeWidth === '5px' && p.style.stroke === 'rgb(255, 127, 14)');
            return {inner: window.innerWidth, page: document.documentElement.scrollWidth, wrap: wrap.right,
                    params: params.map(th => th.getBoundingClientRect().right), best: best.length,
                    sections: [...document.querySelectorAll('section')].map(s => s.id),
                    drawn: [...document.querySelectorAll('.plotly-graph-div')].filter(
                        d => d.querySelector('.main-svg')).map(d => d.id)};
        })())""")
    seen = json.loads(seen)
    assert seen["page"] <= seen["inner"] == width and seen["wrap"] <= width
    assert len(seen["params"]) == 4 and max(seen["params"]) <= seen["wrap"]
    assert seen["best"] == 1
    assert seen["sections"] == list(SECTIONS)
    assert seen["drawn"] == [f"fig-{name}" for name in FIGURES]


def test_without_images_the_page_says_so(built: Built, tmp_path: Path) -> None:
    out = write_report(built.url, "rep", tmp_path / "r.html", artifacts=tmp_path / "elsewhere")
    part = sections(out.read_text())["images"]
    assert "No images are stored for the top 2 trial(s)" in part and "<img" not in part


def test_cdn_page_is_small_and_loads_plotly_from_its_cdn(built: Built, tmp_path: Path) -> None:
    out = write_report(built.url, "rep", tmp_path / "cdn.html", artifacts=built.art, plotly="cdn")
    page = out.read_text()
    assert out.stat().st_size < built.out.stat().st_size / 5 and get_plotlyjs() not in page
    # the script tag plotly itself writes for include_plotlyjs="cdn": same URL, same integrity hash
    theirs = go.Figure().to_html(include_plotlyjs="cdn")
    tag = re.search(r'<script charset="utf-8" src="(https://cdn\.plot\.ly/[^"]+)" integrity="([^"]+)"', theirs)
    assert f'src="{tag.group(1)}" integrity="{tag.group(2)}" crossorigin="anonymous"' in page
    assert page.count("<script charset") == 1
    assert list(sections(page)) == list(SECTIONS) and page.count("Plotly.newPlot(") == len(FIGURES)


TWINS = [{"model.latent": 4, "optim.lr": 3e-3}] * 2  # the same params...


@pytest.mark.parametrize(
    ("name", "budget", "space", "enqueue", "note"),
    [
        ("one", 1, {}, [], "Importances need at least 2 complete trials; this study has 1."),
        ("single", 2, {"optim.lr": {"type": "fixed", "value": 3e-3}}, [],  # (study_yaml merges into its space)
         "Importances need at least 2 searched hyperparameters (one always has all of the importance); "
         "searched here: model.latent."),
        ("twins", 2, {}, TWINS, "Importances are undefined: every complete trial has the same objective value"),
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


@pytest.mark.parametrize("plotly", ["inline", "cdn"])
def test_report_command_writes_the_page(
    built: Built, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, plotly: str
) -> None:
    out = tmp_path / "cli.html"
    code, stdout, err = run_main(capsys, monkeypatch, "report", "rep", "--storage", built.url,
                                 "--artifacts", str(built.art), "--out", str(out), "--top", "1", "--plotly", plotly)
    assert code == 0, err
    assert stdout.strip() == f"report: {out} ({out.stat().st_size / 1e6:.1f} MB)"
    page = out.read_text()
    parts = sections(page)
    assert list(parts) == list(SECTIONS) and parts["images"].count("<h3>Rank ") == 1  # --top 1
    cdn_tag = '<script charset="utf-8" src="https://cdn.plot.ly/'
    assert (get_plotlyjs() in page) == (plotly == "inline") and (cdn_tag in page) == (plotly == "cdn")
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
        ("bad --plotly", "--plotly 'offline' is not one of inline, cdn"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    case: str, phrase: str, built: Built, tmp_path: Path, small_npz: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    study, url, out, extra = "rep", built.url, tmp_path / "report.html", []
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
    elif case == "bad --plotly":
        extra = ["--plotly", "offline"]
    else:
        out = Path("/sys/tuner-report.html")  # not writable, even by root
    code, _, err = run_main(capsys, monkeypatch, "report", study, "--storage", url, "--out", str(out), *extra)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and phrase in lines[0], err
    assert "hunter2" not in err
    assert (tmp_path / "report.html").read_text() == "the previous report"
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "missing.db").exists()
    assert not (tmp_path / "no").exists()
