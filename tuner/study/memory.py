"""How many trials a worker trains at once, and how populations are sized.

Buckets. A slot is padded to its population's latent and hidden maxima. Padding every slot to the
space's largest sizes (latent 64, hidden 1024 in studies/gpu.yaml) makes a hidden-128 slot move 64
times the floats it needs through its hidden-to-hidden weights. So a worker keys its populations by
size *bucket* (the next power of two, at most the space's maximum): a slot pads to at most twice
its size per axis. A worker with one slot sizes its population to the trial exactly.

Slots from memory. On a GPU the worker starts from free memory and a per-slot estimate at the
space's maxima (:func:`auto_slots`, under a host-wide lock per GPU with the memory taken at once, so
workers sharing a GPU do not all see the same free memory), then measures: after a population's
first epoch, its peak memory per slot and the memory still free give a new limit (:class:`SlotBudget`).
A CUDA out-of-memory error halves the limit; the worker hands the evicted trials back and goes on.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from tuner.store.budget_lock import file_lock

if TYPE_CHECKING:
    from tuner.study.spec import StudySpec

__all__ = ["CudaMemory", "MemoryProbe", "SlotBudget", "auto_slots", "bucket", "next_pow2"]

FREE_FRACTION = 0.8  # of the free device memory a worker plans to fill (activations vary by batch)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def bucket(size: int, largest: int) -> int:
    """The size a slot of ``size`` pads to: the next power of two, at most the space's ``largest``."""
    return min(next_pow2(size), max(largest, size))


class MemoryProbe(Protocol):
    """Device memory as a worker sees it (bytes). The CUDA one reads torch.cuda; tests fake it."""

    def free(self) -> int: ...  # free on the device plus what this process's cache holds unused
    def allocated(self) -> int: ...
    def peak(self) -> int: ...  # the most allocated since the last reset_peak
    def reset_peak(self) -> None: ...


class CudaMemory:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def free(self) -> int:
        free, _ = torch.cuda.mem_get_info(self.device)
        return int(free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device))

    def allocated(self) -> int:
        return int(torch.cuda.memory_allocated(self.device))

    def peak(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.device))

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)


def _per_slot_bytes(spec: StudySpec, data_dim: int) -> int:
    """A generous estimate at the space's maxima: 6 copies of the weights (weights, gradient, two Adam
    moments, best weights, scratch) plus one batch's activations (8 floats per unit per example)."""
    from tuner.study import space

    latent, hidden = space.size_bounds(spec)
    depth = spec.base.model.depth
    weights = data_dim * hidden * 2 + hidden * hidden * 2 * max(depth - 1, 0) + hidden * latent * 3
    batch = spec.base.optim.batch_size
    return 4 * (6 * weights + 8 * batch * (2 * data_dim + 2 * depth * hidden))


@contextlib.contextmanager
def _gpu_lock(device: torch.device) -> Iterator[None]:
    """A host-wide lock per GPU (a file beside the system's temporary files): workers sharing one GPU
    size themselves one after the other."""
    try:
        name = str(torch.cuda.get_device_properties(device).uuid)
    except (AttributeError, RuntimeError):
        name = str(device.index or 0)
    with file_lock(Path(tempfile.gettempdir()) / f"tuner-gpu-{name}.lock"):
        yield


def auto_slots(device: torch.device, spec: StudySpec, data_dim: int) -> int:
    """Slots per worker at start: the spec's (1 on the CPU when unset); on a GPU with ``slots`` unset,
    what FREE_FRACTION of the free memory holds at the estimate, capped by max_slots.

    On a GPU the memory is taken at once, under the GPU's lock: an allocation of the planned bytes,
    freed into this process's cache, where the populations reuse it and other workers' free memory
    no longer counts it."""
    if spec.workers.slots:
        return min(spec.workers.slots, spec.workers.max_slots)
    if device.type != "cuda":
        return 1
    per_slot = _per_slot_bytes(spec, data_dim)
    with _gpu_lock(device):
        free = CudaMemory(device).free()
        slots = max(1, min(spec.workers.max_slots, int(FREE_FRACTION * free // per_slot)))
        with contextlib.suppress(torch.OutOfMemoryError):
            del_me = torch.empty(slots * per_slot, dtype=torch.uint8, device=device)
            del del_me  # the block stays in this process's caching allocator
    return slots


class SlotBudget:
    """The most trials a worker trains at once: the start value, then measured (GPU, slots unset)."""

    def __init__(self, limit: int, max_slots: int, probe: MemoryProbe | None, adaptive: bool,
                 log: Callable[[str], None]) -> None:
        self.limit, self.max_slots, self.probe, self.adaptive, self.log = limit, max_slots, probe, adaptive, log
        self.per_slot: int | None = None  # the last measured bytes per slot

    def baseline(self) -> int:
        """Memory in use before a population is made (0 without a probe); starts a peak measurement."""
        if self.probe is None:
            return 0
        self.probe.reset_peak()
        return self.probe.allocated()

    def measure(self, baseline: int, capacity: int, running: int) -> None:
        """After a new population's first epoch: its peak bytes per slot and the memory still free
        give the new limit (never below the trials running now, at most max_slots)."""
        if self.probe is None or not self.adaptive:
            return
        per_slot = max(1, (self.probe.peak() - baseline) // max(capacity, 1))
        self.per_slot = per_slot
        extra = int(FREE_FRACTION * self.probe.free()) // per_slot
        limit = max(1, min(self.max_slots, running + extra))
        if limit != self.limit:
            self.log(f"slots: {self.limit} -> {limit} (measured {per_slot / 2**20:.1f} MiB a slot, "
                     f"{self.probe.free() / 2**30:.1f} GiB free)")
            self.limit = limit

    def halve(self) -> int:
        """After an out-of-memory error: half the slots (at least one); no growth from then on."""
        self.limit = max(1, self.limit // 2)
        self.adaptive = False
        return self.limit
