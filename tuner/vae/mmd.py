"""Maximum mean discrepancy between a batch's posterior samples and prior samples (``kl.divergence: mmd``).

Why: the KL term of the ELBO pulls *every* q(z|x) towards p(z), and with a strong weight it wins
outright (posterior collapse: z carries nothing). InfoVAE / MMD-VAE (Zhao et al. 2017, arXiv
1706.02262) replaces it by a divergence between the *aggregate* posterior q(z) = E_x q(z|x) and p(z):
each example keeps its own code as long as the codes, together, fill the prior. The divergence is
the MMD, estimated from the z the training step already drew (one per example: samples of q(z)) and
as many prior draws.

Kernel: inverse multiquadric k(x, y) = C / (C + |x - y|^2) with C = 2 d (d = the slot's latent size,
the prior's variance 1), as in WAE (Tolstikhin et al. 2018, which found its heavy tails give useful
gradients where a Gaussian kernel's vanish). Estimator: the V-statistic, mean over all n^2 pairs of
each kernel matrix (as InfoVAE's reference code): it is >= 0 and exactly 0 for identical sample sets;
its bias, O(1/n), does not depend on the model. Units: squared RKHS norm (unitless), per slot.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["imq_kernel_mean", "mmd"]


def imq_kernel_mean(a: Tensor, b: Tensor, scale: Tensor) -> Tensor:
    """Mean over all pairs of the IMQ kernel between the rows of a (S, n, Z) and b (S, m, Z): (S,).

    scale: (S,) the kernel's C per slot. Padded latent dims are 0 in both, so they add nothing.
    """
    c = scale.view(-1, 1, 1)
    # |u - v|^2 = |u|^2 + |v|^2 - 2 u.v, one batched matmul per slot: (S, n, m)
    d2 = a.square().sum(-1, keepdim=True) + b.square().sum(-1).unsqueeze(1) - 2.0 * a @ b.transpose(1, 2)
    return (c / (c + d2.clamp_min(0.0))).mean(dim=(1, 2))


def mmd(q_samples: Tensor, p_samples: Tensor, latent_size: Tensor) -> Tensor:
    """Squared MMD (V-statistic, IMQ kernel with C = 2 * latent_size) per slot, (S,).

    q_samples, p_samples: (S, n, Z) samples of the aggregate posterior and of the prior, 0 on
    padded dims; latent_size: (S,) float, each slot's number of real latent dims.
    """
    scale = 2.0 * latent_size
    return (
        imq_kernel_mean(q_samples, q_samples, scale)
        + imq_kernel_mean(p_samples, p_samples, scale)
        - 2.0 * imq_kernel_mean(q_samples, p_samples, scale)
    )
