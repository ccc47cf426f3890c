"""A study as one self-contained HTML file: ranking, history, learning curves, parameters vs objective,
importances, collapse, images.

By default the file opens offline: plotly.js is inlined once in <head> (``plotly="inline"``, about
4.8 MB of the page); ``plotly="cdn"`` references plotly's CDN script instead (a small file that
needs the network to draw). Every figure is a <div> plotly draws, and images are base64 ``data:``
URIs. It reads the store and the artifact store, so any host can write it while workers run (and
the data set, where it is readable, only to count the validation examples behind the MI ceiling).
Sections that cannot be drawn (one complete trial, a single searched parameter, no stored images)
say why in the page instead of failing. The page is written to a temporary file beside ``out`` and
renamed: a failed report leaves nothing behind. The pieces: :mod:`.report_table` (the ranking),
:mod:`.report_caveats` (notes on numbers with a ceiling or a sign caveat), :mod:`.report_figures`,
:mod:`.report_importances`.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
import pandas as pd
from optuna.trial import FrozenTrial
from plotly.offline import get_plotlyjs, get_plotlyjs_version

from tuner import __version__
from tuner.atomic import write_atomic
from tuner.errors import TunerError
from tuner.results import report_figures as figures
from tuner.results.ranking import rank_study
from tuner.results.report_caveats import caveats, validation_examples
from tuner.results.report_importances import METHOD, importances
from tuner.results.report_table import TEST_GROUP, ranking_table
from tuner.store.artifacts import IMAGE_NAMES, artifact_store, trial_images
from tuner.store.urls import mask_url
from tuner.study.open import stored_spec, study_counts

if TYPE_CHECKING:
    import plotly.graph_objects as go
    from optuna.artifacts._protocol import ArtifactStore

__all__ = ["PLOTLY_MODES", "render_report", "write_report"]

TABLE_ROWS = 100  # ranking rows shown; the rest are counted in a note
PLOTLY_MODES = ("inline", "cdn")  # where plotly.js comes from: inside the page, or plotly's CDN
_OBJECTIVE_LABEL = {
    "iwae_nll": "validation IWAE NLL (nats)",
    "neg_elbo": "best validation -ELBO (nats)",
    "multi": "validation IWAE NLL (nats, objective 1 of 2)",
}


@dataclass
class Section:
    id: str
    title: str
    body: str  # HTML


# ----------------------------------------------------------------------------------- entry points
def write_report(
    storage_url: str, study_name: str, out: str | Path, *, artifacts: str | Path | None = None, top: int = 3,
    plotly: str = "inline",
) -> Path:
    """Write the report of ``study_name`` to ``out`` (an .html file); TunerError on bad input."""
    out = Path(out)
    if top < 0:
        raise TunerError(f"--top must be 0 or more trials with images, but got {top}")
    _check_plotly(plotly)
    _check_out(out)
    study, frame = rank_study(storage_url, study_name)  # creates nothing; no complete trial is an error
    page = render_report(study, frame, artifact_store(storage_url, artifacts), top=top, source=mask_url(storage_url),
                         plotly=plotly)
    _write_report(out, page)
    return out


def render_report(
    study: optuna.Study, frame: pd.DataFrame, store: ArtifactStore, *, top: int = 3, source: str = "",
    plotly: str = "inline",
) -> str:
    """The page as a string. ``frame``: ``ranking_frame(study)`` (its complete trials, ranked, at
    least one); ``store``: the artifact store the trials' images were uploaded to."""
    _check_plotly(plotly)
    if frame.empty:
        raise TunerError(f"study '{study.study_name}' has no complete trial to report; run workers first")
    trials = study.get_trials(deepcopy=False)
    label = _OBJECTIVE_LABEL.get(_objective(study), "objective value")
    best = int(frame["trial"].iloc[0])  # rank 1: highlighted wherever trials are drawn one by one
    curves = figures.curves_figure(trials, best, label)
    slices = figures.slices_figure(trials, best, label)  # None: no complete trial set a hyperparameter
    parallel = figures.parallel_figure(study, label) if slices else None
    sections = [
        Section("ranking", "Ranking", _ranking_body(study, frame, trials)),
        Section("history", "Optimization history", _plot(figures.history_figure(frame, label, best), "history")),
        Section("curves", "Learning curves", _plot(curves, "curves", _CURVES_NOTE.format(best=best), _NO_CURVES)),
        Section("parallel", "Hyperparameters to objective", _plot(parallel, "parallel", _PARALLEL_NOTE, _NOT_SEARCHED)),
        Section("slices", "Objective vs each hyperparameter",
                _plot(slices, "slices", _SLICES_NOTE.format(best=best), _NOT_SEARCHED)),
        Section("importances", f"Hyperparameter importances ({METHOD})", _importances_body(study)),
        Section("collapse", "NLL vs active units", _plot(figures.collapse_figure(frame), "collapse")),
        *([Section("confirmed", "Confirmed over seeds", _confirmed_body(frame))]
          if frame["confirmed_n"].notna().any() else []),
        Section("images", "Top trials' images", _images_body(study, trials, frame, store, top, label)),
    ]
    counts = study_counts(study)
    summary = (
        f"{counts.complete} complete, {counts.pruned} pruned, {counts.failed} failed, {counts.running} running; "
        f"objective: {label}; storage {source or '-'}; written {time.strftime('%Y-%m-%d %H:%M:%S %Z')} "
        f"by tuner {__version__}"
    )
    return _page(f"Study {study.study_name}", summary, sections, plotly)


