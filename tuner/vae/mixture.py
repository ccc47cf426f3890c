"""A mixture of M encoders sharing one decoder: the MISELBO of Kviman et al., "Cooperation in the
Latent Space: The Benefits of Adding Mixture Components in Variational Autoencoders" (ICML 2023,
arXiv 2209.15514).

q(z|x) = (1/M) sum_m q_m(z|x), each q_m a diagonal Gaussian from its own encoder. The objective
scores every component's draws against the *mixture's* log-density (a logsumexp over components),
so the components cooperate: each covers part of the posterior instead of all of them covering the
same mode. Component 1 is the VAE's own encoder (so ``model.mixture: 1`` is exactly the Gaussian
VAE, bit for bit); components 2..M are :class:`MixtureEncoders`, the same dense stack as the
encoder's (over the same input: the pixels, or a conv model's shared conv features), stacked on
the slot axis as S x (M - 1) rows so one batched matmul runs them all.

Noise: a draw's first coordinate picks its component (``floor(Phi(eps_0) M)``: uniform for N(0, 1)
noise), the rest is the component's Gaussian noise, so :meth:`VAE.sample` keeps its interface and
every coordinate stays independent of the population's Zmax. Training draws a uniformly random
component per example (an unbiased MISELBO estimate: the component's law does not depend on the
weights). Evaluations *stratify* (:func:`stratify`): draw j of K takes component j mod M, and the
importance weights carry log(K / (M n_m)) (n_m: draws of component m) so their mean is an unbiased
estimate of p(x) for any K >= M; with K = 200 and M | 200 every component gets K / M draws.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tuner.vae.priors import chain_rule_dims

__all__ = ["GroupedLinear", "MixtureEncoders", "posterior_log_prob_dims", "pick", "stratify"]


def pick(eps: Tensor, components: int) -> Tensor:
    """The component (int64, eps.shape[:-1]) each draw's first noise coordinate selects."""
    return (torch.special.ndtr(eps[..., 0]) * components).long().clamp(0, components - 1)


def posterior_log_prob_dims(z: Tensor, mu: Tensor, logvar: Tensor, mask: Tensor) -> Tensor:
    """Chain-rule pieces log q(z_d | z_<d, x) of the equal-weight mixture posterior: (S, B, Z).

    z (S, B, Z); mu, logvar (S, B, M, Z), one set of components per example; mask (S, Z).
    Sums over d to log q(z|x) (see :mod:`tuner.vae.priors` for why per dim).
    """
    m = mu.shape[2]
    log_w = torch.full((1, 1, m), -math.log(m), device=z.device, dtype=z.dtype)
    return chain_rule_dims(z[:, :, None], log_w, mu, logvar, mask)


def stratify(eps: Tensor, draws: Tensor, k: int, components: int) -> tuple[Tensor, Tensor | None]:
    """Pin draw j to component j mod M and give each draw its stratum's log-weight offset.

    eps (S, J, B, 1 + Z): the noise of draws ``draws`` (J,) of k per example. Returns the noise
    with its selector coordinate set, and (J,) log(k / (M n_m)), which makes the weighted mean over
    all k draws an unbiased mixture expectation. With k < M (not every component drawn) or one
    component, eps is returned unchanged (random components) and the offset is None (equal weights).
    """
    if components == 1 or k < components:
        return eps, None
    comp = draws % components
    counts = torch.bincount(torch.arange(k, device=draws.device) % components, minlength=components)
    selector = torch.special.ndtri((comp.to(eps.dtype) + 0.5) / components)  # Phi^-1 of the stratum's middle
    eps = torch.cat([selector[None, :, None, None].expand(*eps.shape[:-1], 1), eps[..., 1:]], dim=-1)
    return eps, torch.log(k / (components * counts[comp].to(eps.dtype)))


class GroupedLinear(nn.Module):
    """y[s, g] = x[s, g] @ W[s, g] + b[s, g]: G linear layers per slot, x (S, G, B, in) -> (S, G, B, out).

    The slot axis stays first (as in :class:`tuner.vae.layers.StackedLinear`), so the engine's flat
    per-slot parameter vector, the stacked optimizer and the slot checkpoints handle it unchanged.
    """

    def __init__(self, slots: int, groups: int, in_max: int, out_max: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(slots, groups, in_max, out_max))
        self.bias = nn.Parameter(torch.zeros(slots, groups, 1, out_max))

    def forward(self, x: Tensor) -> Tensor:
        return torch.matmul(x, self.weight) + self.bias

    @torch.no_grad()
    def init_slot(self, slot: int, group: int, fan_in: int, fan_out: int, generator: torch.Generator) -> None:
        """PyTorch's default Linear init at the slot's true shape, zero-padded (as StackedLinear)."""
        bound = 1.0 / math.sqrt(fan_in)
        self.weight[slot, group].zero_()
        self.bias[slot, group].zero_()
        self.weight[slot, group, :fan_in, :fan_out] = (torch.rand((fan_in, fan_out), generator=generator) * 2.0 - 1.0) * bound
        self.bias[slot, group, 0, :fan_out] = (torch.rand((fan_out,), generator=generator) * 2.0 - 1.0) * bound


class MixtureEncoders(nn.Module):
    """Encoders 2..M of a mixture posterior: for each slot, M - 1 dense stacks (depth hidden layers,
    then mu and logvar heads) shaped like the VAE's own encoder."""

    def __init__(self, slots: int, components: int, enc_in: int, hidden_max: int, latent_max: int, depth: int) -> None:
        super().__init__()
        self.extra = g = components - 1
        self.hidden = nn.ModuleList(
            [GroupedLinear(slots, g, enc_in if i == 0 else hidden_max, hidden_max) for i in range(depth)]
        )
        self.mu = GroupedLinear(slots, g, hidden_max, latent_max)
        self.logvar = GroupedLinear(slots, g, hidden_max, latent_max)

    @torch.no_grad()
    def init_slot(self, slot: int, enc_in: int, hidden: int, latent: int, generator: torch.Generator) -> None:
        """Fresh weights for the slot's M - 1 encoders at its true sizes, component by component."""
        for c in range(self.extra):
            for i, layer in enumerate(self.hidden):
                layer.init_slot(slot, c, enc_in if i == 0 else hidden, hidden, generator)
            self.mu.init_slot(slot, c, hidden, latent, generator)
            self.logvar.init_slot(slot, c, hidden, latent, generator)

    def forward(self, h: Tensor, mask: Tensor, dropout: Callable[[Tensor, int], Tensor]) -> tuple[Tensor, Tensor]:
        """h (S, B, enc_in) -> mu, logvar (S, B, M - 1, Zmax), masked.

        dropout(h (S, (M-1) B, H), layer) applies the slot's dropout to layer ``layer`` of all its
        extra encoders at once (the VAE's, with its own stream per layer).
        """
        s, b, _ = h.shape
        h = h[:, None].expand(s, self.extra, b, h.shape[-1])
        for i, layer in enumerate(self.hidden):
            h = F.relu(layer(h))
            h = dropout(h.reshape(s, self.extra * b, -1), i).view(s, self.extra, b, -1)
        m = mask[:, None, None]
        return (self.mu(h).transpose(1, 2) * m, self.logvar(h).transpose(1, 2) * m)
