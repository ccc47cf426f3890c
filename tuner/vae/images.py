"""Pictures of a VAE: reconstructions, prior samples and latent traversals (:func:`render_images`),
drawn as PNG image grids of anything shaped (n, D).

Images come in flat, as the models see them: (n, D) floats in [0, 1] with D = C * H * W, read in
(C, H, W) order. C = 1 draws grayscale (mode ``L``), C = 3 draws ``RGB``. Non-image data uses
``image_shape = (1, 1, D)`` and each example becomes a one-pixel-high strip.

Layout: tiles are upscaled ``scale`` times (nearest neighbour), laid out row by row with ``pad``
black output pixels between them (none around the border). Values are clipped to [0, 1] and NaN
is drawn black, so a diverged trial still gets a picture instead of an error. A ``caption``
(:class:`~tuner.vae.captions.Caption`) writes a title and row/column labels around the tiles, which
stay pixel for pixel as drawn without it; :func:`render_images` labels all three pictures.

Pillow is imported on first use, not with the module: a slim GPU worker host may lack it (README
"Many hosts"). Drawing there raises :class:`ImagesUnavailable`, which the worker catches to
complete its trials without images.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from tuner.errors import TunerError
from tuner.vae import noise
from tuner.vae.captions import Caption, add_caption
from tuner.vae.metrics import gaussian_kl_per_dim

if TYPE_CHECKING:
    from types import ModuleType

    from PIL import Image

    from tuner.vae.models import VAE

__all__ = [
    "SAMPLES_CAPTION", "ImagesUnavailable", "image_grid", "reconstruction_caption", "reconstruction_grid",
    "render_images", "require_pillow", "save_grid", "sd_labels", "traversal_caption", "traversal_dims",
    "traversal_row_labels",
]


class ImagesUnavailable(TunerError):
    """Pillow is not installed on this host, so no image can be drawn (one line: what and the fix)."""


def require_pillow() -> ModuleType:
    """``PIL.Image``, imported on first use; :class:`ImagesUnavailable` without Pillow."""
    try:
        from PIL import Image
    except ImportError:
        raise ImagesUnavailable(
            "Pillow is not installed on this host, so no image can be drawn; pip install pillow"
        ) from None
    return Image


def image_grid(
    images: Tensor | np.ndarray,
    image_shape: tuple[int, int, int],
    *,
    columns: int = 8,
    pad: int = 2,
    scale: int = 2,
    caption: Caption | None = None,
) -> Image.Image:
    """Lay ``images`` (n, D) out in rows of ``columns`` tiles (ceil(n / columns) rows)."""
    tiles = _tiles(images, image_shape, name="images")
    _check_layout(columns, pad, scale)
    n = len(tiles)
    cells = [divmod(i, columns) for i in range(n)]  # (row, column) of tile i
    grid = _render(tiles, cells, rows=math.ceil(n / columns), columns=min(columns, n), pad=pad, scale=scale)
    return _captioned(grid, caption, image_shape, pad=pad, scale=scale)


def reconstruction_grid(
    inputs: Tensor | np.ndarray,
    outputs: Tensor | np.ndarray,
    image_shape: tuple[int, int, int],
    *,
    columns: int = 8,
    pad: int = 2,
    scale: int = 2,
    caption: Caption | None = None,
) -> Image.Image:
    """Rows of inputs, each followed by the row of their reconstructions (input, output, ...).

    ``outputs[i]`` is drawn right under ``inputs[i]``; a short last row stays short in both.
    :func:`reconstruction_caption` labels the rows.
    """
    x = _tiles(inputs, image_shape, name="inputs")
    y = _tiles(outputs, image_shape, name="outputs")
    if x.shape != y.shape:
        raise TunerError(
            f"reconstruction_grid needs one output per input, but got {len(x)} inputs and "
            f"{len(y)} outputs; pass the decoder's output for exactly these inputs."
        )
    _check_layout(columns, pad, scale)
    n = len(x)
    cells = [(2 * (i // columns), i % columns) for i in range(n)]  # inputs on even rows
    cells += [(r + 1, c) for r, c in cells]  # each reconstruction right under its input
    rows = 2 * math.ceil(n / columns)
    grid = _render(np.concatenate([x, y]), cells, rows=rows, columns=min(columns, n), pad=pad, scale=scale)
    return _captioned(grid, caption, image_shape, pad=pad, scale=scale)


def save_grid(path: str | Path, images: Tensor | np.ndarray, image_shape: tuple[int, int, int], **kw) -> Path:
    """Write :func:`image_grid` (same keywords) as a PNG at ``path``, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, image_shape, **kw).save(path, format="PNG")
    return path


