"""A study as one self-contained HTML file: ranking, history, learning curves, importances, collapse, images.

The file opens offline: plotly.js is inlined once in <head>, every figure is a <div> it draws, and
images are base64 ``data:`` URIs. It reads only the store and the artifact store, so any host can
write it while workers run. Sections that cannot be drawn (one complete trial, a single searched
parameter, no stored images) say why in the page instead of failing. The page is written to a
temporary file beside ``out`` and renamed: a failed report leaves nothing behind.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
import pandas as pd
import plotly.graph_objects as go
from optuna.trial import FrozenTrial, TrialState
from plotly.offline import get_plotlyjs

from tuner import __version__
from tuner.atomic import write_atomic
from tuner.errors import TunerError
from tuner.results.ranking import rank_study
from tuner.store.artifacts import IMAGE_NAMES, artifact_store, trial_images
from tuner.store.urls import mask_url
from tuner.study.open import SPEC_ATTR, study_counts

if TYPE_CHECKING:
    from optuna.artifacts._protocol import ArtifactStore

__all__ = ["render_report", "write_report"]

TABLE_ROWS = 100  # ranking rows shown; the rest are counted in a note
_OBJECTIVE_LABEL = {
    "iwae_nll": "validation IWAE NLL (nats)",
    "neg_elbo": "best validation -ELBO (nats)",
    "multi": "validation IWAE NLL (nats, objective 1 of 2)",
}
_PLOT_CONFIG = {"displaylogo": False, "responsive": True}
_PRUNED_STYLE = {"color": "#9a9a9a", "dash": "dash", "width": 1}
_COLLAPSED_MARKER = {"color": "#d62728", "symbol": "x", "size": 10}


@dataclass
class Section:
    id: str
    title: str
    body: str  # HTML


# ----------------------------------------------------------------------------------- entry points
def write_report(
    storage_url: str, study_name: str, out: str | Path, *, artifacts: str | Path | None = None, top: int = 3
) -> Path:
    """Write the report of ``study_name`` to ``out`` (an .html file); TunerError on bad input."""
    out = Path(out)
    if top < 0:
        raise TunerError(f"--top must be 0 or more trials with images, but got {top}")
    _check_out(out)
    study, frame = rank_study(storage_url, study_name)  # creates nothing; no complete trial is an error
    page = render_report(study, frame, artifact_store(storage_url, artifacts), top=top, source=mask_url(storage_url))
    _write_report(out, page)
    return out


def render_report(
    study: optuna.Study, frame: pd.DataFrame, store: ArtifactStore, *, top: int = 3, source: str = ""
) -> str:
    """The page as a string. ``frame``: ``ranking_frame(study)`` (its complete trials, ranked, at
    least one); ``store``: the artifact store the trials' images were uploaded to."""
    if frame.empty:
        raise TunerError(f"study '{study.study_name}' has no complete trial to report; run workers first")
    trials = study.get_trials(deepcopy=False)
    label = _OBJECTIVE_LABEL.get(_objective(study), "objective value")
    importances, note = _importances_figure(study)
    sections = [
        Section("ranking", "Ranking", _ranking_table(frame)),
        Section("history", "Optimization history", _figure_div(_history_figure(frame, label), "history")),
        Section("curves", "Learning curves", _curves_body(trials)),
        Section("importances", "Hyperparameter importances",
                _figure_div(importances, "importances") if importances else _note(note)),
        Section("collapse", "NLL vs active units", _figure_div(_collapse_figure(frame), "collapse")),
        *([Section("confirmed", "Confirmed over seeds", _confirmed_body(frame))]
          if frame["confirmed_n"].notna().any() else []),
        Section("images", "Top trials' images", _images_body(study, trials, frame, store, top)),
    ]
    counts = study_counts(study)
    summary = (
        f"{counts.complete} complete, {counts.pruned} pruned, {counts.failed} failed, {counts.running} running; "
        f"objective: {label}; storage {source or '-'}; written {time.strftime('%Y-%m-%d %H:%M:%S %Z')} "
        f"by tuner {__version__}"
    )
    return _page(f"Study {study.study_name}", summary, sections)


def _objective(study: optuna.Study) -> str | None:
    """The objective named in the spec tuner stored in the study (None for a study tuner did not create)."""
    raw = study.user_attrs.get(SPEC_ATTR)
    return json.loads(raw).get("objective") if raw else None


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


# ------------------------------------------------------------------------------------------ figures
def _layout(fig: go.Figure, x: str, y: str, *, x_max: float | None = None, height: int = 420) -> go.Figure:
    """Shared look; ``x_max`` marks an integer x axis (trials, epochs, units): about 10 whole-number ticks."""
    fig.update_layout(template="plotly_white", height=height, margin={"l": 60, "r": 20, "t": 30, "b": 50},
                      xaxis_title=x, yaxis_title=y)
    if x_max is not None and math.isfinite(x_max):
        fig.update_xaxes(tick0=0, dtick=max(1, math.ceil(x_max / 10)))
    return fig


