"""Train the documented default config and print its test scores and wall time.

    python benchmarks/quality.py [--config configs/mnist-mlp.yaml] [--epochs N] [--device auto]
    python benchmarks/quality.py --families gaussian,mog,vamp,iaf,ladder,aux,mmd [--epochs N]
    python benchmarks/quality.py --families gaussian --objectives elbo,iwae [--k 5]

The foundation's quality bar: the default config, 50 epochs on CPU, reaches a test IWAE NLL
(K=200) of at most 108 nats on mnist5k with the seeded 3500/500/1000 split.
``--families`` trains the same config once per model family or collapse remedy (FAMILIES: the
config fields each sets; ``aux`` and ``mmd`` are ``kl.aux_weight`` and ``kl.divergence: mmd``,
``aggressive`` is ``train.aggressive_epochs: 5``, whose rows are the true model's -ELBO and IWAE NLL like the rest) at the same epoch budget and
prints one row per family: test IWAE NLL, -ELBO, KL, active units, MI (for non-Gaussian families
KL and MI are estimates: see tuner.vae.metrics) and the amortization and approximation gaps
(tuner.vae.gaps). ``--objectives`` trains each family once per
training objective (``train.objective``: ``elbo``, or ``iwae`` with ``--k`` samples, Burda et al.
2015); the rows of the IWAE objective are named ``<family>/iwae<k>``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tuner.spec import TrainConfig, load_config, parse_config, with_epochs  # noqa: E402
from tuner.train import train_config  # noqa: E402

TARGET_NLL = 108.0
FAMILIES: dict[str, dict[str, dict[str, Any]]] = {  # config fields over the config's, per family: section -> fields
    "gaussian": {},
    "mog": {"model": {"prior": "mog", "prior_components": 10}},
    "vamp": {"model": {"prior": "vamp", "prior_components": 50}},
    "iaf": {"model": {"posterior": "iaf", "flow_steps": 2}},
    "ladder": {"model": {"hierarchy": "ladder", "latent2": 16}},
    "aux": {"kl": {"aux_weight": 1.0}},  # Semeniuta et al. 2017
    "mmd": {"kl": {"divergence": "mmd", "mmd_weight": 100.0}},  # InfoVAE / MMD-VAE, Zhao et al. 2017
    "diffusion": {"model": {"prior": "diffusion", "diffusion_steps": 20}},  # Wehenkel & Louppe 2021
    "mixture": {"model": {"mixture": 2}},  # two encoders, one decoder: MISELBO, Kviman et al. 2023
    "ortho": {"model": {"ortho_weight": 30.0}},  # a locally orthogonal decoder: OroJaR, Wei et al. 2021
    "aggressive": {"train": {"aggressive_epochs": 2}},  # aggressive encoder training, He et al. 2019
}
FAMILY_COLUMNS = ("iwae_nll", "neg_elbo", "kl", "active_units", "mutual_info", "amortization_gap",
                  "approximation_gap", "decoder_ortho_cos", "best_epoch", "train_s")


def family_config(config: TrainConfig, family: str, objective: str = "elbo", k: int = 5) -> TrainConfig:
    """`config` with the family's fields and the training objective (validated again)."""
    raw = config.model_dump(mode="json")
    for section, fields in FAMILIES[family].items():
        raw[section].update(fields)
    raw["train"].update(objective=objective, k=k)
    return parse_config(raw, source=f"family {family}")


def family_rows(config: TrainConfig, families: list[str], device: str, objectives: tuple[str, ...] = ("elbo",),
                k: int = 5) -> Iterator[dict[str, Any]]:
    """One row per family and objective as it finishes: its name and its test metrics (metrics.json's keys)."""
    for family in families:
        for objective in objectives:
            name = family if objective == "elbo" else f"{family}/iwae{k}"
            with tempfile.TemporaryDirectory() as out:
                metrics = train_config(family_config(config, family, objective, k), out, device=device).metrics
            yield {"family": name, **metrics}


def print_family_table(rows: Iterable[dict[str, Any]]) -> None:
    """The table, a row printed as soon as its family is trained (a long run shows progress)."""
    print(f"{'family':<14}" + "".join(f"{c:>18}" for c in FAMILY_COLUMNS), flush=True)
    for row in rows:
        values = (row.get(c, "-") for c in FAMILY_COLUMNS)  # no gaps when train.gap_examples is 0
        cells = (f"{v:>18.2f}" if isinstance(v, float) else f"{v!s:>18}" for v in values)
        print(f"{row['family']:<14}" + "".join(cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "mnist-mlp.yaml"))
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--families", default=None, help=f"comma-separated, of {', '.join(FAMILIES)}")
    parser.add_argument("--objectives", default="elbo", help="comma-separated, of elbo, iwae (with --families)")
    parser.add_argument("--k", type=int, default=5, help="samples per example of the iwae objective")
    args = parser.parse_args()
    objectives = tuple(o.strip() for o in args.objectives.split(",") if o.strip())
    if not objectives or set(objectives) - {"elbo", "iwae"} or args.k < 1:
        parser.error("--objectives: a comma-separated list of elbo, iwae (and --k at least 1)")
    config = load_config(args.config)
    if args.epochs is not None:
        config = with_epochs(config, args.epochs, source=args.config)
    if args.families is not None:
        families = [f.strip() for f in args.families.split(",") if f.strip()]
        unknown = [f for f in families if f not in FAMILIES]
        if unknown or not families:
            parser.error(f"--families: unknown {unknown}; use a comma-separated list of {', '.join(FAMILIES)}")
        if "mmd" in families and "iwae" in objectives:
            parser.error("--families mmd replaces the -ELBO's KL term: use it with --objectives elbo only")
        print(f"config: {args.config} ({config.train.epochs} epochs each, test split, K={config.train.iwae_k})")
        print_family_table(family_rows(config, families, args.device, objectives, args.k))
        return
    with tempfile.TemporaryDirectory() as out:
        m = train_config(config, out, device=args.device).metrics
    print(f"config: {args.config} ({config.train.epochs} epochs, device {m['device']})")
    print(f"{'metric':<22}{'value':>12}")
    for key in ("iwae_nll", "neg_elbo", "recon", "kl", "active_units", "informative_units", "mutual_info",
                "amortization_gap", "approximation_gap", "collapsed", "best_epoch", "train_s", "wall_s"):
        value = m.get(key, "-")  # the gaps are absent when the config sets train.gap_examples 0
        print(f"{key:<22}{value:>12.2f}" if isinstance(value, float) else f"{key:<22}{value!s:>12}")
    verdict = "meets" if m["iwae_nll"] <= TARGET_NLL else "misses"
    print(f"test IWAE NLL (K={m['iwae_k']}) {m['iwae_nll']:.2f} {verdict} the {TARGET_NLL:g}-nat bar")


if __name__ == "__main__":
    main()
