"""Aggressive encoder training, per slot (He, Spokoyny, Neubig and Berg-Kirkpatrick, "Lagging
Inference Networks and Posterior Collapse in Variational Autoencoders", ICLR 2019, arXiv 1901.05534).

He et al. see collapse start early in training, when the encoder lags behind the true posterior
and the decoder learns to ignore z. Their remedy (Algorithm 1): before each decoder update, train
the encoder alone on fresh minibatches until its loss stops improving, then take one
decoder-only update; after the aggressive phase, ordinary joint training. Here a slot's phase is
its first ``train.aggressive_epochs`` epochs (they stop it when the mutual information stops
rising; a fixed count keeps the run a function of its config).

The inner loop, per outer step of an epoch in which some slot is in its phase: up to MAX_INNER
encoder-only steps, each on a fresh minibatch drawn (with replacement) from the slot's own noise
stream; every CHECK_EVERY steps a slot compares the sum of its last CHECK_EVERY losses with the
window before and stops when it is not lower (so at least 2 * CHECK_EVERY steps). Each slot stops
on its own: the loop runs while any slot goes on, a stopped slot's loss is masked out (exactly zero
gradient) and it takes no update (parameters, moments and clocks keep every bit). The loop's
stop test reads one flag back to the host every CHECK_EVERY steps: free on a CPU, a sync on CUDA,
so a population with a slot in its phase trains eagerly (no CUDA graph) in those epochs.

Which weights are the encoder's (phi) and which the decoder's (theta), by parameter name:
ENCODER_PREFIXES, everything that computes q(z|x): the encoder's convolutions, hidden layers and
heads, the IAF flow, the ladder's bottom-up path to q(z2|x) (``ladder.up*``), and a mixture of
encoders (``mixture``). Everything else is the generative model: the decoder, its Gaussian
log-scale, a learned prior (MoG, VampPrior's pseudo-inputs, a diffusion prior), the auxiliary
decoder, and the ladder's top-down p(z1|z2) (``ladder.down*``: it is the prior of z1, shared with q
by construction); an unknown name is the decoder's too.

Two Adam clocks: He et al. use one optimizer for the encoder and one for the decoder, so each part's
bias correction counts its own updates (:meth:`tuner.vae.optim.StackedOptimizer.step_columns`). A
slot with ``aggressive_epochs > 0`` keeps the two clocks after its phase (joint updates, each part on
its clock); a slot without takes the optimizer's ordinary step, bit for bit as without this module.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from tuner.vae import noise

if TYPE_CHECKING:
    from tuner.vae.engine import Population

__all__ = ["CHECK_EVERY", "ENCODER_PREFIXES", "MAX_INNER", "AggressiveSteps", "encoder_columns", "is_encoder"]

ENCODER_PREFIXES = ("conv_enc.", "enc_hidden.", "enc_mu.", "enc_logvar.", "flow.", "ladder.up", "mixture")
MAX_INNER = 100  # encoder steps per decoder step at most (He et al.)
CHECK_EVERY = 10  # encoder steps per convergence check (He et al.'s image models)
_STREAM_INNER = 15  # the engine's streams are 11-14


def is_encoder(name: str) -> bool:
    """Whether a parameter (VAE.named_parameters name) belongs to the encoder q(z|x) (module docstring)."""
    return name.startswith(ENCODER_PREFIXES)


def encoder_columns(names: list[str], offsets: list[tuple[int, int]]) -> Tensor:
    """(P,) bool on the host over the population's flat weight row: True on the encoder's columns."""
    width = offsets[-1][1] if offsets else 0
    mask = torch.zeros(width, dtype=torch.bool)
    for name, (a, b) in zip(names, offsets, strict=True):
        mask[a:b] = is_encoder(name)
    return mask


def in_use(pop: Population) -> bool:
    """Host-side: does any running slot train with aggressive_epochs > 0 (and so with two clocks)."""
    return any(pop.state[s].config.train.aggressive_epochs > 0 for s in pop.running())


def in_phase(pop: Population) -> bool:
    """Host-side: is any running slot in its aggressive phase this epoch."""
    return any(pop.state[s].epoch < pop.state[s].config.train.aggressive_epochs for s in pop.running())


class AggressiveSteps:
    """One epoch's hook into the engine's step loop, made where :func:`in_use` holds: the inner
    encoder loop before each step (:meth:`encoder_steps`) and the step's update (:meth:`update`)."""

    def __init__(self, pop: Population) -> None:
        self.pop = pop
        epochs = pop.hp["aggressive_epochs"]
        self.two_clocks = epochs > 0  # (S,) slots that keep the encoder's clock apart
        self.phase = pop.live & (pop.epoch.to(epochs.dtype) < epochs)  # (S,) slots in their phase now
        self.finite = torch.ones_like(self.phase)  # (S,) every inner step of the epoch finite
        self.inner = torch.zeros(pop.slots, device=pop.device)  # (S,) inner steps taken this epoch
        self.inner_on = in_phase(pop)  # host: run the inner loop at all

    def encoder_steps(self, t: int, lr: Tensor, kl_w: Tensor, cap: Tensor) -> None:
        """Before the epoch's step t: the encoder-only loop of the slots in their phase (module
        docstring). lr, kl_w, cap (S,): the step's schedule values."""
        if not self.inner_on:
            return
        pop, b, n = self.pop, self.pop.shape.batch_size, self.pop.splits.train.shape[0]
        base = noise.derive(pop.keys, _STREAM_INNER, pop.step + t)  # (S,) from the step's noise clock
        going = self.phase & self.finite
        window = torch.zeros(pop.slots, device=pop.device)
        best = torch.full_like(window, float("inf"))
        for i in range(MAX_INNER):
            if i % CHECK_EVERY == 0:
                if i:  # a slot goes on while its last window's loss beats the one before
                    going = going & (window < best)
                    best, window = torch.where(going, window, best), torch.zeros_like(window)
                if not bool(going.any()):  # note: a host read (a sync on CUDA), every CHECK_EVERY steps
                    break
            keys = noise.derive(base, i)
            idx = (noise.uniform(noise.derive(keys, _STREAM_INNER), (b,)) * n).long().clamp_(max=n - 1)  # (S, B) a fresh batch
            loss = self._loss(pop._batch(idx, keys), keys, kl_w, cap)
            ok = going & torch.isfinite(loss)
            pop.flat.grad.zero_()
            torch.where(ok, loss, 0.0).sum().backward()  # zero gradient for every slot not going
            norms = pop.optimizer.clip_grad_norm_(pop.hp["grad_clip"]) if pop._clipping else pop.optimizer.grad_norms()
            ok &= torch.isfinite(norms)
            pop.optimizer.step_columns(torch.where(ok, lr, 0.0), ok, "encoder")
            self.finite &= ok | ~going
            self.inner += going
            window += torch.where(ok, loss.detach(), 0.0)
            going = ok

    def _loss(self, x: Tensor, keys: Tensor, kl_w: Tensor, cap: Tensor) -> Tensor:
        """Each slot's training loss (S,) on x (S, B, D), as the engine's step computes it."""
        pop = self.pop
        bf16 = pop.precision == "bf16"
        with torch.autocast(pop.device.type, torch.bfloat16, cache_enabled=False) if bf16 else nullcontext():
            out = pop.model(x, keys, kl_w, cap, pop.hp["free_bits"], samples=pop.shape.samples,
                            iwae=pop.shape.objective == "iwae")
        return out.loss.float()

    def update(self, lr: Tensor, ok: Tensor) -> Tensor:
        """The step's update of the slots ``ok`` (S,) bool at lr (S,): plain slots the optimizer's
        own step; slots in their phase the decoder's columns alone (He et al.); slots past it both
        parts, each on its clock. Returns ok less the slots whose inner steps went non-finite."""
        ok = ok & self.finite
        lr = torch.where(ok, lr, 0.0)
        opt = self.pop.optimizer
        opt.step(lr, ok & ~self.two_clocks)
        if self.inner_on:
            opt.step_columns(lr, ok & self.phase, "decoder")
        opt.step_columns(lr, ok & self.two_clocks & ~self.phase, "both")
        return ok
