"""Shared fixtures: a small real dataset (a slice of the bundled MNIST subset) and tiny configs."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tuner.spec import TrainConfig, parse_config
from tuner.vae.data import load_array, load_splits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the throw-away stores
from stores import postgres_url  # noqa: E402  (benchmarks/stores.py)

# A suite started in the background by a non-interactive shell (`cmd &` in a script) inherits
# SIGINT ignored, and so would every process it spawns: the Ctrl-C tests (launcher, dashboard)
# would send a signal nobody hears. Give the suite the terminal's default back; children get it too.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def small_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,000 real MNIST digits as uint8 in an .npz: 700/100/200 split, fast enough for unit tests."""
    x, _ = load_array("mnist5k")
    path = tmp_path_factory.mktemp("data") / "mnist1k.npz"
    np.savez(path, x=np.round(x[:1000] * 255).astype(np.uint8).reshape(-1, 28, 28))
    return path


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture
def tiny(small_npz: Path):
    """tiny(**sections) -> a small, fast TrainConfig on the 1k dataset; nested dicts override."""

    def make(**over: Any) -> TrainConfig:
        base = {
            "seed": 1,
            "data": {"dataset": f"npz:{small_npz}"},
            "model": {"latent": 8, "hidden": 64, "depth": 1},
            "optim": {"batch_size": 64},
            "kl": {"schedule": "linear", "warmup_epochs": 2},
            "train": {"epochs": 2, "iwae_k": 20, "gap_examples": 16, "gap_steps": 20},
        }
        return parse_config(merge(base, over))

    return make


@pytest.fixture
def splits_for():
    def make(config: TrainConfig):
        return load_splits(config.data, config.optim.batch_size)

    return make


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database (unique name) as a tuner storage URL; dropped afterwards.

    Needs the server at 127.0.0.1:5432 (trust auth, user postgres): if it is down the test errors,
    it is not skipped (CI starts the server).
    """
    with postgres_url("tuner_test_") as url:
        yield url
