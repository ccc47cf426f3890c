"""Image grids: saved PNGs are reloaded and checked pixel by pixel."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tuner.errors import TunerError
from tuner.vae.images import ImagesUnavailable, image_grid, reconstruction_grid, save_grid


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
