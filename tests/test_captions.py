"""Captions drawn around an image grid: band sizes, where text lands, the grid left untouched, labels
that do not fit left out, and the bitmap font where Pillow cannot size its own."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFont

from tuner.errors import TunerError
from tuner.vae import captions
from tuner.vae.captions import Caption, add_caption, caption_font, caption_layout

TILE, PAD = 56, 2  # MNIST tiles (28 px) at scale 2, as the trial images draw them
PITCH = TILE + PAD


@pytest.fixture(autouse=True)
def fresh_font():
    """caption_font is cached per process: each test (and a patched Pillow) starts from a clean cache."""
    caption_font.cache_clear()
    yield
    caption_font.cache_clear()


def _grid(rows: int, columns: int, mode: str = "L") -> Image.Image:
    """A grid of mid-grey tiles (100) on black pads: tile pixels are never 0, pads and bands are."""
    px = np.zeros((rows * PITCH - PAD, columns * PITCH - PAD), dtype=np.uint8)
    for r in range(rows):
        for c in range(columns):
            px[r * PITCH : r * PITCH + TILE, c * PITCH : c * PITCH + TILE] = 100
    if mode == "RGB":
        return Image.fromarray(np.stack([px] * 3, axis=-1))
    return Image.fromarray(px)


def _lit(region: np.ndarray) -> int:
    """Pixels that text (white, anti-aliased) turned on: > 0 on the black band."""
    return int((region > 0).sum())


def test_bands_frame_an_unchanged_grid_and_text_lands_in_each_row_and_column() -> None:
    grid = _grid(3, 4)
    caption = Caption("a title", rows=("first", "second", "third"), columns=("-1", "0", "+1", "+2"), corner="sd")
    layout = caption_layout(caption, grid.size, (TILE, TILE), PAD)
    image = add_caption(grid, caption, cell=(TILE, TILE), pad=PAD)
    px = np.asarray(image)

    assert layout.rows_drawn and layout.columns_drawn
    assert image.size == (layout.width, layout.height) == (layout.left + grid.width, layout.top + grid.height)
    assert image.mode == "L"
    # the grid sits at (left, top), pixel for pixel
    np.testing.assert_array_equal(px[layout.top :, layout.left :], np.asarray(grid))
    # label column: about the width of "second" at 16 px plus margins; bands: two text lines high
    assert 50 < layout.left < 80, layout
    assert 2 * 20 <= layout.top <= 2 * 36, layout
    # text is drawn in each band, white on black
    assert px[: layout.top].max() == 255 and px[:, : layout.left].max() == 255
    for r in range(3):  # each row label lies within its tile row
        assert _lit(px[layout.top + r * PITCH : layout.top + r * PITCH + TILE, : layout.left]) > 30
    column_band = px[layout.top // 2 : layout.top]
    for c in range(4):  # each column label lies over its tile column
        assert _lit(column_band[:, layout.left + c * PITCH : layout.left + c * PITCH + TILE]) > 10
    # the title is on the first line, at the left
    assert _lit(px[: layout.top // 2, :60]) > 30


def test_equal_labels_draw_equal_pixels_and_different_labels_differ() -> None:
    grid = _grid(4, 2)
    caption = Caption(rows=("input", "reconstruction", "input", "reconstruction"))
    layout = caption_layout(caption, grid.size, (TILE, TILE), PAD)
    px = np.asarray(add_caption(grid, caption, cell=(TILE, TILE), pad=PAD))
    band = [px[layout.top + r * PITCH : layout.top + r * PITCH + TILE, : layout.left] for r in range(4)]
    np.testing.assert_array_equal(band[0], band[2])
    np.testing.assert_array_equal(band[1], band[3])
    assert not np.array_equal(band[0], band[1])
    assert layout.top == 0 and not layout.columns_drawn  # no title, no column labels: no top band


def test_a_title_wider_than_the_grid_widens_the_canvas_to_the_right() -> None:
    grid = _grid(1, 1)
    caption = Caption("samples from the prior")  # ~165 px of text over a 56 px grid
    layout = caption_layout(caption, grid.size, (TILE, TILE), PAD)
    image = add_caption(grid, caption, cell=(TILE, TILE), pad=PAD)
    assert layout.left == 0 and image.width > 160 and image.height == layout.top + TILE
    px = np.asarray(image)
    np.testing.assert_array_equal(px[layout.top :, :TILE], np.asarray(grid))
    assert (px[layout.top :, TILE:] == 0).all()  # right of the grid: black, nothing written
    assert _lit(px[: layout.top, TILE:]) > 30  # the title runs on past the grid


def test_labels_that_do_not_fit_their_pitch_are_left_out() -> None:
    # non-image data: one-pixel strips at scale 2, 2 px apart -> a 4 px row pitch, no room for text
    strips = Image.fromarray(np.full((3 * 2 + 2 * 2, 20), 100, dtype=np.uint8))
    caption = Caption("title", rows=("a", "b", "c"), columns=("+2.25",))  # ~40 px over a 20 px column
    layout = caption_layout(caption, strips.size, (2, 20), 2)
    assert not layout.rows_drawn and not layout.columns_drawn
    assert layout.left == 0  # no label column at all
    image = add_caption(strips, caption, cell=(2, 20), pad=2)
    np.testing.assert_array_equal(np.asarray(image)[layout.top :, :20], np.asarray(strips))


def test_rgb_grids_get_white_text() -> None:
    grid = _grid(1, 2, mode="RGB")
    image = add_caption(grid, Caption("rgb"), cell=(TILE, TILE), pad=PAD)
    px = np.asarray(image)
    assert image.mode == "RGB"
    lit = px[: px.shape[0] - TILE].reshape(-1, 3)  # the title band
    assert [255, 255, 255] in lit.tolist()
    assert (lit[:, 0] == lit[:, 1]).all() and (lit[:, 1] == lit[:, 2]).all()  # grey anti-aliasing, no colour


def test_a_label_per_row_or_none() -> None:
    with pytest.raises(TunerError, match="got 2 labels for 3 rows"):
        caption_layout(Caption(rows=("a", "b")), _grid(3, 1).size, (TILE, TILE), PAD)
    with pytest.raises(TunerError, match="got 1 labels for 2 columns"):
        caption_layout(Caption(columns=("a",)), _grid(1, 2).size, (TILE, TILE), PAD)


def test_pillow_without_a_sized_font_falls_back_to_its_bitmap_font(monkeypatch: pytest.MonkeyPatch) -> None:
    sized = caption_font()
    assert isinstance(sized, ImageFont.FreeTypeFont) and sized.size == captions.CAPTION_PX
    big = caption_layout(Caption("t", rows=("input",)), _grid(1, 1).size, (TILE, TILE), PAD)
    caption_font.cache_clear()

    def no_freetype(size: float | None = None) -> ImageFont.ImageFont:
        if size is not None:  # Pillow >= 10.1 built without FreeType: truetype() fails
            raise ImportError("The _imagingft C module is not installed")
        return ImageFont.load_default_imagefont()

    monkeypatch.setattr(ImageFont, "load_default", no_freetype)
    assert type(caption_font()) is ImageFont.ImageFont  # the bitmap font
    grid = _grid(1, 1)
    small = caption_layout(Caption("t", rows=("input",)), grid.size, (TILE, TILE), PAD)
    image = add_caption(grid, Caption("t", rows=("input",)), cell=(TILE, TILE), pad=PAD)
    assert small.top < big.top and small.left < big.left  # ~11 px letters: narrower bands
    px = np.asarray(image)
    np.testing.assert_array_equal(px[small.top :, small.left :], np.asarray(grid))
    assert _lit(px[small.top :, : small.left]) > 10 and _lit(px[: small.top]) > 3
