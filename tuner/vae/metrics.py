"""Evaluation metrics for a population of VAEs: nats per example, per slot.

Every value is a data mean over the evaluation examples x (N, D), computed for all S slots at once
and returned as an (S,) tensor (or (S, Zmax) for per-dim values). Sums over latent dims always go
through ``model.latent_mask``, so a slot's masked dims contribute exactly 0 and a slot using 3 of
Zmax = 5 dims measures the same as a 3-dim model.

Randomness comes only from :mod:`tuner.vae.noise`: the noise for example i (and importance sample k)
is a pure function of (slot key, i, k, latent dim), never of the batch size, the K chunking, the
population's size or its Zmax. :func:`evaluate` gives every slot the same key (from ``seed``), so a
slot's metrics are the same whether it was trained alone or in a population of 8.

Collapse verdict (a product decision; thresholds live here and nowhere else)
---------------------------------------------------------------------------
A slot is *collapsed* when any of these holds:

1. no informative unit: no latent dim has data-mean KL >= ``INFORMATIVE_KL_NATS`` (0.1 nats);
2. its mean KL per example is under ``COLLAPSE_KL_NATS`` (2 nats);
3. its mutual information I_q(x; z) is under ``COLLAPSE_MI_NATS`` (2 nats).

Why not the active-unit count alone: Cov_x(E_q[z|x]) > 0.01 (Burda et al. 2015) is fooled by a
posterior whose mean wiggles with x while its variance stays near 1. A beta = 8 MNIST VAE measured
total KL 1.5 nats yet 17 of 32 "active" units. Why 2 nats: a code that carries less than ~2 nats
per example cannot even name the digit class (log 10 = 2.3 nats), so whatever its unit counts say
it is useless as a representation for any user's purpose. A NaN KL or MI counts as collapsed.
The MI estimate is bounded by log N (see :func:`mutual_info`), so the verdict needs
N >= exp(COLLAPSE_MI_NATS) ~ 8 examples; :func:`evaluate` refuses fewer.

Model families (tuner.vae.models)
-----------------------------
A model with ``closed_form`` true (or without the attribute: any diagonal-Gaussian encoder with an
N(0, I) prior) takes the closed-form path: analytic KL, exact Gaussian posteriors. Every other
family goes through ``model.local_posterior`` and ``model.sample`` (z and per-dim KL pieces from
given noise), with the same noise keys per (example, sample). What is estimated there:

* KL and KL per dim: Monte Carlo log q(z|x) - log p(z) averaged over the IWAE pass's K draws per
  example, split per dim by the chain rule of the prior and the flow's per-dim log-determinant
  (each dim's share is >= 0 in expectation for mixture priors; for IAF it is an attribution that
  sums to the KL); the ladder's per level at the drawn (z1, z2). ``kl_per_dim`` lists level 1's
  dims, then level 2's (``latent_mask`` is then the model's ``kl_mask`` over both).
* Reconstruction (every family): averaged over the same K draws (a one-draw estimate's seed-to-seed
  spread was 0.15-0.3 nats on MNIST); the closed-form family's KL stays analytic.
* IWAE NLL: log p(x|z) + log p(z) - log q(z|x) with the family's q and p (flow log-determinant
  included; for the ladder z = (z1, z2)); still an upper bound on -log p(x). A model with
  ``prior_bound`` true (the diffusion prior, :mod:`tuner.vae.diffusion`) has no log p(z), only a
  one-chain variational lower bound on it, used in its place: its KL is over-estimated and its IWAE
  NLL stays an upper bound, a looser one (K draws tighten q's side, never the prior's bound).
  :class:`Evaluation` carries the flag (``prior_bound`` in a slot's metrics) for the ranking.
* Active units and MI need E[z|x] and a density q(z|x_j) at other examples' z: exact for a Gaussian
  q (mixture priors), else a diagonal Gaussian moment-matched to ``MOMENT_SAMPLES`` draws of q(z|x)
  per example (the same noise for every example). MI is then still InfoNCE with that Gaussian as
  critic: a lower bound on I_q(x; z), <= log N, exactly 0 for an encoder that ignores x.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tuner.errors import TunerError
from tuner.vae import noise
from tuner.vae.ortho import METRIC_EXAMPLES, ortho_cos

__all__ = [
    "ACTIVE_UNIT_THRESHOLD",
    "COLLAPSE_KL_NATS",
    "COLLAPSE_MI_NATS",
    "INFORMATIVE_KL_NATS",
    "MAX_ELEMENTS",
    "Evaluation",
    "active_units",
    "collapse_verdict",
    "evaluate",
    "gaussian_kl_per_dim",
    "iwae_nll",
    "log_normal",
    "mutual_info",
    "slot_seeds",
]

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2015: a dim is active when Cov_x(E_q[z_d|x]) > 0.01
INFORMATIVE_KL_NATS = 0.1  # a dim carries information when its data-mean KL >= this
COLLAPSE_MI_NATS = 2.0  # under log 10 = 2.3 nats: cannot name an MNIST class (module docstring)
COLLAPSE_KL_NATS = 2.0
MAX_ELEMENTS = 1 << 24  # floats in the largest temporary of one IWAE / MI chunk (64 MiB fp32)
MOMENT_SAMPLES = 32  # draws of q(z|x) per example for E[z|x] and Var[z|x] where q is not Gaussian

_LOG_2PI = math.log(2.0 * math.pi)
# Stream ids folded into evaluate's seed key: one independent noise stream per metric.
_IWAE_STREAM, _MI_STREAM, _MOMENT_STREAM = 1, 2, 3  # (stream 0 was a one-draw ELBO's)


@dataclass
class Evaluation:
    """Metrics of S slots on one data set; every tensor is on the CPU with a leading slot axis."""

    neg_elbo: Tensor  # (S,) -ELBO with beta = 1: recon + kl
    recon: Tensor  # (S,) -E_q log p(x|z), over the IWAE pass's K draws per example
    kl: Tensor  # (S,) KL(q(z|x) || p(z)), data mean: analytic, or the family's estimate (module doc)
    kl_per_dim: Tensor  # (S, Zk) data-mean KL of each dim (both ladder levels), 0 for masked dims
    iwae_nll: Tensor  # (S,) -log (1/K sum_k p(x, z_k) / q(z_k|x)), data mean
    iwae_k: int
    active_units: Tensor  # (S,) int64
    informative_units: Tensor  # (S,) int64: dims with kl_per_dim >= INFORMATIVE_KL_NATS
    mutual_info: Tensor  # (S,) I_q(x; z), <= log N
    collapsed: Tensor  # (S,) bool, see collapse_verdict
    inactive_fraction: Tensor  # (S,) 1 - active_units / latent size
    latent_mask: Tensor  # (S, Zk) the model's KL-dim mask, to trim kl_per_dim per slot
    decoder_ortho_cos: Tensor  # (S,) mean |cos| of the decoder's distinct Jacobian columns (tuner.vae.ortho)
    # log p(z) itself only bounded (the diffusion prior): the KL is over-, -ELBO and IWAE NLL upper-estimated
    prior_bound: bool = False

    def slot(self, s: int) -> dict[str, Any]:
        """Slot s as plain python values (JSON-serializable) for metrics.json."""
        dims = self.latent_mask[s] > 0
        return {
            "neg_elbo": float(self.neg_elbo[s]),
            "recon": float(self.recon[s]),
            "kl": float(self.kl[s]),
            "iwae_nll": float(self.iwae_nll[s]),
            "iwae_k": int(self.iwae_k),
            "active_units": int(self.active_units[s]),
            "informative_units": int(self.informative_units[s]),
            "mutual_info": float(self.mutual_info[s]),
            "collapsed": bool(self.collapsed[s]),
            "inactive_fraction": float(self.inactive_fraction[s]),
            "latent_size": int(dims.sum()),
            "kl_per_dim": [float(v) for v in self.kl_per_dim[s][dims]],
            "decoder_ortho_cos": float(self.decoder_ortho_cos[s]),
            # only where it holds, so other families' metrics (and trial attrs) are what they were
            **({"prior_bound": True} if self.prior_bound else {}),
        }


# ---------------------------------------------------------------------------------------------
# Pure elementwise pieces


def gaussian_kl_per_dim(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) elementwise, in nats. mu = logvar = 0 gives exactly 0."""
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar)


