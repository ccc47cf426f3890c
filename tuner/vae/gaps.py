"""Amortization and approximation gaps of a population of VAEs (Cremer, Li & Duvenaud 2018).

A VAE's -ELBO is -log p(x) plus two gaps, in nats per example:

    -ELBO(q_enc)  =  -log p(x)  +  approximation gap  +  amortization gap
    approximation gap = -ELBO(q*) - (-log p(x))        q* = the best posterior of the family for x
    amortization gap  = -ELBO(q_enc) - (-ELBO(q*))    q_enc = what the encoder outputs for x

The approximation gap is what the posterior *family* costs (a diagonal Gaussian cannot fit a
correlated or multi-modal true posterior): a richer family (a flow) shrinks it. The amortization
gap is what sharing one *encoder* across all x costs: a larger or better-trained encoder shrinks
it. Which of the two dominates says which change to a model pays.

What is estimated (:func:`estimate_gaps`), for every slot at once, on the first ``examples`` rows
--------------------------------------------------------------------------------------------------
* ``neg_elbo_amortized``: -ELBO (beta = 1) of ``model.local_posterior(x)``, averaged over
  ``EVAL_SAMPLES`` reparameterized samples per example.
* ``neg_elbo_optimized``: the same, with the same noise, after each example's own local posterior
  parameters were optimized: started at the encoder's output, ``steps`` Adam steps at a fixed
  ``lr`` on ``model.neg_elbo_local`` with ``STEP_SAMPLES`` fresh samples per step, the model's
  weights frozen (gradients are taken with respect to the local parameters only).
* ``iwae_nll``: the IWAE bound with K = max(GAP_IWAE_K, k) samples, the encoder's q as proposal
  (:func:`tuner.vae.metrics.iwae_nll`), standing in for -log p(x).

``amortization_gap = neg_elbo_amortized - neg_elbo_optimized`` and
``approximation_gap = neg_elbo_optimized - iwae_nll``; both are data means (nats per example).
Everything runs in eval mode (no dropout), and the code touches the posterior only through
``local_posterior`` / ``neg_elbo_local``, so it measures every model family the same way.

Why these are bounds, not the gaps themselves
---------------------------------------------
Finitely many noisy gradient steps from the encoder's guess reach *a* member of the family, not
the best one (the objective is non-convex and the steps stop early): the optimized -ELBO can only
be an upper bound on the -ELBO of q*. So the amortization gap printed here is a lower bound on the
true one (more steps can only raise it), and the approximation gap is an upper bound on the true
one *as far as the optimizer is concerned*, lowered again by the IWAE stand-in: IWAE_K is itself an
upper bound on -log p(x) (tighter as K grows; loose when the encoder is a poor proposal). So a
weak or barely trained encoder can even give a slightly negative approximation gap (measured:
-0.2 nats after 2 epochs): there the optimized posterior beats IWAE with the encoder as proposal,
and the number means "the family is not the bottleneck". The default settings (100 steps at lr
0.03, one sample a step) find 4.84 nats of amortization gap on the default MNIST MLP (z 32, h 512,
10 epochs, 128 test examples) where 500 steps with 2 samples at lr 0.01 find 5.25: about 92%.

Noise
-----
Evaluation noise is fixed, per example, by :mod:`tuner.vae.noise`: sample j of example i (row i of
x) draws from ``derive(key, stream, i)`` then ``derive(., j)``, with the key from ``seed``, so
the result is a pure function of (model, x, seed, settings): not of the chunking, the slot's
neighbours or the population's size. Both -ELBOs use the *same* draws (common random numbers),
so the amortization gap's own noise is far below either -ELBO's. Both standard errors are
computed from the samples and returned (``amortization_gap_se``, ``approximation_gap_se``, one
sd of the mean over examples x samples); the second covers the optimized -ELBO only, not the IWAE
term. Optimization steps draw fresh noise per step from a separate stream, so the optimized
posteriors are never fitted to the evaluation draws. On the default MNIST MLP above both
standard errors are 0.04 nats; over seeds 0, 1, 2 the amortization gap read 4.84, 4.87, 4.84 and
the approximation gap 1.66, 1.55, 1.60 (its IWAE term moves by 0.07 nats), against gaps of
several nats.

Cost
----
About ``examples * (2 * EVAL_SAMPLES + 3 * steps * STEP_SAMPLES + K)`` decoder passes: K = 1000
dominates. For the default MLP and 128 examples, about 4 s of one CPU core (measured), about
three quarters of the test split's own metrics (1000 examples, K = 200).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from tuner.errors import TunerError
from tuner.vae import noise
from tuner.vae.metrics import MAX_ELEMENTS, iwae_nll, slot_seeds

if TYPE_CHECKING:  # this module imports with torch and numpy alone (no pydantic on a bare GPU box)
    from tuner.spec import TrainConfig

__all__ = ["EVAL_SAMPLES", "GAP_IWAE_K", "STEP_SAMPLES", "Gaps", "estimate_gaps", "trial_gaps"]

GAP_IWAE_K = 1000  # importance samples standing in for -log p(x) (Cremer et al. use AIS and IWAE-5000)
EVAL_SAMPLES = 64  # samples per example for each -ELBO that is compared (see Noise above)
STEP_SAMPLES = 1  # samples per example per optimization step: noisy gradients, fresh each step

# Stream ids folded into the seed key: one independent noise stream per use.
_EVAL_STREAM, _STEP_STREAM, _IWAE_STREAM = 20, 21, 22


@dataclass
class Gaps:
    """Gaps of S slots on one subset; every tensor (S,) on the CPU, nats per example (data means)."""

    neg_elbo_amortized: Tensor  # -ELBO of the encoder's posteriors
    neg_elbo_optimized: Tensor  # -ELBO of the per-example optimized posteriors (same noise)
    iwae_nll: Tensor  # IWAE bound with iwae_k importance samples, the stand-in for -log p(x)
    amortization_gap: Tensor  # neg_elbo_amortized - neg_elbo_optimized
    approximation_gap: Tensor  # neg_elbo_optimized - iwae_nll
    amortization_gap_se: Tensor  # MC standard error of amortization_gap
    approximation_gap_se: Tensor  # MC standard error of neg_elbo_optimized (the IWAE term excluded)
    examples: int
    steps: int
    iwae_k: int

    def slot(self, s: int) -> dict[str, Any]:
        """Slot s as plain python values: the user attrs of a trial and the keys of metrics.json."""
        return {
            "amortization_gap": float(self.amortization_gap[s]),
            "approximation_gap": float(self.approximation_gap[s]),
            "amortization_gap_se": float(self.amortization_gap_se[s]),
            "approximation_gap_se": float(self.approximation_gap_se[s]),
            "gap_examples": self.examples,
            "gap_steps": self.steps,
            "gap_iwae_k": self.iwae_k,
        }


@contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and weights that take no gradient, for the block; both restored after.

    Why requires_grad off and not only autograd.grad on the local tensors: backward would still
    compute every weight's gradient on the way (measured: twice the optimization's cost on CPU)."""
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)


