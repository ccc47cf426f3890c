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
    "EpochResult": "tuner.vae.population",
    "Population": "tuner.vae.engine",
    "PopulationShape": "tuner.vae.population",
    "Splits": "tuner.vae.data",
    "TrainConfig": "tuner.spec",
    "TunerError": "tuner.errors",
    "VAE": "tuner.vae.models",
    "evaluate": "tuner.vae.metrics",
    "estimate_gaps": "tuner.vae.gaps",
    "load_config": "tuner.spec",
    "load_run": "tuner.train",
    "load_splits": "tuner.vae.data",
    "write_mnist5k_cache": "tuner.vae.data",
    "train_config": "tuner.train",
    "StudySpec": "tuner.study.spec",
    "load_study_spec": "tuner.study.spec",
    "create_or_resume": "tuner.study.open",
    "load_study": "tuner.study.open",
    "Worker": "tuner.study.worker",
    "launch": "tuner.study.launch",
    "launch_ray": "tuner.study.ray_launch",  # needs the ray extra only when called
    "ranking_frame": "tuner.results.ranking",
    "rank_study": "tuner.results.ranking",
    "export_top": "tuner.results.export",
    "backup_study": "tuner.results.export",
    "write_report": "tuner.results.report",
    "serve": "tuner.results.dashboard",
    "open_storage": "tuner.store.urls",
    "mask_url": "tuner.store.urls",
}


def __getattr__(name: str) -> Any:
    """Lazy imports: `import tuner` stays cheap and the GPU check needs no optional packages."""
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'tuner' has no attribute {name!r}")
