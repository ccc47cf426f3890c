"""Priors p(z) over a population's latent codes, with a leading slot axis: standard normal,
mixture of Gaussians (MoG) and the VampPrior (Tomczak & Welling 2018).

Why a per-dim *chain-rule* log-density: the training loss applies free bits per latent dim and the
metrics report KL per dim, so a prior must split log p(z) into per-dim pieces that sum to it.
A mixture does not factor over dims, but the chain rule does:
``log p(z) = sum_d log p(z_d | z_<d)`` with ``log p(z_<=d) = logsumexp_k [log w_k +
sum_{j<=d} log N(z_j; mu_kj, var_kj)]`` (a cumulative sum, then one logsumexp per d). With a
diagonal posterior q, ``E_q[log q(z_d|x) - log p(z_d|z_<d)]`` is an expected KL, so every dim's
share is >= 0 in expectation; the split depends on the dim order (dims in index order).

Masked dims (past a slot's latent size) contribute exactly 0: their per-dim log-densities are
multiplied by the mask before the cumulative sum, so the cumsum, and hence each later difference,
is unchanged there. Mixture parameters are drawn at the slot's true shape and padded with zeros.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tuner.vae import noise

__all__ = ["MixturePrior", "VampPrior", "chain_rule_dims", "mixture_log_prob_dims", "normal_log_prob_dims", "sample_prior"]

_LOG_2PI = math.log(2.0 * math.pi)


def normal_log_prob_dims(z: Tensor) -> Tensor:
    """log N(z_d; 0, 1) per dim, nats; same shape as z."""
    return -0.5 * (_LOG_2PI + z.square())


def mixture_log_prob_dims(z: Tensor, log_w: Tensor, mu: Tensor, logvar: Tensor, mask: Tensor) -> Tensor:
    """Chain-rule pieces log p(z_d | z_<d) of a diagonal Gaussian mixture, (S, B, Z) nats.

    z (S, B, Z); log_w (S, K) normalized log-weights; mu, logvar (S, K, Z); mask (S, Z) 0/1.
    Sums over d to log p(z) exactly (up to rounding). Memory: one (S, B, K, Z) temporary.
    """
    return chain_rule_dims(z[:, :, None], log_w[:, None], mu[:, None], logvar[:, None], mask)


def chain_rule_dims(z: Tensor, log_w: Tensor, mu: Tensor, logvar: Tensor, mask: Tensor) -> Tensor:
    """The chain-rule pieces of a diagonal Gaussian mixture whose components may differ per example
    (a mixture posterior, :mod:`tuner.vae.mixture`): (S, B, Z) nats.

    z (S, B, 1, Z); log_w (S, B or 1, K); mu, logvar (S, B or 1, K, Z); mask (S, Z) 0/1.
    """
    lp = -0.5 * (_LOG_2PI + logvar + (z - mu).square() * torch.exp(-logvar))
    lp = lp * mask[:, None, None]  # (S, B, K, Z): masked dims add 0 to the cumulative sum
    joint = torch.logsumexp(lp.cumsum(dim=-1) + log_w[..., None], dim=2)  # (S, B, Z): log p(z_<=d)
    start = torch.logsumexp(log_w, dim=-1)[..., None].expand_as(joint[..., :1])  # log p(z_<1) = 0
    return joint - torch.cat([start, joint[..., :-1]], dim=-1)


def _sample_mixture(keys: Tensor, n: int, log_w: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """(S, n, Z) draws from each slot's mixture: a component by inverse CDF, then its Gaussian."""
    u = noise.uniform(noise.derive(keys, 0), (n,))  # (S, n)
    cdf = log_w.softmax(dim=-1).cumsum(dim=-1)  # (S, K)
    k = torch.searchsorted(cdf.contiguous(), u.contiguous()).clamp(max=log_w.shape[-1] - 1)  # (S, n)
    idx = k[..., None].expand(-1, -1, mu.shape[-1])
    eps = noise.normal(noise.derive(keys, 1), (n, mu.shape[-1]))
    return torch.gather(mu, 1, idx) + torch.exp(0.5 * torch.gather(logvar, 1, idx)) * eps


class MixturePrior(nn.Module):
    """p(z) = sum_k w_k N(z; mu_k, diag exp(logvar_k)) with learned means, log-variances and
    weights per slot (K = ``components`` fixed per population: it sets tensor shapes)."""

    def __init__(self, slots: int, components: int, latent_max: int) -> None:
        super().__init__()
        self.prior_mu = nn.Parameter(torch.zeros(slots, components, latent_max))
        self.prior_logvar = nn.Parameter(torch.zeros(slots, components, latent_max))
        self.prior_logits = nn.Parameter(torch.zeros(slots, components))

    @torch.no_grad()
    def init_slot(self, slot: int, latent: int, generator: torch.Generator) -> None:
        """Means ~ N(0, 1) at the slot's true size (spread out, so components differ), unit variances,
        equal weights: at init the mixture is about as wide as N(0, I)."""
        k = self.prior_mu.shape[1]
        self.prior_mu[slot].zero_()
        self.prior_mu[slot, :, :latent] = torch.randn(k, latent, generator=generator)
        self.prior_logvar[slot].zero_()
        self.prior_logits[slot].zero_()

    def components(self, encode: Callable[[Tensor], tuple[Tensor, Tensor]], mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(log_w (S, K), mu (S, K, Z), logvar (S, K, Z)), masked dims 0."""
        m = mask[:, None]
        return F.log_softmax(self.prior_logits, dim=-1), self.prior_mu * m, self.prior_logvar * m


class VampPrior(nn.Module):
    """p(z) = 1/K sum_k q(z | u_k): the encoder's own posteriors at K learned pseudo-inputs u_k
    (Tomczak & Welling 2018), kept in [0, 1] by a hard clamp like the data they stand for."""

    def __init__(self, slots: int, components: int, data_dim: int) -> None:
        super().__init__()
        self.pseudo_inputs = nn.Parameter(torch.zeros(slots, components, data_dim))

    @torch.no_grad()
    def init_slot(self, slot: int, latent: int, generator: torch.Generator) -> None:
        """Pseudo-inputs near mid-gray with a little noise (Tomczak & Welling: N(0.5, 0.01^2)-like)."""
        del latent  # the pseudo-inputs live in data space
        shape = tuple(self.pseudo_inputs.shape[1:])
        self.pseudo_inputs[slot] = 0.5 + 0.05 * torch.randn(shape, generator=generator)

    def components(self, encode: Callable[[Tensor], tuple[Tensor, Tensor]], mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = encode(self.pseudo_inputs.clamp(0.0, 1.0))  # (S, K, Z) each, masked by the encoder
        k = mu.shape[1]
        return torch.full(mu.shape[:2], -math.log(k), device=mu.device), mu, logvar


def sample_prior(prior: MixturePrior | VampPrior | None, encode: Callable[[Tensor], tuple[Tensor, Tensor]],
                 mask: Tensor, keys: Tensor, n: int) -> Tensor:
    """(S, n, Z) draws from the prior, masked; a standard normal prior draws exactly
    ``noise.normal(keys, (n, Z))`` (what the pictures always used)."""
    if prior is None:
        return noise.normal(keys, (n, mask.shape[-1])) * mask[:, None]
    log_w, mu, logvar = prior.components(encode, mask)
    return _sample_mixture(keys, n, log_w, mu, logvar) * mask[:, None]