def _chunks(n: int, rows: int) -> Iterator[slice]:
    for start in range(0, n, rows):
        yield slice(start, min(start + rows, n))


def _per_sample_neg_elbo(
    model: Any, x: Tensor, local: dict[str, Tensor], keys: Tensor, samples: int, max_elements: int
) -> Tensor:
    """(S, B, samples) -ELBO of each example under each of its evaluation draws, no grad.

    Sample j of example b uses the key ``derive(keys[:, b], j)``. Why not ``neg_elbo_local(...,
    samples)``: it returns the mean, and the standard errors need each draw. The draws are stacked
    along the batch axis (every local tensor is (S, B, ...)), ``c`` at a time with (S, c*B, D)
    bounded by max_elements: one decoder call per chunk instead of one per draw (small batches
    leave a CPU idle in per-call overhead)."""
    s, b, d = x.shape
    c = max(1, min(samples, max_elements // (s * b * d)))
    out = []
    with torch.no_grad():
        for j0 in range(0, samples, c):
            js = torch.arange(j0, min(samples, j0 + c), device=keys.device)  # (c,)
            k = noise.derive(keys[:, None, :], js[None, :, None]).reshape(s, -1)  # (S, c*B), rows (j, b)
            rep = {name: t.repeat(1, len(js), *([1] * (t.dim() - 2))) for name, t in local.items()}
            value = model.neg_elbo_local(x.repeat(1, len(js), 1), rep, k, 1)  # (S, c*B)
            out.append(value.view(s, len(js), b))
    return torch.cat(out, dim=1).transpose(1, 2)  # (S, B, samples)


def _optimize(
    model: Any, x: Tensor, start: dict[str, Tensor], keys: Tensor, steps: int, lr: float, samples: int
) -> dict[str, Tensor]:
    """Each example's local posterior parameters after `steps` Adam steps on its own -ELBO.

    The loss is summed over slots and examples: every parameter belongs to one (slot, example) and
    Adam is elementwise, so each example is optimized exactly as if it were alone. Gradients are
    taken with respect to the local tensors only (torch.autograd.grad; the caller has switched the
    weights' requires_grad off): the weights get no gradient and never change. Step t draws its
    noise from ``derive(keys, t)``.
    """
    local = {name: t.detach().clone().requires_grad_(True) for name, t in start.items()}
    leaves = list(local.values())
    optimizer = torch.optim.Adam(leaves, lr=lr)
    for step in range(steps):
        loss = model.neg_elbo_local(x, local, noise.derive(keys, step), samples).sum()
        for leaf, grad in zip(leaves, torch.autograd.grad(loss, leaves)):
            leaf.grad = grad
        optimizer.step()
    return {name: t.detach() for name, t in local.items()}


def _check(x: Tensor, examples: int, steps: int, lr: float, k: int) -> None:
    if x.dim() != 2 or x.shape[0] == 0:
        raise TunerError(
            f"gaps: x must be a non-empty (N, D) tensor, but got shape {tuple(x.shape)}; "
            "flatten each example to one row."
        )
    if examples < 1:
        raise TunerError(
            f"gaps: examples must be >= 1, but got {examples=}; use 128 (train.gap_examples 0 skips the gaps)."
        )
    if steps < 1:
        raise TunerError(f"gaps: steps must be >= 1, but got {steps=}; use 100.")
    if not (math.isfinite(lr) and lr > 0):
        raise TunerError(f"gaps: lr must be a positive number, but got {lr=}; use 0.03.")
    if k < 1:
        raise TunerError(f"gaps: the IWAE sample count k must be >= 1, but got {k=}; use {GAP_IWAE_K}.")


def estimate_gaps(
    model: Any, x: Tensor, *, examples: int = 128, steps: int = 100, lr: float = 3e-2,
    k: int = GAP_IWAE_K, seed: int | Sequence[int] = 0, max_elements: int = MAX_ELEMENTS,
) -> Gaps:
    """Amortization and approximation gaps of every slot on x[:examples], nats per example.

    See the module docstring for what is estimated and how noisy it is. x: (N, D) in [0, 1] (fewer
    rows than ``examples`` means all of them). Examples are optimized and scored in chunks of about
    ``max_elements`` floats of (S, rows, D) (the IWAE term chunks by :data:`tuner.vae.metrics.MAX_ELEMENTS`);
    per-example noise keys make the result independent of the chunking. The model is left as it
    was: same weights, same requires_grad flags, same training flag.
    """
    _check(x, examples, steps, lr, k)
    s, device = model.slots, model.latent_mask.device
    x = x[:examples].to(device=device, dtype=torch.float32)
    n, d = x.shape
    key = noise.keys_from_seeds(slot_seeds(seed, s, device))  # (S,): one seed, or one per slot
    idx = torch.arange(n, device=device)
    eval_keys = noise.derive(key[:, None], _EVAL_STREAM, idx[None, :])  # (S, N): one per example
    step_keys = noise.derive(key[:, None], _STEP_STREAM, idx[None, :])
    amortized, optimized = [], []  # (S, rows, EVAL_SAMPLES) per chunk
    with _frozen(model):
        for rows in _chunks(n, max(1, max_elements // (s * d))):
            xs = x[rows].expand(s, -1, -1)  # (S, rows, D)
            with torch.no_grad():
                start = model.local_posterior(xs)
            keys = eval_keys[:, rows]
            amortized.append(_per_sample_neg_elbo(model, xs, start, keys, EVAL_SAMPLES, max_elements))
            local = _optimize(model, xs, start, step_keys[:, rows], steps, lr, STEP_SAMPLES)
            optimized.append(_per_sample_neg_elbo(model, xs, local, keys, EVAL_SAMPLES, max_elements))
    a, o = torch.cat(amortized, dim=1), torch.cat(optimized, dim=1)  # (S, N, E)
    iwae_k = max(GAP_IWAE_K, k)
    iwae = iwae_nll(model, x, iwae_k, noise.derive(key, _IWAE_STREAM))  # (S,) CPU; metrics' own chunking

    def se(v: Tensor) -> Tensor:  # (S,) sd of the mean over examples x samples, per example's own spread
        return (v.var(dim=-1).sum(dim=1) / v.shape[-1]).sqrt() / n

    # note: the .cpu() calls are the only host syncs
    neg_a, neg_o = a.mean(dim=(1, 2)).cpu(), o.mean(dim=(1, 2)).cpu()
    return Gaps(
        neg_elbo_amortized=neg_a, neg_elbo_optimized=neg_o, iwae_nll=iwae,
        amortization_gap=neg_a - neg_o, approximation_gap=neg_o - iwae,
        amortization_gap_se=se(a - o).cpu(), approximation_gap_se=se(o).cpu(),
        examples=n, steps=steps, iwae_k=iwae_k,
    )


def trial_gaps(model: Any, x: Tensor, config: TrainConfig) -> dict[str, Any]:
    """The gaps of a one-slot model under ``config.train``'s settings, as slot values; ``{}`` when
    ``train.gap_examples`` is 0 (the gaps are off). Noise is seeded by ``config.seed``."""
    t = config.train
    if t.gap_examples == 0:
        return {}
    return estimate_gaps(
        model, x, examples=t.gap_examples, steps=t.gap_steps, lr=t.gap_lr, k=t.iwae_k, seed=config.seed
    ).slot(0)
