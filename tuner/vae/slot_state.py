"""One slot's state off its population and back: true-size snapshots, and slots moved between populations.

A slot of latent 8 and hidden 128 in a population padded to latent 16 and hidden 256 holds its
values in the leading corner of every padded weight (:mod:`tuner.vae.layers`), zeros elsewhere. A
checkpoint keeps only that corner, the slot's *true size*: what the trial needs, whatever population
trained it (loading pads it back into any population it fits, :meth:`Population.load_slot_checkpoint`).

A snapshot is cheap for the training thread. The true-size elements of the weights, best weights
and optimizer moments are gathered into one packed (kinds, N) tensor by one index per kind (the
index depends only on the slot's sizes, and is cached). On CUDA the packed tensor goes to pinned host
memory with a non-blocking copy queued on the training stream: the host does not wait, and the next
epoch's kernels, queued behind it, cannot overwrite the weights before it is done. The writer thread
waits for the copy's event and builds the checkpoint from views of the packed buffer (torch.save
writes its storage once: exactly the true-size bytes). On the CPU the gather is the copy.

Loading (:func:`load`) pads a saved slot back into any population its sizes fit.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from tuner.vae.engine import Population
    from tuner.vae.models import VAE

__all__ = ["CHECKPOINT_FORMAT", "SlotSnapshot", "load", "select_slots", "snapshot", "true_size"]

CHECKPOINT_FORMAT = 2  # 1: padded tensors, no identity; 2: true-size tensors (+ study_id, trial, config_hash)
_OPTIMIZER_SCALARS = ("steps", "beta1", "beta2", "eps", "weight_decay", "momentum", "encoder_steps")


@dataclass(frozen=True)
class _Layout:
    """Where a slot's true-size elements sit in a padded flat row, and how they split per parameter."""

    index: Tensor  # (N,) int64 positions in the (P,) flat row, on the population's device
    pieces: tuple[tuple[str, tuple[int, ...]], ...]  # (parameter name, true shape) in flat order

    @property
    def numel(self) -> int:
        return int(self.index.numel())


_LAYOUTS: weakref.WeakKeyDictionary[Population, dict[tuple[int, int], _Layout]] = weakref.WeakKeyDictionary()
_LAYOUTS_KEPT = 64  # layouts cached per population (one per distinct slot size seen)


def _layout(pop: Population, latent: int, hidden: int) -> _Layout:
    cache = _LAYOUTS.setdefault(pop, {})
    key = (latent, hidden)
    if key not in cache:
        if len(cache) >= _LAYOUTS_KEPT:
            cache.pop(next(iter(cache)))
        true = pop.build_model(1, latent_max=latent, hidden_max=hidden, device="meta")
        shapes = [tuple(p.shape[1:]) for p in true.parameters()]
        positions, pieces = [], []
        for name, p, (a, b), shape in zip(pop.names, pop.params, pop.offsets, shapes, strict=True):
            padded = tuple(p.shape[1:])
            if any(t > m for t, m in zip(shape, padded)):
                raise ValueError(f"{name}: slot size {shape} does not fit the population's {padded}")
            corner = torch.arange(b - a).view(padded)[tuple(slice(0, n) for n in shape)]
            positions.append(corner.reshape(-1) + a)
            pieces.append((name, shape))
        cache[key] = _Layout(torch.cat(positions).to(pop.device), tuple(pieces))
    return cache[key]


def true_size(pop: Population, slot: int) -> int:
    """Floats of one copy of the slot's weights at its true size (a checkpoint stores 2 + moments copies)."""
    config = pop.state[slot].config
    if config is None:
        raise ValueError(f"slot {slot} holds no run")
    return _layout(pop, *_sizes(config)).numel


def _sizes(config: Any) -> tuple[int, int]:
    m = config.model
    return (max(m.latent, m.latent2) if m.hierarchy == "ladder" else m.latent), m.hidden


@dataclass
class SlotSnapshot:
    """One slot at one moment, on its way to the host: :meth:`checkpoint` makes the saved dict."""

    packed: Tensor  # (kinds, N) host: weights, best weights, then each optimizer moment
    scalars: Tensor  # (7,) float32 host: optimizer steps, hyperparameters, encoder steps
    clocks: Tensor  # (2,) int64 host: batches seen (the noise clock), epochs
    kinds: tuple[str, ...]  # "model", "best", then optimizer state names ("exp_avg", ...)
    pieces: tuple[tuple[str, tuple[int, ...]], ...]
    meta: dict[str, Any]  # host-side fields: config, status, best_val, history, ...
    event: Any = None  # torch.cuda.Event after the device-to-host copies (None on the CPU)
    _keep: list[Tensor] = field(default_factory=list)  # device sources of in-flight copies

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size()

    def checkpoint(self) -> dict[str, Any]:
        """The checkpoint dict (torch.load(weights_only=True) loads it); waits for the copy."""
        if self.event is not None:
            self.event.synchronize()
            self._keep.clear()
        rows = dict(zip(self.kinds, self.packed))
        optimizer: dict[str, Any] = {f"{kind}.0": self._split(rows[kind]) for kind in self.kinds[2:]}
        optimizer.update({name: self.scalars[i] for i, name in enumerate(_OPTIMIZER_SCALARS)})
        return {
            "format": CHECKPOINT_FORMAT,
            **self.meta,
            "model": self._split(rows["model"]),
            "best": self._split(rows["best"]),
            "optimizer": optimizer,
            "step": int(self.clocks[0]),
        }

    def _split(self, row: Tensor) -> dict[str, Tensor]:
        """Views of one packed row per parameter name (one storage: saved once)."""
        out, start = {}, 0
        for name, shape in self.pieces:
            n = math.prod(shape)
            out[name] = row[start : start + n].view(shape)
            start += n
        return out