_NOT_SEARCHED = "No complete trial has a searched hyperparameter."
_NO_CURVES = "No trial has reported a validation -ELBO yet."
_CURVES_NOTE = ("Validation -ELBO (beta = 1) each epoch. Complete trials are coloured by their final objective "
                "value (darker is better), the best (trial {best}) is the thick orange line; pruned trials are "
                "the dashed grey line (they have no objective value of their own).")
_PARALLEL_NOTE = ("Complete trials only, one line each, coloured by the objective (the right-most axis); a "
                  "conditional hyperparameter a trial did not use sits on the 'None' tick; collapsed trials dotted.")
_SLICES_NOTE = ("The objective of each complete trial against each hyperparameter it set (the best, trial {best}, "
                "a star; collapsed trials red crosses).")


def _objective(study: optuna.Study) -> str | None:
    """The objective named in the spec tuner stored in the study (None for a study tuner did not create)."""
    raw = stored_spec(study)
    return json.loads(raw).get("objective") if raw else None


def _check_plotly(plotly: str) -> None:
    if plotly not in PLOTLY_MODES:
        raise TunerError(f"--plotly {plotly!r} is not one of {', '.join(PLOTLY_MODES)}; use inline (the page opens "
                         "offline) or cdn (a small page that loads plotly.js from its CDN)")


