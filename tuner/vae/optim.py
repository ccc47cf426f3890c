"""A stacked optimizer: Adam / AdamW / SGD with momentum, hyperparameters per slot.

Every parameter's dim 0 is the slot axis S. ``torch.optim.Adam`` takes one lr per parameter group,
not a tensor over slots (pytorch issue 145461), and scaling the gradients instead does nothing
under Adam (it normalizes the scale away). So lr, betas, eps, weight decay, momentum and the step
count are (S,) tensors here, and each slot's update equals the torch optimizer's on that slot alone.

Per-slot guarantees (DESIGN "Population pitfalls" 1-3):
* each slot has its own step count for Adam's bias correction; :meth:`reset_slot` restarts it at 0,
  so a refilled slot's first update has the size of a fresh optimizer's;
* an inactive slot is not touched: parameters, moments and step count stay bit-identical;
* gradient clipping is per slot; every op is elementwise within a slot and inactive values are
  dropped with ``torch.where`` (never multiplied by 0), so NaN or Inf in one slot cannot reach another.

:meth:`step` and :meth:`clip_grad_norm_` loop over parameters, never over slots. Three ways to update
(``update``), one result within float rounding:

* ``per_slot`` (the CPU default): PyTorch's fused Adam/AdamW/SGD kernel per active slot, one pass over
  that slot's rows; reads the (S,) lr and active flags on the host (free on a CPU, a sync on a GPU);
* ``compiled`` (the CUDA default): :func:`_update`, a pure elementwise function of the parameter,
  its gradient and moments and (S, 1) per-slot tensors, under ``torch.compile``: one fused kernel
  that reads p, g and the moments once and writes them once. If compiling or running it fails,
  one warning, then ``vectorized`` for good;
* ``vectorized``: the same update as ~9 in-place eager passes over all slots (no compiler needed).

The compiled and vectorized paths read nothing back to the host, so they can run under CUDA graph
capture.

Two clocks per slot, for training the encoder and the decoder apart (He et al. 2019's aggressive
encoder training, :mod:`tuner.vae.aggressive`): :meth:`set_encoder_columns` splits the one (S, P)
parameter's columns into encoder and decoder, and :meth:`step_columns` updates one part (or both)
of some slots, the encoder's columns with the slot's ``encoder_steps`` clock and the decoder's with
``steps``, as two torch optimizers over the two parts would. :meth:`step` never reads
``encoder_steps``: a slot that does not use the split trains exactly as before.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from tuner.errors import TunerError

__all__ = ["OPTIMIZERS", "OPTIMIZER_HYPERPARAMETERS", "UPDATES", "StackedOptimizer"]

OPTIMIZERS = ("adam", "adamw", "sgd")
UPDATES = ("auto", "per_slot", "vectorized", "compiled")
_HYPERPARAMETERS = ("beta1", "beta2", "eps", "weight_decay", "momentum")
OPTIMIZER_HYPERPARAMETERS = _HYPERPARAMETERS  # the per-slot (S,) tensors besides ``steps``
_CLIP_EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_: coef = max_norm / (norm + 1e-6)


class StackedOptimizer:
    """Adam / AdamW / SGD-with-momentum over parameters whose dim 0 is the slot axis."""

    def __init__(
        self, params: list[torch.nn.Parameter], kind: Literal["adam", "adamw", "sgd"], slots: int,
        fused: bool | None = None, update: Literal["auto", "per_slot", "vectorized", "compiled"] = "auto",
    ) -> None:
        """update: how to update (module docstring); "auto" is "per_slot" on a CPU, where reading the
        (S,) lr and active flags is free, and "compiled" elsewhere. fused: the older spelling of
        update, True for "per_slot" and False for "vectorized" (see :attr:`fused`)."""
        params = list(params)
        if kind not in OPTIMIZERS:
            raise TunerError(f"optimizer kind must be one of {list(OPTIMIZERS)}, but got {kind=}")
        if update not in UPDATES:
            raise TunerError(f"optimizer update must be one of {list(UPDATES)}, but got {update=}")
        if not params:
            raise TunerError("StackedOptimizer got no parameters; pass the population's parameters")
        for i, p in enumerate(params):
            if p.dim() == 0 or p.shape[0] != slots:
                raise TunerError(
                    f"parameter {i} must have the slot axis first ({slots=}), but got shape {tuple(p.shape)}"
                )
        device = params[0].device
        self.params = params
        self.kind = kind
        self.slots = slots
        if fused is not None:
            update = "per_slot" if fused else "vectorized"
        if update == "auto":
            update = "per_slot" if device.type == "cpu" else "compiled"
        self.update: str = update
        # per-slot hyperparameters and clock, (S,) float32; defaults as tuner.spec.OptimConfig
        f32 = dict(dtype=torch.float32, device=device)
        self.beta1 = torch.full((slots,), 0.9, **f32)
        self.beta2 = torch.full((slots,), 0.999, **f32)
        self.eps = torch.full((slots,), 1e-8, **f32)
        self.weight_decay = torch.zeros(slots, **f32)
        self.momentum = torch.full((slots,), 0.9, **f32)
        self.steps = torch.zeros(slots, **f32)  # updates taken since the slot's last reset
        self.encoder_steps = torch.zeros(slots, **f32)  # encoder updates by step_columns (two clocks)
        self._segments: dict[str, list[tuple[int, int]]] = {}  # set_encoder_columns: part -> column ranges
        self._encoder_columns: Tensor | None = None  # (P,) bool
        self._decay = False  # host-side: does any slot use weight decay (skips a pass when none does)
        # state per parameter, allocated up front (graph-safe: no lazy init inside step)
        names = ("momentum_buffer",) if kind == "sgd" else ("exp_avg", "exp_avg_sq")
        self.state: dict[str, list[Tensor]] = {
            name: [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params] for name in names
        }
        # reused temporaries: a fresh multi-MB tensor per step costs page faults on every step
        self._scratch = [torch.empty_like(p) for p in params] if kind != "sgd" else []

    @property
    def fused(self) -> bool:
        """Whether updates take the per-slot fused kernels; setting False picks the vectorized path."""
        return self.update == "per_slot"

    @fused.setter
    def fused(self, value: bool) -> None:
        self.update = "per_slot" if value else "vectorized"

    # ---- per-slot configuration ---------------------------------------------------------------

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.slots:
            raise TunerError(f"slot must be in [0, {self.slots}), but got {slot=}")

    def configure_slot(
        self, slot: int, *, betas: tuple[float, float], eps: float, weight_decay: float, momentum: float
    ) -> None:
        """Set one slot's hyperparameters (betas/eps for Adam(W), momentum for SGD, all: weight decay)."""
        self._check_slot(slot)
        if not all(0.0 <= b < 1.0 for b in betas):
            raise TunerError(f"betas must be in [0, 1), but got {list(betas)}; e.g. [0.9, 0.999]")
        if eps <= 0 or weight_decay < 0 or not 0.0 <= momentum < 1.0:
            raise TunerError(
                "need eps > 0, weight_decay >= 0, 0 <= momentum < 1, "
                f"but got {eps=}, {weight_decay=}, {momentum=}"
            )
        for name, value in zip(_HYPERPARAMETERS, (*betas, eps, weight_decay, momentum)):
            getattr(self, name)[slot] = value
        self._decay = bool((self.weight_decay > 0).any())

    def reset_slot(self, slot: int) -> None:
        """Zero the slot's moments / momentum buffer and its step count (a refilled slot starts fresh)."""
        self._check_slot(slot)
        for buffers in self.state.values():
            for buf in buffers:
                buf[slot].zero_()
        self.steps[slot] = 0.0
        self.encoder_steps[slot] = 0.0

    # ---- the update ---------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, lr: Tensor, active: Tensor) -> None:
        """One update of every active slot. lr: (S,) float; active: (S,) bool.

        Inactive slots keep parameters, state and step count bit-identical, whatever their gradients
        hold. Parameters without a gradient are skipped.
        """
        self.steps.copy_(self.steps + active.to(self.steps.dtype))
        if self.update == "per_slot":
            self._fused_step(lr, active)
            return
        todo = [i for i, p in enumerate(self.params) if p.grad is not None]
        if self.update == "compiled":
            todo = self._compiled_step(lr, active, todo)
        for i in todo:
            p = self.params[i]
            view = (self.slots,) + (1,) * (p.dim() - 1)  # broadcasts (S,) over the slot's elements
            on = active.view(view)
            if self.kind == "sgd":
                self._sgd(p, i, lr.view(view), on, view)
            else:
                self._adam(p, i, lr.view(view), on, view)

    def _compiled_step(self, lr: Tensor, active: Tensor, todo: list[int]) -> list[int]:
        """:func:`_update` under torch.compile for each parameter in ``todo``; returns those left to
        update (all from the first failure on: a parameter is updated by one path, exactly once)."""
        for n, i in enumerate(todo):
            p = self.params[i]
            view = (self.slots,) + (1,) * (p.dim() - 1)
            hp = [getattr(self, name).view(view) for name in ("beta1", "beta2", "eps", "weight_decay", "momentum")]
            buffers = [bufs[i] for bufs in self.state.values()]
            try:
                _compiled()(
                    p, p.grad, *buffers, *([None] if self.kind == "sgd" else []),
                    lr.view(view), active.view(view), *hp, self.steps.view(view), self.kind,
                )
            except Exception as error:  # noqa: BLE001 - any compiler or backend failure: fall back
                warnings.warn(
                    f"StackedOptimizer: the compiled {self.kind} update failed ({type(error).__name__}: "
                    f"{str(error).splitlines()[0] if str(error) else ''}); using the vectorized update from now on",
                    RuntimeWarning, stacklevel=3,
                )
                self.update = "vectorized"
                return todo[n:]
        return []

    def _fused_step(self, lr: Tensor, active: Tensor) -> None:
        """One fused kernel call per active slot over that slot's rows (inactive: not touched)."""
        # note: .tolist() is a host sync, free on CPU; the vectorized path avoids it on GPUs
        lrs, on = lr.tolist(), active.tolist()
        hp = {name: getattr(self, name).tolist() for name in _HYPERPARAMETERS}
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        for s in (s for s in range(self.slots) if on[s]):
            pieces = [(self.params[i], i, slice(None)) for i in live]
            self._fused_slot(s, pieces, [self.steps[s]] * len(live), lrs[s], hp)

    def _fused_slot(self, s: int, pieces: list[tuple[Tensor, int, slice]], steps: list[Tensor], lr: float,
                    hp: dict[str, list[float]]) -> None:
        """The fused kernel on slot s of each (parameter, its index, columns) piece, Adam's clock
        ``steps[j]`` for piece j."""
        def rows(tensors: list[Tensor]) -> list[Tensor]:  # slot s's columns of each piece
            return [t[s] if cols == slice(None) else t[s, cols] for t, (_, _, cols) in zip(tensors, pieces)]

        params = rows([p for p, _, _ in pieces])
        grads = rows([p.grad for p, _, _ in pieces])
        if self.kind == "sgd":
            # momentum 0 is plain SGD, for which the kernel takes no buffers
            buffers = rows([self.state["momentum_buffer"][i] for _, i, _ in pieces]) if hp["momentum"][s] > 0 else []
            torch._fused_sgd_(
                params, grads, buffers,
                weight_decay=hp["weight_decay"][s], momentum=hp["momentum"][s], lr=lr, dampening=0.0,
                nesterov=False, maximize=False, is_first_step=False,  # zeroed buffer: b = g on step 1
            )
            return
        fused = torch._fused_adam_ if self.kind == "adam" else torch._fused_adamw_
        fused(
            params, grads, rows([self.state["exp_avg"][i] for _, i, _ in pieces]),
            rows([self.state["exp_avg_sq"][i] for _, i, _ in pieces]), [], steps,
            lr=lr, beta1=hp["beta1"][s], beta2=hp["beta2"][s], weight_decay=hp["weight_decay"][s],
            eps=hp["eps"][s], amsgrad=False, maximize=False,
        )

    # ---- two clocks: the encoder's and the decoder's columns apart ------------------------------

    def set_encoder_columns(self, encoder: Tensor) -> None:
        """Split the one (S, P) parameter's columns: encoder (P,) bool, True for the encoder's."""
        if len(self.params) != 1 or self.params[0].dim() != 2 or encoder.shape != self.params[0].shape[1:]:
            raise TunerError(
                f"set_encoder_columns needs one (S, P) parameter and a (P,) mask, but got "
                f"{[tuple(p.shape) for p in self.params]} and {tuple(encoder.shape)}"
            )
        flags = encoder.bool().tolist()  # a host mask: read once, when the population is built
        runs: dict[bool, list[tuple[int, int]]] = {True: [], False: []}
        start = 0
        for j in range(1, len(flags) + 1):
            if j == len(flags) or flags[j] != flags[start]:
                runs[flags[start]].append((start, j))
                start = j
        self._segments = {"encoder": runs[True], "decoder": runs[False]}
        self._encoder_columns = encoder.to(device=self.steps.device, dtype=torch.bool)

    @torch.no_grad()
    def step_columns(self, lr: Tensor, active: Tensor, part: Literal["encoder", "decoder", "both"]) -> None:
        """Update one part of the active slots: the encoder's columns (its clock ``encoder_steps``
        advances), the decoder's (``steps`` advances), or both, each with its own clock. lr (S,),
        active (S,) bool; inactive slots and the other part keep every bit (moments included)."""
        if self._encoder_columns is None:
            raise TunerError("step_columns needs set_encoder_columns first")
        on_f = active.to(self.steps.dtype)
        if part != "decoder":
            self.encoder_steps.copy_(self.encoder_steps + on_f)
        if part != "encoder":
            self.steps.copy_(self.steps + on_f)
        p = self.params[0]
        if self.update == "per_slot":
            lrs, on = lr.tolist(), active.tolist()
            hp = {name: getattr(self, name).tolist() for name in _HYPERPARAMETERS}
            parts = ("encoder", "decoder") if part == "both" else (part,)
            for s in (s for s in range(self.slots) if on[s]):
                pieces, steps = [], []
                for name in parts:
                    clock = self.encoder_steps[s] if name == "encoder" else self.steps[s]
                    pieces += [(p, 0, slice(a, b)) for a, b in self._segments[name]]
                    steps += [clock] * len(self._segments[name])
                self._fused_slot(s, pieces, steps, lrs[s], hp)
            return
        # vectorized / compiled: one elementwise update with (S, P) masks and clocks
        enc = self._encoder_columns.view(1, -1)
        cols = {"encoder": enc, "decoder": ~enc, "both": torch.ones_like(enc)}[part]
        view = (self.slots, 1)
        steps = torch.where(enc, self.encoder_steps.view(view), self.steps.view(view))
        hp = [getattr(self, name).view(view) for name in _HYPERPARAMETERS]
        buffers = [bufs[0] for bufs in self.state.values()] + ([None] if self.kind == "sgd" else [])
        args = (p, p.grad, *buffers, lr.view(view), active.view(view) & cols, *hp, steps, self.kind)
        if self.update == "compiled":
            try:
                _compiled()(*args)
                return
            except Exception as error:  # noqa: BLE001 - as _compiled_step: fall back for good
                warnings.warn(f"StackedOptimizer: the compiled column update failed ({type(error).__name__}); "
                              "using the vectorized update from now on", RuntimeWarning, stacklevel=2)
                self.update = "vectorized"
        _update(*args)

    def _adam(self, p: Tensor, i: int, lr: Tensor, on: Tensor, view: tuple[int, ...]) -> None:
        # In-place passes with per-slot coefficients that are exactly 0 (or 1) for inactive slots,
        # instead of computing new tensors and picking with torch.where: ~9 passes, few allocations.
        exp_avg, exp_avg_sq = self.state["exp_avg"][i], self.state["exp_avg_sq"][i]
        on_f = on.to(p.dtype)
        beta1, beta2 = self.beta1.view(view), self.beta2.view(view)
        wd = self.weight_decay.view(view)
        # inactive slots did not advance; clamp so their (unused) bias corrections stay finite
        steps = self.steps.clamp_min(1.0).view(view)
        # an inactive slot's gradient may hold NaN/Inf or values whose square overflows: select 0
        # for it (a select, not a product: 0 * NaN is NaN), so every update term of it is exactly 0
        grad = torch.where(on, p.grad, 0.0)
        if self.kind == "adam" and self._decay:
            grad.addcmul_(p, wd)  # L2 penalty in the gradient
        exp_avg.lerp_(grad, (1.0 - beta1) * on_f)  # (S, ...) first moment; weight 0 keeps it exactly
        scratch = torch.mul(grad, grad, out=self._scratch[i])
        exp_avg_sq.lerp_(scratch, (1.0 - beta2) * on_f)  # second moment
        # p -= step * m / (sqrt(v) / bc2 + eps)  with  step = lr / bc1, written as
        # p -= m / ((sqrt(v) + eps * bc2) / (bc2 * step)): the divisor is > 0 before the last
        # division, so an inactive slot (step 0) gets +inf and an update of exactly 0
        bc2 = (1.0 - beta2**steps).sqrt()
        step_size = (lr / (1.0 - beta1**steps)) * on_f  # (S, 1, ...)
        denom = torch.sqrt(exp_avg_sq, out=scratch).add_(self.eps.view(view) * bc2).div_(bc2 * step_size)
        if self.kind == "adamw" and self._decay:
            p.mul_(1.0 - lr * wd * on_f)  # decoupled weight decay
        p.addcdiv_(exp_avg, denom, value=-1.0)

    def _sgd(self, p: Tensor, i: int, lr: Tensor, on: Tensor, view: tuple[int, ...]) -> None:
        buf = self.state["momentum_buffer"][i]
        on_f = on.to(p.dtype)
        grad = torch.where(on, p.grad, 0.0)
        if self._decay:
            grad.addcmul_(p, self.weight_decay.view(view))
        # b = momentum * b + g (inactive: b * 1 + 0); a zeroed buffer makes the first step b = g
        buf.mul_(torch.where(on, self.momentum.view(view), 1.0)).addcmul_(grad, on_f)
        p.addcmul_(buf, -lr * on_f)

    @torch.no_grad()
    def grad_norms(self) -> Tensor:
        """Each slot's global gradient norm over all parameters, (S,) (NaN/Inf where a slot's are)."""
        sq = torch.zeros(self.slots, dtype=torch.float32, device=self.steps.device)
        for p in self.params:
            if p.grad is not None:
                sq = sq + torch.linalg.vector_norm(p.grad.reshape(self.slots, -1), dim=1).float().square()
        return sq.sqrt()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: Tensor) -> Tensor:
        """Clip each slot's gradients to its own global norm ``max_norm`` (S,); 0 or inf: no clipping.

        Returns the pre-clip norms (S,) over all parameters' gradients of each slot, as
        ``torch.nn.utils.clip_grad_norm_`` on that slot alone. A slot whose norm is NaN or Inf is
        left as is (its update is the NaN guard's business, not its neighbours').
        """
        grads = [p.grad for p in self.params if p.grad is not None]
        norms = self.grad_norms()  # (S,)
        clip = (max_norm > 0) & torch.isfinite(max_norm) & torch.isfinite(norms)
        coef = torch.where(clip, (max_norm / (norms + _CLIP_EPS)).clamp(max=1.0), 1.0)  # (S,)
        for g in grads:
            g.mul_(coef.view((self.slots,) + (1,) * (g.dim() - 1)).to(g.dtype))
        return norms

    # ---- checkpoints --------------------------------------------------------------------------

    def slot_state(self, slot: int) -> dict[str, Tensor]:
        """One slot's state as CPU tensors: ``{name}.{param index}`` moments, ``steps``, hyperparameters.

        Loadable with ``torch.load(weights_only=True)``, and into any slot index.
        """
        self._check_slot(slot)
        state = {
            f"{name}.{i}": buf[slot].detach().cpu().clone()
            for name, bufs in self.state.items()
            for i, buf in enumerate(bufs)
        }
        for name in ("steps", "encoder_steps", *_HYPERPARAMETERS):
            state[name] = getattr(self, name)[slot].detach().cpu().clone()
        return state

    def load_slot_state(self, slot: int, state: dict[str, Tensor]) -> None:
        """Load a :meth:`slot_state` dict into ``slot`` (which may differ from the slot it came from)."""
        self._check_slot(slot)
        expected = {f"{name}.{i}" for name, bufs in self.state.items() for i in range(len(bufs))}
        expected |= {"steps", *_HYPERPARAMETERS}
        state = {"encoder_steps": torch.zeros(()), **state}  # absent from states saved before the two clocks
        expected.add("encoder_steps")
        if set(state) != expected:
            raise TunerError(
                f"optimizer state does not fit this {self.kind} optimizer: "
                f"missing {sorted(expected - set(state))}, unexpected {sorted(set(state) - expected)}; "
                "load a checkpoint saved by the same optimizer and model"
            )
        for name, bufs in self.state.items():
            for i, buf in enumerate(bufs):
                value = state[f"{name}.{i}"]
                if value.shape != buf.shape[1:]:
                    raise TunerError(
                        f"optimizer state '{name}.{i}' has shape {tuple(value.shape)}, but the parameter's "
                        f"slot has {tuple(buf.shape[1:])}; load a checkpoint saved with the same model shape"
                    )
                buf[slot].copy_(value)
        for name in ("steps", "encoder_steps", *_HYPERPARAMETERS):
            getattr(self, name)[slot] = state[name].to(torch.float32)
        self._decay = bool((self.weight_decay > 0).any())


