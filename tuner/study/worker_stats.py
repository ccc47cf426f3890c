"""What a worker measures of itself: the training thread's time per phase, the device's busy time,
and the summary it ends with (its last log lines; a JSON file for benchmarks)."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["DeviceBusy", "PhaseClock", "WorkerSummary"]


class DeviceBusy:
    """How long the device computed the epochs: CUDA events around each population's epoch, read
    when done (no host sync on the way); the busy fraction is their sum over the wall. A null
    object on the CPU (the training thread's compute phase says it there)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds = 0.0
        self._pending: list[tuple[Any, Any]] = []

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        if not self.cuda:
            yield
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        try:
            yield
        finally:
            end.record()
            self._pending.append((start, end))
            self._collect(wait=False)

    def _collect(self, wait: bool) -> None:
        while self._pending and (wait or self._pending[0][1].query()):
            start, end = self._pending.pop(0)
            end.synchronize()
            self.seconds += start.elapsed_time(end) / 1000.0

    def total(self) -> float:
        self._collect(wait=True)
        return self.seconds


class PhaseClock:
    """Seconds of the training thread per phase (compute, bookkeeping, checkpoints, evaluation,
    store wait, idle): where its wall time goes, for ``benchmarks/overhead.py``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start


@dataclass
class WorkerSummary:
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    handed_back: int = 0
    resumed: int = 0
    model_epochs: int = 0
    wall_s: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # the training thread's seconds per phase
    threads: dict[str, float] = field(default_factory=dict)  # busy seconds of the other threads
    checkpoint_files: int = 0
    checkpoint_bytes: int = 0
    padding: dict[str, float] = field(default_factory=dict)  # population -> useful / stored floats
    device_busy_s: float | None = None  # CUDA: the epochs' device time (events around them)
    device_peak_bytes: int | None = None  # CUDA: the most memory allocated at once

    def __str__(self) -> str:
        """The worker's last log line, whichever launcher ran it (tests read its model-epochs)."""
        return (f"{self.complete} complete, {self.pruned} pruned, {self.handed_back} handed back, "
                f"{self.resumed} resumed, {self.model_epochs} model-epochs")

    def details(self) -> str:
        """Where the time went and what was written, as one log line."""
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in sorted(self.phases.items(), key=lambda kv: -kv[1]))
        padding = ", ".join(f"{k}: {v:.0%}" for k, v in self.padding.items())
        return (f"training thread: {phases} of {self.wall_s:.1f} s; checkpoints: {self.checkpoint_files} files, "
                f"{self.checkpoint_bytes / 2**20:.1f} MiB; padding efficiency: {padding or '-'}")