def _history_figure(frame: pd.DataFrame, label: str) -> go.Figure:
    """Each complete trial's value by trial number (collapsed ones marked) and the best healthy value so far."""
    done = frame.sort_values("trial")
    healthy, collapsed = done[~done["collapsed"]], done[done["collapsed"]]
    fig = go.Figure()
    fig.add_scatter(x=healthy["trial"], y=healthy["value"], mode="markers", name="complete",
                    hovertext=[f"trial {n}" for n in healthy["trial"]])
    fig.add_scatter(x=collapsed["trial"], y=collapsed["value"], mode="markers", name="collapsed",
                    marker=_COLLAPSED_MARKER, hovertext=[f"trial {n} (collapsed)" for n in collapsed["trial"]])
    ranked = healthy if not healthy.empty else done  # collapsed trials count only when all are
    fig.add_scatter(x=ranked["trial"], y=ranked["value"].cummin(), mode="lines", name="best so far",
                    line={"shape": "hv"})
    return _layout(fig, "trial", label, x_max=done["trial"].max())


def _curve(trial: FrozenTrial) -> tuple[list[int], list[float | None]]:
    """(epochs, validation -ELBO): intermediate values, or the curve a multi-objective worker keeps."""
    if trial.intermediate_values:
        epochs = sorted(trial.intermediate_values)
        values = [trial.intermediate_values[e] for e in epochs]
    else:
        values = list(trial.user_attrs.get("val_neg_elbo_curve") or [])
        epochs = list(range(1, len(values) + 1))
    return epochs, [v if v is not None and math.isfinite(v) else None for v in values]  # gaps for NaN


def _curves_body(trials: list[FrozenTrial]) -> str:
    """Complete trials in colour (one trace each), pruned trials as one dashed grey trace with gaps."""
    fig = go.Figure()
    pruned_x: list[int | None] = []
    pruned_y: list[float | None] = []
    pruned_text: list[str] = []
    for t in trials:
        epochs, values = _curve(t)
        if not epochs:
            continue
        if t.state == TrialState.COMPLETE:
            fig.add_scatter(x=epochs, y=values, mode="lines+markers", name=f"trial {t.number}",
                            legendgroup="complete")
        elif t.state == TrialState.PRUNED:
            reason = t.user_attrs.get("prune_reason", "pruned")
            pruned_x += [*epochs, None]
            pruned_y += [*values, None]
            pruned_text += [f"trial {t.number}: {reason}"] * len(epochs) + [""]
    if pruned_x:
        fig.add_scatter(x=pruned_x, y=pruned_y, mode="lines+markers", name="pruned", line=_PRUNED_STYLE,
                        hovertext=pruned_text, legendgroup="pruned")
    if not fig.data:
        return _note("No trial has reported a validation -ELBO yet.")
    epochs = max(x for trace in fig.data for x in trace.x if x is not None)
    return _figure_div(_layout(fig, "epoch", "validation -ELBO (nats, beta = 1)", x_max=epochs), "curves")


