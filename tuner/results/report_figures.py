"""The report's plotly figures: history, learning curves, parameters vs objective, importances, collapse.

Every figure plots complete trials' objective values only: a pruned trial has no objective value
(its last validation -ELBO is another quantity), so it appears only in the learning curves, as the
-ELBO curve it reported. The best trial (rank 1 of the ranking) is drawn apart wherever trials are
drawn one by one. Each function returns a figure; :func:`figure_div` makes it a <div> for the page.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import optuna
import pandas as pd
import plotly.graph_objects as go
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots

from tuner.results.report_importances import METHOD
from tuner.store.attrs import trial_series

__all__ = [
    "BEST_LINE", "collapse_figure", "confirmed_figure", "curves_figure", "figure_div", "history_figure",
    "importances_figure", "parallel_figure", "slices_figure",
]

_PLOT_CONFIG = {"displaylogo": False, "responsive": True}
_PRUNED_STYLE = {"color": "#9a9a9a", "dash": "dash", "width": 1}
_COLLAPSED_MARKER = {"color": "#d62728", "symbol": "x", "size": 10}
BEST_LINE = {"color": "#ff7f0e", "width": 5}  # orange: on no colour scale used here
_BEST_MARKER = {"color": "#ff7f0e", "symbol": "star", "size": 16, "line": {"color": "#222", "width": 1}}
# Viridis without its palest yellow (unreadable on white): better values darker
_SCALE = [[i / 10, c] for i, c in enumerate(sample_colorscale("Viridis", [0.85 * i / 10 for i in range(11)]))]
_SLICE_COLUMNS = 3
_FEASIBLE = {"Feasible": "healthy", "Infeasible": "collapsed"}


def figure_div(fig: go.Figure, name: str) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{name}", config=_PLOT_CONFIG)


def _layout(fig: go.Figure, x: str, y: str, *, x_max: float | None = None, height: int = 420) -> go.Figure:
    """Shared look; ``x_max`` marks an integer x axis (trials, epochs, units): about 10 whole-number ticks."""
    fig.update_layout(template="plotly_white", height=height, margin={"l": 60, "r": 20, "t": 30, "b": 50},
                      xaxis_title=x, yaxis_title=y)
    if x_max is not None and math.isfinite(x_max):
        fig.update_xaxes(tick0=0, dtick=max(1, math.ceil(x_max / 10)))
    return fig


def history_figure(frame: pd.DataFrame, label: str, best: int) -> go.Figure:
    """Each complete trial's value by trial number (collapsed ones marked, the best a star) and the
    best healthy value so far."""
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
    top = done[done["trial"] == best]
    fig.add_scatter(x=top["trial"], y=top["value"], mode="markers", name=f"best: trial {best}", marker=_BEST_MARKER)
    return _layout(fig, "trial", label, x_max=done["trial"].max())


def _curve(trial: FrozenTrial) -> tuple[list[int], list[float | None]]:
    """(epochs, validation -ELBO): intermediate values, or the curve a multi-objective worker keeps."""
    if trial.intermediate_values:
        epochs = sorted(trial.intermediate_values)
        values = [trial.intermediate_values[e] for e in epochs]
    else:
        values = list(trial_series(trial, "val_neg_elbo_curve") or [])
        epochs = list(range(1, len(values) + 1))
    return epochs, [v if v is not None and math.isfinite(v) else None for v in values]  # gaps for NaN


def curves_figure(trials: Sequence[FrozenTrial], best: int, label: str) -> go.Figure | None:
    """Complete trials coloured by their objective value on one continuous scale (better darker),
    the best trial a thick orange line on top, pruned trials one dashed grey trace with gaps; None
    when no trial reported a curve."""
    fig = go.Figure()
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.values and t.number != best]
    values = [t.values[0] for t in trials if t.state == TrialState.COMPLETE and t.values]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)

    def colour(v: float) -> str:
        return sample_colorscale(_SCALE, [(v - low) / (high - low) if high > low else 0.0])[0]

    pruned_x: list[int | None] = []
    pruned_y: list[float | None] = []
    pruned_text: list[str] = []
    for t in trials:
        epochs, curve = _curve(t)
        if epochs and t.state == TrialState.PRUNED:
            reason = t.user_attrs.get("prune_reason", "pruned")
            pruned_x += [*epochs, None]
            pruned_y += [*curve, None]
            pruned_text += [f"trial {t.number}: {reason}"] * len(epochs) + [""]
    if pruned_x:
        fig.add_scatter(x=pruned_x, y=pruned_y, mode="lines+markers", name="pruned", line=_PRUNED_STYLE,
                        marker={"size": 4}, hovertext=pruned_text, legendgroup="pruned")
    for t in sorted(complete, key=lambda t: -t.values[0]):  # worst first: better curves drawn on top
        epochs, curve = _curve(t)
        if epochs:
            fig.add_scatter(x=epochs, y=curve, mode="lines", name=f"trial {t.number}", legendgroup="complete",
                            line={"color": colour(t.values[0]), "width": 1.5},
                            hovertext=[f"trial {t.number}: {label} {t.values[0]:.4g}"] * len(epochs))
    top = next((t for t in trials if t.number == best), None)
    if top is not None and _curve(top)[0]:
        epochs, curve = _curve(top)
        fig.add_scatter(x=epochs, y=curve, mode="lines+markers", name=f"trial {best} (best)", line=BEST_LINE,
                        legendrank=1, hovertext=[f"trial {best} (best): {label} {top.values[0]:.4g}"] * len(epochs))
    if not fig.data:
        return None
    if values:  # the colour scale's key: an invisible trace that carries only the colour bar
        fig.add_scatter(x=[None], y=[None], mode="markers", showlegend=False, hoverinfo="skip",
                        marker={"color": [low, high], "cmin": low, "cmax": high, "colorscale": _SCALE,
                                "showscale": True, "colorbar": {"title": {"text": "final value"}, "x": 1.02}})
    epochs = max(x for trace in fig.data for x in trace.x if x is not None)
    fig = _layout(fig, "epoch", "validation -ELBO (nats, beta = 1)", x_max=epochs, height=460)
    return fig.update_layout(legend={"x": 1.15})


def parallel_figure(study: optuna.Study, label: str) -> go.Figure:
    """Optuna's parallel-coordinate plot of the complete trials (missing conditional values on a
    'None' tick, log and categorical axes, collapsed trials dotted), its objective axis moved from
    the left end to the right (read left to right: hyperparameters -> objective) and its lines in
    the learning curves' colours (better darker)."""
    fig = optuna.visualization.plot_parallel_coordinate(study, target=lambda t: t.values[0], target_name=label)
    axes = len(fig.layout.xaxis.ticktext)

    def moved(items: Sequence) -> list:  # the objective's entry (first) to the end
        return [*items[1:], items[0]]

    for trace in fig.data:
        if trace.mode == "lines" and trace.customdata is not None:  # one trial's line (legend keys have none)
            trace.y, trace.customdata = moved(trace.y), moved(trace.customdata)
            # the learning curves' colours: the objective axis holds (value - min) / (max - min)
            trace.line.color = sample_colorscale(_SCALE, [trace.y[-1]])[0]
            trace.opacity = 0.8
        elif trace.marker is not None and trace.marker.showscale:  # the colour bar's carrier
            trace.marker.colorscale, trace.marker.reversescale = _SCALE, False
        elif trace.name in _FEASIBLE:  # legend entries for Optuna's constraint: tuner's is collapse
            trace.name = _FEASIBLE[trace.name]
    fig.layout.xaxis.ticktext = moved(fig.layout.xaxis.ticktext)
    for note in fig.layout.annotations:
        note.x = (note.x - 1) % axes
    return fig.update_layout(title=None, height=500, margin={"l": 60, "r": 40, "t": 80, "b": 60},
                             template="plotly_white")