def _tiles(images: Tensor | np.ndarray, image_shape: tuple[int, int, int], *, name: str) -> np.ndarray:
    """(n, D) floats -> (n, H, W, C) uint8, clipped to [0, 1] then scaled to 0..255."""
    if len(image_shape) != 3 or image_shape[0] not in (1, 3) or min(image_shape) < 1:
        raise TunerError(
            f"image_shape must be (C, H, W) with C 1 (grayscale) or 3 (RGB), but got {image_shape=}; "
            f"use (1, 1, D) for non-image data."
        )
    c, h, w = image_shape
    if isinstance(images, Tensor):
        images = images.detach().to("cpu", torch.float32).numpy()
    arr = np.asarray(images, dtype=np.float32)
    if arr.ndim == 0 or len(arr) == 0:
        raise TunerError(f"{name} must hold at least one image, but got shape {arr.shape}.")
    arr = arr.reshape(len(arr), -1)  # (n, D); (n, C, H, W) input is accepted too
    if arr.shape[1] != c * h * w:
        raise TunerError(
            f"{name} have {arr.shape[1]} values each but {image_shape=} needs {c * h * w}; "
            f"pass the dataset's image_shape (or (1, 1, {arr.shape[1]}) for non-image data)."
        )
    arr = np.nan_to_num(arr, nan=0.0).clip(0.0, 1.0)
    pixels = np.rint(arr * 255.0).astype(np.uint8)
    return pixels.reshape(-1, c, h, w).transpose(0, 2, 3, 1)  # (n, H, W, C)


def _check_layout(columns: int, pad: int, scale: int) -> None:
    if columns < 1 or pad < 0 or scale < 1:
        raise TunerError(
            f"grid layout needs columns >= 1, pad >= 0 and scale >= 1, but got {columns=}, {pad=}, {scale=}."
        )


def _render(
    tiles: np.ndarray, cells: list[tuple[int, int]], *, rows: int, columns: int, pad: int, scale: int
) -> Image.Image:
    """Paste tiles (n, H, W, C) uint8 at their (row, column) cells on a black canvas."""
    tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)  # nearest-neighbour upscaling
    _, h, w, c = tiles.shape
    canvas = np.zeros((rows * h + (rows - 1) * pad, columns * w + (columns - 1) * pad, c), dtype=np.uint8)
    for tile, (r, col) in zip(tiles, cells):
        top, left = r * (h + pad), col * (w + pad)
        canvas[top : top + h, left : left + w] = tile
    # uint8 (H, W) is read as mode "L", uint8 (H, W, 3) as "RGB"
    return require_pillow().fromarray(canvas[:, :, 0] if c == 1 else canvas)


def _captioned(
    grid: Image.Image, caption: Caption | None, image_shape: tuple[int, int, int], *, pad: int, scale: int
) -> Image.Image:
    if caption is None:
        return grid
    return add_caption(grid, caption, cell=(image_shape[1] * scale, image_shape[2] * scale), pad=pad)


# ------------------------------------------------------------------------- a model's pictures
RECONSTRUCTIONS = 32  # inputs shown over their reconstructions
SAMPLES = 64  # prior samples, 8 per row
TRAVERSAL_DIMS = 8  # the most informative latent dims, one row each
TRAVERSAL_VALUES = torch.linspace(-3.0, 3.0, 9)  # values of the varied dim, one column each (prior sds)
TRAVERSAL_KL_EXAMPLES = 1024  # examples whose mean KL per dim ranks the dims


def traversal_dims(kl_per_dim: Tensor, latent_mask: Tensor, k: int = TRAVERSAL_DIMS) -> list[int]:
    """The (up to) k used latent dims with the largest KL, largest first. Both inputs (Zmax,)."""
    kl = torch.where(latent_mask > 0, kl_per_dim, -torch.inf)
    used = int((latent_mask > 0).sum())
    return [int(d) for d in torch.argsort(kl, descending=True, stable=True)[: min(k, used)]]


# ------------------------------------------------------------------------- what the pictures say
SAMPLES_CAPTION = Caption("samples from the prior")
TRAVERSAL_TITLE = (
    "latent traversal: each row sets one latent dim to the value above (prior sd)\n"
    "other dims keep the first example's posterior mean; KL: nats, mean over examples"
)


