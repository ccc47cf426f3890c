"""Search space -> Optuna: pure translators from a study spec's entries, testable without a study.

Parameter names are the entries' dotted TrainConfig paths (``model.latent``), so a trial's params
read as config overrides and :meth:`tuner.study.spec.StudySpec.train_config` applies them directly.
Conditional entries (``when``) depend on unconditioned categorical entries only (one level, checked
by the spec), so suggesting every unconditioned entry first settles every condition.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from tuner.errors import TunerError
from tuner.study.entries import CategoricalParam, FixedParam, FloatParam, IntParam, SpaceEntry
from tuner.study.spec import StudySpec

__all__ = ["active", "distributions", "fit", "grid", "sample", "size_bounds"]


def _distribution(entry: FloatParam | IntParam | CategoricalParam) -> BaseDistribution:
    match entry:
        case FloatParam():
            return FloatDistribution(entry.low, entry.high, log=entry.log, step=entry.step)
        case IntParam():
            return IntDistribution(entry.low, entry.high, log=entry.log, step=entry.step or 1)
        case CategoricalParam():
            return CategoricalDistribution(entry.choices)


def distributions(spec: StudySpec) -> dict[str, BaseDistribution]:
    """The full space (every entry but fixed ones, conditions ignored) as Optuna distributions."""
    return {path: _distribution(e) for path, e in spec.space.items() if not isinstance(e, FixedParam)}


def active(spec: StudySpec, params: dict[str, Any]) -> list[str]:
    """The entries (fixed ones included) that apply given the categorical values in ``params``."""
    return [path for path, entry in spec.space.items() if entry.applies(params)]


def _in_dependency_order(spec: StudySpec) -> list[tuple[str, SpaceEntry]]:
    # conditions name unconditioned entries only, so those go first (stable within each group)
    return sorted(spec.space.items(), key=lambda item: item[1].when is not None)


def sample(trial: optuna.Trial, spec: StudySpec) -> dict[str, Any]:
    """Suggest every active entry on ``trial``; fixed values are included without suggesting.

    Returns dotted path -> value, ready for :meth:`StudySpec.train_config`.
    """
    params: dict[str, Any] = {}
    for path, entry in _in_dependency_order(spec):
        if not entry.applies(params):
            continue
        match entry:
            case FixedParam():
                params[path] = entry.value
            case FloatParam():
                params[path] = trial.suggest_float(path, entry.low, entry.high, step=entry.step, log=entry.log)
            case IntParam():
                params[path] = trial.suggest_int(path, entry.low, entry.high, step=entry.step or 1, log=entry.log)
            case CategoricalParam():
                params[path] = trial.suggest_categorical(path, entry.choices)
    return params


def fit(spec: StudySpec, values: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``values`` (dotted path -> value: a config to enqueue, an earlier study's trial) as params of
    this spec's space, and a note per value changed or left out: numbers outside an entry's range are
    clipped to it and snapped to its step (ints rounded), a categorical value not among the choices,
    a path that is not a (searched) entry, or one whose ``when`` does not hold, is left out (the
    sampler then chooses it). Pure: what :func:`tuner.study.start` enqueues."""
    params: dict[str, Any] = {}
    notes: list[str] = []
    fixed = {path: e.value for path, e in spec.space.items() if isinstance(e, FixedParam)}
    for path, entry in _in_dependency_order(spec):
        if path not in values or isinstance(entry, FixedParam):
            continue
        value = values[path]
        if not entry.applies({**fixed, **params}):
            notes.append(f"{path}: left out (applies only when {entry.when})")
            continue
        match entry:
            case CategoricalParam():
                if value in entry.choices:
                    params[path] = entry.choices[entry.choices.index(value)]
                else:
                    notes.append(f"{path}: {value!r} left out (not among the choices {entry.choices})")
            case FloatParam() | IntParam():
                fitted = _fit_number(entry, value)
                if fitted is None:
                    notes.append(f"{path}: {value!r} left out (not a number)")
                    continue
                if fitted != value:
                    notes.append(f"{path}: {value!r} -> {fitted!r} (range [{entry.low}, {entry.high}]"
                                 + (f", step {entry.step})" if entry.step else ")"))
                params[path] = fitted
    for path in sorted(set(values) - set(spec.space)):
        notes.append(f"{path}: left out (not in this space)")
    return params, notes


def _fit_number(entry: FloatParam | IntParam, value: Any) -> float | int | None:
    """A number clipped to the entry's range and snapped to its step (a grid point, exactly); None
    for what is not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    v = min(max(value, entry.low), entry.high)
    if entry.step:
        n = round((v - entry.low) / entry.step)
        v = _float_grid(entry.low, entry.high, entry.step)[n] if isinstance(entry, FloatParam) else entry.low + n * entry.step
    return int(round(v)) if isinstance(entry, IntParam) else float(v)


def _float_grid(low: float, high: float, step: float) -> list[float]:
    # decimal arithmetic: 0.0 + 3 * 0.05 is 0.15, not 0.15000000000000002
    n = round((high - low) / step)  # the spec checked that high - low is a multiple of step
    return [float(Decimal(str(low)) + i * Decimal(str(step))) for i in range(n + 1)]


def grid(spec: StudySpec) -> dict[str, list[Any]]:
    """The search_space for Optuna's GridSampler: every value of every non-fixed entry.

    Conditional entries are in the grid too (GridSampler needs one fixed space), so points that
    differ only in an inactive entry train the same config.
    """
    out: dict[str, list[Any]] = {}
    for path, entry in spec.space.items():
        match entry:
            case CategoricalParam():
                out[path] = list(entry.choices)
            case IntParam():
                out[path] = list(range(entry.low, entry.high + 1, entry.step or 1))
            case FloatParam() if entry.step is not None:
                out[path] = _float_grid(entry.low, entry.high, entry.step)
            case FloatParam():
                raise TunerError(f"space.{path}: a continuous float has no grid; give it a step or make it categorical")
    return out


def _largest(spec: StudySpec, path: str, base: int) -> int:
    entry = spec.space.get(path)
    match entry:
        case None:
            return base
        case FloatParam() | IntParam():
            top = int(entry.high)
        case CategoricalParam():
            top = max(int(c) for c in entry.choices)
        case FixedParam():
            top = int(entry.value)
    # a conditional entry leaves the base value in place for the trials it does not apply to
    return top if entry.when is None else max(base, top)


def _may_be(spec: StudySpec, path: str, value: Any, base: Any) -> bool:
    """Whether some trial can get `value` at `path` (the base value, a choice or a fixed value)."""
    entry = spec.space.get(path)
    match entry:
        case CategoricalParam():
            return value in entry.choices or (entry.when is not None and base == value)
        case FixedParam():
            return entry.value == value or (entry.when is not None and base == value)
    return base == value


def size_bounds(spec: StudySpec) -> tuple[int, int]:
    """(largest latent size of any level, largest model.hidden) any trial of the study can get: the
    sizes a population's masks must hold (its maxima). A ladder's top level (model.latent2) is
    masked in the same Zmax as model.latent, so it counts when a trial can be a ladder."""
    model = spec.base.model
    latent = _largest(spec, "model.latent", model.latent)
    if _may_be(spec, "model.hierarchy", "ladder", model.hierarchy):
        latent = max(latent, _largest(spec, "model.latent2", model.latent2))
    return latent, _largest(spec, "model.hidden", model.hidden)