def _distributions(trials: Sequence[FrozenTrial]) -> dict[str, object]:
    found: dict[str, object] = {}
    for t in trials:
        for name, dist in t.distributions.items():
            found.setdefault(name, dist)
    return dict(sorted(found.items()))


def slices_figure(trials: Sequence[FrozenTrial], best: int, label: str) -> go.Figure | None:
    """The objective against each hyperparameter, one panel each, three to a row: complete
    trials where the parameter is set (collapsed ones as red crosses, the best a star); None when
    nothing was searched."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.values and math.isfinite(t.values[0])]
    dists = _distributions(complete)
    if not dists:
        return None
    rows = math.ceil(len(dists) / _SLICE_COLUMNS)
    fig = make_subplots(rows=rows, cols=min(_SLICE_COLUMNS, len(dists)), shared_yaxes=True,
                        horizontal_spacing=0.04, vertical_spacing=min(0.3, 0.45 / rows))
    for i, (name, dist) in enumerate(dists.items()):
        row, col = divmod(i, _SLICE_COLUMNS)
        for kind, part in (("complete", [t for t in complete if not t.user_attrs.get("collapsed")]),
                           ("collapsed", [t for t in complete if t.user_attrs.get("collapsed")]),
                           (f"best: trial {best}", [t for t in complete if t.number == best])):
            part = [t for t in part if name in t.params]
            marker = {"complete": {"color": "#1f77b4", "size": 7, "opacity": 0.7},
                      "collapsed": _COLLAPSED_MARKER}.get(kind, _BEST_MARKER)
            fig.add_scatter(x=[_slice_x(t.params[name], dist) for t in part], y=[t.values[0] for t in part],
                            mode="markers", name=kind, marker=marker, legendgroup=kind, showlegend=i == 0,
                            hovertext=[f"trial {t.number}: {name} = {t.params[name]}" for t in part],
                            row=row + 1, col=col + 1)
        _slice_axis(fig, name, dist, row + 1, col + 1)
    fig.update_yaxes(title_text=label, col=1)
    return fig.update_layout(template="plotly_white", height=80 + 280 * rows,
                             margin={"l": 60, "r": 20, "t": 30, "b": 50})


def _slice_x(value: object, dist: object) -> object:
    return repr(value) if isinstance(dist, CategoricalDistribution) else value


def _slice_axis(fig: go.Figure, name: str, dist: object, row: int, col: int) -> None:
    """The panel's x axis: the parameter's name, log for log-scaled ranges, the choices in spec order."""
    if isinstance(dist, CategoricalDistribution):
        fig.update_xaxes(type="category", categoryorder="array", categoryarray=[repr(c) for c in dist.choices],
                         row=row, col=col)
    elif isinstance(dist, FloatDistribution | IntDistribution) and dist.log:
        fig.update_xaxes(type="log", row=row, col=col)
    fig.update_xaxes(title_text=name, row=row, col=col)


def importances_figure(scores: dict[str, float]) -> go.Figure:
    """Horizontal bars, the most important on top, each parameter's share of the total."""
    names = list(scores)[::-1]
    fig = go.Figure(go.Bar(x=[scores[n] for n in names], y=names, orientation="h"))
    return _layout(fig, f"importance ({METHOD}, as in the dashboard; share of the total)", "",
                   height=max(250, 60 + 40 * len(names)))


