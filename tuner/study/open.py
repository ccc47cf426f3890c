"""The Optuna study of a spec: create or resume it, load it by name, count its trials.

The spec is stored in the study, so a worker on any host needs only the storage URL and the study
name. A study that exists with another spec is refused (one line, nothing changed): mixing two
search spaces in one study would make its ranking meaningless.

What the study holds for machines and what it shows people are apart, because optuna-dashboard
shows every study user attr on one line (a spec there was cut off, an epoch a bare number) and no
system attr: the spec is the system attr ``tuner:spec`` (JSON, read by :func:`stored_spec`, which
also reads the user attr ``tuner_spec`` of studies made by an older tuner) and the study's note (YAML,
on its dashboard page); the creation time is the system attr ``tuner:created_at`` (epoch seconds,
:func:`started_at`) and the user attr ``tuner_created_at`` (ISO 8601, UTC); the objective's names
with their units are the study's metric names (Optuna's ``set_metric_names``), which the dashboard
puts on its plots and best-trial card instead of "Objective 0".
"""

from __future__ import annotations

import json
import time
import uuid
import warnings
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

from tuner.errors import TunerError
from tuner.store.cache import CachedStorage
from tuner.store.notes import has_study_note, save_study_note, yaml_block
from tuner.store.urls import check_storage, mask_url, open_storage, store_exists
from tuner.study import start, strategy
from tuner.study.spec import StudySpec, parse_study_spec
from tuner.vae.data import load_array

__all__ = [
    "ID_ATTR", "SPEC_ATTR", "StudyCounts", "create_or_resume", "load_study", "metric_names", "open_study", "started_at",
    "stored_spec", "studies_status", "study_counts", "study_key",
]

SPEC_ATTR = "tuner:spec"  # study system attr: the spec as JSON
OLD_SPEC_ATTR = "tuner_spec"  # the study user attr an older tuner stored it in
CREATED_ATTR = "tuner:created_at"  # study system attr: epoch seconds
CREATED_SHOWN = "tuner_created_at"  # study user attr: ISO 8601 UTC (an older tuner: epoch seconds)
ID_ATTR = "tuner_study_id"  # the study's own identity: artifacts are keyed by it, not by its name

_METRIC_NAMES = {
    "iwae_nll": ["val IWAE NLL (nats)"],
    "neg_elbo": ["val -ELBO, best epoch (nats)"],
    "multi": ["val IWAE NLL (nats)", "inactive latent fraction (0-1)"],
}


def metric_names(spec: StudySpec) -> list[str]:
    """The objective's names with their units, one per study direction (what the dashboard shows)."""
    return list(_METRIC_NAMES[spec.objective])


def stored_spec(study: optuna.Study) -> str | None:
    """The spec (JSON) the study was created with, or None for a study tuner did not create."""
    system = study._storage.get_study_system_attrs(study._study_id)
    return system.get(SPEC_ATTR, study.user_attrs.get(OLD_SPEC_ATTR))


def _spec_json(spec: StudySpec) -> str:
    # the storage URL is where the study lives, not what it is: two URLs may name one database
    return json.dumps(spec.model_dump(mode="json", exclude={"storage"}), sort_keys=True)


def _same_spec(stored: str, spec: StudySpec) -> bool:
    """Whether a stored spec is ``spec``: compared as validated specs, so a setting added to tuner
    since the study was created (stored without it, read with its default) is no difference."""
    try:
        old = parse_study_spec({**json.loads(stored), "storage": spec.storage}, source="stored spec")
    except (TunerError, ValueError):
        return False
    return old == spec


def study_key(study: optuna.Study) -> str:
    """The folder name of a study's checkpoints under the artifact root: its identity (a UUID stored
    at creation), or its name for a study created before tuner stored one (where its files are)."""
    return str(study.user_attrs.get(ID_ATTR) or study.study_name)


