"""What a population is made of: its shape (what its slots share), a slot's host-side state, one
slot's epoch as the worker sees it, and an empty stacked model of a shape (:func:`build_vae`).

Kept apart from :mod:`tuner.vae.engine` (which trains populations) so the worker, the checkpoints
and the evaluation name these without the engine's machinery.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from tuner.vae.models import VAE

if TYPE_CHECKING:  # pydantic only for types: the engine imports with torch and numpy alone
    from tuner.spec import TrainConfig

__all__ = ["EpochResult", "PopulationShape", "SlotState", "SlotStatus", "build_vae", "latent_size"]


SlotStatus = Literal["empty", "running", "finished", "stopped"]


@dataclass(frozen=True)
class PopulationShape:
    """What slots of one population must share: everything that cannot be masked per slot.

    The model family is part of it (posterior, flow steps, prior, mixture components, hierarchy):
    each changes the set or the shapes of the weights. So is the training objective with its sample
    count (``samples``: 1 for the -ELBO, k for the IWAE bound): it sets the step's tensor shapes.
    A field a family does not use is stored as its neutral value (flow_steps 0 unless iaf,
    prior_components 0 unless mog/vamp, diffusion_steps and diffusion_hidden 0 unless diffusion,
    samples 1 for the ELBO), so configs that differ only in an
    ignored field share a population. The ladder's latent2 is masked like latent.
    """

    arch: str
    depth: int
    channels: int
    likelihood: str
    batch_size: int
    optimizer: str
    posterior: str = "gaussian"
    flow_steps: int = 0
    prior: str = "normal"
    prior_components: int = 0
    diffusion_steps: int = 0
    diffusion_hidden: int = 0
    hierarchy: str = "flat"
    objective: str = "elbo"
    samples: int = 1  # z draws per example in a training step (the IWAE bound's k)
    mixture: int = 1  # encoders of a mixture posterior (tuner.vae.mixture)

    @classmethod
    def of(cls, config: TrainConfig) -> PopulationShape:
        m, t = config.model, config.train
        channels = m.channels if m.arch == "conv" else 0
        diffusion = m.prior == "diffusion"
        return cls(
            m.arch, m.depth, channels, m.likelihood, config.optim.batch_size, config.optim.name,
            posterior=m.posterior, flow_steps=m.flow_steps if m.posterior == "iaf" else 0,
            prior=m.prior, prior_components=m.prior_components if m.prior in ("mog", "vamp") else 0,
            diffusion_steps=m.diffusion_steps if diffusion else 0,
            diffusion_hidden=m.diffusion_hidden if diffusion else 0,
            hierarchy=m.hierarchy, objective=t.objective, samples=t.k if t.objective == "iwae" else 1,
            mixture=m.mixture,
        )


def latent_size(config: TrainConfig) -> int:
    """The most latent dims any level of this config needs: what a population's Zmax must hold."""
    m = config.model
    return max(m.latent, m.latent2) if m.hierarchy == "ladder" else m.latent


@dataclass
class SlotState:
    """Host-side bookkeeping of one slot (the device holds the tensors)."""

    config: TrainConfig | None = None
    status: SlotStatus = "empty"
    reason: str | None = None
    epoch: int = 0
    best_val: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class EpochResult:
    """One slot's epoch, as the worker and the progress bar see it (nats per example)."""

    slot: int
    epoch: int  # epochs completed by this slot
    train_loss: float
    train_neg_elbo: float
    val_neg_elbo: float
    val_recon: float
    val_kl: float
    kl_weight: float
    lr: float
    improved: bool
    status: SlotStatus
    reason: str | None
    inner_steps: float = 0.0  # aggressive encoder steps per decoder step (tuner.vae.aggressive)


def build_vae(shape: PopulationShape, image_shape: tuple[int, int, int], latent_max: int, hidden_max: int,
              device: torch.device | str, slots: int) -> VAE:
    """An empty VAE (weights zero until ``init_slot``) of a population shape, sizes and slot count."""
    if torch.device(device).type == "meta":
        with torch.device("meta"):
            return _vae(shape, image_shape, latent_max, hidden_max, slots)
    return _vae(shape, image_shape, latent_max, hidden_max, slots).to(device)


def _vae(shape: PopulationShape, image_shape: tuple[int, int, int], latent_max: int, hidden_max: int,
         slots: int) -> VAE:
    return VAE(
        arch=shape.arch, likelihood=shape.likelihood, image_shape=image_shape, slots=slots,
        latent_max=latent_max, hidden_max=hidden_max, depth=shape.depth, channels=max(shape.channels, 1),
        posterior=shape.posterior, flow_steps=shape.flow_steps, prior=shape.prior,
        prior_components=shape.prior_components, hierarchy=shape.hierarchy, mixture=shape.mixture,
        diffusion_steps=shape.diffusion_steps, diffusion_hidden=shape.diffusion_hidden,
    )