def reconstruction_caption(n: int, columns: int = 8) -> Caption:
    """Row labels of :func:`reconstruction_grid` for n inputs in rows of `columns`."""
    return Caption("reconstructions: posterior means decoded",
                   rows=("input", "reconstruction") * math.ceil(n / columns))


def traversal_row_labels(dims: list[int], kl_per_dim: Tensor) -> tuple[str, ...]:
    """One label per traversed dim: its index and its KL (nats per example), e.g. "dim 5\nKL 2.31 nats"."""
    return tuple(f"dim {d}\nKL {float(kl_per_dim[d]):.2f} nats" for d in dims)


def sd_labels(values: Tensor) -> tuple[str, ...]:
    """Column labels of a traversal: each value in prior sds, signed ("-3", "-0.75", "0", "+1.5")."""
    return tuple("0" if float(v) == 0 else f"{float(v):+g}" for v in values)


def traversal_caption(dims: list[int], kl_per_dim: Tensor, values: Tensor = TRAVERSAL_VALUES) -> Caption:
    """The traversal's title, row labels (dim and KL) and column labels (value in sd)."""
    return Caption(TRAVERSAL_TITLE, rows=traversal_row_labels(dims, kl_per_dim), columns=sd_labels(values),
                   corner="value (sd)")


@torch.no_grad()
def render_images(
    model: VAE, x: Tensor, image_shape: tuple[int, int, int], seed: int, traversal: bool, *, captions: bool = True
) -> dict[str, Image.Image]:
    """A one-slot model's pictures on x (N, D): file name -> image (grayscale ``L`` or ``RGB``).

    reconstructions.png: the first 32 examples, each row of inputs over its row of reconstructions
    (posterior means decoded). samples.png: 64 prior draws from `seed`. traversal.png (if
    `traversal`): one row per latent dim among the 8 with the largest mean KL over x, the dim set
    to -3..3 (9 columns) while the others keep the posterior mean of x[0]. With `captions` (the
    default) each says so in its own pixels (:func:`reconstruction_caption`, :data:`SAMPLES_CAPTION`,
    :func:`traversal_caption`); the tiles are the same either way.

    Without Pillow (a slim worker host) it raises :class:`ImagesUnavailable` before any work.
    """
    require_pillow()
    xs = x[:RECONSTRUCTIONS].unsqueeze(0)  # (1, B, D)
    mu, _ = model.encode(xs)  # (1, B, Zmax)
    recon = model.mean_image(model.decode(mu))[0]
    z = model.prior_sample(noise.keys_from_seeds(torch.tensor([seed], device=x.device)), SAMPLES)  # (1, 64, Zmax)
    samples = model.mean_image(model.decode(z))[0]  # (64, D), drawn from the model family's own prior
    images = {
        "reconstructions.png": reconstruction_grid(
            xs[0].cpu(), recon.cpu(), image_shape, caption=reconstruction_caption(xs.shape[1]) if captions else None),
        "samples.png": image_grid(samples.cpu(), image_shape, caption=SAMPLES_CAPTION if captions else None),
    }
    if traversal:
        images["traversal.png"] = _traversal(model, x, image_shape, captions)
    return images


def _traversal(model: VAE, x: Tensor, image_shape: tuple[int, int, int], captions: bool) -> Image.Image:
    mu, logvar = model.encode(x[:TRAVERSAL_KL_EXAMPLES].unsqueeze(0))  # (1, N, Zmax)
    kl_per_dim = gaussian_kl_per_dim(mu[0], logvar[0]).mean(0)  # (Zmax,) nats, 0 on masked dims
    dims = traversal_dims(kl_per_dim, model.latent_mask[0])
    values = TRAVERSAL_VALUES.to(x.device)
    z = mu[0, 0].repeat(len(dims), len(values), 1)  # (rows, cols, Zmax): x[0]'s code everywhere
    for row, d in enumerate(dims):
        z[row, :, d] = values
    decoded = model.mean_image(model.decode(z.reshape(1, -1, model.latent_max)))[0]  # (rows*cols, D)
    caption = traversal_caption(dims, kl_per_dim.cpu(), TRAVERSAL_VALUES) if captions else None
    return image_grid(decoded.cpu(), image_shape, columns=len(values), caption=caption)
