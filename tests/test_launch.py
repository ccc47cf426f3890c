"""The launcher's live table: a real study's counts, rendered as a terminal of 80 columns shows it."""

from __future__ import annotations

import time
from pathlib import Path

from optuna.trial import TrialState
from rich.console import Console

from tuner.study.launch import STATUS_COLUMNS, status_table
from tuner.study.open import create_or_resume
from tuner.study.spec import parse_study_spec


def test_the_live_table_fits_80_columns_with_every_header_whole(tmp_path: Path) -> None:
    spec = parse_study_spec({"study": "a-rather-long-study-name", "storage": f"sqlite:///{tmp_path}/s.db",
                             "budget": {"trials": 12000}})
    study = create_or_resume(spec)
    for i in range(12):  # large numbers where they get wide: a best trial #1234-like, 4-digit counts
        t = study.ask()
        study.tell(t, 102.8456 + i) if i % 3 else study.tell(t, state=TrialState.PRUNED)
    started = time.time() - 0.01  # a fast rate: a wide /min cell, a short ETA
    console = Console(width=80, record=True, force_terminal=False, color_system=None)
    console.print(status_table(study, spec, started, finished0=0, alive=12))
    text = console.export_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80, text
    header = next(line for line in lines if "complete" in line)
    assert header.split() == list(STATUS_COLUMNS), text  # whole: nothing cut to "comple…"
    assert "…" not in text
    row = lines[lines.index(header) + 2].split()
    assert row[:5] == ["8", "4", "0", "0", "0"] and row[5:7] == ["103.85", "#1"] and row[-1] == "12", text
