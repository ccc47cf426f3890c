"""KL weight, KL capacity, learning rate and free bits: pure functions vectorized over slots.

Every input is a float32 tensor of shape (S,), one value per slot, unless noted. ``epoch`` is the
slot's own fractional epoch clock (step / steps_per_epoch), so a schedule moves smoothly within an
epoch and a refilled slot starts again at 0 while its neighbours carry on.

Kind codes are int64 (S,) tensors indexing :data:`KL_SCHEDULES` / :data:`LR_DECAYS`. Every kind is
computed for every slot and the slot's own is picked with ``torch.where``: no Python branch per slot
and no host sync, since these run inside the training step (possibly under CUDA graph capture).
Denominators that a config may set to 0 (warmup 0) are clamped before dividing, so the branches a
slot does not use never hold inf or NaN.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "KL_SCHEDULES",
    "LR_DECAYS",
    "free_bits_kl",
    "kl_capacity",
    "kl_weight",
    "learning_rate",
]

KL_SCHEDULES = ("constant", "linear", "sigmoid", "cyclical", "capacity")
LR_DECAYS = ("constant", "cosine", "step")

_TINY = 1e-12  # clamps a zero denominator; the branch that would divide by it is never selected


def _ramp(epoch: Tensor, warmup: Tensor) -> Tensor:
    """min(1, epoch / warmup) per slot, 1 where warmup is 0 (no warmup). Unitless, (S,)."""
    return torch.where(warmup > 0, (epoch / warmup.clamp_min(_TINY)).clamp(0.0, 1.0), 1.0)


def kl_weight(
    epoch: Tensor,
    kind: Tensor,
    beta: Tensor,
    warmup_epochs: Tensor,
    cycles: Tensor,
    ratio: Tensor,
    total_epochs: Tensor,
) -> Tensor:
    """The weight on the KL term of each slot's loss at its fractional ``epoch``. Unitless, (S,).

    kind: int64 (S,) codes into :data:`KL_SCHEDULES`. beta: the final weight. warmup_epochs, cycles
    (number of cycles over the run), ratio (fraction of a cycle spent rising) and total_epochs are
    per slot; see :class:`tuner.spec.KLConfig`.
    """
    # 1) constant: beta all along
    constant = beta
    # 2) linear: 0 -> beta over warmup_epochs, then beta (warmup 0 -> beta)
    linear = beta * _ramp(epoch, warmup_epochs)
    # 3) sigmoid: a logistic ramp centred at warmup / 2 until warmup, then beta (warmup 0 -> beta)
    logistic = beta * torch.sigmoid(12.0 * (epoch / warmup_epochs.clamp_min(_TINY) - 0.5))
    sigmoid = torch.where(epoch < warmup_epochs, logistic, beta)
    # 4) cyclical (Fu et al. 2019): `cycles` periods over the run; in each, rise linearly for
    #    `ratio` of the period, then stay at beta
    period = (total_epochs / cycles.clamp_min(_TINY)).clamp_min(_TINY)
    tau = torch.remainder(epoch, period) / period  # position in the current cycle, in [0, 1)
    cyclical = beta * (tau / ratio.clamp_min(_TINY)).clamp(max=1.0)
    # 5) capacity (Burgess et al. 2018): the loss is recon + beta * |KL - C|, so the weight is beta;
    #    C comes from kl_capacity
    capacity = beta

    branches = (constant, linear, sigmoid, cyclical, capacity)
    weight = branches[0]
    for code, value in enumerate(branches[1:], start=1):
        weight = torch.where(kind == code, value, weight)
    return weight


def kl_capacity(epoch: Tensor, kind: Tensor, capacity: Tensor, warmup_epochs: Tensor) -> Tensor:
    """The KL target C of the capacity schedule, in nats per example, (S,); 0 for other kinds.

    C grows linearly from 0 to ``capacity`` over ``warmup_epochs`` (warmup 0 -> capacity at once).
    """
    target = capacity * _ramp(epoch, warmup_epochs)
    return torch.where(kind == KL_SCHEDULES.index("capacity"), target, torch.zeros_like(target))


def learning_rate(
    epoch: Tensor,
    base_lr: Tensor,
    warmup_epochs: Tensor,
    decay: Tensor,
    total_epochs: Tensor,
    min_lr_ratio: Tensor,
    step_epochs: Tensor,
    step_gamma: Tensor,
) -> Tensor:
    """Each slot's learning rate at its fractional ``epoch``, in the units of ``base_lr``, (S,).

    Callers pass the clock at the *end* of the step being taken, (step + 1) / steps_per_epoch, so
    the first update of a warmup is base_lr / warmup_steps rather than 0.
    decay: int64 (S,) codes into :data:`LR_DECAYS`. min_lr_ratio: the cosine floor as a fraction
    of base_lr. step_epochs, step_gamma: the step decay multiplies by gamma every step_epochs epochs.
    """
    # 1) linear warmup: base_lr * epoch / warmup while epoch < warmup (warmup 0 -> no warmup)
    warm = base_lr * _ramp(epoch, warmup_epochs)
    after = (epoch - warmup_epochs).clamp_min(0.0)  # epochs since warmup ended
    # 2) constant: base_lr
    constant = base_lr
    # 3) cosine: from base_lr down to min_lr = base_lr * min_lr_ratio at total_epochs, then min_lr
    progress = (after / (total_epochs - warmup_epochs).clamp_min(_TINY)).clamp(0.0, 1.0)
    min_lr = base_lr * min_lr_ratio
    cosine = min_lr + (base_lr - min_lr) * 0.5 * (1.0 + torch.cos(math.pi * progress))
    # 4) step: base_lr * gamma ** (whole step_epochs periods since warmup ended)
    step = base_lr * step_gamma ** torch.floor(after / step_epochs.clamp_min(_TINY))

    decayed = torch.where(decay == LR_DECAYS.index("cosine"), cosine, constant)
    decayed = torch.where(decay == LR_DECAYS.index("step"), step, decayed)
    return torch.where(epoch < warmup_epochs, warm, decayed)


def free_bits_kl(kl_per_dim: Tensor, free_bits: Tensor, latent_mask: Tensor) -> Tensor:
    """The KL term per example to put in each slot's loss, in nats, (S,).

    kl_per_dim: (S, B, Z) per-example KL of each latent dimension in nats. free_bits: (S,) nats per
    dimension. latent_mask: (S, Z) 0/1 float, 1 for the slot's real dimensions.
    Returns sum_d mask_d * max(free_bits, mean_B kl_d) (Kingma et al. 2016, free bits on the batch
    mean of each dimension): a dimension below the threshold gets no gradient. With free_bits == 0
    the clamp is skipped, so it is the plain batch mean of the summed KL.
    Masked dimensions are dropped with ``torch.where``, so NaN there cannot reach the result.
    """
    per_dim = kl_per_dim.mean(dim=1)  # (S, Z) nats
    floor = free_bits.unsqueeze(1)  # (S, 1)
    clamped = torch.where(floor > 0, torch.maximum(per_dim, floor), per_dim)  # (S, Z)
    kept = torch.where(latent_mask > 0, clamped, torch.zeros_like(clamped))
    return kept.sum(dim=1)