def log_normal(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mu, exp(logvar)) elementwise (broadcasting), in nats."""
    return -0.5 * (_LOG_2PI + logvar + (z - mu).square() * torch.exp(-logvar))


def active_units(
    mu: Tensor, latent_mask: Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD
) -> Tensor:
    """(S,) int64 count of dims with Cov_x(E_q[z_d|x]) > threshold.

    mu: (S, N, Z) posterior means over the N evaluation examples; latent_mask: (S, Z) of 0/1.
    The variance is the population one (divide by N), as in Burda et al. 2015.
    """
    var = mu.var(dim=1, correction=0)  # (S, Z)
    return ((var > threshold) & (latent_mask > 0)).sum(dim=-1)


def collapse_verdict(kl: Tensor, mutual_info: Tensor, informative_units: Tensor) -> Tensor:
    """(S,) bool: collapsed = no informative unit, or kl < 2 nats, or MI < 2 nats (NaN -> True).

    Pure; the thresholds and their reasons are in the module docstring.
    """
    return (
        (informative_units == 0)
        | ~(kl >= COLLAPSE_KL_NATS)  # written as ~(>=) so NaN counts as collapsed
        | ~(mutual_info >= COLLAPSE_MI_NATS)
    )


# ---------------------------------------------------------------------------------------------
# Passes over the data (the model is called here, under no_grad)


def _standard_normal(keys: Tensor, zmax: int) -> Tensor:
    """(*keys.shape, zmax) N(0, 1) draws: one (zmax,) vector per key, coordinates per dim."""
    return noise.normal(keys.reshape(-1), (zmax,)).view(*keys.shape, zmax)


def _batches(
    x: Tensor, batch_size: int, device: torch.device
) -> Iterator[tuple[slice, Tensor, Tensor]]:
    """Yield (rows of x, their indices (B,) int64, x[rows] (B, D) float32), all on device."""
    for start in range(0, x.shape[0], batch_size):
        rows = slice(start, min(start + batch_size, x.shape[0]))
        xb = x[rows].to(device=device, dtype=torch.float32)
        yield rows, torch.arange(rows.start, rows.stop, device=device), xb


def _encode(model: Any, x: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """Posterior mu, logvar of every example: (S, N, Zmax) each, on the model's device."""
    device, s = model.latent_mask.device, model.slots
    parts = [model.encode(xb.expand(s, *xb.shape)) for _, _, xb in _batches(x, batch_size, device)]
    return torch.cat([m for m, _ in parts], dim=1), torch.cat([v for _, v in parts], dim=1)


