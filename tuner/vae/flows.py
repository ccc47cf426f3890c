"""Inverse autoregressive flow (Kingma et al. 2016) with a leading slot axis.

Each step is a MADE (Germain et al. 2015): masked stacked linears z -> hidden -> (m, s), plus the
encoder's context h added to the hidden layer, and the numerically stable update
``z <- sigma * z + (1 - sigma) * m`` with ``sigma = sigmoid(s + FORGET_BIAS)``. Output dim d sees
only input dims earlier in the step's order, so the Jacobian is triangular and
``log |det dz'/dz| = sum_d log sigma_d``: the per-dim ``log sigma_d`` is the flow's per-dim share of
log q(z|x), which keeps free bits and KL-per-dim defined for this family. Orders alternate between
ascending and descending over the slot's *own* latent dims (not the padded maximum), so a slot with
3 of Zmax = 8 dims computes the same function as a 3-dim model alone.

Per-slot MADE masks are buffers (S, steps, ...) rebuilt by ``init_slot``; masked weights start at
zero and get zero gradient (the mask multiplies the weight in the forward pass), so they stay zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tuner.vae.layers import StackedLinear

__all__ = ["FORGET_BIAS", "IAF", "made_degrees"]

FORGET_BIAS = 1.5  # sigmoid(1.5) ~ 0.82: each step starts close to the identity (Kingma et al. 2016)


def made_degrees(latent: int, hidden: int, descending: bool) -> tuple[Tensor, Tensor]:
    """(input/output degrees (latent,), hidden degrees (hidden,)) of one MADE step.

    Input dim d has degree d + 1 (ascending) or latent - d (descending); hidden units cycle through
    1 .. latent - 1, or are context-only (degree 0) when latent == 1.
    """
    order = torch.arange(latent)
    deg_in = latent - order if descending else order + 1
    deg_h = torch.arange(hidden) % max(latent - 1, 1) + 1 if latent > 1 else torch.zeros(hidden, dtype=torch.int64)
    return deg_in, deg_h


class IAF(nn.Module):
    """``steps`` IAF steps for S slots. z (S, B, Zmax), context h (S, B, C) -> z', log sigma (S, B, Zmax)."""

    def __init__(self, slots: int, steps: int, latent_max: int, hidden_max: int, context_max: int) -> None:
        super().__init__()
        self.steps = steps
        self.made_in = nn.ModuleList([StackedLinear(slots, latent_max, hidden_max) for _ in range(steps)])
        self.made_context = nn.ModuleList([StackedLinear(slots, context_max, hidden_max) for _ in range(steps)])
        self.made_m = nn.ModuleList([StackedLinear(slots, hidden_max, latent_max) for _ in range(steps)])
        self.made_s = nn.ModuleList([StackedLinear(slots, hidden_max, latent_max) for _ in range(steps)])
        self.register_buffer("mask_in", torch.zeros(slots, steps, latent_max, hidden_max))
        self.register_buffer("mask_out", torch.zeros(slots, steps, hidden_max, latent_max))

    @torch.no_grad()
    def init_slot(self, slot: int, latent: int, hidden: int, context: int, generator: torch.Generator) -> None:
        """Fresh MADE weights at the slot's true sizes, then masked; masks from the slot's degrees."""
        self.mask_in[slot].zero_()
        self.mask_out[slot].zero_()
        for t in range(self.steps):
            deg_in, deg_h = made_degrees(latent, hidden, descending=t % 2 == 1)
            self.mask_in[slot, t, :latent, :hidden] = (deg_h[None, :] >= deg_in[:, None]).float()
            self.mask_out[slot, t, :hidden, :latent] = (deg_in[None, :] > deg_h[:, None]).float()
            self.made_in[t].init_slot(slot, latent, hidden, generator)
            self.made_context[t].init_slot(slot, context, hidden, generator)
            self.made_m[t].init_slot(slot, hidden, latent, generator)
            self.made_s[t].init_slot(slot, hidden, latent, generator)
            self.made_in[t].weight[slot] *= self.mask_in[slot, t]
            self.made_m[t].weight[slot] *= self.mask_out[slot, t]
            self.made_s[t].weight[slot] *= self.mask_out[slot, t]

    def forward(self, z: Tensor, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """z (S, B, Z) masked base sample, h (S, B, C), mask (S, 1, Z) -> (z_T, sum_t log sigma_t), masked."""
        log_det = torch.zeros_like(z)
        for t in range(self.steps):
            m_in, m_out = self.mask_in[:, t], self.mask_out[:, t]
            mi, mm, ms = self.made_in[t], self.made_m[t], self.made_s[t]
            hidden = F.relu(torch.baddbmm(mi.bias, z, mi.weight * m_in) + self.made_context[t](h))  # (S, B, H)
            m = torch.baddbmm(mm.bias, hidden, mm.weight * m_out)
            s = torch.baddbmm(ms.bias, hidden, ms.weight * m_out) + FORGET_BIAS
            sigma = torch.sigmoid(s)
            z = (sigma * z + (1.0 - sigma) * m) * mask
            log_det = log_det + F.logsigmoid(s) * mask
        return z, log_det