def _importances_figure(study: optuna.Study) -> tuple[go.Figure | None, str]:
    """fANOVA importances of the first objective (seeded: the same store gives the same page), or a note."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return None, f"Importances need at least 2 complete trials; this study has {len(complete)}."
    shared = sorted(set.intersection(*(set(t.params) for t in complete)))  # what Optuna ranks by default
    if len(shared) < 2:
        return None, (f"Importances need at least 2 hyperparameters shared by all complete trials; "
                      f"searched here: {', '.join(shared) or 'none'}.")
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    try:
        scores = optuna.importance.get_param_importances(
            study, evaluator=evaluator, params=shared, target=lambda t: t.values[0]
        )
    except RuntimeError:  # fANOVA: zero variance in every tree
        return None, ("Importances are undefined: the complete trials' hyperparameters do not change "
                      "their objective value (zero variance).")
    names = list(scores)[::-1]  # the most important on top
    fig = go.Figure(go.Bar(x=[scores[n] for n in names], y=names, orientation="h"))
    return _layout(fig, "importance (fANOVA, share of variance)", "", height=max(250, 60 + 40 * len(names))), ""


def _collapse_figure(frame: pd.DataFrame) -> go.Figure:
    """Validation IWAE NLL against active units; collapsed trials (tuner.vae.metrics' verdict) as red crosses."""
    fig = go.Figure()
    for name, part, marker in (("healthy", frame[~frame["collapsed"]], None),
                               ("collapsed", frame[frame["collapsed"]], _COLLAPSED_MARKER)):
        fig.add_scatter(x=part["active_units"], y=part["iwae_nll"], mode="markers", name=name, marker=marker,
                        hovertext=[f"trial {n}, KL {kl:.3g}" if kl is not None else f"trial {n}"
                                   for n, kl in zip(part["trial"], part["kl"])])
    return _layout(fig, "active units (Cov_x E[z|x] > 0.01)", "validation IWAE NLL (nats)",
                   x_max=pd.to_numeric(frame["active_units"], errors="coerce").max())


def _confirmed_body(frame: pd.DataFrame) -> str:
    """`tuner confirm`'s reruns: each confirmed trial's test IWAE NLL mean with ± 1 sd error bars,
    beside its own single-seed test NLL, in validation rank order."""
    done = frame[frame["confirmed_n"].notna()]
    names = [f"#{t}" for t in done["trial"]]
    fig = go.Figure()
    fig.add_scatter(x=names, y=done["confirmed_nll"], mode="markers", name="mean over seeds (± 1 sd)",
                    error_y={"type": "data", "array": done["confirmed_sd"].tolist(), "visible": True},
                    hovertext=[f"n={n}" for n in done["confirmed_n"]])
    fig.add_scatter(x=names, y=done["test_iwae_nll"], mode="markers", name="the trial's own seed",
                    marker={"symbol": "diamond-open"})
    notes = [f"trial {t}: {n}" for t, n in zip(done["trial"], done["confirm_note"]) if isinstance(n, str)]
    text = ("Test IWAE NLL of the top trials retrained with other seeds on the same split (tuner confirm), "
            "in validation rank order." + (" " + "; ".join(notes) + "." if notes else
                                          " No trial is worse than the next one beyond the sds."))
    return _note(text) + _figure_div(_layout(fig, "trial (validation rank order)", "test IWAE NLL (nats)"), "confirmed")


# ------------------------------------------------------------------------------------- HTML pieces
def _figure_div(fig: go.Figure, name: str) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{name}", config=_PLOT_CONFIG)


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _ranking_table(frame: pd.DataFrame) -> str:
    """ranking_frame's columns, less those empty for every complete trial (state, reason...)."""
    shown = frame.head(TABLE_ROWS).drop(columns=["state"], errors="ignore").dropna(axis=1, how="all")
    shown = shown.rename(columns=lambda c: c.removeprefix("params."))
    table = shown.to_html(index=False, classes="ranking", border=0, na_rep="",
                          float_format=lambda v: f"{v:.4g}")
    more = f" Showing the first {TABLE_ROWS} of {len(frame)}." if len(frame) > TABLE_ROWS else ""
    gaps = (" amortization_gap and approximation_gap: nats per example on the first test examples "
            "(what the shared encoder and the posterior family cost; tuner.vae.gaps)."
            if "amortization_gap" in shown.columns else "")  # dropped above when no trial measured them
    return _note(f"Complete trials ranked by validation IWAE NLL, collapsed ones last.{gaps}{more}") + table


def _images_body(
    study: optuna.Study, trials: list[FrozenTrial], frame: pd.DataFrame, store: ArtifactStore, top: int
) -> str:
    """The top trials' stored image grids as data: URIs; a note when none of them has any."""
    by_number = {t.number: t for t in trials}
    blocks, found = [], 0
    for rank, number, value in frame.head(top)[["rank", "trial", "value"]].itertuples(index=False):
        images = trial_images(study, by_number[number], store)
        found += len(images)
        order = sorted(images, key=lambda n: (IMAGE_NAMES.index(n) if n in IMAGE_NAMES else len(IMAGE_NAMES), n))
        figures = "".join(
            f'<figure><img alt="{html.escape(n)}" src="data:image/png;base64,'
            f'{base64.b64encode(images[n]).decode("ascii")}"><figcaption>{html.escape(n)}</figcaption></figure>'
            for n in order
        ) or _note("No images stored for this trial.")
        blocks.append(f'<div class="trial-images"><h3>Rank {rank}: trial {number} (value {value:.4g})</h3>'
                      f"{figures}</div>")
    if not found:
        return _note(f"No images are stored for the top {min(top, len(frame))} trial(s) of this study "
                     "(workers upload them to the artifact store; check --artifacts).")
    return "".join(blocks)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
p.summary, p.note { color: #555; }
table.ranking { border-collapse: collapse; font-size: 0.85em; display: block; overflow-x: auto; }
table.ranking th, table.ranking td { padding: 0.25em 0.6em; border-bottom: 1px solid #eee; text-align: right; }
div.trial-images figure { display: inline-block; margin: 0 1em 1em 0; vertical-align: top; }
div.trial-images img { image-rendering: pixelated; max-width: 380px; }
figcaption { font-size: 0.85em; color: #555; }
"""


def _page(title: str, summary: str, sections: list[Section]) -> str:
    """The whole document: plotly.js inlined once in <head>, then one <section> per part."""
    nav = " | ".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in sections)
    body = "\n".join(f'<section id="{s.id}"><h2>{html.escape(s.title)}</h2>\n{s.body}\n</section>' for s in sections)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>\n'
        f"<style>{_CSS}</style>\n<script>{get_plotlyjs()}</script>\n</head><body>\n"
        f'<h1>{html.escape(title)}</h1>\n<p class="summary">{html.escape(summary)}</p>\n<nav>{nav}</nav>\n'
        f"{body}\n</body></html>\n"
    )