def _iwae(
    model: Any, x: Tensor, mu: Tensor, logvar: Tensor, k: int, key: Tensor,
    batch_size: int, max_elements: int,
) -> tuple[Tensor, Tensor]:
    """(S,) IWAE NLL given the posteriors of every example (see iwae_nll), and (S,) the recon term
    -E_q log p(x|z) averaged over the same K draws (a K-sample estimate, not one draw's)."""
    s, zmax = mu.shape[0], mu.shape[-1]
    mask = model.latent_mask[:, None, None, :]  # (S, 1, 1, Z)
    total = torch.zeros(s, device=mu.device)
    recon = torch.zeros(s, device=mu.device)
    for rows, idx, xb in _batches(x, batch_size, mu.device):
        b, d = xb.shape
        # K is split so the largest temporary, the decoder output (S, kc*B, D), stays bounded.
        kc = max(1, min(k, max_elements // (s * b * max(d, zmax))))
        m, lv = mu[:, None, rows], logvar[:, None, rows]  # (S, 1, B, Z)
        log_w = []
        for k0 in range(0, k, kc):
            ks = torch.arange(k0, min(k, k0 + kc), device=mu.device)
            keys = noise.derive(key[:, None, None], idx[None, None, :], ks[None, :, None])
            eps = _standard_normal(keys, zmax)  # (S, kc, B, Z)
            z = (m + torch.exp(0.5 * lv) * eps) * mask
            # log p(z) - log q(z|x) per dim; q's term from eps directly: (z - mu)^2 / var = eps^2.
            log_pq = (-0.5 * (z.square() - lv - eps.square()) * mask).sum(dim=-1)  # (S, kc, B)
            params = model.decode(z.reshape(s, -1, zmax))  # (S, kc*B, D)
            xk = xb.repeat(len(ks), 1).expand(s, -1, -1)  # (S, kc*B, D), rows ordered (k, b)
            ll = model.log_likelihood(xk, params).view(s, len(ks), b)
            recon -= ll.sum(dim=(1, 2))
            log_w.append(ll + log_pq)
        log_w = torch.cat(log_w, dim=1)  # (S, K, B)
        total -= (torch.logsumexp(log_w, dim=1) - math.log(k)).sum(dim=1)
    return total / x.shape[0], recon / (k * x.shape[0])


def _mutual_info(
    mu: Tensor, logvar: Tensor, latent_mask: Tensor, key: Tensor, max_elements: int
) -> Tensor:
    """(S,) MI estimate from the posteriors mu, logvar (S, N, Z) (see mutual_info)."""
    s, n, zmax = mu.shape
    idx = torch.arange(n, device=mu.device)
    eps = _standard_normal(noise.derive(key[:, None], idx[None, :]), zmax)  # (S, N, Z)
    z = mu + torch.exp(0.5 * logvar) * eps  # z_i ~ q(z|x_i)
    return _info_nce(z, mu, logvar, latent_mask, max_elements)


def _info_nce(z: Tensor, mu: Tensor, logvar: Tensor, latent_mask: Tensor, max_elements: int) -> Tensor:
    """(S,) mean_i [log q(z_i|x_i) - log (1/N sum_j q(z_i|x_j))], q(.|x_j) = N(mu_j, exp(logvar_j))."""
    s, n, zmax = mu.shape
    mask = latent_mask[:, None, :]  # (S, 1, Z)
    log_q_own = (log_normal(z, mu, logvar) * mask).sum(dim=-1)  # (S, N): log q(z_i|x_i)
    # log q(z_i) ~ logsumexp_j log q(z_i|x_j) - log N; rows i in chunks of (S, ci, N, Z).
    ci = max(1, max_elements // (s * n * zmax))
    log_q_marg = []
    for i0 in range(0, n, ci):
        zi = z[:, i0 : i0 + ci, None, :]  # (S, ci, 1, Z)
        lq = log_normal(zi, mu[:, None], logvar[:, None]) * mask[:, None]  # (S, ci, N, Z)
        lq = lq.sum(dim=-1)  # (S, ci, N): log q(z_i|x_j)
        log_q_marg.append(torch.logsumexp(lq, dim=-1) - math.log(n))
    return (log_q_own - torch.cat(log_q_marg, dim=1)).mean(dim=1)


# ---------------------------------------------------------------------------------------------
# Sampled path: every family through model.local_posterior / model.sample (module docstring)


def _closed_form(model: Any) -> bool:
    return getattr(model, "closed_form", True)


def _kl_mask(model: Any) -> Tensor:
    return model.kl_mask if not _closed_form(model) else model.latent_mask


def _locals(model: Any, x: Tensor, batch_size: int) -> dict[str, Tensor]:
    """model.local_posterior of every example: name -> (S, N, ...), on the model's device."""
    device, s = model.latent_mask.device, model.slots
    parts = [model.local_posterior(xb.expand(s, *xb.shape)) for _, _, xb in _batches(x, batch_size, device)]
    return {name: torch.cat([p[name] for p in parts], dim=1) for name in parts[0]}


def _repeat(local: dict[str, Tensor], rows: slice, times: int) -> dict[str, Tensor]:
    """Rows of every local tensor, tiled `times` along the example axis (rows ordered (t, b))."""
    return {name: v[:, rows].repeat(1, times, *([1] * (v.dim() - 2))) for name, v in local.items()}


def _family_noise(model: Any, keys: Tensor) -> Tensor:
    """(*keys.shape, *model.noise_shape) N(0, 1) draws, one block per key."""
    return noise.normal(keys.reshape(-1), model.noise_shape).view(*keys.shape, *model.noise_shape)


def _stratify(model: Any, eps: Tensor, draws: Tensor, k: int) -> tuple[Tensor, Tensor | None]:
    """model.stratify where the model has it (a mixture posterior's components), else unchanged."""
    stratify = getattr(model, "stratify", None)
    return (eps, None) if stratify is None else stratify(eps, draws, k)


def _sampled_iwae(
    model: Any, x: Tensor, local: dict[str, Tensor], k: int, key: Tensor, batch_size: int, max_elements: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(S,) IWAE NLL with the family's q and p: log w = log p(x|z) - [log q(z|x) - log p(z)]; and
    over the same K draws, (S,) the recon term and (S, Zk) the KL per dim (the sampled log-ratio's
    per-dim pieces, :meth:`VAE.sample`), each a K-sample estimate."""
    device, s = model.latent_mask.device, model.slots
    total = torch.zeros(s, device=device)
    recon, kl_dims = torch.zeros(s, device=device), 0.0
    for rows, idx, xb in _batches(x, batch_size, device):
        b, d = xb.shape
        kc = max(1, min(k, max_elements // (s * b * max(d, model.sample_width))))
        log_w = []
        for k0 in range(0, k, kc):
            ks = torch.arange(k0, min(k, k0 + kc), device=device)
            keys = noise.derive(key[:, None, None], idx[None, None, :], ks[None, :, None])  # (S, kc, B)
            # a mixture posterior's draws are stratified over its components, weighted by `offset`
            eps, offset = _stratify(model, _family_noise(model, keys), ks, k)
            z, log_ratio = model.sample(_repeat(local, rows, len(ks)), eps.flatten(1, 2), mc=True)  # rows (k, b)
            xk = xb.repeat(len(ks), 1).expand(s, -1, -1)
            ll = model.log_likelihood(xk, model.decode(z[..., : model.latent_max]))  # (S, kc*B)
            weight = torch.ones(len(ks), device=device) if offset is None else torch.exp(offset)
            weight = weight.repeat_interleave(b)  # (kc*B,): 1, or the draw's stratum weight (mean 1 over all k)
            recon -= (ll * weight).sum(dim=1)
            kl_dims = kl_dims + (log_ratio * weight[:, None]).sum(dim=1)  # (S, Zk)
            lw = (ll - log_ratio.sum(dim=-1)).view(s, len(ks), b)
            log_w.append(lw if offset is None else lw + offset[:, None])
        total -= (torch.logsumexp(torch.cat(log_w, dim=1), dim=1) - math.log(k)).sum(dim=1)
    draws = k * x.shape[0]
    return total / x.shape[0], recon / draws, kl_dims / draws


def _sampled_moments(model: Any, local: dict[str, Tensor], key: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """(E[z|x], log Var[z|x]) (S, N, Zk) of every example: exact for a Gaussian q, else from
    MOMENT_SAMPLES draws with the same noise for every example (so equal posteriors give equal moments)."""
    exact = model.posterior_gaussian(local)
    if exact is not None:
        return exact
    s, n, m = model.slots, local["mu"].shape[1], MOMENT_SAMPLES
    draws = torch.arange(m, device=key.device)
    eps = _family_noise(model, noise.derive(key[:, None], draws[None, :]))  # (S, M, *noise)
    eps, offset = _stratify(model, eps[:, :, None], draws, m)
    eps = eps[:, :, 0]
    weight = None if offset is None else torch.exp(offset)[:, None, None]  # (M, 1, 1): mean 1 over the draws
    means, logvars = [], []
    for start in range(0, n, batch_size):
        rows = slice(start, min(n, start + batch_size))
        b = rows.stop - rows.start
        e = eps[:, :, None].expand(s, m, b, *model.noise_shape).flatten(1, 2)  # (S, M*b, *noise)
        z, _ = model.sample(_repeat(local, rows, m), e)
        z = z.view(s, m, b, -1)
        if offset is None:
            mean, var = z.mean(dim=1), z.var(dim=1, correction=0)
        else:  # a mixture's stratified draws, weighted by their strata
            mean = (z * weight).mean(dim=1)
            var = ((z - mean[:, None]).square() * weight).mean(dim=1)
        means.append(mean)
        logvars.append(torch.log(var.clamp_min(1e-8)))
    return torch.cat(means, dim=1), torch.cat(logvars, dim=1)


def _sampled_mutual_info(
    model: Any, local: dict[str, Tensor], mean: Tensor, logvar: Tensor, key: Tensor, max_elements: int
) -> Tensor:
    """(S,) InfoNCE MI: z_i ~ q(z|x_i) (eps_i from derive(key, i)), critic N(mean_j, exp(logvar_j))."""
    n = mean.shape[1]
    eps = _family_noise(model, noise.derive(key[:, None], torch.arange(n, device=key.device)[None, :]))
    z, _ = model.sample(local, eps)  # (S, N, Zk)
    return _info_nce(z, mean, logvar, model.kl_mask, max_elements)


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no_grad for the block; restores the training flag after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _check(x: Tensor, k: int, batch_size: int) -> None:
    if x.dim() != 2 or x.shape[0] == 0:
        raise TunerError(
            f"metrics: x must be a non-empty (N, D) tensor, but got shape {tuple(x.shape)}; "
            "flatten each example to one row."
        )
    if k < 1:
        raise TunerError(f"metrics: the IWAE sample count k must be >= 1, but got {k=}; use 200.")
    if batch_size < 1:
        raise TunerError(f"metrics: batch_size must be >= 1, but got {batch_size=}.")


# ---------------------------------------------------------------------------------------------
# Public entry points


def iwae_nll(
    model: Any, x: Tensor, k: int, key: Tensor, batch_size: int = 100,
    max_elements: int = MAX_ELEMENTS,
) -> Tensor:
    """(S,) IWAE bound -log (1/K sum_k p(x, z_k) / q(z_k|x)), nats per example (Burda et al. 2015).

    An upper bound on -log p(x) that tightens as K grows; K = 1 is the single-sample -ELBO.
    key: (S,) int64. Sample k of example i (row i of x) is z = mu + std * eps with
    eps = noise.normal(noise.derive(key, i, k), (Zmax,)), so the result does not depend on
    batch_size or max_elements. K is evaluated in chunks of about max_elements floats.
    Other families draw eps of shape model.noise_shape from the same keys (module docstring).
    """
    _check(x, k, batch_size)
    with _eval_mode(model):
        if not _closed_form(model):
            local = _locals(model, x, batch_size)
            return _sampled_iwae(model, x, local, k, key, batch_size, max_elements)[0].cpu()
        mu, logvar = _encode(model, x, batch_size)
        return _iwae(model, x, mu, logvar, k, key, batch_size, max_elements)[0].cpu()


def mutual_info(
    model: Any, x: Tensor, key: Tensor, batch_size: int = 100, max_elements: int = MAX_ELEMENTS
) -> Tensor:
    """(S,) I_q(x; z) = E_x E_q(z|x)[log q(z|x)] - E_q(z)[log q(z)], nats (He et al. 2019, calc_mi).

    One z_i ~ q(z|x_i) per example (eps_i = noise.normal(noise.derive(key, i), (Zmax,))), and
    log q(z_i) ~ logsumexp_j log q(z_i|x_j) - log N over the N examples of x. Unlike calc_mi, the
    first term is the sampled log q(z_i|x_i) rather than its analytic mean; the estimate is then
    the InfoNCE bound with critic q(z|x) (Poole et al. 2019): it is never above log N (the j = i
    term alone gives that), and exactly 0 for an encoder that ignores x. So an MI near log N
    means "at least log N", and comparing slots needs the same N. Memory: the posteriors
    (S, N, Zmax) twice, plus chunks of about max_elements floats. Non-Gaussian q: the critic is
    moment-matched (module docstring), its draws from ``derive(key, _MOMENT_STREAM)``.
    """
    _check(x, 1, batch_size)
    with _eval_mode(model):
        if not _closed_form(model):
            local = _locals(model, x, batch_size)
            mean, logvar = _sampled_moments(model, local, noise.derive(key, _MOMENT_STREAM), batch_size)
            return _sampled_mutual_info(model, local, mean, logvar, key, max_elements).cpu()
        mu, logvar = _encode(model, x, batch_size)
        return _mutual_info(mu, logvar, model.latent_mask, key, max_elements).cpu()


def slot_seeds(seed: int | Sequence[int], slots: int, device: torch.device | str) -> Tensor:
    """(S,) int64 seeds: one for every slot, or one per slot (a batch of finished trials is
    evaluated together, each with its own trial's seed, as it would be alone)."""
    if isinstance(seed, int):
        return torch.full((slots,), seed, dtype=torch.int64, device=device)
    if len(seed) != slots:
        raise TunerError(f"metrics: got {len(seed)} seeds for {slots} slots; give one seed or one per slot")
    return torch.tensor(list(seed), dtype=torch.int64, device=device)


def evaluate(
    model: Any, x: Tensor, *, k: int = 200, seed: int | Sequence[int] = 0, batch_size: int = 100,
    max_elements: int = MAX_ELEMENTS,
) -> Evaluation:
    """All metrics of every slot on x (N, D), nats per example. Each slot's noise comes from its
    seed (``seed``: one for all slots, or one per slot), so a slot measures the same in any batch."""
    _check(x, k, batch_size)
    n = x.shape[0]
    if math.log(n) < COLLAPSE_MI_NATS:
        raise TunerError(
            f"metrics: evaluating on N={n} examples bounds the mutual information by log N = "
            f"{math.log(n):.2f} nats < COLLAPSE_MI_NATS={COLLAPSE_MI_NATS}, so every slot would be "
            f"judged collapsed; evaluate on at least {math.ceil(math.exp(COLLAPSE_MI_NATS))} "
            "examples."
        )
    mask = _kl_mask(model)
    key = noise.keys_from_seeds(slot_seeds(seed, model.slots, mask.device))
    with _eval_mode(model):
        if _closed_form(model):
            mu, logvar = _encode(model, x, batch_size)  # (S, N, Z), reused by every metric below
            kl_per_dim = (gaussian_kl_per_dim(mu, logvar) * mask[:, None]).mean(dim=1)  # (S, Z)
            iwae_key = noise.derive(key, _IWAE_STREAM)
            iwae, recon = _iwae(model, x, mu, logvar, k, iwae_key, batch_size, max_elements)
            mi = _mutual_info(mu, logvar, mask, noise.derive(key, _MI_STREAM), max_elements)
            au = active_units(mu, mask)
            means = mu
        else:
            local = _locals(model, x, batch_size)  # name -> (S, N, ...), reused below
            iwae_key = noise.derive(key, _IWAE_STREAM)
            iwae, recon, kl_per_dim = _sampled_iwae(model, x, local, k, iwae_key, batch_size, max_elements)
            mean, lv = _sampled_moments(model, local, noise.derive(key, _MOMENT_STREAM), batch_size)
            mi = _sampled_mutual_info(model, local, mean, lv, noise.derive(key, _MI_STREAM), max_elements)
            au = active_units(mean, mask)
            means = mean
        # how orthogonal the decoder's Jacobian columns are at the first examples' posterior means
        ortho = ortho_cos(model.decode, means[:, :METRIC_EXAMPLES, : model.latent_max], model.latent_mask, max_elements)
    # note: the .cpu() calls below are the only host syncs of the evaluation
    kl_per_dim, mask = kl_per_dim.cpu(), mask.cpu()
    kl, recon, au = kl_per_dim.sum(dim=-1), recon.cpu(), au.cpu()
    informative = ((kl_per_dim >= INFORMATIVE_KL_NATS) & (mask > 0)).sum(dim=-1)
    mi = mi.cpu()
    return Evaluation(
        neg_elbo=recon + kl,
        recon=recon,
        kl=kl,
        kl_per_dim=kl_per_dim,
        iwae_nll=iwae.cpu(),
        iwae_k=k,
        active_units=au,
        informative_units=informative,
        mutual_info=mi,
        collapsed=collapse_verdict(kl, mi, informative),
        inactive_fraction=1.0 - au.float() / mask.sum(dim=-1).clamp(min=1.0),
        latent_mask=mask,
        decoder_ortho_cos=ortho.cpu(),
        prior_bound=bool(getattr(model, "prior_bound", False)),
    )
