"""The textbook Optuna objective for an MLP VAE: the plain-textbook arm of search_race.py.

What a user writes by hand from the Optuna and PyTorch tutorials: an nn.Module MLP VAE built from the
sampled latent/hidden/lr/beta/KL warmup, trained with a DataLoader over the train split and dynamic
binarization (torch.bernoulli), the validation -ELBO reported each epoch (``trial.report`` /
``should_prune``, so a MedianPruner prunes it), and the validation IWAE NLL of its last weights as
the value, computed by the small direct implementation below (nothing from tuner's engine).
``benchmarks/search_race.py`` runs it with ``study.optimize`` in one process per core against the
tuner on the same wall budget.
"""

from __future__ import annotations

import math

import optuna
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# the small textbook space
LATENT = (4, 32)  # int, log
HIDDEN = [128, 192, 256]  # categorical
LR = (1e-4, 1e-2)  # float, log
BETA = (0.5, 2.0)  # float, log
KL_WARMUP = (0.0, 3.0, 0.5)  # float, step (epochs of a linear 0 -> beta ramp)
DEPTH, BATCH, IWAE_K = 2, 64, 200


# ------------------------------------------------------------------------------ plain Optuna
class PlainVAE(nn.Module):
    """The textbook MLP VAE: `depth` ReLU layers of `hidden` on each side, Bernoulli decoder."""

    def __init__(self, d: int, latent: int, hidden: int, depth: int = DEPTH) -> None:
        super().__init__()

        def mlp(n_in: int) -> list[nn.Module]:
            layers: list[nn.Module] = []
            for i in range(depth):
                layers += [nn.Linear(n_in if i == 0 else hidden, hidden), nn.ReLU()]
            return layers

        self.enc = nn.Sequential(*mlp(d))
        self.mu, self.logvar = nn.Linear(hidden, latent), nn.Linear(hidden, latent)
        self.dec = nn.Sequential(*mlp(latent), nn.Linear(hidden, d))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(recon, kl) per example, nats: -log p(x|z) for one z ~ q(z|x), and KL(q(z|x) || N(0, I))."""
        h = self.enc(x)
        mu, logvar = self.mu(h), self.logvar(h)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        recon = F.binary_cross_entropy_with_logits(self.dec(z), x, reduction="none").sum(-1)
        kl = 0.5 * (mu * mu + logvar.exp() - 1 - logvar).sum(-1)
        return recon, kl


@torch.no_grad()
def val_neg_elbo(model: PlainVAE, x: Tensor) -> float:
    model.eval()
    recon, kl = model(x)
    return float((recon + kl).mean())


@torch.no_grad()
def iwae_nll(model: PlainVAE, x: Tensor, k: int = IWAE_K, batch: int = 100) -> float:
    """-log (1/K sum_k p(x, z_k) / q(z_k|x)), z_k ~ q(z|x): data mean, nats per example."""
    model.eval()
    total = 0.0
    for xb in x.split(batch):
        h = model.enc(xb)
        mu, logvar = model.mu(h), model.logvar(h)  # (B, Z)
        eps = torch.randn(k, *mu.shape)  # (K, B, Z)
        z = mu + torch.exp(0.5 * logvar) * eps
        logits = model.dec(z)  # (K, B, D)
        log_px = -F.binary_cross_entropy_with_logits(logits, xb.expand_as(logits), reduction="none").sum(-1)
        log_pz = -0.5 * (z * z + math.log(2 * math.pi)).sum(-1)
        log_qz = -0.5 * (eps * eps + logvar + math.log(2 * math.pi)).sum(-1)
        log_w = log_px + log_pz - log_qz  # (K, B)
        total -= float((torch.logsumexp(log_w, dim=0) - math.log(k)).sum())
    return total / x.shape[0]


def make_objective(train: Tensor, val: Tensor, epochs: int, k: int = IWAE_K, test: Tensor | None = None):
    """The objective: the val IWAE NLL (K=k) of the last weights; with ``test``, the test IWAE NLL
    is stored as the trial's user attr ``test_iwae_nll`` (search_race.py scores on it)."""
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(train), batch_size=BATCH, shuffle=True)

    def objective(trial: optuna.Trial) -> float:
        latent = trial.suggest_int("model.latent", *LATENT, log=True)
        hidden = trial.suggest_categorical("model.hidden", HIDDEN)
        lr = trial.suggest_float("optim.lr", *LR, log=True)
        beta = trial.suggest_float("kl.beta", *BETA, log=True)
        warmup = trial.suggest_float("kl.warmup_epochs", KL_WARMUP[0], KL_WARMUP[1], step=KL_WARMUP[2])
        model = PlainVAE(train.shape[1], latent, hidden)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        step = 0
        for epoch in range(1, epochs + 1):
            model.train()
            for (x,) in loader:
                step += 1
                kl_weight = beta * min(1.0, step / len(loader) / warmup) if warmup > 0 else beta
                recon, kl = model(torch.bernoulli(x))  # dynamic binarization
                loss = (recon + kl_weight * kl).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            value = val_neg_elbo(model, val)
            if not math.isfinite(value):
                raise optuna.TrialPruned(f"non-finite val -ELBO at epoch {epoch}")
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        if test is not None:
            trial.set_user_attr("test_iwae_nll", iwae_nll(model, test, k))
        return iwae_nll(model, val, k)

    return objective