_compiled_update: Callable[..., None] | None = None  # torch.compile(_update), made by _compiled()


def _compiled() -> Callable[..., None]:
    """The compiled update, made on first use (importing this module stays compiler-free)."""
    global _compiled_update
    if _compiled_update is None:
        _compiled_update = torch.compile(_update, fullgraph=True)
    return _compiled_update


def _update(
    p: Tensor, grad: Tensor, buf1: Tensor, buf2: Tensor | None, lr: Tensor, on: Tensor, beta1: Tensor,
    beta2: Tensor, eps: Tensor, weight_decay: Tensor, momentum: Tensor, steps: Tensor, kind: str,
) -> None:
    """One Adam / AdamW / SGD update of every active slot of p (S, ...), written in place.

    buf1, buf2: exp_avg and exp_avg_sq (Adam, AdamW), or SGD's momentum buffer and None. lr, on
    (bool), the hyperparameters and steps (the slot's update count, this one included) are
    (S, 1, ...) and broadcast over the slot's elements. A pure elementwise function of tensors (the
    one host value, kind, is a compile-time constant), so torch.compile fuses it into one kernel
    and a CUDA graph can capture it. Weight decay is always applied: 0 leaves a finite value exactly
    as it was, and one kernel has no pass to save. Inactive slots keep every bit: their new values
    are dropped with ``torch.where`` (a select: NaN or Inf computed for them goes nowhere).
    """
    g = torch.where(on, grad, 0.0)
    if kind != "adamw":
        g = g + weight_decay * p  # L2 penalty in the gradient (Adam, SGD)
    if kind == "sgd":
        buf = momentum * buf1 + g  # a zeroed buffer makes the first step b = g, as torch.optim.SGD
        heavy = momentum > 0  # momentum 0: plain SGD, the buffer is not used (nor written)
        buf1.copy_(torch.where(on & heavy, buf, buf1))
        p.copy_(torch.where(on, p - lr * torch.where(heavy, buf, g), p))
        return
    m = torch.lerp(buf1, g, 1.0 - beta1)  # (S, ...) first moment
    v = beta2 * buf2 + (1.0 - beta2) * g * g  # second moment
    t = steps.clamp_min(1.0)  # inactive slots did not advance; keep their (dropped) corrections finite
    denom = v.sqrt() / (1.0 - beta2**t).sqrt() + eps
    new = p * (1.0 - lr * weight_decay) if kind == "adamw" else p  # decoupled weight decay
    new = new - (lr / (1.0 - beta1**t)) * m / denom
    buf1.copy_(torch.where(on, m, buf1))
    buf2.copy_(torch.where(on, v, buf2))
    p.copy_(torch.where(on, new, p))
