"""A study's first trials: what is known to work before the sampler guesses.

A new study enqueues, before any sampled trial: the base config (``enqueue_base``: its values at the
space's paths, where they lie in the space: the documented defaults unless the spec's base says
otherwise), then the configs the spec lists (``enqueue``), then, with ``tuner run --warm-start``, the
best complete trials of an earlier study, in any store. Values are fitted to the space by
:func:`tuner.study.space.fit`: a listed config must fit as written (else one line, nothing created);
an earlier study's values are clipped or left out, one line each. Enqueued trials count towards the
budget like any other, and Optuna's ``skip_if_exists`` keeps a rerun from enqueueing one twice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import optuna

from tuner.errors import TunerError
from tuner.store.checkpoints import top_trials
from tuner.study import space
from tuner.study.spec import StudySpec

__all__ = ["WarmStart", "base_params", "enqueue", "first_trials", "warm_start", "warm_start_params"]


@dataclass(frozen=True)
class WarmStart:
    """Where a warm start's configs come from: ``tuner run --warm-start STUDY --from URL --top K``.
    url None: the new study's own store."""

    study: str
    url: str | None = None
    top: int = 5


def base_params(spec: StudySpec) -> dict[str, Any]:
    """The base config's values at the space's paths, those that lie in the space as they are."""
    values = {path: attrgetter(path)(spec.base) for path in spec.space}
    params, _ = space.fit(spec, values)
    return {path: v for path, v in params.items() if v == values[path]}


def first_trials(spec: StudySpec) -> list[dict[str, Any]]:
    """The params a new study enqueues: the base config's (if any of its values lie in the space),
    then each ``enqueue`` config, which must fit the space as written (TunerError naming the value)."""
    trials = [params] if spec.enqueue_base and (params := base_params(spec)) else []
    for i, values in enumerate(spec.enqueue):
        params, notes = space.fit(spec, values)
        if notes:
            raise TunerError(f"study '{spec.study}': enqueue[{i}] {notes[0]}; list values the space holds")
        trials.append(params)
    return trials


def warm_start_params(spec: StudySpec, source: optuna.Study, top: int,
                      log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The params of the best ``top`` complete trials of an earlier study (collapsed trials last),
    fitted to this spec's space, one line per value clipped or left out."""
    trials = {t.number: t for t in source.get_trials(deepcopy=False)}
    out = []
    for number in top_trials(trials.values(), top):
        params, notes = space.fit(spec, trials[number].params)
        for note in notes:
            log(f"warm start from {source.study_name} trial {number}: {note}")
        if params:
            out.append(params)
    return out


def warm_start(spec: StudySpec, source: optuna.Study, warm: WarmStart, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The params a warm start enqueues from its (opened) source study; a study with no complete
    trial is a one-line TunerError, raised before the new study is created."""
    params = warm_start_params(spec, source, warm.top, log)
    if not params:
        raise TunerError(f"--warm-start: study '{warm.study}' has no complete trial to start from; pick a study "
                         "with finished trials")
    log(f"warm start: {len(params)} config(s) from study '{warm.study}' enqueued first")
    return params


def enqueue(study: optuna.Study, trials: list[dict[str, Any]]) -> int:
    """Enqueue each params dict (skipping one the study holds already); returns how many."""
    for params in trials:
        study.enqueue_trial(params, skip_if_exists=True)
    return len(trials)
