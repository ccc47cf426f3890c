"""Image grids: saved PNGs are reloaded and checked pixel by pixel; captions around them leave every tile
pixel as it was, and the traversal's labels name its dims with their KL and its values in sd."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tuner.errors import TunerError
from tuner.vae.captions import add_caption, caption_layout
from tuner.vae.data import load_splits
from tuner.vae.engine import Population
from tuner.vae.images import (
    SAMPLES_CAPTION, TRAVERSAL_VALUES, ImagesUnavailable, image_grid, reconstruction_caption, reconstruction_grid,
    render_images, save_grid, sd_labels, traversal_caption, traversal_row_labels,
)
from tuner.vae.population import PopulationShape


def test_saved_grid_reloads_with_size_mode_and_pixels(tmp_path):
    # 3 tiles of 2x2, 2 columns, scale 3 -> tiles 6x6 px, pad 1 px: 2 rows x 2 columns
    images = np.stack([np.ones(4), np.zeros(4), np.full(4, 0.5)])  # white, black, grey
    path = save_grid(tmp_path / "deep" / "dir" / "grid.png", images, (1, 2, 2), columns=2, pad=1, scale=3)

    assert path == tmp_path / "deep" / "dir" / "grid.png"
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.mode == "L"
        assert im.size == (2 * 6 + 1, 2 * 6 + 1)  # (width, height)
        px = np.asarray(im)
    assert (px[0:6, 0:6] == 255).all()  # tile 0: white, top left
    assert (px[0:6, 7:13] == 0).all()  # tile 1: black, top right
    assert (px[7:13, 0:6] == 128).all()  # tile 2: 0.5 -> 127.5, rounded half to even: 128
    assert (px[6, :] == 0).all() and (px[:, 6] == 0).all()  # the pad line between tiles
    assert (px[7:13, 7:13] == 0).all()  # empty last cell


def test_pixel_order_is_channel_row_column_and_upscaling_is_nearest():
    # one 2x3 image whose pixel (r, c) is (3r + c) / 5: values 0, 51, 102, 153, 204, 255
    image = torch.arange(6, dtype=torch.float32) / 5
    px = np.asarray(image_grid(image[None], (1, 2, 3), scale=2))
    assert px.shape == (4, 6)
    expected = np.array([[0, 51, 102], [153, 204, 255]]).repeat(2, axis=0).repeat(2, axis=1)
    np.testing.assert_array_equal(px, expected)


def test_rgb_channels_land_in_their_planes():
    # (C, H, W) = (3, 1, 1): image 0 pure red, image 1 pure blue
    images = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    im = image_grid(images, (3, 1, 1), pad=1, scale=1)
    assert im.mode == "RGB"
    assert im.size == (3, 1)
    px = np.asarray(im)
    assert px[0, 0].tolist() == [255, 0, 0]
    assert px[0, 1].tolist() == [0, 0, 0]  # pad
    assert px[0, 2].tolist() == [0, 0, 255]


def test_rows_are_ceil_n_over_columns():
    im = image_grid(np.ones((10, 16)), (1, 4, 4), columns=4, pad=2, scale=1)
    # 10 tiles in 4 columns -> 3 rows; width 4 * 4 + 3 * 2, height 3 * 4 + 2 * 2
    assert im.size == (22, 16)
    px = np.asarray(im)
    assert (px[12:16, 0:4] == 255).all() and (px[12:16, 6:10] == 255).all()  # tiles 8 and 9
    assert (px[12:16, 12:22] == 0).all()  # cells 10 and 11 stay empty


def test_fewer_images_than_columns_gives_a_narrow_grid():
    im = image_grid(np.ones((2, 4)), (1, 2, 2), columns=8, pad=2, scale=1)
    assert im.size == (2 * 2 + 2, 2)


def test_non_image_data_is_drawn_as_one_row_strips():
    # 3 examples of 5 features as (1, 1, D): each a 1-pixel-high strip (scale 2 -> 2 px)
    data = np.tile(np.linspace(0.0, 1.0, 5), (3, 1))
    im = image_grid(data, (1, 1, 5), columns=1, pad=1, scale=2)
    assert im.size == (10, 3 * 2 + 2 * 1)
    px = np.asarray(im)
    for top in (0, 3, 6):
        np.testing.assert_array_equal(px[top], [0, 0, 64, 64, 128, 128, 191, 191, 255, 255])
        np.testing.assert_array_equal(px[top + 1], px[top])
    assert (px[[2, 5]] == 0).all()  # pads


def test_values_outside_unit_interval_are_clipped_and_nan_is_black():
    images = torch.tensor([[-3.0, 2.5, 1.0001, float("nan")]])
    px = np.asarray(image_grid(images, (1, 1, 4), scale=1))
    assert px.tolist() == [[0, 255, 255, 0]]


def test_reconstruction_grid_interleaves_input_and_output_rows():
    # inputs are white, outputs grey; 3 pairs in 2 columns -> rows: in, out, in, out
    inputs = np.ones((3, 4))
    outputs = np.full((3, 4), 0.2)
    px = np.asarray(reconstruction_grid(inputs, outputs, (1, 2, 2), columns=2, pad=0, scale=1))
    assert px.shape == (4 * 2, 2 * 2)
    expected = np.array(
        [
            [255, 255],  # inputs 0, 1
            [51, 51],  # outputs 0, 1
            [255, 0],  # input 2, empty
            [51, 0],  # output 2, empty
        ]
    ).repeat(2, axis=0).repeat(2, axis=1)
    np.testing.assert_array_equal(px, expected)


def test_reconstruction_sits_right_under_its_input():
    # input i has grey level i/9 and its output 1 - i/9 (no level lands on a .5 rounding tie)
    n = 5
    inputs = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3) / 9
    outputs = 1 - inputs
    px = np.asarray(reconstruction_grid(inputs, outputs, (3, 1, 1), columns=3, pad=1, scale=1))
    assert px.shape == (4 * 1 + 3, 3 * 1 + 2, 3)
    for i in range(n):
        row, col = 2 * (i // 3) * 2, (i % 3) * 2  # each tile row is 1 px + 1 px pad
        assert px[row, col].tolist() == [round(255 * i / 9)] * 3
        assert px[row + 2, col].tolist() == [round(255 * (1 - i / 9))] * 3


def test_bad_shapes_raise_tuner_error_naming_the_value():
    with pytest.raises(TunerError, match="needs 16"):
        image_grid(np.ones((2, 10)), (1, 4, 4))
    with pytest.raises(TunerError, match="image_shape"):
        image_grid(np.ones((2, 8)), (2, 2, 2))
    with pytest.raises(TunerError, match="2 inputs and 3 outputs"):
        reconstruction_grid(np.ones((2, 4)), np.ones((3, 4)), (1, 2, 2))
    with pytest.raises(TunerError, match="columns=0"):
        image_grid(np.ones((2, 4)), (1, 2, 2), columns=0)


def test_without_pillow_drawing_raises_one_named_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)  # `from PIL import Image` now fails as on a host without Pillow
    for draw in (lambda: image_grid(np.ones((2, 4)), (1, 2, 2)),
                 lambda: reconstruction_grid(np.ones((2, 4)), np.ones((2, 4)), (1, 2, 2)),
                 lambda: save_grid(tmp_path / "grid.png", np.ones((2, 4)), (1, 2, 2))):
        with pytest.raises(ImagesUnavailable) as info:
            draw()
        assert str(info.value) == "Pillow is not installed on this host, so no image can be drawn; pip install pillow"
        assert isinstance(info.value, TunerError)  # the CLI prints it as one line, exit 2
    assert not (tmp_path / "grid.png").exists()


# ------------------------------------------------------------------------- captions on the grids
CELL = (56, 56)  # a 28 px MNIST tile at the default scale 2


def _digits(n: int, seed: int = 0) -> np.ndarray:
    """n random 28x28 'images' (n, 784) in [0, 1]: any tile content will do, as long as tiles differ."""
    return np.random.default_rng(seed).random((n, 784), dtype=np.float32)


def test_captioned_grids_keep_every_tile_pixel() -> None:
    images = _digits(20)
    plain = np.asarray(image_grid(images, (1, 28, 28)))
    captioned = image_grid(images, (1, 28, 28), caption=SAMPLES_CAPTION)
    layout = caption_layout(SAMPLES_CAPTION, plain.shape[::-1], CELL, 2)
    assert captioned.size == (plain.shape[1], layout.top + plain.shape[0])  # a title band, nothing else
    px = np.asarray(captioned)
    np.testing.assert_array_equal(px[layout.top :], plain)
    assert px[: layout.top].max() == 255  # the title's letters, white on black

    inputs, outputs = _digits(12, 1), _digits(12, 2)
    plain = np.asarray(reconstruction_grid(inputs, outputs, (1, 28, 28)))
    caption = reconstruction_caption(12)
    assert caption.rows == ("input", "reconstruction", "input", "reconstruction")  # 12 in rows of 8: 2 pairs
    captioned = reconstruction_grid(inputs, outputs, (1, 28, 28), caption=caption)
    layout = caption_layout(caption, plain.shape[::-1], CELL, 2)
    assert layout.rows_drawn and layout.left > 0 and layout.top > 0
    assert captioned.size == (layout.left + plain.shape[1], layout.top + plain.shape[0])
    px = np.asarray(captioned)
    np.testing.assert_array_equal(px[layout.top :, layout.left :], plain)
    labels = [px[layout.top + r * 58 : layout.top + r * 58 + 56, : layout.left] for r in range(4)]
    assert all((label > 0).sum() > 30 for label in labels)  # each row has its word
    np.testing.assert_array_equal(labels[0], labels[2])  # "input" both times
    assert not np.array_equal(labels[0], labels[1])


def test_save_grid_passes_the_caption_on(tmp_path) -> None:
    path = save_grid(tmp_path / "s.png", _digits(8), (1, 28, 28), caption=SAMPLES_CAPTION)
    with Image.open(path) as im:
        np.testing.assert_array_equal(np.asarray(im), np.asarray(image_grid(_digits(8), (1, 28, 28),
                                                                            caption=SAMPLES_CAPTION)))


def test_traversal_labels_name_each_dim_its_kl_and_the_sd_values_used() -> None:
    kl = torch.tensor([0.1234, 3.0, 12.3456, 0.0, 0.004])
    assert traversal_row_labels([2, 1, 0, 4], kl) == (
        "dim 2\nKL 12.35 nats", "dim 1\nKL 3.00 nats", "dim 0\nKL 0.12 nats", "dim 4\nKL 0.00 nats")
    labels = sd_labels(TRAVERSAL_VALUES)
    assert labels == ("-3", "-2.25", "-1.5", "-0.75", "0", "+0.75", "+1.5", "+2.25", "+3")
    assert [float(v) for v in labels] == TRAVERSAL_VALUES.tolist()  # each label reads back as its value
    caption = traversal_caption([2, 1], kl)
    assert caption.rows == traversal_row_labels([2, 1], kl) and caption.columns == labels
    assert caption.corner == "value (sd)" and "prior sd" in caption.title


def _slot_model(tiny, latent: int, latent_max: int):
    """A fresh one-slot model using `latent` of `latent_max` dims, and its splits (as a trial's)."""
    config = tiny(model={"latent": latent, "hidden": 64})
    splits = load_splits(config.data, config.optim.batch_size)
    pop = Population(PopulationShape.of(config), splits, slots=1, latent_max=latent_max, hidden_max=64)
    pop.assign(0, config)
    return pop.slot_model(0, best=False), splits


def test_render_images_labels_the_traversal_with_its_dims_and_their_kl(tiny) -> None:
    model, splits = _slot_model(tiny, latent=5, latent_max=8)
    x = splits.val
    plain = render_images(model, x, splits.image_shape, seed=3, traversal=True, captions=False)
    images = render_images(model, x, splits.image_shape, seed=3, traversal=True)
    assert list(images) == list(plain) == ["reconstructions.png", "samples.png", "traversal.png"]

    # the KL per dim, from torch.distributions: the 5 used dims ranked by it, largest first
    with torch.no_grad():
        mu, logvar = model.encode(x[:1024].unsqueeze(0))
    posterior = torch.distributions.Normal(mu[0], (0.5 * logvar[0]).exp())
    kl = torch.distributions.kl_divergence(posterior, torch.distributions.Normal(0.0, 1.0)).mean(0)  # (8,)
    dims = [int(d) for d in torch.argsort(kl[:5], descending=True)]
    want = traversal_caption(dims, kl)
    assert want.rows[0] == f"dim {dims[0]}\nKL {kl[dims[0]]:.2f} nats"
    # the traversal is exactly its uncaptioned tiles with these labels written around them
    expected = add_caption(plain["traversal.png"], want, cell=CELL, pad=2)
    np.testing.assert_array_equal(np.asarray(images["traversal.png"]), np.asarray(expected))
    layout = caption_layout(want, plain["traversal.png"].size, CELL, 2)
    assert layout.rows_drawn and layout.columns_drawn
    assert images["traversal.png"].size == (layout.left + 9 * 58 - 2, layout.top + 5 * 58 - 2)

    for name, caption in (("reconstructions.png", reconstruction_caption(32)), ("samples.png", SAMPLES_CAPTION)):
        layout = caption_layout(caption, plain[name].size, CELL, 2)
        tiles = np.asarray(images[name])[layout.top :, layout.left : layout.left + plain[name].width]
        np.testing.assert_array_equal(tiles, np.asarray(plain[name]))  # captions never touch a tile
        assert images[name].size == (layout.width, layout.height)
