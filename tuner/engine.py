"""`Population`: N training runs of one shape, stepped together on one device.

Each slot is one trial: its own hyperparameters (tensors over slots), weights, optimizer moments and
step count, random stream (counter-based, :mod:`tuner.noise`), epoch clock, best state and patience.
One `run_epoch` trains every live slot for one epoch (same number of steps: same data and batch
size) and validates them; a slot that finishes or is stopped is `assign`-ed a new config while its
neighbours carry on. Slot losses are *summed* (never averaged: that would shrink every gradient by
1/N), gradient norms are clipped per slot, and a slot whose loss or gradient goes non-finite is
frozen at once and stopped with a reason at the end of the epoch.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from tuner import noise, schedules
from tuner.data import Splits
from tuner.models import VAE
from tuner.optim import StackedOptimizer

if TYPE_CHECKING:  # the engine imports with torch and numpy alone (no pydantic on a bare GPU box)
    from tuner.spec import TrainConfig

__all__ = ["EpochResult", "Population", "PopulationShape", "SlotState", "latent_size"]

CHECKPOINT_FORMAT = 1
_STREAM_PERM, _STREAM_STEP, _STREAM_BINARIZE, _STREAM_VALID = 11, 12, 13, 14
# the flat parameter's views are strided across slots; their gradients accumulate in place all the same
warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")
_EVAL_ELEMENTS = 1 << 23  # floats per validation batch across slots (bounds memory)

SlotStatus = Literal["empty", "running", "finished", "stopped"]


@dataclass(frozen=True)
class PopulationShape:
    """What slots of one population must share: everything that cannot be masked per slot.

    The model family is part of it (posterior, flow steps, prior, mixture components, hierarchy):
    each changes the set or the shapes of the weights. A field a family does not use is stored as
    its neutral value (flow_steps 0 unless iaf, prior_components 0 unless mog/vamp), so configs that
    differ only in an ignored field share a population. The ladder's latent2 is masked like latent.
    """

    arch: str
    depth: int
    channels: int
    likelihood: str
    batch_size: int
    optimizer: str
    posterior: str = "gaussian"
    flow_steps: int = 0
    prior: str = "normal"
    prior_components: int = 0
    hierarchy: str = "flat"

    @classmethod
    def of(cls, config: TrainConfig) -> PopulationShape:
        m = config.model
        channels = m.channels if m.arch == "conv" else 0
        return cls(
            m.arch, m.depth, channels, m.likelihood, config.optim.batch_size, config.optim.name,
            posterior=m.posterior, flow_steps=m.flow_steps if m.posterior == "iaf" else 0,
            prior=m.prior, prior_components=m.prior_components if m.prior != "normal" else 0,
            hierarchy=m.hierarchy,
        )


def latent_size(config: TrainConfig) -> int:
    """The most latent dims any level of this config needs: what a population's Zmax must hold."""
    m = config.model
    return max(m.latent, m.latent2) if m.hierarchy == "ladder" else m.latent


@dataclass
class SlotState:
    """Host-side bookkeeping of one slot (the device holds the tensors)."""

    config: TrainConfig | None = None
    status: SlotStatus = "empty"
    reason: str | None = None
    epoch: int = 0
    best_val: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class EpochResult:
    """One slot's epoch, as the worker and the progress bar see it (nats per example)."""

    slot: int
    epoch: int  # epochs completed by this slot
    train_loss: float
    train_neg_elbo: float
    val_neg_elbo: float
    val_recon: float
    val_kl: float
    kl_weight: float
    lr: float
    improved: bool
    status: SlotStatus
    reason: str | None


_HYPERPARAMETERS = (
    "lr", "lr_warmup", "lr_decay", "min_lr_ratio", "step_epochs", "step_gamma", "grad_clip",
    "kl_kind", "beta", "kl_warmup", "cycles", "ratio", "capacity", "free_bits", "epochs",
)


