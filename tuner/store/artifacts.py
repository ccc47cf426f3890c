"""Where a study's files live, and trial images as Optuna artifacts: saved, and read back.

The images (drawn by :func:`tuner.vae.images.render_images`: reconstructions, prior samples and a
latent traversal for every complete trial) and each trial's ``config.yaml`` go into one
:mod:`optuna.artifacts` file-system artifact store per study store, at ``<artifacts root>/optuna``
(see :func:`artifacts_root`); the trial's system attrs hold each image's id and name, as Optuna's
``upload_artifact`` writes them (:func:`save_images`), so the dashboard (``tuner dashboard``)
shows them beside the trial and :func:`trial_images` reads them back for reports. Workers on many
hosts share the root on shared disk (NFS, or an S3 bucket mounted as a file system).
"""

from __future__ import annotations

import io
import json
import os
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta
from optuna.artifacts._upload import ARTIFACTS_ATTR_PREFIX, ArtifactMeta
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import FrozenTrial

from tuner.errors import TunerError

if TYPE_CHECKING:
    from optuna.artifacts._protocol import ArtifactStore
    from PIL import Image

__all__ = ["IMAGE_NAMES", "artifact_store", "artifacts_root", "save_file", "save_images", "trial_images"]

IMAGE_NAMES = ("reconstructions.png", "samples.png", "traversal.png")


def artifacts_root(storage_url: str, override: str | Path | None = None) -> Path:
    """Where checkpoints and images live: --artifacts / $TUNER_ARTIFACTS, else `artifacts/` beside a
    SQLite file, else ./storage/artifacts (point it at shared disk when workers run on many hosts)."""
    chosen = override or os.environ.get("TUNER_ARTIFACTS")
    if chosen:
        return Path(chosen)
    if storage_url.startswith("sqlite:///"):
        return Path(storage_url.removeprefix("sqlite:///")).parent / "artifacts"
    return Path("storage") / "artifacts"


def artifact_store(storage_url: str, override: str | Path | None = None) -> FileSystemArtifactStore:
    """The store's one artifact store (every study shares it: the dashboard takes one), created if missing."""
    root = artifacts_root(storage_url, override) / "optuna"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TunerError(
            f"artifact root '{root.parent}': cannot create '{root}' ({err.strerror}); "
            "pass --artifacts (or set TUNER_ARTIFACTS) to a writable folder"
        ) from None
    return FileSystemArtifactStore(root)


# ------------------------------------------------------------------------------ save / read
def save_images(images: dict[str, Image.Image], store: ArtifactStore) -> dict[str, str]:
    """Write each image to ``store`` as a PNG artifact named by its file name; return the trial
    system attrs that attach them (what :func:`optuna.artifacts.upload_artifact` writes, one
    ``artifacts:<id>`` key per image), for the caller to store with the trial's other attrs in one
    transaction (:func:`tuner.store.attrs.set_trial_attrs`). The files go first: an attr never points at
    an artifact that was not written."""
    attrs = {}
    for name, image in images.items():
        if Path(name).name != name or not name.endswith(".png"):
            raise ValueError(f"image names are PNG file names such as 'samples.png', but got {name=}.")
        png = io.BytesIO()
        image.save(png, format="PNG", compress_level=1)  # grids are small; zlib level 6 cost ~15 ms a trial
        attrs.update(save_file(name, png.getvalue(), "image/png", store))
    return attrs


def save_file(name: str, data: bytes, mimetype: str, store: ArtifactStore) -> dict[str, str]:
    """Write ``data`` to ``store`` as one artifact named ``name``; return the trial system attr that
    attaches it (as :func:`save_images`: the file first, the attr for the caller's transaction)."""
    meta = ArtifactMeta(artifact_id=str(uuid.uuid4()), filename=name, mimetype=mimetype, encoding=None)
    store.write(meta.artifact_id, io.BytesIO(data))
    return {ARTIFACTS_ATTR_PREFIX + meta.artifact_id: json.dumps(asdict(meta))}


def trial_images(study: optuna.Study, trial: FrozenTrial, store: ArtifactStore) -> dict[str, bytes]:
    """File name -> PNG bytes of a trial's saved images ({} if none, or none left in `store`)."""
    images: dict[str, bytes] = {}
    for meta in get_all_artifact_meta(trial, storage=study._storage):
        if meta.mimetype != "image/png":
            continue
        try:
            with store.open_reader(meta.artifact_id) as reader:
                images[meta.filename] = reader.read()
        except ArtifactNotFound:  # removed from the store since (save_images writes the file first)
            continue
    return images
