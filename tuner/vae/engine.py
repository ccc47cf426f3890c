"""`Population`: N training runs of one shape, stepped together on one device.

Each slot is one trial: its own hyperparameters (tensors over slots), weights, optimizer moments and
step count, random stream (counter-based, :mod:`tuner.vae.noise`), epoch clock, best state and patience.
One `run_epoch` trains every live slot for one epoch (same number of steps: same data and batch
size) and validates them; a slot that finishes or is stopped is `assign`-ed a new config while its
neighbours carry on. Slot losses are *summed* (never averaged: that would shrink every gradient by
1/N), gradient norms are clipped per slot, and a slot whose loss or gradient goes non-finite is
frozen at once and stopped with a reason at the end of the epoch.

The host never waits inside an epoch: the step loop makes no host-to-device copy and reads nothing
back (no ``.item()``, no Python branch on a tensor), so on CUDA the host queues steps ahead of the
GPU; ``run_epoch`` reads the epoch's numbers back in one copy, and keeps best weights with a
decision made on the device. That also lets CUDA run the epoch as one captured graph
(:class:`tuner.vae.epoch_graph.EpochGraph`), with ``precision`` (TF32 or bf16 autocast) and a compiled optimizer update
(:mod:`tuner.vae.optim`). Each of these falls back to plain eager launches, with one warning, if it fails.

Tolerances. On the CPU in fp32, a slot trains bit for bit as its config alone would in a population
of one (the same kernels per slot) and a resumed slot as if never stopped: the tests hold it. On
CUDA that is not promised: batched kernels pick their algorithms by the population's shapes, TF32
and bf16 round differently, and the compiled optimizer fuses what eager code rounds step by step,
so a slot alone and the same slot in a population agree to a tolerance, which the GPU check measures.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from tuner.errors import TunerError
from tuner.vae import aggressive, noise, schedules, slot_state
from tuner.vae.data import Splits
from tuner.vae.epoch_graph import EpochGraph, tf32
from tuner.vae.models import VAE
from tuner.vae.optim import OPTIMIZER_HYPERPARAMETERS, StackedOptimizer
from tuner.vae.population import EpochResult, PopulationShape, SlotState, build_vae, latent_size

if TYPE_CHECKING:  # the engine imports with torch and numpy alone (no pydantic on a bare GPU box)
    from tuner.spec import TrainConfig

__all__ = ["PRECISIONS", "VAL_SAMPLES", "Population", "resolve_precision"]

_STREAM_PERM, _STREAM_STEP, _STREAM_BINARIZE, _STREAM_VALID = 11, 12, 13, 14
# the flat parameter's views are strided across slots; their gradients accumulate in place all the same
warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")
VAL_SAMPLES = 4  # z draws per validation example (the per-epoch -ELBO that picks the best epoch)
VAL_BATCH = 50  # validation rows per batch: fixed, so noise does not depend on the population's size
PRECISIONS = ("auto", "fp32", "tf32", "bf16")

_HYPERPARAMETERS = (
    "lr", "lr_warmup", "lr_decay", "min_lr_ratio", "step_epochs", "step_gamma", "grad_clip",
    "kl_kind", "beta", "kl_warmup", "cycles", "ratio", "capacity", "free_bits", "epochs", "aggressive_epochs",
)


def _hyperparameters(config: TrainConfig) -> dict[str, float]:
    """A config's per-slot schedule values, as the tensors of :mod:`tuner.vae.schedules` want them
    (named by _HYPERPARAMETERS, which sizes the tensors before any config exists)."""
    o, k = config.optim, config.kl
    values = (
        o.lr, o.warmup_epochs, schedules.LR_DECAYS.index(o.decay), o.min_lr_ratio, o.step_epochs, o.step_gamma,
        o.grad_clip if o.grad_clip > 0 else math.inf,
        schedules.KL_SCHEDULES.index(k.schedule), k.beta, k.warmup_epochs, k.cycles, k.ratio, k.capacity,
        k.free_bits, config.train.epochs, config.train.aggressive_epochs,
    )
    return dict(zip(_HYPERPARAMETERS, values, strict=True))


_CODES = ("lr_decay", "kl_kind")


def _flatten(params: list[nn.Parameter]) -> tuple[nn.Parameter, list[tuple[int, int]]]:
    """One (S, P) parameter, with a preallocated gradient, holding every weight of the model.

    Each model parameter's data and grad become views into it (autograd accumulates into the
    views in place), so the optimizer, the gradient-norm check, zeroing and best-state copies are a
    handful of ops over one tensor per step instead of a handful per layer.
    """
    sizes = [p[0].numel() for p in params]
    flat = nn.Parameter(torch.zeros(params[0].shape[0], sum(sizes), device=params[0].device))
    flat.grad = torch.zeros_like(flat)
    offsets, start = [], 0
    with torch.no_grad():
        for p, n in zip(params, sizes):
            view = flat.data[:, start : start + n].view(p.shape)
            view.copy_(p.data)
            p.data = view
            p.grad = flat.grad[:, start : start + n].view(p.shape)
            offsets.append((start, start + n))
            start += n
    return flat, offsets


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto -> tf32 on CUDA, fp32 elsewhere; tf32 off CUDA is fp32 (TF32 is a tensor-core format)."""
    if precision not in PRECISIONS:
        raise TunerError(f"precision must be one of {list(PRECISIONS)}, but got {precision=}")
    if precision == "auto" or (precision == "tf32" and device.type != "cuda"):
        return "tf32" if device.type == "cuda" else "fp32"
    return precision


