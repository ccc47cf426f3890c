"""Fast paths of a population's epoch on CUDA: TF32 matmuls and the epoch as one captured CUDA graph.

Both are CUDA-only and were written without a GPU at hand: each falls back to plain eager launches
with one warning if it fails at run time, so a path no GPU has exercised yet cannot stop a study
(the README marks them unmeasured until ``benchmarks/gpu_check.py`` has run on a card).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

__all__ = ["EpochGraph", "tf32"]


@contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 float32 matmuls and convolutions on CUDA inside (IEEE fp32 if not enabled), the caller's
    setting after. torch.set_float32_matmul_precision and torch.backends.cudnn.allow_tf32 set the
    older flags and the newer ``fp32_precision`` ones together: setting only the newer ones makes
    every reader of the older (inductor's cache key among them) raise on a "mix of APIs"."""
    before = (torch.backends.cuda.matmul.fp32_precision == "tf32", torch.backends.cudnn.conv.fp32_precision == "tf32")
    if before == (enabled, enabled):
        yield
        return
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.set_float32_matmul_precision("high" if before[0] else "highest")
        torch.backends.cudnn.allow_tf32 = before[1]


def _capture(steps: Callable[[], dict[str, Tensor]], stream: Any) -> tuple[Any, dict[str, Tensor]]:
    """Record steps() into a CUDA graph (nothing runs) -> (graph, its static outputs)."""
    graph = torch.cuda.CUDAGraph()
    current = torch.cuda.current_stream()
    try:
        # thread_local: a checkpoint writer thread may wait on CUDA events while this thread captures
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            outputs = steps()
    finally:
        torch.cuda.set_stream(current)  # a failing capture_end skips the graph context's stream reset
    return graph, outputs


class EpochGraph:
    """An epoch's steps as one CUDA graph, replayed while the host-side ``key`` they depend on holds.

    A graph replays fixed kernels on fixed memory: every tensor the steps read or write must stay the
    same object (Population updates them in place), and its outputs are static buffers the next
    replay overwrites (run() returns copies). The PyTorch docs ask for warm-up before capture, on the
    capture's side stream (lazy handles, workspaces, compiling happen there, not under capture):
    so an epoch whose key differs from the last one's runs eagerly on that stream, the next one
    captures (records only: nothing runs, no state changes) and replays. Any exception while
    capturing or replaying: one warning, eager for good, and this epoch runs eagerly in full.
    """

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.device, self.enabled = device, enabled
        self.key: Hashable = None  # what the last epoch ran with
        self.graph: Any = None
        self.outputs: dict[str, Tensor] = {}
        self.stream: Any = None
        self.captures = 0  # graphs captured so far (tests, logs)

    def run(self, key: Hashable, steps: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
        if not self.enabled:
            return steps()
        if key != self.key:  # new kernels or shapes: warm up eagerly, capture next epoch
            self.key, self.graph, self.outputs = key, None, {}
            return self._warm_up(steps)
        try:
            if self.graph is None:
                self.graph, self.outputs = _capture(steps, self.stream)
                self.captures += 1
            self.graph.replay()
        except Exception as error:  # noqa: BLE001 - never let a graph stop a study
            self._give_up(error)
            return steps()
        return {k: v.clone() for k, v in self.outputs.items()}

    def _warm_up(self, steps: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
        try:
            if self.stream is None:
                self.stream = torch.cuda.Stream(self.device)
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        except Exception as error:  # noqa: BLE001
            self._give_up(error)
            return steps()
        with torch.cuda.stream(self.stream):
            outputs = steps()
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)
        for v in outputs.values():
            v.record_stream(current)  # made on the side stream, used on this one
        return outputs

    def _give_up(self, error: Exception) -> None:
        warnings.warn(
            f"CUDA graph of the training epoch failed ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); this population runs eagerly from now on",
            RuntimeWarning, stacklevel=4,
        )
        self.enabled, self.graph, self.outputs = False, None, {}
