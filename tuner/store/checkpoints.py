"""Trial checkpoints on disk: where they live, when they are written, which outlive their trial.

Layout: ``<artifacts root>/<study key>/<trial number>/checkpoint.pt``. The study key is the study's
own identity (a UUID stored in it at creation, :func:`tuner.study.open.study_key`), so two studies of one
name in two stores never share a folder. Each file records that identity, its trial number and the
hash of its config; a resume checks all three and ignores (with one warning line) a file that is
not the retried trial's.

Cost. A checkpoint holds one slot at its true size (:mod:`tuner.vae.slot_state`), is written by a
background thread through a bounded queue (a newer checkpoint of the same trial replaces one still
waiting: only the newest matters), and only on the spec's cadence (:class:`Cadence`). Retention: a
pruned trial's checkpoint is deleted when it is told; a complete trial keeps its checkpoint only
while it is among the study's ``keep_top`` complete trials (:func:`top_trials`); a failed trial's
checkpoint moves to its retry when the retry resumes from it (:meth:`TrialFiles.adopt`). So a study
of any length leaves at most keep_top + (running trials) checkpoints behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner.atomic import save_atomic
from tuner.errors import TunerError

if TYPE_CHECKING:
    from tuner.spec import TrainConfig
    from tuner.vae.slot_state import SlotSnapshot

__all__ = ["Cadence", "CheckpointWriter", "TrialFiles", "config_hash", "rank_key", "top_trials"]

CHECKPOINT_NAME = "checkpoint.pt"


def config_hash(config: TrainConfig) -> str:
    """A short hash of a resolved config (its YAML): what a checkpoint must match to be resumed."""
    from tuner.spec import config_to_yaml

    return hashlib.sha256(config_to_yaml(config).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Cadence:
    """When a running trial is checkpointed: every ``every_epochs`` epochs or ``every_seconds``
    seconds since its last checkpoint, whichever comes first, and at the pruner's rung epochs."""

    every_epochs: int
    every_seconds: float
    rungs: frozenset[int] = frozenset()

    def due(self, epoch: int, saved_epoch: int, saved_at: float, now: float) -> bool:
        """epoch: epochs trained; saved_epoch / saved_at: the last checkpoint's epoch and time."""
        return (epoch - saved_epoch >= self.every_epochs or now - saved_at >= self.every_seconds
                or epoch in self.rungs)


def rank_key(collapsed: bool | None, value: float, number: int) -> tuple[bool, float, int]:
    """A complete trial's place among kept checkpoints: the (first) objective, minimized, collapsed
    trials after every healthy one (the ranking's order, which `tuner export` follows)."""
    return (bool(collapsed), value, number)


