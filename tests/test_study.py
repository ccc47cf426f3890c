"""Creating and resuming a study: its identity (a UUID artifacts are keyed by), and a stored spec
compared as a spec, so a setting added to tuner since does not lock an existing study out."""

from __future__ import annotations

import json
import re
from pathlib import Path

import optuna
import pytest

from tuner.errors import TunerError
from tuner.study.open import ID_ATTR, SPEC_ATTR, create_or_resume, load_study, study_key
from tuner.study.spec import parse_study_spec


def spec(tmp_path: Path, **over):
    return parse_study_spec({"study": "ident", "storage": f"sqlite:///{tmp_path}/s.db", **over})


def test_a_new_study_gets_its_own_identity(tmp_path: Path) -> None:
    a = create_or_resume(spec(tmp_path))
    key = a.user_attrs[ID_ATTR]
    assert re.fullmatch(r"[0-9a-f]{32}", key) and study_key(a) == key
    assert study_key(create_or_resume(spec(tmp_path))) == key  # resuming keeps it
    other = create_or_resume(parse_study_spec({"study": "ident", "storage": f"sqlite:///{tmp_path}/other.db"}))
    assert study_key(other) != key  # the same name in another store is another study
    legacy = optuna.create_study(study_name="legacy", storage=f"sqlite:///{tmp_path}/s.db")
    assert study_key(legacy) == "legacy"  # a study made before identities: its files are under its name


def test_a_spec_stored_without_newer_settings_still_resumes(tmp_path: Path) -> None:
    s = spec(tmp_path)
    study = create_or_resume(s)
    stored = json.loads(study.user_attrs[SPEC_ATTR])
    del stored["checkpoints"]  # as tuner stored specs before the section existed
    del stored["workers"]["precision"], stored["workers"]["cuda_graph"]
    study.set_user_attr(SPEC_ATTR, json.dumps(stored))
    assert create_or_resume(s).study_name == "ident"
    _, loaded = load_study(s.storage, "ident")
    assert loaded.checkpoints.keep_top == 10 and loaded.workers.precision == "auto"
    with pytest.raises(TunerError, match="exists .* with another spec"):
        create_or_resume(spec(tmp_path, budget={"trials": 99}))
    with pytest.raises(TunerError, match="exists .* with another spec"):
        create_or_resume(spec(tmp_path, checkpoints={"keep_top": 3}))