def collapse_figure(frame: pd.DataFrame) -> go.Figure:
    """Validation IWAE NLL against active units; collapsed trials (tuner.vae.metrics' verdict) as red crosses."""
    fig = go.Figure()
    for name, part, marker in (("healthy", frame[~frame["collapsed"]], None),
                               ("collapsed", frame[frame["collapsed"]], _COLLAPSED_MARKER)):
        fig.add_scatter(x=part["active_units"], y=part["iwae_nll"], mode="markers", name=name, marker=marker,
                        hovertext=[f"trial {n}, KL {kl:.3g}" if kl is not None else f"trial {n}"
                                   for n, kl in zip(part["trial"], part["kl"])])
    return _layout(fig, "active units (Cov_x E[z|x] > 0.01)", "validation IWAE NLL (nats)",
                   x_max=pd.to_numeric(frame["active_units"], errors="coerce").max())


def confirmed_figure(frame: pd.DataFrame) -> tuple[go.Figure, str]:
    """`tuner confirm`'s reruns: each confirmed trial's test IWAE NLL mean with ± 1 sd error bars,
    beside its own single-seed test NLL, in validation rank order; and the sentence to go with it."""
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
            "in validation rank order; a test number, not for selection."
            + (" " + "; ".join(notes) + "." if notes else " No trial is worse than the next one beyond the sds."))
    return _layout(fig, "trial (validation rank order)", "test IWAE NLL (nats)"), text
