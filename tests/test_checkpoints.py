"""Checkpoint files: the cadence, the background writer (bounded, coalescing, atomic, errors reported),
identity checks on resume, a retry adopting its failed trial's file, and retention of the top K."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.trial import TrialState

from tuner.errors import TunerError
from tuner.store.checkpoints import Cadence, CheckpointWriter, TrialFiles, config_hash, rank_key, top_trials


class FakeSnapshot:
    """What the writer needs of a snapshot: checkpoint(); optionally slow, or failing."""

    def __init__(self, value: int, delay: float = 0.0, error: Exception | None = None) -> None:
        self.value, self.delay, self.error = value, delay, error

    def checkpoint(self) -> dict[str, Any]:
        time.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return {"value": torch.tensor(self.value)}


def test_cadence_every_epochs_or_seconds_whichever_first_and_at_rungs() -> None:
    c = Cadence(every_epochs=5, every_seconds=60, rungs=frozenset({2, 6, 18}))
    assert [e for e in range(1, 21) if c.due(e, saved_epoch=0, saved_at=0.0, now=1.0)] == [2, 5, 6, 7, 8, 9, 10,
                                                                                         11, 12, 13, 14, 15, 16,
                                                                                         17, 18, 19, 20]
    # counted from the last checkpoint: saved at epoch 6, the next is due at 11 (or the rung at 18)
    assert [e for e in range(7, 21) if c.due(e, saved_epoch=6, saved_at=0.0, now=1.0)] == [11, 12, 13, 14, 15,
                                                                                        16, 17, 18, 19, 20]
    assert c.due(7, saved_epoch=6, saved_at=0.0, now=61.0)  # 60 s passed first
    plain = Cadence(every_epochs=3, every_seconds=300)
    assert not plain.due(2, 0, 0.0, 1.0) and plain.due(3, 0, 0.0, 1.0)


def test_writer_writes_atomically_coalesces_and_reports_errors(tmp_path: Path) -> None:
    writer = CheckpointWriter(max_pending=2)
    try:
        slow = tmp_path / "a" / "checkpoint.pt"
        writer.put(FakeSnapshot(1, delay=0.3), slow)  # being written while the next ones queue
        time.sleep(0.05)
        other = tmp_path / "b" / "checkpoint.pt"
        writer.put(FakeSnapshot(2), other)
        writer.put(FakeSnapshot(3), other, note="newest")  # replaces the waiting one: only the newest matters
        writer.flush()
        assert torch.load(slow, weights_only=True)["value"] == 1
        saved = torch.load(other, weights_only=True)
        assert saved["value"] == 3 and saved["note"] == "newest"
        assert writer.stats.files == 2 and writer.stats.coalesced == 1
        assert writer.stats.bytes == slow.stat().st_size + other.stat().st_size
        assert not list(tmp_path.rglob("*.tmp"))  # atomic: no temporary file left

        # bounded: a third distinct checkpoint waits while two are pending
        writer.put(FakeSnapshot(4, delay=0.4), tmp_path / "c" / "checkpoint.pt")
        time.sleep(0.05)
        writer.put(FakeSnapshot(5), tmp_path / "d" / "checkpoint.pt")
        writer.put(FakeSnapshot(6), tmp_path / "e" / "checkpoint.pt")
        done = threading.Event()
        blocked = threading.Thread(target=lambda: (writer.put(FakeSnapshot(7), tmp_path / "f" / "checkpoint.pt"),
                                                   done.set()))
        blocked.start()
        assert not done.wait(0.1)  # backpressure: the queue is full
        assert done.wait(5)
        writer.flush()
        assert sorted(p.parent.name for p in tmp_path.rglob("checkpoint.pt")) == list("abcdef")

        # a cancelled path (its trial ended) takes no later checkpoint: the training thread may queue
        # one after the bookkeeper ended the trial, and retention may delete the folder mid-write
        ended = tmp_path / "pruned" / "checkpoint.pt"
        writer.cancel(ended)
        writer.put(FakeSnapshot(9), ended)
        writer.flush()
        assert not ended.parent.exists() and writer.stats.dropped == 1

        # a write that fails surfaces at the next flush, as one TunerError naming the folder
        writer.put(FakeSnapshot(8, error=OSError(28, "No space left on device")), tmp_path / "g" / "checkpoint.pt")
        with pytest.raises(TunerError, match="cannot write a checkpoint under .*g: .*No space left"):
            writer.flush()
        # a cancelled checkpoint is never written
        writer.put(FakeSnapshot(9, delay=0.3), tmp_path / "h" / "checkpoint.pt")
        time.sleep(0.05)
        writer.put(FakeSnapshot(10), tmp_path / "i" / "checkpoint.pt")
        writer.cancel(tmp_path / "i" / "checkpoint.pt")
        writer.flush()
        assert not (tmp_path / "i").exists()
    finally:
        writer.close()


def _study(tmp_path: Path) -> optuna.Study:
    return optuna.create_study(storage=f"sqlite:///{tmp_path}/c.db", study_name="c")


def test_resume_checks_study_trial_and_config_and_adopt_moves_the_file(tmp_path: Path, tiny) -> None:
    config, other = tiny(seed=3), tiny(seed=4)
    lines: list[str] = []
    files = TrialFiles(tmp_path / "uuid-a", "uuid-a", log=lines.append)

    def save(number: int, **stamp: Any) -> None:
        files.path(number).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"epoch": 3, **files.stamp(number, config), **stamp}, files.path(number))

    assert files.load_for_resume([0], config) is None  # nothing on disk
    save(0)
    number, ckpt = files.load_for_resume([0, 5], config)
    assert number == 0 and ckpt["epoch"] == 3 and lines == []
    assert files.load_for_resume([0, 5], other) is None  # another config: ignored, one warning line
    assert len(lines) == 1 and "ignoring" in lines[0] and config_hash(other) in lines[0]
    save(1, study_id="uuid-b")  # a file of another study of the same name
    assert files.load_for_resume([1], config) is None and "study uuid-b" in lines[-1]
    files.path(2).parent.mkdir()
    files.path(2).write_bytes(b"torn")
    assert files.load_for_resume([2], config) is None and "unreadable" in lines[-1]

    files.adopt(0, 5)  # the retry takes the file over; the failed trial's folder goes
    assert files.path(5).is_file() and not files.path(0).parent.exists()
    number, ckpt = files.load_for_resume([0, 5, 9], config)  # the retry's own retry still finds it
    assert number == 5 and ckpt["trial"] == 0


def test_retain_keeps_the_top_k_complete_and_running_trials_only(tmp_path: Path) -> None:
    study = _study(tmp_path)
    files = TrialFiles(tmp_path / "art", "s", log=lambda line: None)
    values = {0: 10.0, 1: 5.0, 2: 7.0, 3: None, 4: 1.0}  # 3 pruned; 4 collapsed (ranks last)
    for number, value in values.items():
        t = study.ask()
        if number == 4:
            t.set_user_attr("collapsed", True)
        if value is None:
            study.tell(t, state=TrialState.PRUNED)
        else:
            study.tell(t, value)
    running = study.ask()  # trial 5, still running
    failed = study.ask()
    study.tell(failed, state=TrialState.FAIL)  # trial 6: its retry would adopt its file
    for number in range(7):
        files.path(number).parent.mkdir(parents=True)
        files.path(number).write_bytes(b"x")
    assert top_trials(study.get_trials(), 2) == [1, 2]
    assert rank_key(True, 1.0, 4) > rank_key(False, 10.0, 0)
    assert sorted(files.retain(study, keep_top=2)) == [0, 3, 4]
    assert files.numbers() == [1, 2, running.number, failed.number]
    assert files.retain(study, keep_top=0) == [1, 2] and files.numbers() == [5, 6]
