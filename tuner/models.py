"""Population-shaped VAEs: MLP and conv encoders/decoders with a leading slot axis.

Every tensor is slot-major: data (S, B, D), posteriors (S, B, Z). Slot s uses the first
``latent[s]`` latent dims and ``hidden[s]`` hidden units of the population's maxima; the rest is
zero padding that stays zero (see :mod:`tuner.layers`). The posterior is a diagonal Gaussian with
the reparameterization trick; the likelihood is Bernoulli (logits) or Gaussian (mean plus a learned
per-pixel log-scale per slot). ``forward`` returns a named :class:`VAEOutput`; the engine reads only
those fields and never branches on the model family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tuner import noise
from tuner.errors import TunerError
from tuner.layers import StackedConv2d, StackedConvTranspose2d, StackedLinear, fold_slots, unfold_slots
from tuner.metrics import gaussian_kl_per_dim
from tuner.schedules import free_bits_kl

__all__ = ["VAE", "VAEOutput"]

_LOG_2PI = math.log(2.0 * math.pi)
_STREAM_EPS, _STREAM_DROPOUT = 1, 2


@dataclass
class VAEOutput:
    """Per-slot training quantities, each (S,), in nats per example (batch means)."""

    loss: Tensor  # what is minimized: recon + kl_weight * |KL (free bits) - capacity|
    neg_elbo: Tensor  # recon + kl, beta = 1
    recon: Tensor  # -E_q log p(x|z)
    kl: Tensor  # KL(q(z|x) || N(0, I))


class VAE(nn.Module):
    """N independent VAEs of one *shape* (architecture, depth, channels, likelihood, data shape)."""

    def __init__(
        self,
        *,
        arch: str,
        likelihood: str,
        image_shape: tuple[int, int, int],
        slots: int,
        latent_max: int,
        hidden_max: int,
        depth: int,
        channels: int = 32,
    ) -> None:
        super().__init__()
        self.arch, self.likelihood, self.image_shape = arch, likelihood, image_shape
        self.slots, self.latent_max, self.hidden_max, self.depth = slots, latent_max, hidden_max, depth
        c, h, w = image_shape
        self.data_dim = c * h * w
        if arch == "conv":
            if h % 4 or w % 4 or h < 4 or w < 4:
                raise TunerError(
                    f"model.arch 'conv' needs images whose height and width divide by 4, but the data is "
                    f"{c}x{h}x{w}; use model.arch 'mlp' or data shaped (n, c, h, w)"
                )
            self.conv_enc = nn.ModuleList(
                [StackedConv2d(slots, c, channels, 3, padding=1), StackedConv2d(slots, channels, 2 * channels, 3, padding=1)]
            )
            self.conv_dec = nn.ModuleList(
                [
                    StackedConvTranspose2d(slots, 2 * channels, channels, 4, stride=2, padding=1),
                    StackedConvTranspose2d(slots, channels, c, 4, stride=2, padding=1),
                ]
            )
            self.feature_shape = (2 * channels, h // 4, w // 4)
            enc_in = math.prod(self.feature_shape)
        else:
            self.feature_shape = None
            enc_in = self.data_dim
        dec_out = enc_in
        # encoder: enc_in -> hidden x depth -> (mu, logvar); decoder: latent -> hidden x depth -> dec_out
        self.enc_hidden = nn.ModuleList(
            [StackedLinear(slots, enc_in if i == 0 else hidden_max, hidden_max) for i in range(depth)]
        )
        self.enc_mu = StackedLinear(slots, hidden_max, latent_max)
        self.enc_logvar = StackedLinear(slots, hidden_max, latent_max)
        self.dec_hidden = nn.ModuleList(
            [StackedLinear(slots, latent_max if i == 0 else hidden_max, hidden_max) for i in range(depth)]
        )
        self.dec_out = StackedLinear(slots, hidden_max, dec_out)
        if likelihood == "gaussian":
            self.log_scale = nn.Parameter(torch.zeros(slots, 1, self.data_dim))  # per-pixel log sigma
        self.register_buffer("latent_mask", torch.zeros(slots, latent_max))
        self.register_buffer("dropout_rate", torch.zeros(slots))
        self._any_dropout = False

    # ----------------------------------------------------------------------------------- slots
    @torch.no_grad()
    def init_slot(self, slot: int, *, seed: int, latent: int, hidden: int, dropout: float) -> None:
        """Fresh weights for one slot, drawn from its own seed at its true sizes."""
        if latent > self.latent_max or hidden > self.hidden_max:
            raise ValueError(
                f"slot needs latent {latent}, hidden {hidden} but the population holds at most "
                f"{self.latent_max}, {self.hidden_max}"
            )
        g = torch.Generator().manual_seed(seed)
        enc_in = self.data_dim if self.feature_shape is None else math.prod(self.feature_shape)
        for conv in self.conv_enc if self.arch == "conv" else []:
            conv.init_slot(slot, g)
        for i, layer in enumerate(self.enc_hidden):
            layer.init_slot(slot, enc_in if i == 0 else hidden, hidden, g)
        self.enc_mu.init_slot(slot, hidden, latent, g)
        self.enc_logvar.init_slot(slot, hidden, latent, g)
        for i, layer in enumerate(self.dec_hidden):
            layer.init_slot(slot, latent if i == 0 else hidden, hidden, g)
        self.dec_out.init_slot(slot, hidden, enc_in, g)
        for conv in self.conv_dec if self.arch == "conv" else []:
            conv.init_slot(slot, g)
        if self.likelihood == "gaussian":
            self.log_scale[slot].zero_()
        self.latent_mask[slot].zero_()
        self.latent_mask[slot, :latent] = 1.0
        self.dropout_rate[slot] = dropout
        self._any_dropout = bool((self.dropout_rate > 0).any())

    # ------------------------------------------------------------------------------ networks
    def _dropout(self, h: Tensor, key: Tensor | None, layer: int) -> Tensor:
        if key is None or not self._any_dropout or not self.training:
            return h
        p = self.dropout_rate.view(-1, 1, 1)
        u = noise.uniform(noise.derive(key, _STREAM_DROPOUT, layer), tuple(h.shape[1:]))
        return torch.where(u >= p, h / (1.0 - p), 0.0)

    def encode(self, x: Tensor, dropout_key: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (S, B, D) in [0, 1] -> mu, logvar (S, B, Zmax); padded dims are exactly 0."""
        h = x
        if self.arch == "conv":
            s, b, _ = x.shape
            h = fold_slots(x.reshape(s, b, *self.image_shape))  # (B, S*C, H, W)
            for conv in self.conv_enc:
                h = F.max_pool2d(F.relu(conv(h)), 2)
            h = unfold_slots(h, s)  # (S, B, 2c*H/4*W/4)
        for i, layer in enumerate(self.enc_hidden):
            h = self._dropout(F.relu(layer(h)), dropout_key, i)
        mask = self.latent_mask.unsqueeze(1)
        return self.enc_mu(h) * mask, self.enc_logvar(h) * mask

    def decode(self, z: Tensor, dropout_key: Tensor | None = None) -> Tensor:
        """z (S, B, Zmax) -> likelihood params (S, B, D): Bernoulli logits or Gaussian means."""
        h = z * self.latent_mask.unsqueeze(1)
        for i, layer in enumerate(self.dec_hidden):
            h = self._dropout(F.relu(layer(h)), dropout_key, self.depth + i)
        out = self.dec_out(h)
        if self.arch == "conv":
            s, b, _ = out.shape
            h = fold_slots(F.relu(out).reshape(s, b, *self.feature_shape))
            h = self.conv_dec[1](F.relu(self.conv_dec[0](h)))
            out = unfold_slots(h, s)
        return out

    def log_likelihood(self, x: Tensor, params: Tensor) -> Tensor:
        """log p(x|z) summed over the D data dims -> (S, B) nats."""
        if self.likelihood == "bernoulli":
            return -F.binary_cross_entropy_with_logits(params, x.expand_as(params), reduction="none").sum(-1)
        log_scale = self.log_scale.clamp(-7.0, 3.0)
        z = (x - params) * torch.exp(-log_scale)
        return (-0.5 * z * z - log_scale - 0.5 * _LOG_2PI).sum(-1)

    def mean_image(self, params: Tensor) -> Tensor:
        """Likelihood params -> the expected image in data space (for pictures)."""
        return torch.sigmoid(params) if self.likelihood == "bernoulli" else params.clamp(0.0, 1.0)

    # ------------------------------------------------------------------------------ training
    def forward(self, x: Tensor, key: Tensor, kl_weight: Tensor, capacity: Tensor, free_bits: Tensor) -> VAEOutput:
        """One stochastic pass: x (S, B, D), per-slot keys (S,) and schedule values (S,)."""
        mu, logvar = self.encode(x, key)
        eps = noise.normal(noise.derive(key, _STREAM_EPS), tuple(mu.shape[1:]))  # (S, B, Zmax)
        z = mu + torch.exp(0.5 * logvar) * eps
        recon = -self.log_likelihood(x, self.decode(z, key)).mean(1)  # (S,)
        kl_per_dim = gaussian_kl_per_dim(mu, logvar)  # (S, B, Zmax), 0 on padding
        kl = kl_per_dim.sum(-1).mean(1)
        kl_term = free_bits_kl(kl_per_dim, free_bits, self.latent_mask)
        loss = recon + kl_weight * (kl_term - capacity).abs()
        return VAEOutput(loss=loss, neg_elbo=recon + kl, recon=recon, kl=kl)

    # -------------------------------------------------------------------- local posteriors
    def local_posterior(self, x: Tensor) -> dict[str, Tensor]:
        """The encoder's per-example variational parameters for x (S, B, D), each (S, B, ...).

        Amortization makes one encoder guess these for every x; analyses that instead optimize
        them per example (the amortization gap) start from this dict, change its tensors and score
        them with :meth:`neg_elbo_local`. Global parameters (weights, a prior, a flow) stay in the model.
        """
        mu, logvar = self.encode(x)
        return {"mu": mu, "logvar": logvar}

    def neg_elbo_local(self, x: Tensor, local: dict[str, Tensor], keys: Tensor, samples: int = 1) -> Tensor:
        """-ELBO (beta = 1) of every example given its local posterior: (S, B) nats.

        keys (S, B) int64, one per example; sample j draws eps from ``noise.derive(keys, j)``, so
        the estimate is a pure function of the keys and is differentiable in ``local``.
        """
        mu, logvar = local["mu"], local["logvar"]
        mask = self.latent_mask.unsqueeze(1)
        total = torch.zeros(mu.shape[:2], device=mu.device)
        for j in range(samples):
            eps = noise.normal(noise.derive(keys, j).reshape(-1), (mu.shape[-1],)).view_as(mu)
            z = (mu + torch.exp(0.5 * logvar) * eps) * mask
            total = total - self.log_likelihood(x, self.decode(z))
        kl = (gaussian_kl_per_dim(mu, logvar) * mask).sum(-1)
        return total / samples + kl
