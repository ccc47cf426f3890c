"""The second level of a two-level ladder VAE (Sønderby et al. 2016), with a leading slot axis.

Generative: z2 ~ N(0, I), z1 ~ p(z1|z2) = N(mu_p(z2), var_p(z2)), x ~ p(x|z1) (the VAE's decoder).
Inference, bottom-up then top-down: the encoder's last hidden layer d1 gives the level-1 estimate
(mu_hat1, var_hat1) (the VAE's own heads); d2 = relu(up(d1)) gives q(z2|x) = N(mu2, var2). Then
z2 ~ q(z2|x) and q(z1|x, z2) merges the bottom-up estimate with the top-down prior by precision:
``var_q = 1 / (1/var_hat1 + 1/var_p)``, ``mu_q = var_q * (mu_hat1/var_hat1 + mu_p/var_p)``.
Because p and q share the top-down network, the posterior is as expressive as the prior.

KL per level, per dim: level 2 analytically, KL(q(z2|x) || N(0, I)); level 1 analytically given
the sampled z2, KL(q(z1|x,z2) || p(z1|z2)) (a one-sample estimate of its expectation over z2).
The sampled log-ratios (for IWAE) are log q - log p per dim at the drawn z1, z2.
Level 2 has its own mask (its size ``latent2`` is masked up to the population's Zmax like
``latent``); the extra layers use no dropout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tuner.vae.layers import StackedLinear

__all__ = ["Ladder", "gaussian_kl_pair"]


def gaussian_kl_pair(mu_q: Tensor, logvar_q: Tensor, mu_p: Tensor, logvar_p: Tensor) -> Tensor:
    """KL(N(mu_q, var_q) || N(mu_p, var_p)) elementwise, nats."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).square()) * torch.exp(-logvar_p) - 1.0)


class Ladder(nn.Module):
    """Level 2 of the ladder: bottom-up d1 -> q(z2|x), top-down z2 -> p(z1|z2)."""

    def __init__(self, slots: int, hidden_max: int, latent_max: int) -> None:
        super().__init__()
        self.up = StackedLinear(slots, hidden_max, hidden_max)
        self.up_mu = StackedLinear(slots, hidden_max, latent_max)
        self.up_logvar = StackedLinear(slots, hidden_max, latent_max)
        self.down = StackedLinear(slots, latent_max, hidden_max)
        self.down_mu = StackedLinear(slots, hidden_max, latent_max)
        self.down_logvar = StackedLinear(slots, hidden_max, latent_max)
        self.register_buffer("latent2_mask", torch.zeros(slots, latent_max))

    @torch.no_grad()
    def init_slot(self, slot: int, latent: int, latent2: int, hidden: int, generator: torch.Generator) -> None:
        self.up.init_slot(slot, hidden, hidden, generator)
        self.up_mu.init_slot(slot, hidden, latent2, generator)
        self.up_logvar.init_slot(slot, hidden, latent2, generator)
        self.down.init_slot(slot, latent2, hidden, generator)
        self.down_mu.init_slot(slot, hidden, latent, generator)
        self.down_logvar.init_slot(slot, hidden, latent, generator)
        self.latent2_mask[slot].zero_()
        self.latent2_mask[slot, :latent2] = 1.0

    def top(self, d1: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder features d1 (S, B, H) -> q(z2|x): mu2, logvar2 (S, B, Zmax), 0 on padding."""
        d2 = F.relu(self.up(d1))
        mask = self.latent2_mask.unsqueeze(1)
        return self.up_mu(d2) * mask, self.up_logvar(d2) * mask

    def prior1(self, z2: Tensor, mask1: Tensor) -> tuple[Tensor, Tensor]:
        """z2 (S, B, Zmax) -> p(z1|z2): mu_p, logvar_p (S, B, Zmax), 0 on level-1 padding."""
        h = F.relu(self.down(z2 * self.latent2_mask.unsqueeze(1)))
        return self.down_mu(h) * mask1, self.down_logvar(h) * mask1

    def sample(self, local: dict[str, Tensor], eps: Tensor, mask1: Tensor, mc: bool) -> tuple[Tensor, Tensor]:
        """eps (S, B, 2, Zmax) -> z = [z1, z2] (S, B, 2*Zmax) and per-dim KL pieces (same shape)."""
        mask2 = self.latent2_mask.unsqueeze(1)
        mu2, lv2, mu_hat, lv_hat = local["mu2"], local["logvar2"], local["mu"], local["logvar"]
        eps1, eps2 = eps[..., 0, :], eps[..., 1, :]
        z2 = (mu2 + torch.exp(0.5 * lv2) * eps2) * mask2
        mu_p, lv_p = self.prior1(z2, mask1)
        lv_q = -torch.logaddexp(-lv_hat, -lv_p)  # precision-weighted merge
        mu_q = (mu_hat * torch.exp(-lv_hat) + mu_p * torch.exp(-lv_p)) * torch.exp(lv_q)
        z1 = (mu_q + torch.exp(0.5 * lv_q) * eps1) * mask1
        if mc:  # sampled log q - log p per dim; q's term from eps: (z - mu)^2 / var = eps^2
            kl1 = -0.5 * (lv_q + eps1.square()) + 0.5 * (lv_p + (z1 - mu_p).square() * torch.exp(-lv_p))
            kl2 = -0.5 * (lv2 + eps2.square()) + 0.5 * z2.square()
        else:
            kl1 = gaussian_kl_pair(mu_q, lv_q, mu_p, lv_p)
            kl2 = 0.5 * (mu2.square() + lv2.exp() - 1.0 - lv2)
        return torch.cat([z1, z2], dim=-1), torch.cat([kl1 * mask1, kl2 * mask2], dim=-1)
