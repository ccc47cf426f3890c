"""Sampler, pruner and directions from a study spec: pure factories, registered by name.

Collapse as a constraint: a trial whose latent code collapsed (``user_attrs["collapsed"]``) is
infeasible, so TPE models it apart from the good trials instead of learning from its (often fine)
NLL. Optuna's convention: a trial is feasible when every constraint value is <= 0. Of our samplers
only TPE reads constraints; random, grid, qmc and cmaes ignore them (Optuna's GP and NSGA-II/III
samplers would read them too, but are not offered). Optuna 5 deprecates the samplers'
``constraints_func`` (a FutureWarning; removal planned for 7.0) in favour of
:meth:`optuna.Trial.set_constraint` on the running trial. :func:`collapse_constraint_attrs` gives
the system attr that call writes, so the worker stores it in the one transaction of the trial's
final attrs (:func:`tuner.store.attrs.set_trial_attrs`); ``build_sampler(constraints_func=...)`` still
works while Optuna keeps it.
"""

from __future__ import annotations

import bisect
import importlib.util
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from optuna.pruners import (
    BasePruner,
    HyperbandPruner,
    NopPruner,
    PatientPruner,
    PercentilePruner,
    SuccessiveHalvingPruner,
)
from optuna.samplers import BaseSampler, CmaEsSampler, GridSampler, QMCSampler, RandomSampler, TPESampler
from optuna.study import Study, StudyDirection
from optuna.study._constrained_optimization import _CONSTRAINTS_KEY
from optuna.trial import BaseTrial, FrozenTrial, TrialState

from tuner.errors import TunerError
from tuner.study import space
from tuner.study.spec import PrunerSpec, StudySpec

__all__ = [
    "COLLAPSE_CONSTRAINT", "CachedPercentilePruner", "build_pruner", "build_sampler", "collapse_constraint",
    "collapse_constraint_attrs", "directions", "rung_epochs",
]

COLLAPSE_CONSTRAINT = "collapsed"  # the constraint's key: system attr "constraints:collapsed"

ConstraintsFunc = Callable[[FrozenTrial], Sequence[float]]


class _AskTellGridSampler(GridSampler):
    """Optuna's GridSampler for ask/tell workers. Its after_trial calls ``study.stop()`` once the
    grid is exhausted, which raises RuntimeError outside ``study.optimize`` (that is, in
    ``study.tell``); here it does nothing, and a worker checks ``sampler.is_exhausted(study)``."""

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        return None


def build_sampler(spec: StudySpec, constraints_func: ConstraintsFunc | None = None, *, worker: int = 0) -> BaseSampler:
    """The spec's sampler for one worker process, seeded from sampler.seed.

    worker: this process's index among the study's workers (0, 1, ...), or any int unique to it
    (a pid). tpe, random and cmaes get seed + worker: workers with one seed propose the same
    trials (their random startup trials are identical). grid and qmc keep sampler.seed on every
    worker: their sequence is the study's, and a grid point's id means the same point only under
    the same shuffle. grid: a GridSampler that never stops the study itself (stopping raises in
    ``study.tell``); ask ``sampler.is_exhausted(study)`` before ``study.ask()``.
    constraints_func goes to TPE only (the one sampler here that takes it); the others ignore it.
    """
    s = spec.sampler
    own_seed = (s.seed + worker) % 2**32  # numpy's seed range
    match s.name:
        case "tpe":
            return TPESampler(
                seed=own_seed,
                n_startup_trials=s.n_startup_trials,
                multivariate=s.multivariate,
                constant_liar=s.constant_liar,  # many trials run at once: treat running ones as bad
                constraints_func=constraints_func,
            )
        case "random":
            return RandomSampler(seed=own_seed)
        case "grid":
            return _AskTellGridSampler(space.grid(spec), seed=s.seed)
        case "cmaes":
            if importlib.util.find_spec("cmaes") is None:
                raise TunerError("sampler.name: cmaes needs the 'cmaes' package; pip install cmaes, or use tpe")
            return CmaEsSampler(seed=own_seed, n_startup_trials=s.n_startup_trials)
        case "qmc":
            return QMCSampler(qmc_type=s.qmc_type, scramble=s.scramble, seed=s.seed)
    raise AssertionError(f"unreachable: sampler {s.name!r} passed validation")


@dataclass
class _StepValues:
    """The complete trials' intermediate values of one study, sorted per step (NaNs counted apart)."""

    numbers: set[int] = field(default_factory=set)  # the complete trials taken in
    values: dict[int, list[float]] = field(default_factory=dict)  # step -> sorted non-NaN values
    nans: dict[int, int] = field(default_factory=dict)  # step -> NaN values

    def take(self, complete: list[FrozenTrial]) -> None:
        if len(complete) == len(self.numbers):
            return  # nothing finished since the last call: the common case, O(1)
        for trial in complete:
            if trial.number in self.numbers:
                continue
            self.numbers.add(trial.number)
            for step, value in trial.intermediate_values.items():
                if math.isnan(value):
                    self.nans[step] = self.nans.get(step, 0) + 1
                else:
                    bisect.insort(self.values.setdefault(step, []), value)

    def percentile(self, step: int, q: float, n_min_trials: int) -> float:
        """``np.nanpercentile`` (linear) of the values at ``step``; NaN under ``n_min_trials`` values."""
        ordered = self.values.get(step, [])
        if len(ordered) + self.nans.get(step, 0) < n_min_trials or not ordered:
            return math.nan
        index = (len(ordered) - 1) * (q / 100)
        lo = math.floor(index)
        a, b, t = ordered[lo], ordered[min(lo + 1, len(ordered) - 1)], index - lo
        return b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t  # numpy's _lerp, bit for bit