class Population:
    """N slots of one :class:`PopulationShape` training on one device.

    precision: the training step's arithmetic (validation is always fp32): ``fp32``; ``tf32``,
    float32 matmuls and convolutions on TF32 tensor cores (CUDA only: elsewhere it is fp32); ``bf16``,
    the forward pass under bfloat16 autocast (on CUDA with TF32 for what stays float32); ``auto``,
    tf32 on CUDA and fp32 elsewhere. ``self.precision`` holds the resolved value. cuda_graph: on a
    CUDA device, run each epoch's steps as a captured CUDA graph (:class:`tuner.vae.epoch_graph.EpochGraph`; ignored
    elsewhere). update: the optimizer's update path (:class:`tuner.vae.optim.StackedOptimizer`).
    """

    def __init__(
        self, shape: PopulationShape, splits: Splits, *, slots: int, latent_max: int, hidden_max: int,
        device: torch.device | str = "cpu", precision: str = "auto", cuda_graph: bool = True,
        update: Literal["auto", "per_slot", "vectorized", "compiled"] = "auto",
    ) -> None:
        self.shape, self.splits, self.slots = shape, splits, slots
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device)
        self.graph = EpochGraph(self.device, enabled=cuda_graph and self.device.type == "cuda")
        self.latent_max, self.hidden_max = latent_max, hidden_max
        self.model = self.build_model(slots)
        self.params = list(self.model.parameters())
        self.names = [n for n, _ in self.model.named_parameters()]
        self.flat, self.offsets = _flatten(self.params)  # (S, P); self.params are views into it
        self.best_flat = self.flat.detach().clone()  # best-validation weights per slot
        self.best = [self.best_flat[:, a:b].view(p.shape) for p, (a, b) in zip(self.params, self.offsets)]
        self.optimizer = StackedOptimizer([self.flat], shape.optimizer, slots, update=update)
        self.optimizer.set_encoder_columns(aggressive.encoder_columns(self.names, self.offsets))  # two clocks
        self._clipping = False  # host-side: does any slot clip gradients
        self.state = [SlotState() for _ in range(slots)]
        dev = self.device
        self.seed = torch.zeros(slots, dtype=torch.int64, device=dev)
        self.keys = noise.keys_from_seeds(self.seed)
        self.step = torch.zeros(slots, dtype=torch.int64, device=dev)  # batches seen (the noise clock)
        self.epoch = torch.zeros(slots, dtype=torch.int64, device=dev)
        self.live = torch.zeros(slots, dtype=torch.bool, device=dev)
        self.hp = {
            name: torch.zeros(slots, dtype=torch.int64 if name in _CODES else torch.float32, device=dev)
            for name in _HYPERPARAMETERS
        }
        self.steps_per_epoch = splits.train.shape[0] // shape.batch_size  # the last partial batch is dropped
        self.order = torch.zeros(slots, splits.train.shape[0], dtype=torch.int64, device=dev)  # this epoch's, per slot
        # each slot's best val -ELBO on the device (float32, as read back), so run_epoch decides which
        # slots improved without a host-to-device copy; _best_written: what it holds, host-side
        self.best_val = torch.full((slots,), math.inf, device=dev)
        self._best_written = [math.inf] * slots
        self.steps_done = 0  # steps of the current (or last) epoch whose update was applied

    @classmethod
    def for_configs(cls, configs: list[TrainConfig], splits: Splits, device: torch.device | str = "cpu") -> Population:
        """A population holding exactly these configs (all of one shape), slot i = configs[i]."""
        shapes = {PopulationShape.of(c) for c in configs}
        if len(shapes) != 1:
            raise ValueError(f"configs of different shapes cannot share a population: {sorted(map(str, shapes))}")
        pop = cls(
            shapes.pop(), splits, slots=len(configs), device=device,
            latent_max=max(latent_size(c) for c in configs), hidden_max=max(c.model.hidden for c in configs),
        )
        for slot, config in enumerate(configs):
            pop.assign(slot, config)
        return pop

    # ------------------------------------------------------------------------------- slots
    def assign(self, slot: int, config: TrainConfig) -> None:
        """Reset one slot to a fresh run of `config`: new weights, zero moments, clocks at 0."""
        if PopulationShape.of(config) != self.shape:
            raise ValueError(f"config shape {PopulationShape.of(config)} does not fit population {self.shape}")
        m, k = config.model, config.kl
        self.model.init_slot(
            slot, seed=config.seed, latent=m.latent, hidden=m.hidden, dropout=m.dropout, latent2=m.latent2,
            aux_weight=k.aux_weight, mmd_weight=k.mmd_weight if k.divergence == "mmd" else 0.0,
            ortho_weight=m.ortho_weight,
        )
        self.optimizer.reset_slot(slot)
        o = config.optim
        self.optimizer.configure_slot(slot, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, momentum=o.momentum)
        for name, value in _hyperparameters(config).items():
            self.hp[name][slot] = value
        self.seed[slot] = config.seed
        self.keys.copy_(noise.keys_from_seeds(self.seed))  # in place: a captured graph reads this tensor
        self.step[slot] = 0
        self.epoch[slot] = 0
        self._clipping = bool(torch.isfinite(self.hp["grad_clip"]).any())
        with torch.no_grad():
            self.best_flat[slot] = self.flat[slot]
        self.state[slot] = SlotState(config=config, status="running")
        self.live[slot] = True

    def release(self, slot: int) -> None:
        """Mark a slot empty (its trial was handed back); it trains no more until assigned."""
        self.state[slot].status = "empty"
        self.live[slot] = False

    def stop(self, slot: int, reason: str) -> None:
        self.state[slot].status, self.state[slot].reason = "stopped", reason
        self.live[slot] = False

    def running(self) -> list[int]:
        return [s for s, st in enumerate(self.state) if st.status == "running"]

    # ---------------------------------------------------------------------------- training
    def _batch(self, idx: Tensor, step_keys: Tensor) -> Tensor:
        """(S, B) example indices -> (S, B, D) on the device; dynamic binarization per slot stream."""
        x = self.splits.train[idx]
        if self.splits.binarize == "dynamic":
            x = noise.bernoulli(noise.derive(step_keys, _STREAM_BINARIZE), x)
        return x

    def _schedule(self, clock: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(kl_weight, capacity, lr) at the slots' fractional-epoch clocks (..., S) (broadcasts)."""
        hp = self.hp
        kl_w = schedules.kl_weight(clock, hp["kl_kind"], hp["beta"], hp["kl_warmup"], hp["cycles"], hp["ratio"], hp["epochs"])
        cap = schedules.kl_capacity(clock, hp["kl_kind"], hp["capacity"], hp["kl_warmup"])
        lr = schedules.learning_rate(
            clock, hp["lr"], hp["lr_warmup"], hp["lr_decay"], hp["epochs"], hp["min_lr_ratio"],
            hp["step_epochs"], hp["step_gamma"],
        )
        return kl_w, cap, lr

    def train_epoch(self) -> dict[str, Tensor]:
        """One epoch of every live slot. Returns per-slot means (S,) and a `finite` flag (S,)."""
        self.model.train()
        # a fresh permutation of the train split per slot and epoch, from the slot's own stream; made
        # here, outside any CUDA graph: CUB's segmented sort is not capturable at every size
        u = noise.uniform(noise.derive(self.keys, _STREAM_PERM, self.epoch), (self.splits.train.shape[0],))  # (S, N)
        self.order.copy_(torch.argsort(u, dim=1, stable=True))
        # host-side choices the steps' kernels depend on (tensor contents may change freely)
        key = (
            self.steps_per_epoch, self._clipping, self.optimizer._decay, self.optimizer.update,
            self.model.step_flags, self.precision, aggressive.in_use(self),
        )
        self.steps_done = 0
        # aggressive encoder training's inner loop reads a flag back now and then: no graph then
        out = self._launch_steps() if aggressive.in_phase(self) else self.graph.run(key, self._launch_steps)
        self.steps_done = self.steps_per_epoch
        return out

    def _launch_steps(self) -> dict[str, Tensor]:
        """The epoch's steps, launched with this population's float32 matmul precision on CUDA.

        note: TF32 is a process-wide switch in PyTorch, so it is on only while steps are launched
        (eagerly or under capture: a replayed graph keeps the kernels it captured) and restored
        after; another thread's float32 matmuls in that window (final metrics) may take TF32 too.
        """
        with tf32(self.precision != "fp32") if self.device.type == "cuda" else nullcontext():
            return self._train_steps()

    def _train_steps(self) -> dict[str, Tensor]:
        """The epoch's steps, all device work (what a CUDA graph captures): no host copy or read."""
        b, steps, order = self.shape.batch_size, self.steps_per_epoch, self.order
        bf16 = self.precision == "bf16"
        live = self.live.clone()
        finite = torch.ones_like(live)
        sums = {k: torch.zeros(self.slots, device=self.device) for k in ("loss", "neg_elbo")}
        # 1. the epoch's schedules and noise keys, for all steps at once (steps, S): each value is
        #    taken at the end of its step (the LR warmup never takes a zero step)
        ticks = torch.arange(1, steps + 1, device=self.device).view(-1, 1)
        kl_ws, caps, lrs = self._schedule(self.epoch.to(torch.float32) + ticks / steps)
        all_keys = noise.derive(self.keys, _STREAM_STEP, self.step + ticks - 1)
        hook = aggressive.AggressiveSteps(self) if aggressive.in_use(self) else None  # He et al. 2019
        for t in range(steps):
            self.steps_done = t  # host-side: updates applied when an out-of-memory error stops the epoch
            kl_w, cap, lr, step_keys = kl_ws[t], caps[t], lrs[t], all_keys[t]
            if hook is not None:  # encoder-only steps first, for slots in their aggressive phase
                hook.encoder_steps(t, lr, kl_w, cap)
            # 2. forward all slots; a non-finite slot is frozen (zero loss share, no update)
            x = self._batch(order[:, t * b : (t + 1) * b], step_keys)  # (S, B, D)
            # (the autocast cache is off: under graph capture it would outlive what it caches)
            with torch.autocast(self.device.type, torch.bfloat16, enabled=bf16, cache_enabled=False):
                out = self.model(x, step_keys, kl_w, cap, self.hp["free_bits"], samples=self.shape.samples,
                                 iwae=self.shape.objective == "iwae")
            loss = out.loss.float()  # (S,); bf16 autocast may hand back bfloat16
            ok = live & torch.isfinite(loss)
            # 3. backward on the SUM of slot losses: each slot gets exactly its own gradient
            self.flat.grad.zero_()
            torch.where(ok, loss, 0.0).sum().backward()
            if self._clipping:
                norms = self.optimizer.clip_grad_norm_(self.hp["grad_clip"])
            else:
                norms = self.optimizer.grad_norms()
            ok &= torch.isfinite(norms)
            # 4. update, then advance the clocks of live slots
            if hook is None:
                self.optimizer.step(torch.where(ok, lr, 0.0), ok)
            else:
                ok = hook.update(lr, ok)
            finite &= ok | ~live
            self.step += live
            sums["loss"] += torch.where(ok, loss.detach(), 0.0)
            sums["neg_elbo"] += torch.where(ok, out.neg_elbo.detach().float(), 0.0)
        self.epoch += live
        return {
            "loss": sums["loss"] / steps, "neg_elbo": sums["neg_elbo"] / steps, "finite": finite,
            "kl_weight": kl_w, "lr": lr,
            "inner_steps": hook.inner / steps if hook is not None else torch.zeros_like(kl_w),
        }

    @torch.no_grad()
    def validate(self, x: Tensor | None = None) -> dict[str, Tensor]:
        """-ELBO (beta = 1), recon and KL of every slot on x (default: val split), (S,) nats.

        Each example's value is the mean over VAL_SAMPLES draws of z with fixed noise (per slot seed,
        batch of VAL_BATCH rows and draw): the curve moves only when the model does, and the best
        epoch (and every prune decision) is chosen on an estimate a quarter as noisy in its variance
        as one draw's. Batches have a fixed number of rows, so a slot's noise does not depend on the
        population it validates in."""
        self.model.eval()
        x = self.splits.val if x is None else x
        n = x.shape[0]
        sums = {k: torch.zeros(self.slots, device=self.device) for k in ("neg_elbo", "recon", "kl")}
        zeros = torch.zeros(self.slots, device=self.device)
        for i, start in enumerate(range(0, n, VAL_BATCH)):
            xb = x[start : start + VAL_BATCH].unsqueeze(0).expand(self.slots, -1, -1)
            key = noise.derive(self.keys, _STREAM_VALID, i)
            out = self.model(xb, key, zeros + 1.0, zeros, zeros, samples=VAL_SAMPLES)
            for k in sums:
                sums[k] += getattr(out, k) * xb.shape[1]
        return {k: v / n for k, v in sums.items()}

    @torch.no_grad()
    def _keep_best(self, improved: Tensor, val: Tensor) -> None:
        """Best weights and best val -ELBO of the slots that improved (S,) bool: on the device."""
        self.best_flat.copy_(torch.where(improved.view(-1, 1), self.flat, self.best_flat))
        self.best_val.copy_(torch.where(improved, val, self.best_val))

    def _write_best_val(self) -> None:
        """Put host best values the device does not hold yet (a slot assigned, loaded from a
        checkpoint or moved in) into best_val: a few scalar writes then, none in a usual epoch."""
        for s, st in enumerate(self.state):
            if st.best_val != self._best_written[s]:
                self.best_val[s] = st.best_val
                self._best_written[s] = st.best_val

    def run_epoch(self) -> list[EpochResult]:
        """Train and validate every running slot for one epoch; update best state, patience, status."""
        running = self.running()
        if not running:
            return []
        self._write_best_val()
        live = self.live.clone()  # the running slots, on the device
        train = self.train_epoch()
        val = self.validate()
        # 1. best weights, decided on the device by the host's rule below: a running slot whose
        #    epoch and val -ELBO are finite improves when it beats its best (NaN never does)
        v_dev = val["neg_elbo"]
        improved_dev = live & train["finite"] & torch.isfinite(v_dev) & (v_dev < self.best_val)
        self._keep_best(improved_dev, v_dev)
        # 2. note: the one host sync of the epoch, every number in one copy
        rows = (
            train["loss"], train["neg_elbo"], train["finite"], train["kl_weight"], train["lr"],
            v_dev, val["recon"], val["kl"], improved_dev, train["inner_steps"],
        )
        (loss, neg_elbo, finite, kl_w, lr, val_neg_elbo, recon, kl, improved, inner) = torch.stack(
            [r.to(torch.float32) for r in rows]
        ).tolist()
        results = []
        for s in running:
            st, cfg = self.state[s], self.state[s].config
            st.epoch += 1
            v = val_neg_elbo[s]
            if not finite[s] or not math.isfinite(v):
                self.stop(s, f"non-finite loss or gradient in epoch {st.epoch} (lr {cfg.optim.lr:g}); slot frozen")
            elif improved[s]:  # v < st.best_val: the device's decision, so best weights and bookkeeping agree
                st.best_val, st.best_epoch, st.bad_epochs = v, st.epoch, 0
                self._best_written[s] = v
            else:
                st.bad_epochs += 1
            if st.status == "running":
                if st.epoch >= cfg.train.epochs:
                    st.status, st.reason = "finished", "epoch budget reached"
                elif cfg.train.patience and st.bad_epochs >= cfg.train.patience:
                    st.status, st.reason = "finished", f"early stop: no better val -ELBO for {st.bad_epochs} epochs"
                if st.status != "running":
                    self.live[s] = False
            row = {
                "epoch": st.epoch, "train_loss": loss[s], "train_neg_elbo": neg_elbo[s],
                "val_neg_elbo": v, "val_recon": recon[s], "val_kl": kl[s], "kl_weight": kl_w[s], "lr": lr[s],
                "inner_steps": inner[s],  # aggressive encoder steps per decoder step (0: none)
            }
            st.history.append(row)
            results.append(EpochResult(slot=s, improved=bool(improved[s]), status=st.status, reason=st.reason, **row))
        return results

    # ----------------------------------------------------------------------- slot state
    def slot_checkpoint(self, slot: int) -> dict[str, Any]:
        """Everything to resume one slot anywhere, at its true size (:mod:`tuner.vae.slot_state`); loads
        with torch.load(weights_only=True)."""
        return slot_state.snapshot(self, slot).checkpoint()

    def load_slot_checkpoint(self, slot: int, ckpt: dict[str, Any]) -> None:
        """Put a saved slot into `slot` of this population (maxima may differ; true sizes must fit)."""
        slot_state.load(self, slot, ckpt)

    def slot_model(self, slot: int, best: bool = True) -> VAE:
        """A one-slot copy of a slot's model (its best-validation weights if `best`), in eval mode."""
        return self.finished_model([slot], best=[best])

    @torch.no_grad()
    def finished_model(self, slots: list[int], best: list[bool] | None = None) -> VAE:
        """A len(slots)-slot copy of these slots' models, in eval mode: slot i holds slots[i]'s
        best-validation weights where ``best[i]`` (default: where its config restores the best
        weights and it has a best epoch), else its last ones. What the final scores evaluate."""
        if best is None:
            best = [bool(st.config and st.config.train.restore_best and st.best_epoch > 0)
                    for st in (self.state[s] for s in slots)]
        out = slot_state.select_slots(self.model, slots, self.build_model)
        for i, (slot, use_best) in enumerate(zip(slots, best, strict=True)):
            if use_best:
                for p, src in zip(out.parameters(), self.best):
                    p[i] = src[slot]
        return out

    def slot_tensors(self) -> list[Tensor]:
        """Every device tensor with a leading slot axis that holds slot state (weights, best weights,
        optimizer state and hyperparameters, schedule values, seeds, keys, clocks, masks): what
        moving a slot to another population copies (:meth:`take_slots`)."""
        opt = self.optimizer
        return [
            self.flat.detach(), self.best_flat, *(buf for bufs in opt.state.values() for buf in bufs),
            opt.steps, opt.encoder_steps, *(getattr(opt, name) for name in OPTIMIZER_HYPERPARAMETERS),
            *self.hp.values(),
            self.seed, self.keys, self.step, self.epoch, self.live, self.best_val, *self.model.buffers(),
        ]

    @torch.no_grad()
    def take_slots(self, src: Population, pairs: list[tuple[int, int]]) -> None:
        """Copy slots ``src[a] -> self[b]`` for (a, b) in pairs, with their host-side state. Both
        populations share shape and size maxima (one layout of the flat weights); in place."""
        if (self.shape, self.latent_max, self.hidden_max) != (src.shape, src.latent_max, src.hidden_max):
            raise ValueError("slots move only between populations of one shape and size maxima")
        if not pairs:
            return
        a = torch.tensor([p[0] for p in pairs], device=src.device)
        b = torch.tensor([p[1] for p in pairs], device=self.device)
        for dst, source in zip(self.slot_tensors(), src.slot_tensors(), strict=True):
            dst[b] = source[a]
        for sa, sb in pairs:
            self.state[sb] = src.state[sa]
            self._best_written[sb] = src._best_written[sa]
        self.refresh_flags()

    def resized(self, slots: int) -> tuple[Population, dict[int, int]]:
        """A population of ``slots`` slots holding this one's running slots, packed first (grown,
        shrunk, or halved after an out-of-memory error); returns it and old slot -> new slot."""
        running = self.running()
        if len(running) > slots:
            raise ValueError(f"{len(running)} running slots do not fit {slots} slots")
        new = Population(
            self.shape, self.splits, slots=slots, latent_max=self.latent_max, hidden_max=self.hidden_max,
            device=self.device, precision=self.precision, cuda_graph=self.graph.enabled,
            update=self.optimizer.update,  # a path that failed here stays off there
        )
        moved = {old: i for i, old in enumerate(running)}
        new.take_slots(self, list(moved.items()))
        return new, moved

    def refresh_flags(self) -> None:
        """Recompute the host-side flags from the slots' values (after slots were moved in)."""
        self._clipping = bool(torch.isfinite(self.hp["grad_clip"]).any())
        self.optimizer._decay = bool((self.optimizer.weight_decay > 0).any())
        self.model.refresh_flags()

    def build_model(self, slots: int, *, latent_max: int | None = None, hidden_max: int | None = None,
                    device: torch.device | str | None = None) -> VAE:
        """An empty VAE of this population's shape: its size maxima and device unless given."""
        return build_vae(self.shape, self.splits.image_shape, latent_max or self.latent_max,
                         hidden_max or self.hidden_max, device or self.device, slots)

    def model_factory(self) -> Callable[[int], VAE]:
        """build_model as a function of the slot count alone, holding no reference to the population."""
        return functools.partial(build_vae, self.shape, self.splits.image_shape, self.latent_max, self.hidden_max,
                                 self.device)
