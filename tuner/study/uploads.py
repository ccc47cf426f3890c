"""What a trial leaves in the artifact store (:mod:`tuner.store.artifacts`): its ``config.yaml`` when
it starts, its images when it completes; the dashboard lists both beside the trial.

Each returns the trial system attrs that attach its files, for the bookkeeper to store with the
trial's other attrs in one transaction. A failure to store (a full disk, an unreachable store) is
the trial's user attr ``artifact_error`` and one log line, never the end of the worker: an artifact
never costs a trained trial.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tuner.spec import TrainConfig, config_to_yaml

if TYPE_CHECKING:
    from optuna.artifacts._protocol import ArtifactStore
    from PIL import Image

__all__ = ["upload_config", "upload_images"]

CONFIG_MIMETYPE = "text/yaml; charset=utf-8"  # a text/* type: Chromium shows the file instead of saving it


def upload_config(store: ArtifactStore, study: str, number: int, config: TrainConfig, attrs: dict[str, Any],
                  log: Callable[[str], None]) -> dict[str, str]:
    """The trial's resolved config as ``config.yaml``: the file `tuner train` reruns as it is."""
    from tuner.store.artifacts import save_file

    text = f"# study '{study}', trial {number}; rerun: tuner train config.yaml --out DIR\n" + config_to_yaml(config)
    return _stored("config.yaml", number, attrs, log,
                   lambda: save_file("config.yaml", text.encode(), CONFIG_MIMETYPE, store))


def upload_images(store: ArtifactStore, number: int, images: dict[str, Image.Image], attrs: dict[str, Any],
                  log: Callable[[str], None]) -> dict[str, str]:
    """The trial's images (reconstructions, samples, traversal) as PNG artifacts."""
    if not images:
        return {}
    from tuner.store.artifacts import save_images

    return _stored("images", number, attrs, log, lambda: save_images(images, store))


def _stored(what: str, number: int, attrs: dict[str, Any], log: Callable[[str], None],
            write: Callable[[], dict[str, str]]) -> dict[str, str]:
    try:
        return write()
    except Exception as err:  # noqa: BLE001 - stores are plug-ins (file system, S3...) with their own errors
        attrs["artifact_error"] = f"{type(err).__name__}: {err}"
        log(f"trial {number}: {what} not stored ({type(err).__name__}: {err})")
        return {}
