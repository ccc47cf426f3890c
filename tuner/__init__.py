"""tuner: hyperparameter tuning for variational autoencoders.

The public library API; the `tuner` command (tuner.cli) is a thin layer over it. Import-light on
purpose: `engine`, `models`, `metrics` need only torch and numpy.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

__all__ = [
    "EpochResult",
    "Population",
    "PopulationShape",
    "Splits",
    "TrainConfig",
    "TunerError",
    "VAE",
    "evaluate",
    "load_config",
    "load_run",
    "load_splits",
    "train_config",
]

_WHERE = {
    "EpochResult": "tuner.engine",
    "Population": "tuner.engine",
    "PopulationShape": "tuner.engine",
    "Splits": "tuner.data",
    "TrainConfig": "tuner.spec",
    "TunerError": "tuner.errors",
    "VAE": "tuner.models",
    "evaluate": "tuner.metrics",
    "load_config": "tuner.spec",
    "load_run": "tuner.train",
    "load_splits": "tuner.data",
    "train_config": "tuner.train",
}


def __getattr__(name: str) -> Any:
    """Lazy imports: `import tuner` stays cheap and the GPU check needs no optional packages."""
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'tuner' has no attribute {name!r}")
