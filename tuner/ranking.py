"""Completed trials as a pandas DataFrame, ranked: collapsed trials last, then by the objective.

Reads only the study (any worker's results, from any host). Collapse is a verdict stored by the
worker (see tuner.metrics); a collapsed model with a good NLL is still a model whose latent code
is useless, so it never outranks a healthy one by default.
"""

from __future__ import annotations

import optuna
import pandas as pd
from optuna.trial import TrialState

__all__ = ["METRIC_COLUMNS", "ranking_frame"]

METRIC_COLUMNS = ("iwae_nll", "recon", "kl", "active_units", "mutual_info", "collapsed", "epochs", "test_iwae_nll")


def ranking_frame(study: optuna.Study, include_collapsed: bool = True) -> pd.DataFrame:
    """One row per complete trial: number, objective value(s), params, metrics; rank 1 is best."""
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        row = {"trial": t.number, "value": t.values[0]}
        row.update({name: t.user_attrs.get(name) for name in METRIC_COLUMNS})
        row.update({f"params.{k}": v for k, v in t.params.items()})
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame["collapsed"] = frame["collapsed"].fillna(False).astype(bool)
    if not include_collapsed:
        frame = frame[~frame["collapsed"]]
    frame = frame.sort_values(["collapsed", "value", "trial"]).reset_index(drop=True)
    frame.insert(0, "rank", range(1, len(frame) + 1))
    return frame