def top_trials(trials: Iterable[FrozenTrial], k: int) -> list[int]:
    """Numbers of the best ``k`` complete trials (:func:`rank_key` order)."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.values]
    done.sort(key=lambda t: rank_key(t.user_attrs.get("collapsed"), t.values[0], t.number))
    return [t.number for t in done[:k]]


class TrialFiles:
    """The checkpoint files of one study under one artifact root."""

    def __init__(self, root: Path, study_id: str, log: Callable[[str], None] = print) -> None:
        self.root, self.study_id, self.log = root, study_id, log

    def path(self, number: int) -> Path:
        return self.root / str(number) / CHECKPOINT_NAME

    def stamp(self, number: int, config: TrainConfig) -> dict[str, Any]:
        """The identity fields a checkpoint of trial ``number`` carries."""
        return {"study_id": self.study_id, "trial": number, "config_hash": config_hash(config)}

    def load_for_resume(self, numbers: list[int], config: TrainConfig) -> tuple[int, dict[str, Any]] | None:
        """The newest checkpoint among trials ``numbers`` (a retry's history, oldest first) that
        belongs to this study and config: (its trial number, the checkpoint), or None.

        A file of another study, trial or config is ignored with one warning line (it was not this
        trial's: a resume from it would train some other run)."""
        want = config_hash(config)
        for number in reversed(numbers):
            path = self.path(number)
            if not path.is_file():
                continue
            import torch  # here, not at the top: a study's parent process (top_trials) never loads torch

            try:
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - a torn or foreign file is not resumed, whatever broke
                self.log(f"warning: ignoring {path}: unreadable ({type(err).__name__}); the trial starts fresh")
                continue
            found = (ckpt.get("study_id"), ckpt.get("trial"), ckpt.get("config_hash"))
            # a checkpoint moved to a retry (adopt) still names the trial that wrote it
            if found[0] != self.study_id or found[1] not in numbers or found[2] != want:
                self.log(f"warning: ignoring {path}: it is study {found[0]} trial {found[1]} config {found[2]}, "
                         f"not study {self.study_id} trial {number} config {want}; the trial starts fresh")
                continue
            return number, ckpt
        return None

    def adopt(self, old: int, new: int) -> None:
        """Move trial ``old``'s checkpoint to its retry ``new`` (the retry resumed from it): the
        failed trial leaves no file behind, and a kill of the retry before its own first
        checkpoint still finds this one (Optuna's retry history lists ``new`` for the next retry)."""
        source, target = self.path(old), self.path(new)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
        _remove_folder(source.parent)

    def discard(self, number: int) -> None:
        _remove_folder(self.path(number).parent, everything=True)

    def numbers(self) -> list[int]:
        """Trial numbers with a checkpoint folder (one directory listing)."""
        try:
            return sorted(int(p.name) for p in self.root.iterdir() if p.name.isdigit())
        except FileNotFoundError:
            return []

    def retain(self, study: optuna.Study, keep_top: int) -> list[int]:
        """Delete the checkpoints of finished trials that are not kept: pruned ones, and complete
        ones outside the study's top ``keep_top``. Running, waiting and failed trials keep theirs
        (a failed trial's goes to its retry). Returns the numbers deleted."""
        on_disk = self.numbers()
        if not on_disk:
            return []
        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        keep = set(top_trials(finished, keep_top))
        gone = [t.number for t in finished if t.number in set(on_disk) and t.number not in keep]
        for number in gone:
            self.discard(number)
        return gone


def _remove_folder(folder: Path, everything: bool = False) -> None:
    """Remove a trial's checkpoint folder: with ``everything`` its files too, else only if empty."""
    if everything:
        shutil.rmtree(folder, ignore_errors=True)
        return
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty (a temporary file of a write in flight) or already gone


@dataclass
class WriterStats:
    """What the writer did: files and bytes on disk, and checkpoints replaced before being written."""

    files: int = 0
    bytes: int = 0
    coalesced: int = 0
    dropped: int = 0  # queued for a trial that had ended (cancelled path): never written
    seconds: float = 0.0  # the writer thread's wall time spent writing


@dataclass
class _Pending:
    snapshot: SlotSnapshot
    path: Path
    extra: dict[str, Any] = field(default_factory=dict)


class CheckpointWriter:
    """Writes slot snapshots to disk on a background thread; the training thread never waits on
    disk unless ``max_pending`` checkpoints are already waiting (backpressure, not an unbounded queue).

    Each write is atomic (temporary file, then rename), so a kill leaves the previous complete file.
    A snapshot for a path that is still waiting replaces the waiting one. ``flush`` waits until a
    path's (or every) pending checkpoint is on disk and reports a failed write as a TunerError.
    ``cancel`` closes a path for good: the bookkeeping thread ends a trial while the training thread,
    a prune decision behind, may still queue its next checkpoint; written, that file would land in a
    folder that retention deletes (``TrialFiles.retain``: any worker, any time), mid-write.
    """

    def __init__(self, max_pending: int = 8) -> None:
        self.max_pending = max_pending
        self.stats = WriterStats()
        self._pending: OrderedDict[Path, _Pending] = OrderedDict()
        self._writing: Path | None = None
        self._error: tuple[Path, BaseException] | None = None
        self._closed = False
        self._ended: set[Path] = set()  # cancelled paths: their trials ended, nothing more is written
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="tuner-checkpoints", daemon=True)
        self._thread.start()

    def put(self, snapshot: SlotSnapshot, path: Path, **extra: Any) -> None:
        """Queue ``snapshot`` (plus ``extra`` checkpoint fields) for ``path``; dropped when the path
        was cancelled (its trial ended)."""
        with self._cv:
            if path in self._ended:
                self.stats.dropped += 1
                return
            if path in self._pending:
                self.stats.coalesced += 1
                self._pending[path] = _Pending(snapshot, path, extra)
                return
            while len(self._pending) >= self.max_pending and not self._closed:
                self._cv.wait()
            self._pending[path] = _Pending(snapshot, path, extra)
            self._cv.notify_all()

    def cancel(self, path: Path) -> None:
        """Drop a checkpoint still waiting for ``path`` and any later one (its trial ended and will
        not be kept)."""
        with self._cv:
            self._ended.add(path)
            self._pending.pop(path, None)
            self._cv.notify_all()

    def flush(self, path: Path | None = None) -> None:
        with self._cv:
            while (path is None and (self._pending or self._writing)) or (
                path is not None and (path in self._pending or self._writing == path)
            ):
                self._cv.wait()
            if self._error is not None:
                (where, error), self._error = self._error, None
                raise TunerError(f"cannot write a checkpoint under {where.parent}: {error}; check the artifact folder")

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if not self._pending:
                    return  # closed and drained
                path, item = self._pending.popitem(last=False)
                self._writing = path
                self._cv.notify_all()
            started = time.perf_counter()
            try:
                checkpoint = item.snapshot.checkpoint()  # waits for its device-to-host copy
                checkpoint.update(item.extra)
                path.parent.mkdir(parents=True, exist_ok=True)
                save_atomic(checkpoint, path)
                size = path.stat().st_size
                error = None
            except BaseException as err:  # noqa: BLE001 - reported to the training thread by flush()
                size, error = 0, err
            with self._cv:
                self._writing = None
                if error is not None:
                    self._error = (path, error)
                else:
                    self.stats.files += 1
                    self.stats.bytes += size
                self.stats.seconds += time.perf_counter() - started
                self._cv.notify_all()