# -------------------------------------------------------------------------------------- input checks
def _check_out(out: Path) -> None:
    """Fail before reading the study: ``out`` must be a file path in an existing folder."""
    if out.is_dir():
        raise TunerError(f"--out '{out}' is a folder; give a file path such as {out / 'report.html'}")
    folder = out.parent
    if not folder.is_dir():
        raise TunerError(f"--out '{out}': folder '{folder}' does not exist; create it or choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise TunerError(f"--out '{out}': folder '{folder}' is not writable; choose a writable folder")


def _write_report(out: Path, text: str) -> None:
    try:
        write_atomic(out, text)
    except OSError as e:
        raise TunerError(
            f"--out '{out}': cannot write in '{out.parent}' ({e.strerror}); choose a writable folder"
        ) from None


# ------------------------------------------------------------------------------------- HTML pieces
def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _plot(fig: go.Figure | None, name: str, note: str = "", missing: str = "") -> str:
    """A section's body: its note and figure, or, without a figure, why there is none."""
    if fig is None:
        return _note(missing)
    return (_note(note) if note else "") + figures.figure_div(fig, name)


def _ranking_body(study: optuna.Study, frame: pd.DataFrame, trials: list[FrozenTrial]) -> str:
    """What the table holds, the caveats its numbers hit, then the table (first TABLE_ROWS rows)."""
    shown = frame.head(TABLE_ROWS)
    marks = caveats(shown, {t.number: t for t in trials}, validation_examples(study))
    more = f" Showing the first {TABLE_ROWS} of {len(frame)}." if len(frame) > TABLE_ROWS else ""
    gaps = (" amortization_gap and approximation_gap: nats per example on the first test examples "
            "(what the shared encoder and the posterior family cost; tuner.vae.gaps)."
            if shown["amortization_gap"].notna().any() else "")
    intro = (f"Complete trials ranked by validation IWAE NLL, collapsed ones last; the best (rank 1) highlighted. "
             f"Hyperparameters first, then validation metrics (select on these), the training run, and the "
             f"test split's numbers, marked '{TEST_GROUP}'.{gaps}{more}")
    return _note(intro) + "".join(_note(n) for n in marks.notes) + ranking_table(shown, marks)


def _importances_body(study: optuna.Study) -> str:
    found = importances(study)
    figure = figures.figure_div(figures.importances_figure(found.scores), "importances") if found.scores else ""
    return "".join(_note(n) for n in found.notes) + figure


def _confirmed_body(frame: pd.DataFrame) -> str:
    fig, text = figures.confirmed_figure(frame)
    return _plot(fig, "confirmed", text)


def _images_body(
    study: optuna.Study, trials: list[FrozenTrial], frame: pd.DataFrame, store: ArtifactStore, top: int, label: str
) -> str:
    """The top trials' stored image grids as data: URIs, and a line for each image a trial lacks;
    one note when none of them has any."""
    by_number = {t.number: t for t in trials}
    blocks, found = [], 0
    for rank, number, value in frame.head(top)[["rank", "trial", "value"]].itertuples(index=False):
        images = trial_images(study, by_number[number], store)
        found += len(images)
        order = sorted(images, key=lambda n: (IMAGE_NAMES.index(n) if n in IMAGE_NAMES else len(IMAGE_NAMES), n))
        shown = "".join(
            f'<figure><img alt="{html.escape(n)}" src="data:image/png;base64,'
            f'{base64.b64encode(images[n]).decode("ascii")}"><figcaption>{html.escape(n)}</figcaption></figure>'
            for n in order
        )
        blocks.append(f'<div class="trial-images"><h3>Rank {rank}: trial {number} ({html.escape(label)} {value:.4g})</h3>'
                      f"{_missing_images(by_number[number], images)}{shown}</div>")
    if not found:
        return _note(f"No images are stored for the top {min(top, len(frame))} trial(s) of this study "
                     "(workers upload them to the artifact store; check --artifacts).")
    return "".join(blocks)


def _missing_images(trial: FrozenTrial, images: dict[str, bytes]) -> str:
    """One line saying why a trial shows fewer images than a worker draws, or nothing."""
    error = trial.user_attrs.get("artifact_error")
    if not images:
        return _note(f"No images stored for this trial{f': {error}' if error else ''}.")
    if "traversal.png" in images:
        return ""
    if error:
        return _note(f"No latent traversal for this trial: {error}.")
    return _note("No latent traversal for this trial: it ran before workers drew one for every complete trial; "
                 "traversal images were kept then only for trials that were the study's new best when they finished.")


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: min(1400px, 100%); padding: 0 1.5em;
       box-sizing: border-box; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
p.summary, p.note { color: #555; }
div.table-wrap { max-width: 100%; overflow-x: auto; }
table.ranking { border-collapse: collapse; font-size: 0.85em; }
table.ranking th, table.ranking td { padding: 0.25em 0.5em; border-bottom: 1px solid #eee; text-align: right; }
table.ranking td { white-space: nowrap; }
table.ranking th { vertical-align: bottom; font-weight: 600; }
table.ranking tr.groups th { text-align: left; border-bottom: 2px solid #bbb; white-space: nowrap; }
table.ranking .first { border-left: 1px solid #ccc; }
table.ranking .g-hyperparameters { background: #f3f7fc; }
table.ranking .g-test { background: #f4f4f4; color: #666; font-style: italic; }
table.ranking tr.groups th.g-test { color: #a33; }
table.ranking tr.best td { background: #fff1c7; font-weight: 600; }
table.ranking td.caveat { text-decoration: underline dotted; cursor: help; }
span.best-tag { background: #ff7f0e; color: white; border-radius: 3px; padding: 0 0.3em; font-size: 0.8em; }
div.trial-images figure { display: inline-block; margin: 0 1em 1em 0; vertical-align: top; max-width: 100%; }
div.trial-images img { max-width: 100%; }
figcaption { font-size: 0.85em; color: #555; }
"""


def _plotly_script(plotly: str) -> str:
    """plotly.js for the <head>: the library itself, or plotly's CDN script tag pinned by its hash
    (Subresource Integrity: the browser runs it only if it is the very file this plotly ships)."""
    if plotly == "inline":
        return f"<script>{get_plotlyjs()}</script>"
    digest = base64.b64encode(hashlib.sha256(get_plotlyjs().encode("utf-8")).digest()).decode("ascii")
    return (f'<script charset="utf-8" src="https://cdn.plot.ly/plotly-{get_plotlyjs_version()}.min.js" '
            f'integrity="sha256-{digest}" crossorigin="anonymous"></script>')


def _page(title: str, summary: str, sections: list[Section], plotly: str) -> str:
    """The whole document: plotly.js once in <head>, then one <section> per part."""
    nav = " | ".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in sections)
    body = "\n".join(f'<section id="{s.id}"><h2>{html.escape(s.title)}</h2>\n{s.body}\n</section>' for s in sections)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<style>{_CSS}</style>\n{_plotly_script(plotly)}\n</head><body>\n"
        f'<h1>{html.escape(title)}</h1>\n<p class="summary">{html.escape(summary)}</p>\n<nav>{nav}</nav>\n'
        f"{body}\n</body></html>\n"
    )
