"""Creating and resuming a study: its identity (a UUID artifacts are keyed by), a stored spec
compared as a spec, so a setting added to tuner since does not lock an existing study out, and what
the dashboard shows of it (metric names with units, the spec as a note, an ISO creation time), for
new studies and for studies an older tuner made."""

from __future__ import annotations

import json
import re
import time
from datetime import datetime
from pathlib import Path

import optuna
import pytest
import yaml
from optuna_dashboard import get_note, save_note

from tuner.errors import TunerError
from tuner.store.attrs import trial_config
from tuner.study.open import (
    ID_ATTR, SPEC_ATTR, create_or_resume, load_study, metric_names, started_at, stored_spec, study_key,
)
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
    stored = json.loads(stored_spec(study))
    del stored["checkpoints"]  # as tuner stored specs before the section existed
    del stored["workers"]["precision"], stored["workers"]["cuda_graph"]
    study._storage.set_study_system_attr(study._study_id, SPEC_ATTR, json.dumps(stored))
    assert create_or_resume(s).study_name == "ident"
    _, loaded = load_study(s.storage, "ident")
    assert loaded.checkpoints.keep_top == 10 and loaded.workers.precision == "auto"
    with pytest.raises(TunerError, match="exists .* with another spec"):
        create_or_resume(spec(tmp_path, budget={"trials": 99}))
    with pytest.raises(TunerError, match="exists .* with another spec"):
        create_or_resume(spec(tmp_path, checkpoints={"keep_top": 3}))


def _note_yaml(study: optuna.Study) -> dict:
    """The YAML block of the study's note, read back by optuna-dashboard's own reader."""
    note = get_note(study)
    assert note.count("```yaml\n") == 1, note
    return yaml.safe_load(note.split("```yaml\n")[1].split("```")[0])


@pytest.mark.parametrize("objective", ["iwae_nll", "neg_elbo", "multi"])
def test_a_new_study_shows_its_metric_names_spec_and_time(objective: str, tmp_path: Path) -> None:
    s = spec(tmp_path, objective=objective, **({"pruner": {"name": "none"}} if objective == "multi" else {}))
    before = time.time()
    study = create_or_resume(s)
    names = {"iwae_nll": ["val IWAE NLL (nats)"], "neg_elbo": ["val -ELBO, best epoch (nats)"],
             "multi": ["val IWAE NLL (nats)", "inactive latent fraction (0-1)"]}[objective]
    assert study.metric_names == metric_names(s) == names and len(names) == len(study.directions)
    # the spec: the study's note as YAML, equal to the spec without its store; no user attr holds it
    assert _note_yaml(study) == s.model_dump(mode="json", exclude={"storage"})
    assert json.loads(stored_spec(study))["objective"] == objective
    assert set(study.user_attrs) == {"tuner_created_at", ID_ATTR}
    # the time: ISO 8601 in UTC for people, epoch seconds for the timeout budget
    shown = study.user_attrs["tuner_created_at"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", shown)
    assert before <= started_at(study) <= time.time()
    assert datetime.fromisoformat(shown.replace("Z", "+00:00")).timestamp() == int(started_at(study))
    # a worker joins with the spec from the system attr
    _, loaded = load_study(s.storage, "ident")
    assert loaded == s


def test_a_study_an_older_tuner_made_reads_and_resumes(tmp_path: Path) -> None:
    """Spec and creation time as user attrs, the config as a trial user attr, no metric names, no note:
    every reader still works, and resuming adds what the dashboard shows."""
    s = spec(tmp_path)
    url = s.storage
    old = optuna.create_study(study_name="ident", storage=url)
    created = 1_700_000_000.25  # 2023-11-14T22:13:20Z
    old.set_user_attr("tuner_spec", json.dumps(s.model_dump(mode="json", exclude={"storage"}), sort_keys=True))
    old.set_user_attr("tuner_created_at", created)
    old.set_user_attr(ID_ATTR, "0" * 32)
    trial = old.ask()
    trial.set_user_attr("config", s.base.model_dump(mode="json"))
    old.tell(trial, 100.0)
    assert started_at(old) == created and old.metric_names is None
    assert load_study(url, "ident")[1] == s  # a worker joins it as it is
    assert trial_config(old.trials[0]) == s.base.model_dump(mode="json")

    study = create_or_resume(s)  # tuner run resumes it
    assert study.metric_names == ["val IWAE NLL (nats)"]
    assert _note_yaml(study) == s.model_dump(mode="json", exclude={"storage"})
    assert "2023-11-14T22:13:20Z" in get_note(study)
    assert study.user_attrs["tuner_created_at"] == "2023-11-14T22:13:20Z" and started_at(study) == created
    assert study_key(study) == "0" * 32 and len(study.trials) == 1

    save_note(study, "typed on the dashboard")  # a note people wrote since is theirs: kept
    create_or_resume(s)
    assert get_note(study) == "typed on the dashboard"
