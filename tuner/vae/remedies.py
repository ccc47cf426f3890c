"""Remedies for posterior collapse: per-slot terms a VAE adds to (or swaps into) its training loss.

Each is a per-slot weight (a buffer of :class:`tuner.vae.models.VAE` set by ``init_slot``), so slots
with and without it share a population; none of them touches the reported ``neg_elbo``, ``recon``
or ``kl`` (the true model's), so rankings across remedies stay comparable:

* ``aux_weight`` alpha (Semeniuta et al. 2017): a second, weak decoder, one linear layer from z alone
  (``aux_out``), whose reconstruction -log p_aux(x|z) is added to the loss times alpha, so z must
  carry what a linear map can read back. Its weights exist in every slot; at alpha 0 the term is not
  computed (no slot uses it) or adds an exact 0 with a zero gradient (a neighbour uses it).
* ``mmd_weight`` lambda (InfoVAE / MMD-VAE, Zhao et al. 2017, :mod:`tuner.vae.mmd`): where > 0 the
  KL term (with its schedule, free bits and capacity) is *replaced* by lambda * MMD(z of the batch,
  as many prior draws): the loss is recon + lambda * MMD, InfoVAE with alpha = 1.
* ``ortho_weight`` (OroJaR, Wei et al. 2021, :mod:`tuner.vae.ortho`): adds the weight times a
  scale-free estimate of the off-diagonal mass of the decoder's J^T J, so its Jacobian columns (what
  moving one latent dim does to the image) become orthogonal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from tuner.vae import noise, ortho
from tuner.vae.mmd import mmd

if TYPE_CHECKING:
    from tuner.vae.models import VAE

__all__ = ["STREAM_MMD_PRIOR", "STREAM_ORTHO", "apply", "aux_recon", "mmd_to_prior"]

STREAM_MMD_PRIOR, STREAM_ORTHO = 3, 4  # noise streams of the slot's step key (1, 2: tuner.vae.models)


def aux_recon(model: VAE, x: Tensor, z: Tensor) -> Tensor:
    """-log p_aux(x|z) of the auxiliary decoder, batch mean per slot: (S,) nats.

    x (S, B, D), z (S, B, Zk) (the decoder's latent is z[..., :Zmax]). The likelihood is the
    model's; a Gaussian one reads the model's log-scale detached, so the auxiliary term never
    moves the true decoder's noise level.
    """
    params = model.aux_out(z[..., : model.latent_max] * model.latent_mask.unsqueeze(1))  # (S, B, D)
    scale = None if model.likelihood == "bernoulli" else model.log_scale.detach()
    return -model.log_likelihood(x, params, scale).mean(1)


def mmd_to_prior(model: VAE, z: Tensor, key: Tensor) -> Tensor:
    """MMD between the batch's posterior draws z (S, B, Zk) and as many N(0, I) draws: (S,).

    The prior draws come from the slot's key (stream STREAM_MMD_PRIOR), per coordinate like every
    draw here, so they do not depend on the population's Zmax (:mod:`tuner.vae.mmd`).
    """
    mask = model.latent_mask.unsqueeze(1)
    prior = noise.normal(noise.derive(key, STREAM_MMD_PRIOR), (z.shape[1], model.latent_max)) * mask
    return mmd(z[..., : model.latent_max] * mask, prior, model.latent_mask.sum(-1))


def apply(model: VAE, loss: Tensor, recon: Tensor, x: Tensor, z: Tensor, key: Tensor, params: Tensor) -> Tensor:
    """The training loss (S,) with each slot's remedies: where lambda > 0, recon + lambda * MMD
    replaces it; then + alpha * the auxiliary reconstruction, + the orthogonality penalty's weight
    times the penalty (params: decode(z, key), the step's decoder output). Slots without them keep
    ``loss`` exactly (torch.where picks it; a weight 0 adds an exact 0)."""
    if model._any_mmd:
        loss = torch.where(model.mmd_weight > 0, recon + model.mmd_weight * mmd_to_prior(model, z, key), loss)
    if model._any_aux:
        loss = loss + model.aux_weight * aux_recon(model, x, z)
    if model._any_ortho:
        def decode(shifted: Tensor) -> Tensor:  # the same dropout masks as params'
            return model.decode(shifted, key)

        penalty = ortho.penalty(decode, z[..., : model.latent_max], params, model.latent_mask,
                                noise.derive(key, STREAM_ORTHO))
        loss = loss + model.ortho_weight * penalty
    return loss
