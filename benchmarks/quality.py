"""Train the documented default config and print its test scores and wall time.

    python benchmarks/quality.py [--config configs/mnist-mlp.yaml] [--epochs N] [--device auto]

The foundation's quality bar: the default config, 50 epochs on CPU, reaches a test IWAE NLL
(K=200) of at most 108 nats on mnist5k with the seeded 3500/500/1000 split.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tuner.spec import load_config, with_epochs  # noqa: E402
from tuner.train import train_config  # noqa: E402

TARGET_NLL = 108.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "mnist-mlp.yaml"))
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    config = load_config(args.config)
    if args.epochs is not None:
        config = with_epochs(config, args.epochs, source=args.config)
    with tempfile.TemporaryDirectory() as out:
        m = train_config(config, out, device=args.device).metrics
    print(f"config: {args.config} ({config.train.epochs} epochs, device {m['device']})")
    print(f"{'metric':<22}{'value':>12}")
    for key in ("iwae_nll", "neg_elbo", "recon", "kl", "active_units", "informative_units", "mutual_info",
                "collapsed", "best_epoch", "train_s", "wall_s"):
        value = m[key]
        print(f"{key:<22}{value:>12.2f}" if isinstance(value, float) else f"{key:<22}{value!s:>12}")
    verdict = "meets" if m["iwae_nll"] <= TARGET_NLL else "misses"
    print(f"test IWAE NLL (K={m['iwae_k']}) {m['iwae_nll']:.2f} {verdict} the {TARGET_NLL:g}-nat bar")


if __name__ == "__main__":
    main()
