"""Hyperparameter importances for the report, by the method the dashboard uses, with what it left out.

optuna-dashboard (0.21, ``optuna_dashboard/_importance.py``) ranks hyperparameters with Optuna's
``PedAnovaImportanceEvaluator()`` at its defaults (not configurable there), on every parameter of the
complete trials, target ``t.values[i]`` per objective. The report calls the same evaluator the same
way on the first objective, so the two pages rank a study alike. PED-ANOVA has no randomness (Parzen
estimators on a fixed grid): the same store gives the same importances, with no seed to set.

What PED-ANOVA measures: how differently a parameter is distributed among the best 10% of the complete
trials (``target_quantile``) than among all of them, as a share of the total over parameters.
Conditional parameters (``when`` in the spec: ``kl.cycles`` only with a cyclical schedule) are scored
on the trials where they are set (Conditional PED-ANOVA); a parameter set in fewer than 2 complete
trials cannot be scored (the evaluator drops regimes under 2 trials) and is listed as left out.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import optuna
from optuna.importance import PedAnovaImportanceEvaluator
from optuna.trial import TrialState

__all__ = ["METHOD", "Importances", "importances"]

METHOD = "PED-ANOVA"
_TARGET_QUANTILE = 0.1  # PedAnovaImportanceEvaluator's default, which the dashboard keeps
_MIN_TOP = 5  # Optuna's advice: at least 5 trials in the top quantile for a stable answer
_MIN_SET = 2  # the evaluator's _min_n_trials_in_regime: trials a parameter must be set in


@dataclass
class Importances:
    """Share per scored parameter (None when none could be computed) and the notes to show with it."""

    scores: dict[str, float] | None
    notes: list[str] = field(default_factory=list)


def importances(study: optuna.Study) -> Importances:
    """PED-ANOVA importances of the first objective over the complete trials, or why there are none."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.values and math.isfinite(t.values[0])]
    if len(complete) < 2:
        return Importances(None, [f"Importances need at least 2 complete trials; this study has {len(complete)}."])
    searched = sorted({name for t in complete for name in t.params})
    if len(searched) < 2:
        return Importances(None, [f"Importances need at least 2 searched hyperparameters (one always has all "
                                  f"of the importance); searched here: {', '.join(searched) or 'none'}."])
    if len({t.values[0] for t in complete}) == 1:
        return Importances(None, ["Importances are undefined: every complete trial has the same objective "
                                  "value, so no hyperparameter changes it."])
    with warnings.catch_warnings():  # the evaluator warns that it minimizes target (ours do) and on thin regimes
        warnings.simplefilter("ignore")
        scores = optuna.importance.get_param_importances(
            study, evaluator=PedAnovaImportanceEvaluator(), target=lambda t: t.values[0]
        )
    set_in = {name: sum(name in t.params for t in complete) for name in searched}
    left_out = [name for name in searched if set_in[name] < _MIN_SET]
    notes = _notes(set_in, left_out, len(complete))
    return Importances({name: scores[name] for name in scores if name not in left_out}, notes)


def _notes(set_in: dict[str, int], left_out: list[str], n: int) -> list[str]:
    """What the reader must know to read the bars: conditional parameters, left-out ones, few trials."""
    notes = []
    conditional = [name for name in set_in if _MIN_SET <= set_in[name] < n]
    if conditional:
        notes.append("Conditional parameters, scored on the complete trials where they are set: "
                     + ", ".join(f"{name} ({set_in[name]} of {n})" for name in conditional) + ".")
    if left_out:
        notes.append("Left out: " + ", ".join(f"{name} (set in {set_in[name]} of {n} complete trials)" for name in left_out)
                     + f"; {METHOD} needs a parameter set in at least {_MIN_SET} complete trials to score it.")
    top = math.ceil(_TARGET_QUANTILE * n)  # the evaluator's cutoff keeps at least this many (ties: more)
    if top < _MIN_TOP:
        notes.append(f"{METHOD} compares the best {_TARGET_QUANTILE:.0%} of the complete trials (here {top} of {n}) "
                     f"with all of them; Optuna advises at least {_MIN_TOP} in that best group (about "
                     f"{math.ceil(_MIN_TOP / _TARGET_QUANTILE)} complete trials), so read these shares as rough.")
    return notes

