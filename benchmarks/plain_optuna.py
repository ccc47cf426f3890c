"""Best validation IWAE NLL in the same wall time: a plain Optuna study vs `tuner run`, same run.

    python benchmarks/plain_optuna.py [--seconds 120] [--epochs 10] [--workers 2]

Plain: the textbook setup. ``optuna.create_study(sampler=TPESampler(seed), pruner=MedianPruner())``
on a SQLite file and `workers` processes (this script in ``--plain-worker`` mode), each calling
``study.optimize(objective, timeout=...)`` with one torch thread. The objective builds an
nn.Module MLP VAE from the sampled latent/hidden/lr/beta/KL warmup, trains it with a DataLoader
over the mnist5k train split (``tuner.vae.data.load_splits`` with the default DataConfig, so the split
is the tuner's) and dynamic binarization (torch.bernoulli), reports the validation -ELBO each epoch
(``trial.report`` / ``should_prune``) and returns the validation IWAE NLL (K=50) of its last
weights, computed by the small direct implementation below (nothing from tuner's engine).
Tuner: the same space, epochs per trial and K, TPE + Hyperband (the tuner's recommended pruner),
`workers` CPU workers of one slot, ``budget.timeout`` = the same seconds.
Each setup gets the whole machine for the same wall time T, one after the other; a trial counts
when it finished within T of its setup's launch (both let the trials in flight at T finish; the
wall column says how long that took).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
import torch
import torch.nn.functional as F
import yaml
from optuna.trial import TrialState
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tuner.spec import DataConfig  # noqa: E402
from tuner.vae.data import load_splits  # noqa: E402

# the one search space, written for both sides (the tuner's YAML below mirrors these suggest calls)
LATENT = (4, 32)  # int, log
HIDDEN = [128, 192, 256]  # categorical
LR = (1e-4, 1e-2)  # float, log
BETA = (0.5, 2.0)  # float, log
KL_WARMUP = (0.0, 3.0, 0.5)  # float, step (epochs of a linear 0 -> beta ramp)
DEPTH, BATCH, IWAE_K = 2, 64, 50


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


def make_objective(train: Tensor, val: Tensor, epochs: int):
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
        return iwae_nll(model, val)

    return objective


def plain_worker(args: argparse.Namespace) -> None:
    """One plain process: join the study and optimize until the shared deadline."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    splits = load_splits(DataConfig(), BATCH)
    storage = optuna.storages.RDBStorage(args.storage, engine_kwargs={"connect_args": {"timeout": 60}})
    study = optuna.load_study(
        study_name="plain", storage=storage, sampler=optuna.samplers.TPESampler(seed=args.seed),
        pruner=optuna.pruners.MedianPruner(),
    )
    study.optimize(make_objective(splits.train, splits.val, args.epochs), timeout=max(0.0, args.deadline - time.time()))


