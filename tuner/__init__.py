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
    "StudySpec",
    "TrainConfig",
    "TunerError",
    "VAE",
    "Worker",
    "backup_study",
    "create_or_resume",
    "estimate_gaps",
    "evaluate",
    "export_top",
    "launch",
    "launch_ray",
    "load_config",
    "load_run",
    "load_splits",
    "load_study",
    "load_study_spec",
    "mask_url",
    "open_storage",
    "rank_study",
    "ranking_frame",
    "serve",
    "train_config",
    "write_mnist5k_cache",
    "write_report",
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
    "estimate_gaps": "tuner.gaps",
    "load_config": "tuner.spec",
    "load_run": "tuner.train",
    "load_splits": "tuner.data",
    "write_mnist5k_cache": "tuner.data",
    "train_config": "tuner.train",
    "StudySpec": "tuner.study_spec",
    "load_study_spec": "tuner.study_spec",
    "create_or_resume": "tuner.study",
    "load_study": "tuner.study",
    "Worker": "tuner.worker",
    "launch": "tuner.launch",
    "launch_ray": "tuner.ray_launch",  # needs the ray extra only when called
    "ranking_frame": "tuner.ranking",
    "rank_study": "tuner.ranking",
    "export_top": "tuner.export",
    "backup_study": "tuner.export",
    "write_report": "tuner.report",
    "serve": "tuner.dashboard",
    "open_storage": "tuner.storage",
    "mask_url": "tuner.storage",
}


def __getattr__(name: str) -> Any:
    """Lazy imports: `import tuner` stays cheap and the GPU check needs no optional packages."""
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'tuner' has no attribute {name!r}")
