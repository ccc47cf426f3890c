"""Trials as a pandas DataFrame, ranked by log-likelihood, reconstruction or active units; collapse last.

Reads only the study (any worker's results, from any host): the metrics each worker stored as user
attrs when it told a trial complete (see tuner.study.worker). Collapse is a verdict stored there too (see
tuner.vae.metrics); a collapsed model with a good NLL is still a model whose latent code is useless, so
by default it never outranks a healthy one. The Pareto flag marks the complete trials that no other
complete trial beats on all of (IWAE NLL, reconstruction, inactive latent fraction) at once.
Trials whose log p(z) is only bounded (``prior_bound``: the diffusion prior, tuner.vae.metrics) are
listed in the frame's ``attrs["bounded_prior_trials"]``: their NLL is a looser upper bound, and the
terminal table and the report mark it (PRIOR_BOUND_MARK, prior_bound_note).
The terminal's tables are tuner.results.ranking_table; the machine formats here keep every column.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from tuner.atomic import write_atomic
from tuner.errors import TunerError
from tuner.results.confirm import Confirmed, confirmed, worse_than_next
from tuner.study.open import open_study

__all__ = [
    "CONFIRM_COLUMNS", "FORMATS", "METRIC_COLUMNS", "PARETO_OBJECTIVES", "PRIOR_BOUND_MARK", "RANK_BY", "STATES",
    "pareto_front", "prior_bound_note", "rank_study", "ranking_frame", "ranking_records", "render_ranking",
    "save_ranking",
]

# user attrs shown per trial, in this order (nats per example on the validation split unless test_; the
# amortization and approximation gaps (tuner.vae.gaps) are on the first train.gap_examples test examples;
# decoder_ortho_cos: the mean |cos| of the decoder's Jacobian columns, tuner.vae.ortho)
METRIC_COLUMNS = (
    "iwae_nll", "recon", "kl", "neg_elbo", "active_units", "latent_size", "inactive_fraction", "mutual_info",
    "collapsed", "epochs", "best_epoch", "test_iwae_nll", "amortization_gap", "approximation_gap",
    "decoder_ortho_cos", "wall_s", "seed",
)
# --by NAME -> (column, ascending): NLL, reconstruction and -ELBO are nats (less is better); more
# active units is better
RANK_BY: dict[str, tuple[str, bool]] = {
    "nll": ("iwae_nll", True), "recon": ("recon", True), "elbo": ("neg_elbo", True), "au": ("active_units", False),
    "confirmed": ("confirmed_nll", True),  # `tuner confirm`'s mean test IWAE NLL over seeds; unconfirmed last
}
# `tuner confirm`'s summary per trial (tuner.results.confirm): test IWAE NLL mean, sd and n over the
# reruns' seeds, the means of test recon, KL and active units and the share of seeds that collapsed,
# and a note where a trial's mean is worse than the next confirmed one's beyond the sds
CONFIRM_COLUMNS = ("confirmed_nll", "confirmed_sd", "confirmed_n", "confirmed_recon", "confirmed_kl",
                   "confirmed_active_units", "confirmed_collapse_rate", "confirm_note")
_CONFIRM_MEANS = {"confirmed_recon": "recon", "confirmed_kl": "kl", "confirmed_active_units": "active_units",
                  "confirmed_collapse_rate": "collapse_rate"}  # column -> Confirmed field
PARETO_OBJECTIVES = ("iwae_nll", "recon", "inactive_fraction")  # all minimized
STATES: dict[str, TrialState] = {
    "complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "fail": TrialState.FAIL,
    "running": TrialState.RUNNING, "waiting": TrialState.WAITING,
}
FORMATS = ("table", "csv", "json", "parquet", "markdown")
_REASON_ATTRS = ("prune_reason", "error", "handed_back")  # why a trial did not complete, first found
PRIOR_BOUND_MARK = "‡"  # after an NLL whose log p(z) is a bound (the diffusion prior)


def prior_bound_note(trials: Sequence[int]) -> str:
    """One line on what a marked NLL is, naming the ``trials`` whose log p(z) is only bounded."""
    listed = ", ".join(str(int(t)) for t in trials)
    return (f"{PRIOR_BOUND_MARK} trial{'s' if len(trials) != 1 else ''} {listed} (model.prior diffusion): log p(z) "
            "is a one-chain variational bound on the diffusion prior's density (tuner.vae.diffusion), so the "
            "IWAE NLL and -ELBO are upper bounds on the true NLL, looser than the other families' (a diffusion "
            "prior's true NLL is lower than shown)")


def _choice(option: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise TunerError(f"{option} {value!r} is not one of {', '.join(choices)}; pick one of them")
    return value


def pareto_front(points: np.ndarray) -> np.ndarray:
    """(N,) bool: the rows of ``points`` (N, M), every column minimized, that no other row dominates.

    Row a dominates row b when a <= b in every column and a < b in one. Equal rows do not dominate
    each other (both stay on the front). A row with a NaN is never on the front and dominates nothing.
    """
    points = np.asarray(points, dtype=float)
    finite = np.isfinite(points).all(axis=1)
    others = points[finite]  # (F, M)
    front = np.zeros(len(points), dtype=bool)
    for i in np.flatnonzero(finite):
        beaten = (others <= points[i]).all(axis=1) & (others < points[i]).any(axis=1)  # (F,)
        front[i] = not beaten.any()
    return front


def _row(t: FrozenTrial) -> dict[str, object]:
    row: dict[str, object] = {
        "trial": t.number, "state": t.state.name.lower(), "value": t.values[0] if t.values else None,
    }
    row.update({name: t.user_attrs.get(name) for name in METRIC_COLUMNS})
    row["reason"] = next((str(t.user_attrs[a]) for a in _REASON_ATTRS if a in t.user_attrs), None)
    row.update({f"params.{k}": v for k, v in t.params.items()})
    return row


def ranking_frame(
    study: optuna.Study, *, by: str = "nll", include_collapsed: bool = False,
    states: Sequence[str] = ("complete",), top: int | None = None,
) -> pd.DataFrame:
    """One row per trial: rank (1 is best), trial, state, value, metrics, pareto, reason, params.*.

    Complete trials are ranked by ``by`` (see RANK_BY, or ``auto``: ``confirmed`` when any trial
    was confirmed, else ``nll``; ties by NLL, then trial number); collapsed
    ones after the healthy ones unless ``include_collapsed``, which ranks them by the metric alone.
    ``top`` keeps the best ``top`` complete trials. Trials in the other ``states`` (pruned, fail,
    ...) follow, unranked (rank NA), by trial number, with the prune reason or error in ``reason``.
    Empty frame when the study has no such trial.
    """
    summaries = confirmed(study)  # `tuner confirm`'s reruns, from the study's attrs
    if by == "auto":  # confirmed trials ranked by their mean over seeds, else validation NLL
        by = "confirmed" if summaries else "nll"
    key, ascending = RANK_BY[_choice("--by", by, tuple(RANK_BY))]
    for name in states:
        _choice("--states", name, tuple(STATES))
    if top is not None and top < 1:
        raise TunerError(f"--top must be at least 1, but got top={top}; give the number of trials to keep")
    trials = study.get_trials(deepcopy=False, states=tuple({STATES[s] for s in ("complete", *states)}))
    frame = pd.DataFrame([_row(t) for t in trials], columns=[
        "trial", "state", "value", *METRIC_COLUMNS, "reason",
        *sorted({f"params.{k}" for t in trials for k in t.params}),
    ])
    done = frame[frame["state"] == "complete"].copy()
    done["collapsed"] = done["collapsed"].fillna(False).astype(bool)
    done["pareto"] = pareto_front(done[list(PARETO_OBJECTIVES)].to_numpy(dtype=float))
    order = ([] if include_collapsed else ["collapsed"]) + list(dict.fromkeys([key, "iwae_nll", "trial"]))
    asc = [True if col != key else ascending for col in order]
    done = _with_confirmed(done, summaries)
    done = done.sort_values(order, ascending=asc, na_position="last", kind="stable")
    done = done if top is None else done.head(top)
    done.insert(0, "rank", pd.array(range(1, len(done) + 1), dtype="Int64"))
    if "complete" not in states:
        done = done.iloc[:0]
    rest = frame[(frame["state"] != "complete") & frame["state"].isin(states)].sort_values("trial")
    rest = rest.assign(rank=pd.array([pd.NA] * len(rest), dtype="Int64"), pareto=False)
    parts = [p for p in (done, rest) if not p.empty]
    out = pd.concat(parts, ignore_index=True) if parts else done.reset_index(drop=True)
    out = _confirm_notes(out, summaries)
    columns = ["rank", "trial", "state", "value", *METRIC_COLUMNS[:9], "pareto", *METRIC_COLUMNS[9:],
               *CONFIRM_COLUMNS, "reason"]
    out = out[columns + [c for c in out.columns if c.startswith("params.")]]
    bounded = {t.number for t in trials if t.user_attrs.get("prior_bound")}  # the metrics' flag (a worker's attr)
    out.attrs["bounded_prior_trials"] = sorted(int(t) for t in out["trial"] if int(t) in bounded)
    return out


def _with_confirmed(done: pd.DataFrame, summaries: dict[int, Confirmed]) -> pd.DataFrame:
    """The confirmed_* columns (NaN, or NA for n, where a trial was never confirmed)."""
    pick = [summaries.get(int(t)) for t in done["trial"]]
    return done.assign(
        confirmed_nll=[c.nll_mean if c else np.nan for c in pick],
        confirmed_sd=[c.nll_sd if c else np.nan for c in pick],
        confirmed_n=pd.array([c.n if c else pd.NA for c in pick], dtype="Int64"),
        **{col: [getattr(c, field) if c else np.nan for c in pick] for col, field in _CONFIRM_MEANS.items()},
    )


def _confirm_notes(out: pd.DataFrame, summaries: dict[int, Confirmed]) -> pd.DataFrame:
    """confirm_note on a ranked trial whose confirmed mean is worse than the next confirmed one's
    by more than both sds: its single-seed rank is not to be trusted."""
    if "confirmed_nll" not in out:
        out = out.assign(confirmed_nll=np.nan, confirmed_sd=np.nan, confirmed_n=pd.array([pd.NA] * len(out), dtype="Int64"),
                         **{col: np.nan for col in _CONFIRM_MEANS})
    ranked = [summaries[int(t)] for t, r in zip(out["trial"], out["rank"]) if r is not pd.NA and int(t) in summaries]
    worse = worse_than_next(ranked)
    notes = [f"worse than trial {worse[int(t)]} over seeds" if int(t) in worse else None for t in out["trial"]]
    return out.assign(confirm_note=notes)


def rank_study(
    storage_url: str, study_name: str, *, by: str = "nll", include_collapsed: bool = False,
    states: Sequence[str] = ("complete",), top: int | None = None,
) -> tuple[optuna.Study, pd.DataFrame]:
    """Open a study and rank it (see ranking_frame); TunerError when it has no complete trial."""
    study = open_study(storage_url, study_name)
    frame = ranking_frame(study, by=by, include_collapsed=include_collapsed, states=states, top=top)
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        counts = pd.Series([t.state.name.lower() for t in study.get_trials(deepcopy=False)]).value_counts()
        have = ", ".join(f"{n} {s}" for s, n in counts.items()) or "no trials"
        raise TunerError(f"study '{study_name}' has no complete trial yet ({have}); run workers "
                         f"(tuner worker --study {study_name}) and rank it when trials finish")
    return study, frame


def ranking_records(frame: pd.DataFrame) -> list[dict[str, object]]:
    """The frame as JSON-ready objects: params.* gathered into ``params``; NaN/NA as None."""
    rows = json.loads(frame.to_json(orient="records", double_precision=15))
    records = []
    for row in rows:
        params = {k.removeprefix("params."): row.pop(k) for k in list(row) if k.startswith("params.")}
        # a param absent from a trial (conditional space) is absent from its params, not null
        records.append({**row, "params": {k: v for k, v in params.items() if v is not None}})
    return records


def _parquet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """Parquet needs one type per column: a categorical param mixing types (e.g. 32 and 'auto') as str."""
    out = frame.copy()
    for col in out.columns[out.dtypes == object]:
        kinds = {type(v) for v in out[col] if v is not None and not (isinstance(v, float) and np.isnan(v))}
        if len(kinds) > 1:
            out[col] = [None if v is None else str(v) for v in out[col]]
    return out


def render_ranking(frame: pd.DataFrame, fmt: str) -> str | bytes:
    """The frame as csv, json (ranking_records), markdown (a table with a header row) or parquet (bytes)."""
    _choice("--format", fmt, [f for f in FORMATS if f != "table"])
    if fmt == "csv":
        return frame.to_csv(index=False)
    if fmt == "json":
        return json.dumps(ranking_records(frame), indent=2, allow_nan=False) + "\n"
    if fmt == "markdown":
        return frame.to_markdown(index=False, floatfmt=".4g") + "\n"
    buffer = io.BytesIO()
    _parquet_safe(frame).to_parquet(buffer, index=False)
    return buffer.getvalue()


def save_ranking(frame: pd.DataFrame, fmt: str, path: str | Path) -> Path:
    """Write render_ranking(frame, fmt) to ``path`` via a temporary file: never a torn file."""
    data = render_ranking(frame, fmt)
    path = Path(path)
    try:
        write_atomic(path, data)
    except OSError as err:
        raise TunerError(f"--out '{path}': cannot write it ({err.strerror}); choose a writable path") from None
    return path