class CachedPercentilePruner(PercentilePruner):
    """Optuna's PercentilePruner (``MedianPruner`` at 50) with the same decisions at a flat cost.

    Optuna's re-reads the value at the current step of every complete trial and takes a percentile
    on each ``should_prune`` (O(complete trials) a call: ~1 ms per 1,000 trials). Complete trials
    never change, so here their values are kept sorted per step and taken in once.
    """

    def __init__(self, percentile: float, n_startup_trials: int = 5, n_warmup_steps: int = 0,
                 interval_steps: int = 1, *, n_min_trials: int = 1) -> None:
        super().__init__(percentile, n_startup_trials, n_warmup_steps, interval_steps, n_min_trials=n_min_trials)
        self._settings = (percentile, n_startup_trials, n_warmup_steps, interval_steps, n_min_trials)
        self._studies: dict[str, _StepValues] = {}

    def prune(self, study: Study, trial: FrozenTrial) -> bool:
        percentile, n_startup_trials, n_warmup_steps, interval_steps, n_min_trials = self._settings
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        step = trial.last_step
        if not complete or len(complete) < n_startup_trials or step is None or step < n_warmup_steps:
            return False
        # the first step of its interval (offset by the warmup) that this trial reports
        interval_start = (step - n_warmup_steps) // interval_steps * interval_steps + n_warmup_steps
        if max((s for s in trial.intermediate_values if s != step), default=-1) >= interval_start:
            return False
        own = [v for v in trial.intermediate_values.values() if not math.isnan(v)]
        if not own:
            return True  # only NaNs reported: as Optuna
        maximize = study.direction == StudyDirection.MAXIMIZE
        best = max(own) if maximize else min(own)
        values = self._studies.setdefault(study.study_name, _StepValues())
        values.take(complete)
        p = values.percentile(step, 100 - percentile if maximize else percentile, n_min_trials)
        if math.isnan(p):
            return False
        return best < p if maximize else best > p


def _pruner(p: PrunerSpec, name: str, epochs: int) -> BasePruner | None:
    match name:
        case "median":
            return CachedPercentilePruner(50.0, p.n_startup_trials, p.n_warmup_steps, p.interval_steps)
        case "percentile":
            return CachedPercentilePruner(p.percentile, p.n_startup_trials, p.n_warmup_steps, p.interval_steps)
        case "successive_halving":
            return SuccessiveHalvingPruner(p.min_resource, p.reduction_factor, p.min_early_stopping_rate)
        case "hyperband":
            # "auto" is known up front: Optuna's own auto waits for a finished trial, so a
            # population that starts together would prune nothing until then
            top = epochs if p.max_resource == "auto" else p.max_resource
            return HyperbandPruner(p.min_resource, top, p.reduction_factor)
        case _:  # "none"
            return None


def build_pruner(spec: StudySpec) -> BasePruner:
    """The spec's pruner; ``none`` is Optuna's NopPruner; ``patient`` wraps pruner.wrapped
    (wrapped ``none``: patience alone decides)."""
    p = spec.pruner
    if p.name == "patient":
        return PatientPruner(_pruner(p, p.wrapped, spec.budget.epochs), p.patience, p.min_delta)
    return _pruner(p, p.name, spec.budget.epochs) or NopPruner()


def rung_epochs(spec: StudySpec) -> frozenset[int]:
    """The epochs at which the spec's pruner compares trials at rungs (successive halving and
    Hyperband, also wrapped by ``patient``): min_resource * reduction_factor**k up to budget.epochs
    (successive halving starts at k = min_early_stopping_rate; Hyperband's brackets together cover
    every k). Empty for pruners that look at every epoch. Checkpoints are taken there too."""
    p = spec.pruner
    name = p.wrapped if p.name == "patient" else p.name
    if name not in ("successive_halving", "hyperband"):
        return frozenset()
    k = p.min_early_stopping_rate if name == "successive_halving" else 0
    rungs = set()
    while (epoch := p.min_resource * p.reduction_factor**k) <= spec.budget.epochs:
        rungs.add(epoch)
        k += 1
    return frozenset(rungs)


def directions(spec: StudySpec) -> list[str]:
    """Study directions: NLL (nats) is minimized; ``multi`` adds the inactive latent fraction."""
    return ["minimize", "minimize"] if spec.objective == "multi" else ["minimize"]


def collapse_constraint(trial: BaseTrial) -> list[float]:
    """[1.0] for a collapsed trial (infeasible), [-1.0] for a healthy one, [0.0] when unknown
    (pruned or failed before the verdict: feasible, so it is judged by its values alone)."""
    return [_constraint_value(trial.user_attrs.get("collapsed"))]


def collapse_constraint_attrs(collapsed: bool | None) -> dict[str, float]:
    """The system attr ``trial.set_constraint(COLLAPSE_CONSTRAINT, ...)`` writes for a trial with
    this ``collapsed`` verdict (Optuna 5's replacement for constraints_func), to be stored with the
    trial's other final attrs before ``study.tell``."""
    return {f"{_CONSTRAINTS_KEY}:{COLLAPSE_CONSTRAINT}": _constraint_value(collapsed)}


def _constraint_value(collapsed: bool | None) -> float:
    return 0.0 if collapsed is None else (1.0 if collapsed else -1.0)