def _optuna_study(
    spec: StudySpec, storage: optuna.storages.BaseStorage, *, create: bool, worker: int = 0
) -> optuna.Study:
    # collapse reaches the sampler as a constraint stored on each trial before tell
    # (strategy.collapse_constraint_attrs)
    sampler = strategy.build_sampler(spec, worker=worker)
    kwargs: dict[str, Any] = {"study_name": spec.study, "storage": storage, "sampler": sampler}
    if spec.objective != "multi":
        kwargs["pruner"] = strategy.build_pruner(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if create:
            return optuna.create_study(directions=strategy.directions(spec), load_if_exists=True, **kwargs)
        return optuna.load_study(**kwargs)


def preflight(spec: StudySpec) -> None:
    """Fail before anything is written: the base data must load on this host."""
    load_array(spec.base.data.dataset)


def create_or_resume(spec: StudySpec, storage_url: str | None = None,
                     first: list[dict[str, Any]] | None = None) -> optuna.Study:
    """Create the spec's study, or resume it when it exists with the same spec. A new study
    enqueues ``first`` (a warm start's trials), then its own first trials (:mod:`tuner.study.start`);
    a resumed one enqueues ``first`` only (a config it already holds is not enqueued again)."""
    url = storage_url or spec.storage
    check_storage(url)
    preflight(spec)
    own_first = start.first_trials(spec)  # a bad enqueue value fails here, before anything is written
    storage = open_storage(url)
    if spec.study in optuna.get_all_study_names(storage):
        stored = stored_spec(optuna.load_study(study_name=spec.study, storage=storage))
        if stored is None:
            raise TunerError(
                f"study '{spec.study}' in {mask_url(url)} was not created by tuner; choose another study name"
            )
        if not _same_spec(stored, spec):
            raise TunerError(
                f"study '{spec.study}' exists in {mask_url(url)} with another spec; "
                "use a new study name, or run it with the spec it was created with"
            )
        study = _optuna_study(spec, storage, create=False)
        _label(study, spec)  # a study made by an older tuner gets its names and note now
        start.enqueue(study, first or [])
        return study
    study = _optuna_study(spec, storage, create=True)
    now = time.time()
    study._storage.set_study_system_attr(study._study_id, SPEC_ATTR, _spec_json(spec))
    study._storage.set_study_system_attr(study._study_id, CREATED_ATTR, now)
    study.set_user_attr(CREATED_SHOWN, _iso(now))
    study.set_user_attr(ID_ATTR, uuid.uuid4().hex)
    _label(study, spec)
    start.enqueue(study, [*(first or []), *own_first])
    return study


def _label(study: optuna.Study, spec: StudySpec) -> None:
    """What the dashboard shows of the study, where it is missing: the metric names, the creation
    time as ISO 8601 (an older tuner's epoch moves to the system attr) and the spec as the study's
    note (a note typed on the dashboard since is kept)."""
    shown = study.user_attrs.get(CREATED_SHOWN)
    if isinstance(shown, int | float):
        study._storage.set_study_system_attr(study._study_id, CREATED_ATTR, float(shown))
        study.set_user_attr(CREATED_SHOWN, _iso(shown))
    if study.metric_names is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(metric_names(spec))
    if not has_study_note(study._storage.get_study_system_attrs(study._study_id)):
        lead = (f"Created {_iso(started_at(study))}. The spec this study runs (`tuner run` of another spec "
                "under this name is refused); every trial's full config is its `config.yaml` artifact.")
        text = yaml.safe_dump(spec.model_dump(mode="json", exclude={"storage"}), sort_keys=False)
        save_study_note(study._storage, study._study_id, yaml_block(f"Study '{spec.study}'", text, lead))


def _iso(epoch: float) -> str:
    """Epoch seconds as ISO 8601 in UTC, to the second: 2026-05-01T12:34:56Z."""
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _existing_store(storage_url: str, study_name: str) -> optuna.storages.BaseStorage:
    """A reader's storage for a store that exists; creates nothing (a missing SQLite file is reported)."""
    check_storage(storage_url)
    if not store_exists(storage_url):
        raise TunerError(f"no study '{study_name}' in {mask_url(storage_url)}: the file does not exist; "
                         "check --storage (or $TUNER_STORAGE)")
    return open_storage(storage_url, heartbeat_interval=None, grace_period=None)  # a reader beats for no trial


def open_study(
    storage_url: str, study_name: str, storage: optuna.storages.BaseStorage | None = None
) -> optuna.Study:
    """The study ``study_name`` in an existing store, for reading; one-line TunerError when it is not
    there. Creates nothing."""
    storage = storage or _existing_store(storage_url, study_name)
    names = optuna.get_all_study_names(storage)
    if study_name not in names:
        known = ", ".join(sorted(names)[:8]) or "none"
        raise TunerError(f"no study '{study_name}' in {mask_url(storage_url)} (studies: {known}); check the name "
                         "and --storage")
    return optuna.load_study(study_name=study_name, storage=storage)


def load_study(
    storage_url: str, study_name: str, storage: optuna.storages.BaseStorage | None = None, worker: int = 0
) -> tuple[optuna.Study, StudySpec]:
    """Load a study by name with the spec stored in it (what `tuner worker` joins).

    worker: a number unique to the calling process (its pid): samplers seeded per worker, so
    parallel workers do not propose the same trials."""
    storage = storage or _existing_store(storage_url, study_name)
    stored = stored_spec(open_study(storage_url, study_name, storage))
    if stored is None:
        raise TunerError(f"study '{study_name}' was not created by tuner; it has no spec to train from")
    raw = json.loads(stored)
    raw["storage"] = storage_url
    spec = parse_study_spec(raw, source=f"study '{study_name}' spec")
    return _optuna_study(spec, storage, create=False, worker=worker), spec


@dataclass
class StudyCounts:
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    waiting: int = 0

    @property
    def finished(self) -> int:
        """Trials that count towards the budget: complete or pruned (failed ones are retried)."""
        return self.complete + self.pruned


_STATE_FIELD = {
    TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
    TrialState.RUNNING: "running", TrialState.WAITING: "waiting",
}


def study_counts(study: optuna.Study) -> StudyCounts:
    """The study's trials per state (a worker asks before every trial: tuner's store counts them
    without loading any trial)."""
    storage = study._storage
    if isinstance(storage, CachedStorage):
        by_state = storage.count_trials(study._study_id)
    else:
        by_state = Counter(trial.state for trial in study.get_trials(deepcopy=False))
    counts = StudyCounts()
    for state, n in by_state.items():
        field = _STATE_FIELD[state]
        setattr(counts, field, getattr(counts, field) + n)
    return counts


def started_at(study: optuna.Study) -> float:
    """When the study was created, in epoch seconds (for its timeout budget); now for a study that
    does not say. An older tuner stored the epoch in the user attr (until the study is resumed)."""
    system = study._storage.get_study_system_attrs(study._study_id)
    if CREATED_ATTR in system:
        return float(system[CREATED_ATTR])
    shown = study.user_attrs.get(CREATED_SHOWN)
    return float(shown) if isinstance(shown, int | float) else time.time()



def studies_status(storage_url: str) -> list[tuple[str, int, int, int, int, int, str, int]]:
    """(study, complete, pruned, failed, running, waiting, best, live workers) per study in a store.

    Live workers: distinct workers (host:pid) holding running trials.
    """
    check_storage(storage_url)
    if not store_exists(storage_url):
        return []  # no store yet, no studies
    storage = open_storage(storage_url)
    rows = []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        c = study_counts(study)
        trials = study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state == TrialState.COMPLETE and t.values]
        best = f"{min(t.values[0] for t in done):.3f}" if done else "-"
        workers = {t.user_attrs.get("worker") for t in trials if t.state == TrialState.RUNNING} - {None}
        rows.append((summary.study_name, c.complete, c.pruned, c.failed, c.running, c.waiting, best, len(workers)))
    return rows
