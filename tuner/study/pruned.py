"""A pruned trial is told without a value.

Optuna's ``study.tell(trial, state=PRUNED)`` stores the trial's last intermediate value as its value
(``optuna/study/_tell.py``: "Whether a pruned trials should have an actual value can be
discussed"). Here the intermediate value is the validation -ELBO of the trial's last epoch, the
objective is the validation IWAE NLL (or the best epoch's -ELBO): a pruned trial would sit on the
objective's axis of every dashboard plot with a number of another quantity. So a pruned trial keeps
no value, and its intermediate values (the -ELBO curve) stay where they are.

Nothing reads a pruned trial's value instead: TPE ranks pruned trials by their last intermediate
value and step (``_get_pruned_trial_score``), CMA-ES ignores pruned trials unless
``consider_pruned_trials`` (off here) and then copies the last intermediate value itself, random,
grid and QMC read no values; the median/percentile pruners read the intermediate values of complete
trials, successive halving and Hyperband their rung system attrs; tuner's ranking, checkpoint
retention and warm starts order complete trials only.
"""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

__all__ = ["tell_pruned"]


def tell_pruned(study: optuna.Study, trial: optuna.Trial) -> None:
    """``study.tell(trial, state=PRUNED)`` without the value Optuna would copy from the last
    intermediate value: the sampler's ``after_trial`` hook, then the state, as Optuna's tell does
    them (a finished trial raises ``UpdateFinishedTrialError`` from the storage, as there)."""
    frozen = study._storage.get_trial(trial._trial_id)
    if frozen.state != TrialState.RUNNING:
        raise ValueError(f"Cannot tell a {frozen.state.name} trial.")  # Optuna's own words
    # (Optuna passes a Hyperband bracket's view of the study here; the offered samplers' hooks read
    # no trials, so the whole study is the same to them)
    study.sampler.after_trial(study, frozen, TrialState.PRUNED, None)
    study._storage.set_trial_state_values(trial._trial_id, TrialState.PRUNED, None)
