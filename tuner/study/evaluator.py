"""Final scores of finished trials, on a thread of their own: the training thread refills the slot and
trains on while the IWAE bound, the gaps and the images are computed.

The trainer hands over a :class:`Finished` batch: every slot that finished in one epoch of one
population, copied into one model of that many slots (its best or last weights per slot). The batch
is scored together (one IWAE/metrics pass and one gap pass for all of them; on a GPU on a side
stream), each slot with its own trial's seed, so a trial measures what it would alone. Each trial's
result goes to the bookkeeper, which tells it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tuner.vae import gaps, metrics
from tuner.vae.slot_state import select_slots

if TYPE_CHECKING:
    from PIL import Image

    from tuner.study.bookkeeper import Bookkeeper, Run
    from tuner.study.spec import StudySpec
    from tuner.vae.data import Splits
    from tuner.vae.models import VAE
    from tuner.vae.slot_state import SlotSnapshot

__all__ = ["Evaluator", "Finished"]

_TEST_ATTRS = ("iwae_nll", "neg_elbo", "recon", "kl", "active_units")


@dataclass
class Finished:
    """Slots that finished in one epoch of one population, ready to be scored."""

    runs: list[Run]
    model: VAE  # len(runs) slots: slot i holds runs[i]'s weights to evaluate
    ends: list[dict[str, Any]]  # per slot: best_epoch, best_val_neg_elbo, epochs, end_reason
    snapshots: list[SlotSnapshot | None]  # per slot: its final checkpoint (kept if it ranks)
    splits: Splits
    build: Callable[[int], VAE]  # an empty model of n slots of this population's shape
    copied: Any = None  # CUDA event after the trainer's copies (None on the CPU)


class Evaluator:
    """Scores :class:`Finished` batches in order on one thread; a failure stops the worker."""

    def __init__(self, spec: StudySpec, bookkeeper: Bookkeeper, device: torch.device,
                 log: Callable[[str], None], inline: bool = False) -> None:
        """inline: score on the caller's thread (a one-slot worker waits for each trial's tell anyway,
        and on a CPU a second thread's math only competes for the same cores, ~20% slower)."""
        self.spec, self.bookkeeper, self.log, self.inline = spec, bookkeeper, log, inline
        self._queue: queue.Queue[Finished | None] = queue.Queue()
        self._pending = 0
        self._failure: BaseException | None = None
        self._cv = threading.Condition()
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._no_images: str | None = None  # why images cannot be rendered on this host (said once)
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="tuner-evaluator", daemon=True)

    def __enter__(self) -> Evaluator:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._queue.put(None)
        if exc[0] is None:  # a clean end waits for what is queued; an error (a second Ctrl-C) does not
            self._thread.join(timeout=300)

    def put(self, batch: Finished) -> None:
        if self.inline:
            started = time.perf_counter()
            self._score(batch)
            self.seconds += time.perf_counter() - started
            return
        with self._cv:
            self._pending += 1
        self._queue.put(batch)

    @property
    def pending(self) -> int:
        with self._cv:
            return self._pending

    def drain(self) -> None:
        """Wait until every batch handed over is scored and queued for its tell."""
        with self._cv:
            self._cv.wait_for(lambda: self._pending == 0 or self._failure is not None)
        self.raise_failure()

    def raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _run(self) -> None:
        while (batch := self._queue.get()) is not None:
            started = time.perf_counter()
            try:
                with self._on_stream(batch):
                    self._score(batch)
            except BaseException as err:  # noqa: BLE001 - the trainer re-raises it
                with self._cv:
                    self._failure = err
                    self._pending = 0
                    self._cv.notify_all()
                return
            self.seconds += time.perf_counter() - started
            with self._cv:
                self._pending -= 1
                self._cv.notify_all()

    @contextlib.contextmanager
    def _on_stream(self, batch: Finished) -> Iterator[None]:
        """On a GPU, score on a side stream that first waits for the trainer's copies."""
        if self._stream is None:
            yield
            return
        if batch.copied is not None:
            self._stream.wait_event(batch.copied)
        with torch.cuda.stream(self._stream):
            yield

    def _score(self, batch: Finished) -> None:
        """Metrics on val and test, gaps on test, images on val; one pass per group of slots that
        share evaluation settings (usually the whole batch)."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, run in enumerate(batch.runs):
            t = run.config.train
            groups.setdefault((t.iwae_k, t.gap_examples, t.gap_steps, t.gap_lr), []).append(i)
        for (k, examples, steps, lr), members in groups.items():
            model = batch.model if len(members) == len(batch.runs) else select_slots(batch.model, members, batch.build)
            seeds = [batch.runs[i].config.seed for i in members]
            val = metrics.evaluate(model, batch.splits.val, k=k, seed=seeds)
            test = metrics.evaluate(model, batch.splits.test, k=k, seed=seeds)
            gap = (gaps.estimate_gaps(model, batch.splits.test, examples=examples, steps=steps, lr=lr, k=k, seed=seeds)
                   if examples else None)
            for j, i in enumerate(members):
                attrs: dict[str, Any] = dict(val.slot(j))
                attrs.update({f"test_{name}": test.slot(j)[name] for name in _TEST_ATTRS})
                if gap is not None:
                    attrs.update(gap.slot(j))  # amortization/approximation gaps, test split
                attrs.update(batch.ends[i])
                run = batch.runs[i]
                images = self._images(run, select_slots(model, [j], batch.build), batch.splits, attrs)
                self.bookkeeper.submit(self.bookkeeper.complete, run, self._values(val.slot(j), batch.ends[i]),
                                       attrs, images, batch.snapshots[i])

    def _values(self, val: dict[str, Any], end: dict[str, Any]) -> list[float]:
        if self.spec.objective == "iwae_nll":
            return [val["iwae_nll"]]
        if self.spec.objective == "neg_elbo":
            return [end["best_val_neg_elbo"]]
        return [val["iwae_nll"], val["inactive_fraction"]]

    def _images(self, run: Run, model: VAE, splits: Splits, attrs: dict[str, Any]) -> dict[str, Image.Image]:
        """Reconstructions, prior samples and a latent traversal on the val split, for every complete
        trial (the traversal, at the default size z32 h512 on 2 CPU cores: ~20 ms to draw, ~5 ms to
        encode, ~59 KB of PNG). An image never costs a trained trial: an error is kept in the user
        attr ``artifact_error`` and logged, and the trial completes all the same."""
        from tuner.vae.images import ImagesUnavailable, render_images

        if self._no_images is not None:
            attrs["artifact_error"] = self._no_images
            return {}
        try:
            return render_images(model, splits.val, splits.image_shape, run.config.seed, traversal=True)
        except ImagesUnavailable as err:  # no Pillow on this host: said once, not per trial
            self._no_images = str(err)
            attrs["artifact_error"] = self._no_images
            self.log(f"images are not rendered on this host: {err}")
        except Exception as err:  # noqa: BLE001 - any rendering error is the trial's attr, not the worker's end
            attrs["artifact_error"] = f"{type(err).__name__}: {err}"
            self.log(f"trial {run.number}: images not rendered ({type(err).__name__}: {err})")
        return {}