def _hyperparameters(config: TrainConfig) -> dict[str, float]:
    """A config's per-slot schedule values, as the tensors of :mod:`tuner.schedules` want them
    (named by _HYPERPARAMETERS, which sizes the tensors before any config exists)."""
    o, k = config.optim, config.kl
    values = (
        o.lr, o.warmup_epochs, schedules.LR_DECAYS.index(o.decay), o.min_lr_ratio, o.step_epochs, o.step_gamma,
        o.grad_clip if o.grad_clip > 0 else math.inf,
        schedules.KL_SCHEDULES.index(k.schedule), k.beta, k.warmup_epochs, k.cycles, k.ratio, k.capacity,
        k.free_bits, config.train.epochs,
    )
    return dict(zip(_HYPERPARAMETERS, values, strict=True))


_CODES = ("lr_decay", "kl_kind")


def _fit(t: Tensor, shape: torch.Size) -> Tensor:
    """Copy t into zeros of `shape` over their overlap (padded slot tensors between populations)."""
    if t.shape == shape:
        return t
    out = torch.zeros(shape, dtype=t.dtype)
    region = tuple(slice(0, min(a, b)) for a, b in zip(t.shape, shape))
    out[region] = t[region]
    return out


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


class Population:
    """N slots of one :class:`PopulationShape` training on one device."""

    def __init__(
        self, shape: PopulationShape, splits: Splits, *, slots: int, latent_max: int, hidden_max: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.shape, self.splits, self.slots = shape, splits, slots
        self.device = torch.device(device)
        self.latent_max, self.hidden_max = latent_max, hidden_max
        self.model = self._new_model(slots)
        self.params = list(self.model.parameters())
        self.names = [n for n, _ in self.model.named_parameters()]
        self.flat, self.offsets = _flatten(self.params)  # (S, P); self.params are views into it
        self.best_flat = self.flat.detach().clone()  # best-validation weights per slot
        self.best = [self.best_flat[:, a:b].view(p.shape) for p, (a, b) in zip(self.params, self.offsets)]
        self.optimizer = StackedOptimizer([self.flat], shape.optimizer, slots)
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
        m = config.model
        self.model.init_slot(
            slot, seed=config.seed, latent=m.latent, hidden=m.hidden, dropout=m.dropout, latent2=m.latent2
        )
        self.optimizer.reset_slot(slot)
        o = config.optim
        self.optimizer.configure_slot(slot, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, momentum=o.momentum)
        for name, value in _hyperparameters(config).items():
            self.hp[name][slot] = value
        self.seed[slot] = config.seed
        self.keys = noise.keys_from_seeds(self.seed)
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
        n, b, steps = self.splits.train.shape[0], self.shape.batch_size, self.steps_per_epoch
        live = self.live.clone()
        # a fresh permutation of the train split per slot and epoch, from the slot's own stream
        order = torch.argsort(noise.uniform(noise.derive(self.keys, _STREAM_PERM, self.epoch), (n,)), dim=1, stable=True)
        finite = torch.ones_like(live)
        sums = {k: torch.zeros(self.slots, device=self.device) for k in ("loss", "neg_elbo")}
        # 1. the epoch's schedules and noise keys, for all steps at once (steps, S): each value is
        #    taken at the end of its step (the LR warmup never takes a zero step)
        ticks = torch.arange(1, steps + 1, device=self.device).view(-1, 1)
        kl_ws, caps, lrs = self._schedule(self.epoch.to(torch.float32) + ticks / steps)
        all_keys = noise.derive(self.keys, _STREAM_STEP, self.step + ticks - 1)
        for t in range(steps):
            kl_w, cap, lr, step_keys = kl_ws[t], caps[t], lrs[t], all_keys[t]
            # 2. forward all slots; a non-finite slot is frozen (zero loss share, no update)
            x = self._batch(order[:, t * b : (t + 1) * b], step_keys)  # (S, B, D)
            out = self.model(x, step_keys, kl_w, cap, self.hp["free_bits"])
            ok = live & torch.isfinite(out.loss)
            # 3. backward on the SUM of slot losses: each slot gets exactly its own gradient
            self.flat.grad.zero_()
            torch.where(ok, out.loss, 0.0).sum().backward()
            if self._clipping:
                norms = self.optimizer.clip_grad_norm_(self.hp["grad_clip"])
            else:
                norms = self.optimizer.grad_norms()
            ok &= torch.isfinite(norms)
            # 4. update, then advance the clocks of live slots
            self.optimizer.step(torch.where(ok, lr, 0.0), ok)
            finite &= ok | ~live
            self.step += live
            sums["loss"] += torch.where(ok, out.loss.detach(), 0.0)
            sums["neg_elbo"] += torch.where(ok, out.neg_elbo.detach(), 0.0)
        self.epoch += live
        return {
            "loss": sums["loss"] / steps, "neg_elbo": sums["neg_elbo"] / steps, "finite": finite,
            "kl_weight": kl_w, "lr": lr,
        }

    @torch.no_grad()
    def validate(self, x: Tensor | None = None) -> dict[str, Tensor]:
        """Single-sample -ELBO (beta = 1), recon and KL of every slot on x (default: val split), (S,)."""
        self.model.eval()
        x = self.splits.val if x is None else x
        n, d = x.shape
        batch = max(1, min(n, _EVAL_ELEMENTS // (self.slots * d)))
        sums = {k: torch.zeros(self.slots, device=self.device) for k in ("neg_elbo", "recon", "kl")}
        zeros = torch.zeros(self.slots, device=self.device)
        for i, start in enumerate(range(0, n, batch)):
            xb = x[start : start + batch].unsqueeze(0).expand(self.slots, -1, -1)
            # fixed noise per (slot seed, batch): the curve moves only when the model does
            key = noise.derive(self.keys, _STREAM_VALID, i)
            out = self.model(xb, key, zeros + 1.0, zeros, zeros)
            for k in sums:
                sums[k] += getattr(out, k) * xb.shape[1]
        return {k: v / n for k, v in sums.items()}

    @torch.no_grad()
    def _keep_best(self, improved: Tensor) -> None:
        self.best_flat.copy_(torch.where(improved.view(-1, 1), self.flat, self.best_flat))

    def run_epoch(self) -> list[EpochResult]:
        """Train and validate every running slot for one epoch; update best state, patience, status."""
        running = self.running()
        if not running:
            return []
        train = self.train_epoch()
        val = self.validate()
        # note: the one host sync of the epoch
        train_h = {k: v.tolist() for k, v in train.items()}
        val_h = {k: v.tolist() for k, v in val.items()}
        improved = [False] * self.slots
        results = []
        for s in running:
            st, cfg = self.state[s], self.state[s].config
            st.epoch += 1
            v = val_h["neg_elbo"][s]
            if not train_h["finite"][s] or not math.isfinite(v):
                self.stop(s, f"non-finite loss or gradient in epoch {st.epoch} (lr {cfg.optim.lr:g}); slot frozen")
            elif v < st.best_val:
                st.best_val, st.best_epoch, st.bad_epochs, improved[s] = v, st.epoch, 0, True
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
                "epoch": st.epoch, "train_loss": train_h["loss"][s], "train_neg_elbo": train_h["neg_elbo"][s],
                "val_neg_elbo": v, "val_recon": val_h["recon"][s], "val_kl": val_h["kl"][s],
                "kl_weight": train_h["kl_weight"][s], "lr": train_h["lr"][s],
            }
            st.history.append(row)
            results.append(EpochResult(slot=s, improved=improved[s], status=st.status, reason=st.reason, **row))
        self._keep_best(torch.tensor(improved, device=self.device))
        return results

    # ------------------------------------------------------------------------ checkpoints
    def slot_checkpoint(self, slot: int) -> dict[str, Any]:
        """Everything to resume one slot anywhere: loads with torch.load(weights_only=True)."""
        st = self.state[slot]
        if st.config is None:
            raise ValueError(f"slot {slot} holds no run")
        return {
            "format": CHECKPOINT_FORMAT,
            "config": st.config.model_dump(mode="json"),
            "model": self._split(self.flat[slot].detach().cpu().clone()),
            "best": self._split(self.best_flat[slot].cpu().clone()),
            "optimizer": self._optimizer_state(slot),
            "step": int(self.step[slot]),
            "epoch": st.epoch,
            "status": st.status,
            "reason": st.reason,
            "best_val": st.best_val,
            "best_epoch": st.best_epoch,
            "bad_epochs": st.bad_epochs,
            "history": [dict(r) for r in st.history],
        }

    def _split(self, row: Tensor) -> dict[str, Tensor]:
        """One slot's flat (P,) CPU copy -> {parameter name: view}. Views, not copies: a checkpoint
        is one contiguous copy per tensor kind (torch.save writes the shared storage once), which
        keeps the per-epoch checkpoint to 4 copies instead of one per layer and kind."""
        return {n: row[a:b].view(p.shape[1:]) for n, p, (a, b) in zip(self.names, self.params, self.offsets)}

    def _optimizer_state(self, slot: int) -> dict[str, Any]:
        """The optimizer's slot state with each flat moment split per named parameter, so that it
        loads into a population with other latent/hidden maxima (another layout of the flat vector)."""
        out: dict[str, Any] = {}
        for key, value in self.optimizer.slot_state(slot).items():
            if key.endswith(".0"):  # a moment of the flat parameter, (P,)
                out[key] = self._split(value)
            else:
                out[key] = value
        return out

    def _load_optimizer_state(self, slot: int, saved: dict[str, Any]) -> None:
        state = {}
        for key, value in saved.items():
            if isinstance(value, dict):
                state[key] = torch.cat([_fit(value[n], p.shape[1:]).flatten() for n, p in zip(self.names, self.params)])
            else:
                state[key] = value
        self.optimizer.load_slot_state(slot, state)

    @torch.no_grad()
    def load_slot_checkpoint(self, slot: int, ckpt: dict[str, Any]) -> None:
        """Put a saved slot into `slot` of this population (maxima may differ; true sizes must fit)."""
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint format {ckpt.get('format')!r} is not {CHECKPOINT_FORMAT}")
        from tuner.spec import parse_config  # lazy: pydantic only where a checkpoint is read

        config = parse_config(ckpt["config"], source="checkpoint config")
        self.assign(slot, config)
        shapes = {n: p.shape[1:] for n, p in zip(self.names, self.params)}
        for n, p, b in zip(self.names, self.params, self.best):
            p[slot] = _fit(ckpt["model"][n], shapes[n]).to(self.device)
            b[slot] = _fit(ckpt["best"][n], shapes[n]).to(self.device)
        self._load_optimizer_state(slot, ckpt["optimizer"])
        self.step[slot] = ckpt["step"]
        self.epoch[slot] = ckpt["epoch"]
        st = self.state[slot]
        st.status, st.reason, st.epoch = ckpt["status"], ckpt["reason"], ckpt["epoch"]
        st.best_val, st.best_epoch, st.bad_epochs = ckpt["best_val"], ckpt["best_epoch"], ckpt["bad_epochs"]
        st.history = [dict(r) for r in ckpt["history"]]
        self.live[slot] = st.status == "running"

    @torch.no_grad()
    def slot_model(self, slot: int, best: bool = True) -> VAE:
        """A one-slot copy of a slot's model (its best-validation weights if `best`), in eval mode."""
        m = self.model
        single = self._new_model(1)
        source = self.best if best else self.params
        for p, src in zip(single.parameters(), source):
            p[0] = src[slot]
        for b, src in zip(single.buffers(), m.buffers()):  # masks and rates, all slot-major
            b[0] = src[slot]
        single._any_dropout = bool((single.dropout_rate > 0).any())
        return single.eval()

    def _new_model(self, slots: int) -> VAE:
        """A VAE of this population's shape and size maxima with `slots` slots, on its device."""
        shape = self.shape
        return VAE(
            arch=shape.arch, likelihood=shape.likelihood, image_shape=self.splits.image_shape, slots=slots,
            latent_max=self.latent_max, hidden_max=self.hidden_max, depth=shape.depth,
            channels=max(shape.channels, 1), posterior=shape.posterior, flow_steps=shape.flow_steps,
            prior=shape.prior, prior_components=shape.prior_components, hierarchy=shape.hierarchy,
        ).to(self.device)