@torch.no_grad()
def snapshot(pop: Population, slot: int) -> SlotSnapshot:
    """The slot's state now, at its true size, without waiting for the device (module docstring)."""
    st = pop.state[slot]
    if st.config is None:
        raise ValueError(f"slot {slot} holds no run")
    layout = _layout(pop, *_sizes(st.config))
    opt = pop.optimizer
    rows = [pop.flat.detach(), pop.best_flat] + [bufs[0] for bufs in opt.state.values()]
    packed = torch.empty(len(rows), layout.numel, dtype=pop.flat.dtype, device=pop.device)
    for i, row in enumerate(rows):
        torch.index_select(row[slot], 0, layout.index, out=packed[i])
    scalars = torch.stack([getattr(opt, name)[slot] for name in _OPTIMIZER_SCALARS]).float()
    clocks = torch.stack([pop.step[slot], pop.epoch[slot]])
    meta = {
        "config": st.config.model_dump(mode="json"),
        "epoch": st.epoch, "status": st.status, "reason": st.reason, "best_val": st.best_val,
        "best_epoch": st.best_epoch, "bad_epochs": st.bad_epochs, "history": [dict(r) for r in st.history],
    }
    kinds = ("model", "best", *opt.state)
    snap = SlotSnapshot(packed, scalars, clocks, kinds, layout.pieces, meta)
    if pop.device.type == "cuda":
        # note: non_blocking copies into pinned memory; no host sync until the writer's event wait
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in (packed, scalars, clocks)]
        for h, t in zip(host, (packed, scalars, clocks)):
            h.copy_(t, non_blocking=True)
        snap.packed, snap.scalars, snap.clocks = host
        snap._keep = [packed, scalars, clocks]
        snap.event = torch.cuda.Event()
        snap.event.record()
    return snap


@torch.no_grad()
def load(pop: Population, slot: int, ckpt: dict[str, Any]) -> None:
    """Put a saved slot (format 1: padded, or 2: true size) into ``slot`` of ``pop``: its maxima may
    differ from the saving population's as long as the slot's true sizes fit."""
    if ckpt.get("format") not in (1, CHECKPOINT_FORMAT):
        raise ValueError(f"checkpoint format {ckpt.get('format')!r} is not one of 1, {CHECKPOINT_FORMAT}")
    from tuner.spec import parse_config  # lazy: pydantic only where a checkpoint is read

    config = parse_config(ckpt["config"], source="checkpoint config")
    pop.assign(slot, config)
    for name, p, b in zip(pop.names, pop.params, pop.best):
        p[slot] = _saved(ckpt["model"], name, p.shape[1:]).to(pop.device)
        b[slot] = _saved(ckpt["best"], name, p.shape[1:]).to(pop.device)
    state = {}
    for key, value in ckpt["optimizer"].items():
        if isinstance(value, dict):  # a moment of the flat parameter, per parameter name
            state[key] = torch.cat([_saved(value, n, p.shape[1:]).flatten() for n, p in zip(pop.names, pop.params)])
        else:
            state[key] = value
    pop.optimizer.load_slot_state(slot, state)
    pop.step[slot] = ckpt["step"]
    pop.epoch[slot] = ckpt["epoch"]
    st = pop.state[slot]
    st.status, st.reason, st.epoch = ckpt["status"], ckpt["reason"], ckpt["epoch"]
    st.best_val, st.best_epoch, st.bad_epochs = ckpt["best_val"], ckpt["best_epoch"], ckpt["bad_epochs"]
    st.history = [dict(r) for r in ckpt["history"]]
    pop.live[slot] = st.status == "running"


# parameters added to every model after checkpoints without them were written: such a checkpoint
# loads them as zeros (the auxiliary decoder: unused by any config of that time, aux_weight 0)
_ADDED_SINCE = ("aux_out.",)


def _saved(tensors: dict[str, Tensor], name: str, shape: torch.Size) -> Tensor:
    """A checkpoint's tensor for parameter `name`, fitted to `shape`; zeros for a parameter the
    checkpoint predates (_ADDED_SINCE)."""
    if name not in tensors and name.startswith(_ADDED_SINCE):
        return torch.zeros(shape)
    return _fit(tensors[name], shape)


def _fit(t: Tensor, shape: torch.Size) -> Tensor:
    """Copy t into zeros of `shape` over their overlap (padded slot tensors between populations)."""
    if t.shape == shape:
        return t
    out = torch.zeros(shape, dtype=t.dtype)
    region = tuple(slice(0, min(a, b)) for a, b in zip(t.shape, shape))
    out[region] = t[region]
    return out



@torch.no_grad()
def select_slots(model: VAE, slots: Sequence[int], build: Callable[[int], VAE],
                 params: Sequence[Tensor] | None = None) -> VAE:
    """A len(slots)-slot copy of ``model``'s slots (weights from ``params`` if given, e.g. the best
    weights; else the model's own), in eval mode. ``build(n)`` makes an empty model of n slots."""
    out = build(len(slots))
    idx = torch.tensor(list(slots), device=model.latent_mask.device)
    sources = params if params is not None else list(model.parameters())
    for p, src in zip(out.parameters(), sources, strict=True):
        p.copy_(src.index_select(0, idx))
    for b, src in zip(out.buffers(), model.buffers(), strict=True):  # masks and rates, all slot-major
        b.copy_(src.index_select(0, idx))
    out.refresh_flags()
    return out.eval()