def run_plain(tmp: Path, seconds: float, epochs: int, workers: int) -> tuple[float, float, list[optuna.trial.FrozenTrial]]:
    """(launch time, wall s, trials) of the plain setup."""
    url = f"sqlite:///{tmp / 'plain.db'}"
    optuna.create_study(study_name="plain", storage=url, direction="minimize")
    started = time.time()
    procs = [
        subprocess.Popen([sys.executable, __file__, "--plain-worker", "--storage", url, "--seed", str(i),
                          "--deadline", str(started + seconds), "--epochs", str(epochs), "--threads", "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(workers)
    ]
    outputs = [p.communicate()[0] for p in procs]
    wall = time.time() - started
    for p, out in zip(procs, outputs):
        if p.returncode != 0:
            sys.exit(f"plain worker failed ({p.returncode}):\n{out[-2000:]}")
    return started, wall, optuna.load_study(study_name="plain", storage=url).get_trials(deepcopy=False)


# ------------------------------------------------------------------------------------ tuner
def tuner_spec(seconds: float, epochs: int, workers: int) -> dict[str, Any]:
    return {
        "study": "plain-vs-tuner",
        "base": {
            "data": {"dataset": "mnist5k"},
            "model": {"arch": "mlp", "depth": DEPTH},
            "optim": {"name": "adam", "batch_size": BATCH},
            "kl": {"schedule": "linear"},
            "train": {"iwae_k": IWAE_K, "gap_examples": 0},  # no gap analysis: the plain side has none either
        },
        "space": {
            "model.latent": {"type": "int", "low": LATENT[0], "high": LATENT[1], "log": True},
            "model.hidden": {"type": "categorical", "choices": HIDDEN},
            "optim.lr": {"type": "float", "low": LR[0], "high": LR[1], "log": True},
            "kl.beta": {"type": "float", "low": BETA[0], "high": BETA[1], "log": True},
            "kl.warmup_epochs": {"type": "float", "low": KL_WARMUP[0], "high": KL_WARMUP[1], "step": KL_WARMUP[2]},
        },
        "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 10},
        "pruner": {"name": "hyperband", "min_resource": 1, "reduction_factor": 3},
        "objective": "iwae_nll",
        "budget": {"trials": 100000, "timeout": seconds, "epochs": epochs},
        "workers": {"count": workers, "slots": 1, "device": "cpu"},
    }


def run_tuner(tmp: Path, seconds: float, epochs: int, workers: int) -> tuple[float, float, list[optuna.trial.FrozenTrial]]:
    """(launch time, wall s, trials) of `tuner run` on the same budget."""
    url = f"sqlite:///{tmp / 'tuner.db'}"
    spec = tmp / "plain-vs-tuner.yaml"
    spec.write_text(yaml.safe_dump(tuner_spec(seconds, epochs, workers)))
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "tuner", "run", str(spec), "--workers", str(workers),
                           "--storage", url, "--artifacts", str(tmp / "artifacts")],
                          capture_output=True, text=True, cwd=tmp)
    wall = time.time() - started
    if proc.returncode != 0:
        sys.exit(f"tuner run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return started, wall, optuna.load_study(study_name="plain-vs-tuner", storage=url).get_trials(deepcopy=False)


# ------------------------------------------------------------------------------------- main
def summarize(started: float, seconds: float, trials: list[optuna.trial.FrozenTrial]) -> dict[str, Any]:
    """Trials finished within `seconds` of the launch, and the best validation IWAE NLL among them."""
    deadline = started + seconds
    in_time = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               and t.datetime_complete.timestamp() <= deadline]
    complete = [t for t in in_time if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value)]
    return {
        "trials": len(in_time),
        "complete": len(complete),
        "pruned": sum(t.state == TrialState.PRUNED for t in in_time),
        "epochs": sum(len(t.intermediate_values) for t in in_time),
        "late": sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) - len(in_time),
        "best": min((t.value for t in complete), default=math.nan),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="wall time T of each setup")
    parser.add_argument("--epochs", type=int, default=10, help="most epochs per trial (both setups)")
    parser.add_argument("--workers", type=int, default=2, help="processes per setup (one per core)")
    parser.add_argument("--plain-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--storage", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_worker:
        plain_worker(args)
        return
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"T = {args.seconds:g} s per setup, {args.workers} CPU processes of 1 thread each; mnist5k "
          f"(3500 train / 500 val); MLP VAE depth {DEPTH}, batch {BATCH}, up to {args.epochs} epochs per trial; "
          f"latent {LATENT[0]}-{LATENT[1]}, hidden {HIDDEN}, lr {LR[0]:g}-{LR[1]:g}, beta {BETA[0]:g}-{BETA[1]:g}, "
          f"KL warmup {KL_WARMUP[0]:g}-{KL_WARMUP[1]:g}; objective val IWAE NLL (K={IWAE_K})")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="tuner-plain-") as tmp_name:
        tmp = Path(tmp_name)
        for name, run in (("plain-optuna", run_plain), ("tuner", run_tuner)):
            started, wall, trials = run(tmp, args.seconds, args.epochs, args.workers)
            rows[name] = {**summarize(started, args.seconds, trials), "wall": wall}
    setups = {"plain-optuna": "tpe+median,DataLoader,1-trial/process", "tuner": "tpe+hyperband,population-engine"}
    print()
    print(f"{'setup':<14}{'strategy':<38}{'trials':>7}{'complete':>9}{'pruned':>7}{'epochs':>7}"
          f"{'best_val_nll':>13}{'late':>5}{'wall_s':>8}")
    for name, r in rows.items():
        print(f"{name:<14}{setups[name]:<38}{r['trials']:>7}{r['complete']:>9}{r['pruned']:>7}{r['epochs']:>7}"
              f"{r['best']:>13.2f}{r['late']:>5}{r['wall']:>8.1f}")
    print("  trials/complete/pruned/epochs/best: finished within T of launch; late: finished after T (not counted);")
    print("  wall_s: launch until the last process exited (trials in flight at T finish)")
    diff = rows["tuner"]["best"] - rows["plain-optuna"]["best"]
    if math.isnan(diff):
        print("difference: n/a (a setup completed no trial within T)")
    else:
        winner = "tuner" if diff < 0 else "plain-optuna" if diff > 0 else "neither"
        print(f"difference (tuner - plain) {diff:+.2f} nats: {winner} better in {args.seconds:g} s")


if __name__ == "__main__":
    main()
