"""Numbers in the report's ranking that do not mean what they seem: a ceiling, a sign.

* ``mutual_info`` (:func:`tuner.vae.metrics.mutual_info`) is InfoNCE with the encoder's q(z|x) as
  critic, over the N examples of the validation split (all of them: the worker evaluates the whole
  split): mean_i [log q(z_i|x_i) - log (1/N sum_j q(z_i|x_j))]. The j = i term alone caps it at
  log N, so an encoder that tells every validation example apart reads log N whatever its true
  information: a trial within ``MI_CEILING_MARGIN`` of log N measures only "at least this much".
* ``approximation_gap`` (:mod:`tuner.vae.gaps`) is the optimized -ELBO minus the IWAE NLL on the first
  test examples: two estimates, each an upper bound with its own noise, so it can come out below 0.
* ``iwae_nll`` of a trial whose log p(z) is only bounded (``prior_bound``: the diffusion prior,
  :mod:`tuner.vae.diffusion`) is an upper bound on its NLL looser than the other families': a
  one-chain variational bound stands in for log p(z) in every importance weight.

A note is shown only when a shown number hits its case; the cells that do are marked.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import optuna
import pandas as pd
from optuna.trial import FrozenTrial
from pydantic import ValidationError

from tuner.errors import TunerError
from tuner.results.ranking import PRIOR_BOUND_MARK, prior_bound_note
from tuner.spec import DataConfig
from tuner.study.open import stored_spec
from tuner.vae.data import load_splits

__all__ = ["GAP_MARK", "MI_CEILING_MARGIN", "MI_MARK", "Caveats", "Mark", "caveats", "validation_examples"]

# Within 0.1 nats of log N, the other N - 1 examples' densities at z_i sum to under e^0.1 - 1 = 10.5%
# of its own on average: the encoder already tells the validation examples apart, and what is left of
# the estimate is the estimator's cap, not the model's information.
MI_CEILING_MARGIN = 0.1
MI_MARK, GAP_MARK = "≥", "†"  # before the MI (read: at least), after a negative gap


@dataclass(frozen=True)
class Mark:
    """How a cell with a caveat reads: text around its number, and a tooltip that says why."""

    prefix: str
    suffix: str
    tip: str


@dataclass
class Caveats:
    """Per (trial, column): the cell's mark; the notes to print above the table."""

    marks: dict[tuple[int, str], Mark] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def validation_examples(study: optuna.Study) -> int | None:
    """N, the validation split's size, from the study's stored data settings (every trial shares
    the split); None when the data cannot be read on this host (a path on another machine)."""
    raw = stored_spec(study)
    if not raw:
        return None
    try:
        data = DataConfig.model_validate(json.loads(raw).get("base", {}).get("data", {}))
        return int(load_splits(data, batch_size=1).val.shape[0])
    except (TunerError, ValidationError, OSError, ValueError):
        return None


def caveats(shown: pd.DataFrame, trials: dict[int, FrozenTrial], n_val: int | None) -> Caveats:
    """The marks and notes for the rows of ``shown`` (ranking_frame rows) among ``trials``."""
    out = Caveats()
    _mutual_info(shown, n_val, out)
    _approximation_gap(shown, trials, out)
    _prior_bound(shown, trials, out)
    return out


def _prior_bound(shown: pd.DataFrame, trials: dict[int, FrozenTrial], out: Caveats) -> None:
    bounded = [int(t) for t in shown["trial"] if trials[int(t)].user_attrs.get("prior_bound")]
    if not bounded:
        return
    tip = "an upper bound with a one-chain variational bound for log p(z): the true NLL is lower"
    for trial in bounded:
        for column in ("iwae_nll", "test_iwae_nll", "confirmed_nll"):
            if column in shown:
                out.marks[(trial, column)] = Mark("", PRIOR_BOUND_MARK, tip)
    out.notes.append(prior_bound_note(bounded) + ".")


def _mutual_info(shown: pd.DataFrame, n_val: int | None, out: Caveats) -> None:
    if n_val is None or "mutual_info" not in shown:
        return
    ceiling = math.log(n_val)
    at = [(int(t), float(mi)) for t, mi in zip(shown["trial"], shown["mutual_info"])
          if pd.notna(mi) and float(mi) >= ceiling - MI_CEILING_MARGIN]
    if not at:
        return
    for trial, mi in at:
        out.marks[(trial, "mutual_info")] = Mark(MI_MARK, "", f"at the estimator's ceiling log N = {ceiling:.2f} "
                                                               f"nats: the true value is at least {mi:.2f}")
    out.notes.append(
        f"mutual_info is an InfoNCE estimate over the N = {n_val} validation examples (tuner.vae.metrics), "
        f"which can never exceed log N = {ceiling:.2f} nats. {len(at)} of the {len(shown)} trials shown are "
        f"within {MI_CEILING_MARGIN} nats of it (marked {MI_MARK}): each only says 'at least this much', so "
        "those trials cannot be told apart by MI (a larger validation split raises the ceiling)."
    )


def _approximation_gap(shown: pd.DataFrame, trials: dict[int, FrozenTrial], out: Caveats) -> None:
    if "approximation_gap" not in shown:
        return
    negative = [(int(t), float(g)) for t, g in zip(shown["trial"], shown["approximation_gap"]) if pd.notna(g) and g < 0]
    if not negative:
        return
    listed = []
    for trial, gap in negative:
        attrs = trials[trial].user_attrs
        se = attrs.get("approximation_gap_se")
        tip = f"{gap:.3g} nats" + (f" (se {se:.2g} of the optimized -ELBO alone)" if se is not None else "")
        out.marks[(trial, "approximation_gap")] = Mark("", GAP_MARK, tip)
        listed.append(f"trial {trial}: {tip}")
    first = trials[negative[0][0]].user_attrs
    out.notes.append(
        f"approximation_gap is the optimized -ELBO minus the IWAE NLL (K = {first.get('gap_iwae_k', '?')}) on the "
        f"first {first.get('gap_examples', '?')} test examples (tuner.vae.gaps): a difference of two estimates, "
        "each an upper bound with noise of its own, whose variance is the sum of both (its se, "
        "approximation_gap_se, counts only the optimized -ELBO's draws). Below 0 here (marked "
        f"{GAP_MARK}; {'; '.join(listed)}): the optimized posterior beat IWAE with the encoder as proposal, "
        "which says the posterior family is not the bottleneck, not that it costs negative nats."
    )
