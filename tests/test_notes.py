"""A study's note written by tuner in optuna-dashboard's stored format: read back by the dashboard's
own reader (get_note), long notes in several chunks, and turns with notes saved by the dashboard."""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna_dashboard import get_note, save_note

from tuner.store.notes import has_study_note, save_study_note, yaml_block
from tuner.store.urls import open_storage


def test_notes_round_trip_through_the_dashboards_reader(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path}/n.db", heartbeat_interval=None, grace_period=None)
    study = optuna.create_study(storage=storage, study_name="n")
    assert not has_study_note(storage.get_study_system_attrs(study._study_id))
    long = yaml_block("Study 'n'", "\n".join(f"key{i}: {'v' * 60}" for i in range(80)), "A line under the title.")
    assert len(long) > 2 * 2045  # three chunks
    save_study_note(storage, study._study_id, long)
    assert get_note(study) == long and has_study_note(storage.get_study_system_attrs(study._study_id))
    assert long.startswith("### Study 'n'\n\nA line under the title.\n\n```yaml\nkey0: ") and long.endswith("v\n```\n")
    save_study_note(storage, study._study_id, "short")  # the chunks the long note left are blanked
    assert get_note(study) == "short"
    save_note(study, "typed on the page")  # the dashboard's own save takes the next version
    assert get_note(study) == "typed on the page"
    save_study_note(storage, study._study_id, "ours again")
    assert get_note(study) == "ours again"
    assert storage.get_study_system_attrs(study._study_id)["dashboard:note_ver"] == 4
