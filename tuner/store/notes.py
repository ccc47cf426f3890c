"""A study's note as optuna-dashboard shows it: Markdown on the study's page, written by tuner.

optuna-dashboard keeps a study's note in the study's system attrs: ``dashboard:note_ver`` (the
note's version, raised by one on every save from the page) and the Markdown body cut into
``dashboard:note_str:0``, ``:1``, ... of at most 2,045 characters each (its ``_note`` module; the
format is its stored data, read back by ``optuna_dashboard.get_note``). tuner writes that format
itself, so a slim worker host without optuna-dashboard (README "Many hosts") writes notes too.

Only the study gets a note. A trial's note is kept in the *study's* system attrs under its trial
id, and the dashboard scans all of them once per trial it serves: with a note per trial, its note
lookups alone took ~1 s of a first page load at 1,000 trials and ~10 s at 3,000 (measured with
optuna-dashboard 0.21's reader), growing with the square of the study. A trial's config is a
``config.yaml`` artifact instead (:mod:`tuner.study.uploads`), kept with the trial.
"""

from __future__ import annotations

import math
from typing import Any

from optuna.storages import BaseStorage

__all__ = ["has_study_note", "save_study_note", "yaml_block"]

_VERSION = "dashboard:note_ver"
_BODY = "dashboard:note_str:"
_CHUNK = 2045  # optuna-dashboard's SYSTEM_ATTR_MAX_LENGTH


def has_study_note(system_attrs: dict[str, Any]) -> bool:
    """Whether the study has a note (written by tuner or typed on the dashboard's page)."""
    return _VERSION in system_attrs


def save_study_note(storage: BaseStorage, study_id: int, body: str) -> None:
    """Write ``body`` (Markdown) as the study's note, one version above the stored one; chunks a
    longer earlier note left behind are blanked, as the dashboard does."""
    attrs = storage.get_study_system_attrs(study_id)
    old = sum(1 for key in attrs if key.startswith(_BODY))
    n = math.ceil(len(body) / _CHUNK)
    for i in range(max(n, old)):
        storage.set_study_system_attr(study_id, f"{_BODY}{i}", body[i * _CHUNK:(i + 1) * _CHUNK])
    # the version last: a reader that sees it sees the whole body
    storage.set_study_system_attr(study_id, _VERSION, int(attrs.get(_VERSION, 0)) + 1)


def yaml_block(title: str, text: str, lead: str = "") -> str:
    """Markdown: a heading, an optional line under it, and ``text`` in a fenced YAML block."""
    parts = [f"### {title}", lead, f"```yaml\n{text.rstrip()}\n```"]
    return "\n\n".join(part for part in parts if part) + "\n"
