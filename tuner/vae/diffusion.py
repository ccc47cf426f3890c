"""A diffusion prior p(z) over a population's latent codes (Wehenkel & Louppe 2021, "Diffusion Priors
in Variational Autoencoders", arXiv 2106.15671), with a leading slot axis.

p(z) is a small DDPM (Ho et al. 2020) over z = z_0: a fixed forward chain
q(z_t | z_{t-1}) = N(sqrt(1 - beta_t) z_{t-1}, beta_t I), t = 1..T, with Nichol & Dhariwal's (2021)
cosine schedule (betas capped at ``BETA_MAX``), and a learned reverse chain p(z_T) = N(0, I),
p(z_{t-1} | z_t) = N(mu_theta(z_t, t), beta_t I) whose mean comes from a noise network eps_theta:
``mu_theta = (z_t - beta_t / sqrt(1 - abar_t) * eps_theta) / sqrt(alpha_t)``.

log p(z) has no closed form; a DDPM only bounds it. :meth:`DiffusionPrior.bound_dims` is the
variational bound over *all* T steps along one forward chain per z (deterministic given the chain's
noise, T rows per example):

    log p(z_0) >= E_q(z_1:T | z_0) [log p(z_T) + sum_t log p(z_{t-1} | z_t) - log q(z_1:T | z_0)]

evaluated as that log-ratio at the chain's points. Every piece is a sum over latent dims, so the bound
splits per dim exactly (what free bits and the KL per dim need); masked dims contribute exactly 0.

Why the plain log-ratio and not Ho et al.'s (2020, eq. 5) form with the Gaussian KLs of
q(z_{t-1} | z_t, z_0) to p(z_{t-1} | z_t) in closed form: both have the same expectation, but on a
toy 2-d Gaussian latent (T = 20, 4,000 points) the closed-form-KL version's per-point spread was
1.75 nats at init and 2.5 after 400 Adam steps, the log-ratio's 0.0 and 1.1 (of which about 1.0
is the spread of the true log-density): the log-ratio is exactly log N(z; 0, I) for a prior at
N(0, I), and the KL pieces are not.

Why the reverse variance beta_t and the residual noise network
``eps_theta = sqrt(1 - abar_t) z_t + net(z_t, t)``: for z_0 ~ N(0, I) the forward chain is
stationary and reversible, so its exact reversal has variance beta_t and mean sqrt(alpha_t) z_t,
which is net = 0. The output layer starts at zero, so a fresh diffusion prior *is* N(0, I): its
bound is exactly log N(z; 0, I) for any chain noise, and the model starts where the Gaussian VAE starts.

The network is per slot (:class:`tuner.vae.layers.StackedLinear`): z (Zmax, padded 0) and a fixed
sinusoidal embedding of t enter through separate layers, then two SiLU layers of ``hidden`` units
and a linear head back to Zmax. Weights are drawn at the slot's true latent size, so a slot computes
the same function whatever the population's Zmax.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tuner.vae import noise
from tuner.vae.layers import StackedLinear

__all__ = ["BETA_MAX", "DiffusionPrior", "cosine_betas"]

BETA_MAX = 0.5  # caps the cosine schedule's last steps (beta_T would be 1: z_T independent of z_0)
EMBED = 16  # sinusoidal time-embedding width
_LOG_2PI = math.log(2.0 * math.pi)


def cosine_betas(steps: int, s: float = 0.008) -> Tensor:
    """(T,) float64 betas of the cosine schedule (Nichol & Dhariwal 2021, eq. 17), capped at BETA_MAX."""
    t = torch.arange(steps + 1, dtype=torch.float64) / steps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2).square()
    return (1.0 - f[1:] / f[:-1]).clamp(max=BETA_MAX)


def _time_embedding(steps: int) -> Tensor:
    """(T, EMBED) sin/cos features of t = 1..T at geometric frequencies (Vaswani et al. 2017)."""
    t = torch.arange(1, steps + 1, dtype=torch.float64)[:, None]
    freq = torch.exp(-math.log(1000.0) * torch.arange(EMBED // 2, dtype=torch.float64) / (EMBED // 2))
    return torch.cat([torch.sin(t * freq), torch.cos(t * freq)], dim=-1)


def _log_normal(x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    return -0.5 * (_LOG_2PI + torch.log(var) + (x - mean).square() / var)


class DiffusionPrior(nn.Module):
    """T-step DDPM priors for S slots: bound_dims(z (S, B, Z), noise (S, B, T, Z)) -> (S, B, Z) nats."""

    def __init__(self, slots: int, steps: int, latent_max: int, hidden: int) -> None:
        super().__init__()
        self.steps, self.hidden = steps, hidden
        betas = cosine_betas(steps)
        alpha_bar = torch.cumprod(1.0 - betas, dim=0)
        # the schedule, a function of T alone, as buffers for the device: slot-major like every
        # buffer of the model (copying slots between models copies buffers row by row), equal rows
        sched = {
            "beta": betas,  # (S, T)
            "sqrt_alpha": torch.sqrt(1.0 - betas),  # (S, T)
            "sqrt_one_minus_abar": torch.sqrt(1.0 - alpha_bar),  # (S, T)
            "time_embedding": _time_embedding(steps),  # (S, T, EMBED)
        }
        for name, value in sched.items():
            rows = value.to(torch.float32).expand(slots, *value.shape).clone()
            self.register_buffer(name, rows, persistent=False)
        self.net_z = StackedLinear(slots, latent_max, hidden)
        self.net_t = StackedLinear(slots, EMBED, hidden)
        self.net_mid = StackedLinear(slots, hidden, hidden)
        self.net_out = StackedLinear(slots, hidden, latent_max)

    @torch.no_grad()
    def init_slot(self, slot: int, latent: int, hidden: int, generator: torch.Generator) -> None:
        """Default-init input and middle layers at the slot's true sizes; a zero output layer, so
        the fresh prior is exactly N(0, I) (module docstring)."""
        self.net_z.init_slot(slot, latent, hidden, generator)
        self.net_t.init_slot(slot, EMBED, hidden, generator)
        self.net_mid.init_slot(slot, hidden, hidden, generator)
        self.net_out.weight[slot].zero_()
        self.net_out.bias[slot].zero_()

    def _reverse_mean(self, zt: Tensor, steps: slice) -> Tensor:
        """mu_theta(z_t, t) of p(z_{t-1} | z_t) at the given (0-based) steps: zt (S, B, T', Z) -> same."""
        s, b, t, z = zt.shape
        emb = self.net_t(self.time_embedding[:, steps])  # (S, T', H)
        h = F.silu(self.net_z(zt.reshape(s, b * t, z)).view(s, b, t, -1) + emb[:, None])
        net = self.net_out(F.silu(self.net_mid(h.view(s, b * t, -1)))).view(s, b, t, z)
        root = self.sqrt_one_minus_abar[:, None, steps, None]  # (S, 1, T', 1)
        eps = root * zt + net  # residual: net = 0 is N(0, I)'s exact reversal
        return (zt - self.beta[:, None, steps, None] / root * eps) / self.sqrt_alpha[:, None, steps, None]

    def bound_dims(self, z0: Tensor, chain_noise: Tensor, mask: Tensor) -> Tensor:
        """The all-steps variational bound on log p(z_0) along one forward chain, split per dim:
        (S, B, Z) nats, 0 on padding.

        z0 (S, B, Z); chain_noise (S, B, T, Z) standard normal, row t-1 drives step t of the forward
        chain; mask (S, 1, Z). The log-ratio log p(z_T) + sum_t log p(z_{t-1} | z_t) - log q(z_1:T | z_0)
        at the chain's points (module docstring). Differentiable in z0 (the posterior's draw) and the net.
        """
        n = chain_noise * mask.unsqueeze(2)  # (S, B, T, Z)
        beta = self.beta[:, None, :, None]  # (S, 1, T, 1)
        step_sd, keep = torch.sqrt(beta), self.sqrt_alpha[:, None, :, None]
        zs, z = [], z0 * mask
        for t in range(self.steps):  # the forward chain: T cheap elementwise steps
            z = keep[:, :, t] * z + step_sd[:, :, t] * n[:, :, t]
            zs.append(z)
        zt = torch.stack(zs, dim=2)  # (S, B, T, Z): z_1..z_T
        prev = torch.cat([z0.unsqueeze(2) * mask.unsqueeze(2), zt[:, :, :-1]], dim=2)  # z_0..z_{T-1}
        log_p = _log_normal(prev, self._reverse_mean(zt, slice(None)), beta).sum(dim=2)  # sum_t log p(z_{t-1}|z_t)
        log_p = log_p - 0.5 * (_LOG_2PI + zt[:, :, -1].square())  # + log p(z_T)
        # log q(z_t | z_{t-1}) = log N(noise_t; 0, 1) - log sqrt(beta_t): from the noise, exactly
        log_q = (-0.5 * (_LOG_2PI + torch.log(beta) + n.square())).sum(dim=2)
        return (log_p - log_q) * mask

    def sample(self, keys: Tensor, n: int, mask: Tensor) -> Tensor:
        """(S, n, Z) draws by the reverse chain from z_T ~ N(0, I), masked; keys (S,).

        Row 0 of ``noise.normal(keys, (n, T + 1, Z))`` is z_T, row t the noise of step t (drawn per
        coordinate, so a slot's draws do not depend on Zmax). Every step adds its noise, t = 1
        included: the draws follow exactly the density the bound bounds.
        """
        e = noise.normal(keys, (n, self.steps + 1, mask.shape[-1])) * mask[:, None, None]
        z = e[:, :, 0]
        for t in reversed(range(self.steps)):  # step t + 1, 1-based
            mean = self._reverse_mean(z.unsqueeze(2), slice(t, t + 1)).squeeze(2)
            z = (mean + torch.sqrt(self.beta[:, t, None, None]) * e[:, :, t + 1]) * mask[:, None]
        return z
