"""A locally orthogonal decoder: a penalty on the off-diagonal of the decoder's J^T J, and a metric
of how orthogonal its Jacobian columns are.

Why: Rolinek, Zietlow & Martius (CVPR 2019, "Variational Autoencoders Pursue PCA Directions (by
Accident)") show that the VAE's diagonal posterior pushes the decoder's Jacobian columns towards
orthogonality, which is what makes latent dims act independently (disentangled traversals); Wei et
al. (ICCV 2021, "Orthogonal Jacobian Regularization for Unsupervised Disentanglement in Image
Generation", OroJaR) make it explicit with a penalty on sum_{i != j} (J_i . J_j)^2.

Estimator (:func:`penalty`), OroJaR's: with Rademacher v (entries +-1), v^T M v = tr M + sum_{i != j}
M_ij v_i v_j for M = J^T J, so Var_v[||J v||^2] = 2 sum_{i != j} M_ij^2: the off-diagonal mass, from
``DIRECTIONS`` draws of ||J v||^2 (an unbiased sample variance), independent of the latent size.
J v is a forward difference (f(z + h v) - f(z)) / h with the pass the loss already made as f(z),
so the penalty costs ``DIRECTIONS`` extra decoder passes. It is divided by the squared batch mean of
||J v||^2 (an estimate of (tr M)^2), so it is scale-free: the decoder cannot shrink it by shrinking
its Jacobian, only by making the columns orthogonal. It enters the training loss only (times the
slot's ``model.ortho_weight``), never the reported -ELBO or IWAE NLL.

Metric (:func:`ortho_cos`): the mean |cos| between distinct Jacobian columns at the posterior means
of the first ``METRIC_EXAMPLES`` examples (0: orthogonal; a slot with one latent dim reads 0),
columns by central differences, per slot over its own latent dims.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from tuner.vae import noise

__all__ = ["DIRECTIONS", "METRIC_EXAMPLES", "ortho_cos", "penalty"]

DIRECTIONS = 2  # Rademacher directions per example (OroJaR's k; a variance needs >= 2)
STEP = 1e-2  # forward-difference step of the penalty, in latent units (posterior sds are ~0.1-1)
METRIC_STEP = 1e-3  # central-difference step of the metric
METRIC_EXAMPLES = 128


def penalty(decode: Callable[[Tensor], Tensor], z: Tensor, params: Tensor, mask: Tensor, key: Tensor) -> Tensor:
    """The normalized off-diagonal mass of each slot's J^T J at the batch's z: (S,).

    decode: z (S, B, Zmax) -> likelihood params (S, B, D), the same function (weights, dropout
    masks) that made ``params`` = decode(z); mask (S, Zmax) 0/1; key (S,) the stream's key.
    """
    s, b, zmax = z.shape
    v = torch.where(noise.uniform(key, (DIRECTIONS, b, zmax)) < 0.5, -1.0, 1.0) * mask[:, None, None]
    sq = torch.stack([((decode(z + STEP * v[:, j]) - params) / STEP).square().sum(-1) for j in range(DIRECTIONS)], 1)
    # sq (S, k, B): ||J v||^2 per direction; Var_v = 2 off-diagonal mass, E_v = tr J^T J
    off = sq.var(dim=1, correction=1).mean(1)
    return off / sq.mean(dim=(1, 2)).square().clamp_min(1e-12)


@torch.no_grad()
def ortho_cos(decode: Callable[[Tensor], Tensor], z: Tensor, mask: Tensor, max_elements: int) -> Tensor:
    """(S,) mean |cos(J_i, J_j)| over a slot's distinct latent dims i != j, averaged over the rows of
    z (S, N, Zmax) (the posterior means); mask (S, Zmax) 0/1. Chunked so a chunk's Jacobian,
    (S, n, Zmax, D), holds at most ``max_elements`` floats."""
    s, n, zmax = z.shape
    d = decode(z[:, :1]).shape[-1]
    chunk = max(1, max_elements // (s * zmax * d * 2))
    total = torch.zeros(s, device=z.device)
    pairs = mask.sum(-1) * (mask.sum(-1) - 1)  # ordered pairs i != j per slot
    off = mask[:, :, None] * mask[:, None, :] * (1.0 - torch.eye(zmax, device=z.device))  # (S, Z, Z)
    basis = torch.eye(zmax, device=z.device) * METRIC_STEP
    for start in range(0, n, chunk):
        zc = z[:, start : start + chunk]  # (S, c, Z)
        c = zc.shape[1]
        shifted = torch.cat([zc[:, :, None] + basis, zc[:, :, None] - basis], dim=2)  # (S, c, 2Z, Z)
        out = decode(shifted.reshape(s, c * 2 * zmax, zmax)).view(s, c, 2, zmax, d)
        cols = (out[:, :, 0] - out[:, :, 1]) / (2 * METRIC_STEP)  # (S, c, Z, D): column i = dx/dz_i
        unit = cols / cols.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        cos = (unit @ unit.transpose(-1, -2)).abs()  # (S, c, Z, Z)
        total += (cos * off[:, None]).sum(dim=(1, 2, 3))
    return torch.where(pairs > 0, total / (n * pairs.clamp_min(1.0)), torch.zeros_like(total))
