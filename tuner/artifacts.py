"""Trial images as Optuna artifacts: render them from a model, save them, read them back.

Every complete trial gets a reconstruction grid (inputs over outputs) and a grid of prior samples;
the trials that beat the study's best so far also get a latent traversal. The images go into one
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
import torch
from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta
from optuna.artifacts._upload import ARTIFACTS_ATTR_PREFIX, ArtifactMeta
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import FrozenTrial
from torch import Tensor

from tuner import noise
from tuner.errors import TunerError
from tuner.images import ImagesUnavailable, image_grid, reconstruction_grid, require_pillow
from tuner.metrics import gaussian_kl_per_dim

if TYPE_CHECKING:
    from optuna.artifacts._protocol import ArtifactStore
    from PIL import Image

    from tuner.models import VAE

__all__ = [
    "IMAGE_NAMES",
    "ImagesUnavailable",
    "artifact_store",
    "artifacts_root",
    "beats_best",
    "render_images",
    "save_images",
    "trial_images",
    "traversal_dims",
]

IMAGE_NAMES = ("reconstructions.png", "samples.png", "traversal.png")
RECONSTRUCTIONS = 32  # inputs shown over their reconstructions
SAMPLES = 64  # prior samples, 8 per row
TRAVERSAL_DIMS = 8  # the most informative latent dims, one row each
TRAVERSAL_VALUES = torch.linspace(-3.0, 3.0, 9)  # values of the varied dim, one column each (prior sds)
TRAVERSAL_KL_EXAMPLES = 1024  # examples whose mean KL per dim ranks the dims


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


# ---------------------------------------------------------------------------------- rendering
def traversal_dims(kl_per_dim: Tensor, latent_mask: Tensor, k: int = TRAVERSAL_DIMS) -> list[int]:
    """The (up to) k used latent dims with the largest KL, largest first. Both inputs (Zmax,)."""
    kl = torch.where(latent_mask > 0, kl_per_dim, -torch.inf)
    used = int((latent_mask > 0).sum())
    return [int(d) for d in torch.argsort(kl, descending=True, stable=True)[: min(k, used)]]


@torch.no_grad()
def render_images(
    model: VAE, x: Tensor, image_shape: tuple[int, int, int], seed: int, traversal: bool
) -> dict[str, Image.Image]:
    """A one-slot model's pictures on x (N, D): file name -> image (grayscale ``L`` or ``RGB``).

    reconstructions.png: the first 32 examples, each row of inputs over its row of reconstructions
    (posterior means decoded). samples.png: 64 prior draws from `seed`. traversal.png (if
    `traversal`): one row per latent dim among the 8 with the largest mean KL over x, the dim set
    to -3..3 (9 columns) while the others keep the posterior mean of x[0].

    Without Pillow (a slim worker host) it raises :class:`ImagesUnavailable` before any work.
    """
    require_pillow()
    xs = x[:RECONSTRUCTIONS].unsqueeze(0)  # (1, B, D)
    mu, _ = model.encode(xs)  # (1, B, Zmax)
    recon = model.mean_image(model.decode(mu))[0]
    z = model.prior_sample(noise.keys_from_seeds(torch.tensor([seed], device=x.device)), SAMPLES)  # (1, 64, Zmax)
    samples = model.mean_image(model.decode(z))[0]  # (64, D), drawn from the model family's own prior
    images = {
        "reconstructions.png": reconstruction_grid(xs[0].cpu(), recon.cpu(), image_shape),
        "samples.png": image_grid(samples.cpu(), image_shape),
    }
    if traversal:
        images["traversal.png"] = _traversal(model, x, image_shape)
    return images


def _traversal(model: VAE, x: Tensor, image_shape: tuple[int, int, int]) -> Image.Image:
    mu, logvar = model.encode(x[:TRAVERSAL_KL_EXAMPLES].unsqueeze(0))  # (1, N, Zmax)
    kl_per_dim = gaussian_kl_per_dim(mu[0], logvar[0]).mean(0)  # (Zmax,) nats, 0 on masked dims
    dims = traversal_dims(kl_per_dim, model.latent_mask[0])
    values = TRAVERSAL_VALUES.to(x.device)
    z = mu[0, 0].repeat(len(dims), len(values), 1)  # (rows, cols, Zmax): x[0]'s code everywhere
    for row, d in enumerate(dims):
        z[row, :, d] = values
    decoded = model.mean_image(model.decode(z.reshape(1, -1, model.latent_max)))[0]  # (rows*cols, D)
    return image_grid(decoded.cpu(), image_shape, columns=len(values))


# ------------------------------------------------------------------------------ save / read
def beats_best(study: optuna.Study, values: list[float], feasible: bool = True) -> bool:
    """Whether a running trial with `values` becomes the study's best when told, as Optuna (and the
    dashboard's "Best Trial") sees it: a feasible (not collapsed) trial that beats every feasible
    complete trial (one objective), or that no trial on the Pareto front dominates (several).
    The study's first feasible trial is its best."""
    if not feasible:
        return False
    minimize = [d == optuna.study.StudyDirection.MINIMIZE for d in study.directions]
    mine = [v if m else -v for v, m in zip(values, minimize)]  # smaller is better from here on
    if len(mine) == 1:
        try:
            best = study.best_value  # the best feasible trial's
        except ValueError:  # no feasible complete trial yet
            return True
        return mine[0] < (best if minimize[0] else -best)
    for other in study.best_trials:
        theirs = [v if m else -v for v, m in zip(other.values, minimize)]
        if all(t <= m for t, m in zip(theirs, mine)) and theirs != mine:
            return False
    return True


def save_images(images: dict[str, Image.Image], store: ArtifactStore) -> dict[str, str]:
    """Write each image to ``store`` as a PNG artifact named by its file name; return the trial
    system attrs that attach them (what :func:`optuna.artifacts.upload_artifact` writes, one
    ``artifacts:<id>`` key per image), for the caller to store with the trial's other attrs in one
    transaction (:func:`tuner.attrs.set_trial_attrs`). The files go first: an attr never points at
    an artifact that was not written."""
    attrs = {}
    for name, image in images.items():
        if Path(name).name != name or not name.endswith(".png"):
            raise ValueError(f"image names are PNG file names such as 'samples.png', but got {name=}.")
        png = io.BytesIO()
        image.save(png, format="PNG", compress_level=1)  # grids are small; zlib level 6 cost ~15 ms a trial
        png.seek(0)
        meta = ArtifactMeta(artifact_id=str(uuid.uuid4()), filename=name, mimetype="image/png", encoding=None)
        store.write(meta.artifact_id, png)
        attrs[ARTIFACTS_ATTR_PREFIX + meta.artifact_id] = json.dumps(asdict(meta))
    return attrs


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
