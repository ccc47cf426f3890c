"""Population-shaped VAEs: MLP and conv encoders/decoders with a leading slot axis.

Every tensor is slot-major: data (S, B, D), posteriors (S, B, Z). Slot s uses the first
``latent[s]`` latent dims and ``hidden[s]`` hidden units of the population's maxima; the rest is
zero padding that stays zero (see :mod:`tuner.vae.layers`). The likelihood is Bernoulli (logits) or
Gaussian (mean plus a learned per-pixel log-scale per slot). ``forward`` returns a named
:class:`VAEOutput`; the engine reads only those fields and never branches on the model family.

Families (fixed per population: they change tensor shapes):

* posterior ``gaussian`` (diagonal, reparameterized; the default) or ``iaf`` (the Gaussian pushed
  through ``flow_steps`` inverse autoregressive steps, :mod:`tuner.vae.flows`, with context h = the
  encoder's last hidden layer);
* prior ``normal`` (N(0, I); the default), ``mog`` (a learned mixture of ``prior_components``
  Gaussians) or ``vamp`` (the VampPrior over ``prior_components`` pseudo-inputs), :mod:`tuner.vae.priors`;
  or ``diffusion`` (a ``diffusion_steps``-step DDPM over z, :mod:`tuner.vae.diffusion`, Wehenkel &
  Louppe 2021), whose log p(z) is only bounded: its KL is log q(z|x) minus a one-chain variational
  bound on log p(z), so its -ELBO and IWAE NLL are upper bounds on the true model's;
* hierarchy ``flat`` (the default) or ``ladder`` (two levels, z1 of size ``latent`` near the data
  and z2 of size ``latent2`` on top, :mod:`tuner.vae.ladder`; Gaussian posterior and prior only);
* ``mixture`` M > 1: q(z|x) is the mixture of M Gaussian encoders, :mod:`tuner.vae.mixture`.

Remedies for posterior collapse (auxiliary decoder, MMD, orthogonal decoder) are per-slot values
(buffers set by :meth:`VAE.init_slot`), so slots with and without them share a population; they
change the training ``loss`` only, never the reported ``neg_elbo``, ``recon`` or ``kl``
(:mod:`tuner.vae.remedies`).

The default family (gaussian, normal, flat) is *closed form*: its KL is analytic, and it computes
exactly what it always did. Every other family estimates log q(z|x) - log p(z) per dim from the
drawn z (Monte Carlo), except the ladder, which is analytic per level given the drawn z2.
All families share one interface: :meth:`VAE.local_posterior` (the per-example variational
parameters) and :meth:`VAE.sample` (z and the per-dim KL pieces from given noise), which
training, :mod:`tuner.vae.metrics` and the gap analysis all go through.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tuner.errors import TunerError
from tuner.vae import noise, remedies
from tuner.vae.diffusion import DiffusionPrior
from tuner.vae.flows import IAF
from tuner.vae.ladder import Ladder
from tuner.vae.layers import StackedConv2d, StackedConvTranspose2d, StackedLinear, fold_slots, unfold_slots
from tuner.vae.metrics import gaussian_kl_per_dim
from tuner.vae.mixture import MixtureEncoders, pick, posterior_log_prob_dims, stratify
from tuner.vae.priors import MixturePrior, VampPrior, mixture_log_prob_dims, normal_log_prob_dims, sample_prior
from tuner.vae.schedules import free_bits_kl

__all__ = ["VAE", "VAEOutput"]

_LOG_2PI = math.log(2.0 * math.pi)
_STREAM_EPS, _STREAM_DROPOUT = 1, 2  # the remedies' streams are 3 and 4 (tuner.vae.remedies)


@dataclass
class VAEOutput:
    """Per-slot training quantities, each (S,), in nats per example (batch means)."""

    loss: Tensor  # what is minimized: recon + kl_weight * |KL (free bits) - capacity| (+ remedies, module docstring)
    neg_elbo: Tensor  # recon + kl, beta = 1
    recon: Tensor  # -E_q log p(x|z)
    kl: Tensor  # KL(q(z|x) || p(z)): analytic, or MC for non-closed-form families (module docstring)


class VAE(nn.Module):
    """N independent VAEs of one *shape* (architecture, depth, channels, likelihood, data shape, family)."""

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
        posterior: str = "gaussian",
        flow_steps: int = 0,
        prior: str = "normal",
        prior_components: int = 0,
        hierarchy: str = "flat",
        mixture: int = 1,
        diffusion_steps: int = 0,
        diffusion_hidden: int = 0,
    ) -> None:
        super().__init__()
        self.posterior, self.prior_name, self.hierarchy = posterior, prior, hierarchy
        self.closed_form = posterior == "gaussian" and prior == "normal" and hierarchy == "flat" and mixture == 1
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
        self.register_buffer("aux_weight", torch.zeros(slots))  # alpha per slot, 0 = no auxiliary decoder
        self.register_buffer("mmd_weight", torch.zeros(slots))  # lambda per slot, 0 = the KL divergence
        self.register_buffer("ortho_weight", torch.zeros(slots))  # per slot, 0 = no orthogonality penalty
        self._any_dropout = self._any_aux = self._any_mmd = self._any_ortho = False
        # family modules come after the base ones, so the default family's parameters (names,
        # order, the flat vector's layout, the init draws) are exactly what they always were
        self.flow = IAF(slots, flow_steps, latent_max, hidden_max, hidden_max) if posterior == "iaf" else None
        self.prior: MixturePrior | VampPrior | None = None
        if prior == "mog":
            self.prior = MixturePrior(slots, prior_components, latent_max)
        elif prior == "vamp":
            self.prior = VampPrior(slots, prior_components, self.data_dim)
        self.ladder = Ladder(slots, hidden_max, latent_max) if hierarchy == "ladder" else None
        # last of all, so every other parameter keeps its place in the flat vector and its init draws
        self.aux_out = StackedLinear(slots, latent_max, self.data_dim)  # the auxiliary decoder, z -> x
        # families added after the auxiliary decoder come after it, for the same reason
        self.components = mixture  # of the posterior: encoders 2..M, :mod:`tuner.vae.mixture`
        self.mixture = MixtureEncoders(slots, mixture, enc_in, hidden_max, latent_max, depth) if mixture > 1 else None
        self.diffusion = (
            DiffusionPrior(slots, diffusion_steps, latent_max, diffusion_hidden) if prior == "diffusion" else None
        )
        # the diffusion bound is a one-chain bound on log p(z): -ELBO and IWAE NLL are upper bounds
        self.prior_bound = self.diffusion is not None
        # noise per example: (Zmax,), one row per ladder level, a mixture's component selector then
        # (Zmax,), or the diffusion prior's posterior row then its T forward-chain rows; so
        # coordinates never depend on Zmax
        self.noise_shape: tuple[int, ...] = (2, latent_max) if self.ladder is not None else (latent_max,)
        if self.mixture is not None:
            self.noise_shape = (1 + latent_max,)
        elif self.diffusion is not None:
            self.noise_shape = (1 + diffusion_steps, latent_max)
        # floats per example in the largest temporary of sample() (sizes metric chunks)
        self.sample_width = latent_max * max(prior_components, 1, mixture) + (hidden_max if self.flow is not None else 0)
        if self.diffusion is not None:  # the chain (1 + T) x Zmax, its states twice, T hidden rows twice
            self.sample_width += diffusion_steps * (3 * latent_max + 2 * diffusion_hidden) + latent_max

    @property
    def kl_mask(self) -> Tensor:
        """(S, Zk) 0/1 over the dims that carry KL: latent_mask, and for the ladder [level 1, level 2]."""
        if self.ladder is None:
            return self.latent_mask
        return torch.cat([self.latent_mask, self.ladder.latent2_mask], dim=-1)

    # ----------------------------------------------------------------------------------- slots
    @torch.no_grad()
    def init_slot(
        self, slot: int, *, seed: int, latent: int, hidden: int, dropout: float, latent2: int = 0,
        aux_weight: float = 0.0, mmd_weight: float = 0.0, ortho_weight: float = 0.0,
    ) -> None:
        """Fresh weights for one slot, drawn from its own seed at its true sizes (latent2: the
        ladder's top level; ignored by flat models), and its remedy weights (module docstring)."""
        if max(latent, latent2 if self.ladder is not None else 0) > self.latent_max or hidden > self.hidden_max:
            raise ValueError(
                f"slot needs latent {latent} (level 2: {latent2}), hidden {hidden} but the population holds "
                f"at most {self.latent_max}, {self.hidden_max}"
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
        if self.flow is not None:
            self.flow.init_slot(slot, latent, hidden, hidden, g)
        if self.prior is not None:
            self.prior.init_slot(slot, latent, g)
        if self.ladder is not None:
            self.ladder.init_slot(slot, latent, latent2, hidden, g)
        self.aux_out.init_slot(slot, latent, self.data_dim, g)  # drawn after the others: their draws are unchanged
        if self.mixture is not None:
            self.mixture.init_slot(slot, enc_in, hidden, latent, g)
        if self.diffusion is not None:  # after aux_out's and the mixture's draws: theirs stay unchanged
            self.diffusion.init_slot(slot, latent, self.diffusion.hidden, g)
        self.aux_weight[slot] = aux_weight
        self.mmd_weight[slot] = mmd_weight
        self.ortho_weight[slot] = ortho_weight
        self.refresh_flags()

    def refresh_flags(self) -> None:
        """The host-side flags the forward pass branches on (any slot with dropout, an auxiliary
        decoder, the MMD, the orthogonality penalty), from the per-slot values (after a slot is
        initialised, or slots are copied in)."""
        self._any_dropout = bool((self.dropout_rate > 0).any())
        self._any_aux = bool((self.aux_weight > 0).any())
        self._any_mmd = bool((self.mmd_weight > 0).any())
        self._any_ortho = bool((self.ortho_weight > 0).any())

    @property
    def step_flags(self) -> tuple[bool, bool, bool, bool]:
        """The host-side flags that change a training step's kernels (a captured graph's key)."""
        return self._any_dropout, self._any_aux, self._any_mmd, self._any_ortho

    # ------------------------------------------------------------------------------ networks
    def _dropout(self, h: Tensor, key: Tensor | None, layer: int) -> Tensor:
        if key is None or not self._any_dropout or not self.training:
            return h
        p = self.dropout_rate.view(-1, 1, 1)
        u = noise.uniform(noise.derive(key, _STREAM_DROPOUT, layer), tuple(h.shape[1:]))
        return torch.where(u >= p, h / (1.0 - p), 0.0)

    def _trunk(self, x: Tensor) -> Tensor:
        """x (S, B, D) -> the encoder's dense input: x itself, or the conv layers' features."""
        if self.arch != "conv":
            return x
        s, b, _ = x.shape
        h = fold_slots(x.reshape(s, b, *self.image_shape))  # (B, S*C, H, W)
        for conv in self.conv_enc:
            h = F.max_pool2d(F.relu(conv(h)), 2)
        return unfold_slots(h, s)  # (S, B, 2c*H/4*W/4)

    def _features(self, x: Tensor, dropout_key: Tensor | None = None, trunk: Tensor | None = None) -> Tensor:
        """x (S, B, D) in [0, 1] -> the encoder's last hidden layer (S, B, Hmax) (trunk: _trunk(x), if at hand)."""
        h = self._trunk(x) if trunk is None else trunk
        for i, layer in enumerate(self.enc_hidden):
            h = self._dropout(F.relu(layer(h)), dropout_key, i)
        return h

    def _heads(self, h: Tensor) -> tuple[Tensor, Tensor]:
        mask = self.latent_mask.unsqueeze(1)
        return self.enc_mu(h) * mask, self.enc_logvar(h) * mask

    def encode(self, x: Tensor, dropout_key: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (S, B, D) in [0, 1] -> mu, logvar (S, B, Zmax) of the decoder's latent; padding exactly 0.

        For the default family this is q(z|x). For the others it is a deterministic summary (used
        for pictures): IAF the flow applied to the base mean (eps = 0) with the base logvar; ladder
        q(z1|x, z2 = mu2).
        """
        if self.flow is None and self.ladder is None and self.mixture is None:
            return self._heads(self._features(x, dropout_key))
        local = self.local_posterior(x, dropout_key)
        if self.mixture is not None:  # the mixture's moments, per dim
            mean = local["mu"].mean(2)
            second = (torch.exp(local["logvar"]) + local["mu"].square()).mean(2)
            return mean, torch.log((second - mean.square()).clamp_min(1e-8)) * self.latent_mask.unsqueeze(1)
        zero = torch.zeros(*local["mu"].shape[:2], *self.noise_shape, device=x.device)
        z, _ = self.sample(local, zero)
        if self.ladder is None:
            return z, local["logvar"]
        mask = self.latent_mask.unsqueeze(1)
        _, lv_p = self.ladder.prior1(local["mu2"], mask)
        return z[..., : self.latent_max], -torch.logaddexp(-local["logvar"], -lv_p) * mask

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

    def log_likelihood(self, x: Tensor, params: Tensor, log_scale: Tensor | None = None) -> Tensor:
        """log p(x|z) summed over the D data dims -> (S, B) nats (Gaussian: the model's per-pixel
        log-scale unless another is given)."""
        if self.likelihood == "bernoulli":
            return -F.binary_cross_entropy_with_logits(params, x.expand_as(params), reduction="none").sum(-1)
        log_scale = (self.log_scale if log_scale is None else log_scale).clamp(-7.0, 3.0)
        z = (x - params) * torch.exp(-log_scale)
        return (-0.5 * z * z - log_scale - 0.5 * _LOG_2PI).sum(-1)

    def mean_image(self, params: Tensor) -> Tensor:
        """Likelihood params -> the expected image in data space (for pictures)."""
        return torch.sigmoid(params) if self.likelihood == "bernoulli" else params.clamp(0.0, 1.0)

    # ------------------------------------------------------------------------------ families
    def _gaussian_encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """q(z|x)'s Gaussian heads without dropout: the VampPrior's components at its pseudo-inputs."""
        return self._heads(self._features(x))

    def log_prior_dims(self, z: Tensor) -> Tensor:
        """log p(z) of a flat model split per dim (chain rule for mixtures, :mod:`tuner.vae.priors`): (S, B, Zmax)."""
        if self.diffusion is not None:  # never N(0, I) by mistake: the DDPM's bound needs its chain's noise
            raise ValueError("the diffusion prior has no log p(z), only a bound along a chain: use VAE.sample")
        if self.prior is None:
            return normal_log_prob_dims(z)
        log_w, mu, logvar = self.prior.components(self._gaussian_encode, self.latent_mask)
        return mixture_log_prob_dims(z, log_w, mu, logvar, self.latent_mask)

    def sample(self, local: dict[str, Tensor], eps: Tensor, mc: bool = False) -> tuple[Tensor, Tensor]:
        """z ~ q(z|x) from standard-normal eps (S, B, *noise_shape), and its per-dim KL pieces.

        Returns z (S, B, Zk) and kl (S, B, Zk), 0 on padding; the decoder reads z[..., :Zmax] (for
        the ladder Zk = 2 Zmax: [z1, z2]). kl sums over dims to this family's KL estimate: the
        analytic KL where it is closed form (mc=False), else the sampled log q(z|x) - log p(z);
        mc=True always gives the sampled log-ratio (what an importance weight needs).
        """
        mask = self.latent_mask.unsqueeze(1)
        if self.ladder is not None:
            return self.ladder.sample(local, eps, mask, mc)
        mu, logvar = local["mu"], local["logvar"]
        if self.mixture is not None:  # one component per draw (its selector), scored by the whole mixture
            idx = pick(eps, self.components)[..., None, None].expand(*mu.shape[:2], 1, mu.shape[-1])
            mu_c, logvar_c = mu.gather(2, idx).squeeze(2), logvar.gather(2, idx).squeeze(2)
            z = (mu_c + torch.exp(0.5 * logvar_c) * eps[..., 1:]) * mask
            log_q = posterior_log_prob_dims(z, mu, logvar, self.latent_mask)
            return z, (log_q - self.log_prior_dims(z)) * mask
        chain = None
        if self.diffusion is not None:  # row 0 draws z, rows 1..T drive the prior's forward chain
            eps, chain = eps[..., 0, :], eps[..., 1:, :]
        z = mu + torch.exp(0.5 * logvar) * eps
        if self.closed_form and not mc:
            return z, gaussian_kl_per_dim(mu, logvar)  # (S, B, Zmax), 0 on padding
        log_q = -0.5 * (_LOG_2PI + logvar + eps.square())  # log N(z; mu, var) per dim, from eps
        if self.flow is not None:
            z, log_det = self.flow(z * mask, local["h"], mask)
            log_q = log_q - log_det
        if chain is not None:  # log q(z|x) minus the DDPM's bound on log p(z), per dim
            return z * mask, (log_q - self.diffusion.bound_dims(z * mask, chain, mask)) * mask
        return z * mask, (log_q - self.log_prior_dims(z * mask)) * mask

    def posterior_gaussian(self, local: dict[str, Tensor]) -> tuple[Tensor, Tensor] | None:
        """q(z|x) as (mu, logvar) over the KL dims when it is exactly a diagonal Gaussian (flat,
        gaussian posterior, any prior), else None (IAF, ladder: metrics then moment-match samples)."""
        if self.flow is None and self.ladder is None and self.mixture is None:
            return local["mu"], local["logvar"]
        return None

    def stratify(self, eps: Tensor, draws: Tensor, k: int) -> tuple[Tensor, Tensor | None]:
        """Noise (S, J, B, *noise_shape) of draws ``draws`` (J,) out of k per example, stratified
        over a mixture posterior's components, and the draws' log-weight offsets (J,); unchanged and
        None (equal weights) for every other family (:func:`tuner.vae.mixture.stratify`)."""
        if self.mixture is None:
            return eps, None
        return stratify(eps, draws, k, self.components)

    def prior_sample(self, keys: Tensor, n: int) -> Tensor:
        """n draws per slot from the generative model's p(z) in the decoder's latent: (S, n, Zmax).

        keys (S,). A flat normal prior draws exactly ``noise.normal(keys, (n, Zmax))``; the ladder
        draws z2 ~ N(0, I) then z1 ~ p(z1|z2); the diffusion prior runs its reverse chain.
        """
        if self.diffusion is not None:
            return self.diffusion.sample(keys, n, self.latent_mask)
        if self.ladder is None:
            return sample_prior(self.prior, self._gaussian_encode, self.latent_mask, keys, n)
        eps = noise.normal(keys, (n, 2, self.latent_max))
        z2 = eps[:, :, 1] * self.ladder.latent2_mask.unsqueeze(1)
        mu_p, lv_p = self.ladder.prior1(z2, self.latent_mask.unsqueeze(1))
        return (mu_p + torch.exp(0.5 * lv_p) * eps[:, :, 0]) * self.latent_mask.unsqueeze(1)

    # ------------------------------------------------------------------------------ training
    def forward(
        self, x: Tensor, key: Tensor, kl_weight: Tensor, capacity: Tensor, free_bits: Tensor, samples: int = 1,
        iwae: bool = False,
    ) -> VAEOutput:
        """One stochastic pass: x (S, B, D), per-slot keys (S,) and schedule values (S,).

        samples: z draws per example (the encoder runs once); recon, KL and -ELBO are their means.
        iwae: the loss is the ``samples``-draw importance-weighted bound with log-weights
        log p(x|z) - kl_weight * (log q(z|x) - log p(z)) instead of the -ELBO with the KL schedule.
        The slots' remedies act on the loss in every case (:func:`tuner.vae.remedies.apply`; the config allows
        the MMD with the -ELBO objective only).
        """
        local = self.local_posterior(x, key)
        if samples == 1 and not iwae:  # the -ELBO from one draw: the default training step
            eps = noise.normal(noise.derive(key, _STREAM_EPS), (x.shape[1], *self.noise_shape))  # (S, B, *noise)
            z, kl_per_dim = self.sample(local, eps)  # (S, B, Zk) each, 0 on padding
            params = self.decode(z[..., : self.latent_max], key)
            recon = -self.log_likelihood(x, params).mean(1)  # (S,)
            kl = kl_per_dim.sum(-1).mean(1)
            kl_term = free_bits_kl(kl_per_dim, free_bits, self.kl_mask)
            loss = remedies.apply(self, recon + kl_weight * (kl_term - capacity).abs(), recon, x, z, key, params)
            return VAEOutput(loss=loss, neg_elbo=recon + kl, recon=recon, kl=kl)
        s, b = x.shape[:2]
        # draws (S, k, B, *noise) flattened to rows ordered (k, b), the posteriors tiled to match;
        # the IWAE bound stratifies a mixture posterior's draws over its components
        eps = noise.normal(noise.derive(key, _STREAM_EPS), (samples, b, *self.noise_shape))
        offset = None
        if iwae:
            eps, offset = self.stratify(eps, torch.arange(samples, device=eps.device), samples)
        eps = eps.flatten(1, 2)
        tiled = {name: v.repeat(1, samples, *([1] * (v.dim() - 2))) for name, v in local.items()}
        # mc: the sampled log q(z|x) - log p(z) per draw, what an importance weight needs
        z, kl_per_dim = self.sample(tiled, eps, mc=iwae)  # (S, kB, Zk)
        x = x.repeat(1, samples, 1)  # (S, kB, D), rows ordered as the draws
        params = self.decode(z[..., : self.latent_max], key)
        ll = self.log_likelihood(x, params)  # (S, kB)
        recon, kl = -ll.mean(1), kl_per_dim.sum(-1).mean(1)
        if iwae:
            log_w = (ll - kl_weight.unsqueeze(1) * kl_per_dim.sum(-1)).view(s, samples, b)
            if offset is not None:
                log_w = log_w + offset[:, None]
            loss = -(torch.logsumexp(log_w, dim=1) - math.log(samples)).mean(1)
        else:
            loss = recon + kl_weight * (free_bits_kl(kl_per_dim, free_bits, self.kl_mask) - capacity).abs()
        loss = remedies.apply(self, loss, recon, x, z, key, params)
        return VAEOutput(loss=loss, neg_elbo=recon + kl, recon=recon, kl=kl)

    # -------------------------------------------------------------------- local posteriors
    def local_posterior(self, x: Tensor, dropout_key: Tensor | None = None) -> dict[str, Tensor]:
        """The encoder's per-example variational parameters for x (S, B, D), each (S, B, ...).

        Amortization makes one encoder guess these for every x; analyses that instead optimize
        them per example (the amortization gap) start from this dict, change its tensors and score
        them with :meth:`neg_elbo_local`. Global parameters (weights, a prior, a flow) stay in the model.
        Keys: ``mu``, ``logvar`` (level 1's bottom-up estimate for the ladder; a mixture posterior's
        are (S, B, M, Zmax), component 1 the model's own encoder); IAF adds its context ``h``; the
        ladder adds ``mu2``, ``logvar2`` (q(z2|x)).
        """
        trunk = self._trunk(x)
        h = self._features(x, dropout_key, trunk)
        mu, logvar = self._heads(h)
        if self.mixture is not None:
            mu2, logvar2 = self.mixture(trunk, self.latent_mask, lambda g, i: self._dropout(g, dropout_key, 2 * self.depth + i))
            mu, logvar = torch.cat([mu[:, :, None], mu2], dim=2), torch.cat([logvar[:, :, None], logvar2], dim=2)
        local = {"mu": mu, "logvar": logvar}
        if self.flow is not None:
            local["h"] = h
        if self.ladder is not None:
            local["mu2"], local["logvar2"] = self.ladder.top(h)
        return local

    def neg_elbo_local(self, x: Tensor, local: dict[str, Tensor], keys: Tensor, samples: int = 1) -> Tensor:
        """-ELBO (beta = 1) of every example given its local posterior: (S, B) nats.

        keys (S, B) int64, one per example; sample j draws eps from ``noise.derive(keys, j)``, so
        the estimate is a pure function of the keys and is differentiable in ``local``. The KL is
        the family's estimate from :meth:`sample` (analytic for the default family).
        """
        mu = local["mu"]
        mask = self.latent_mask.unsqueeze(1)
        total = torch.zeros(mu.shape[:2], device=mu.device)
        if self.closed_form:
            logvar = local["logvar"]
            for j in range(samples):
                eps = noise.normal(noise.derive(keys, j).reshape(-1), (mu.shape[-1],)).view_as(mu)
                z = (mu + torch.exp(0.5 * logvar) * eps) * mask
                total = total - self.log_likelihood(x, self.decode(z))
            kl = (gaussian_kl_per_dim(mu, logvar) * mask).sum(-1)
            return total / samples + kl
        for j in range(samples):
            eps = noise.normal(noise.derive(keys, j).reshape(-1), self.noise_shape).view(*mu.shape[:2], *self.noise_shape)
            z, kl = self.sample(local, eps)
            total = total - self.log_likelihood(x, self.decode(z[..., : self.latent_max])) + kl.sum(-1)
        return total / samples
