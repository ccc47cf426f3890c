"""Words drawn into an image grid (:func:`add_caption`): a title band on top, a label per tile row
in a column on the left, a label per tile column in a band under the title.

Why drawn into the PNG and not written beside it: the same file is shown by optuna-dashboard, embedded
in the report and written into a run folder, and only the pixels travel to all three.

Layout: the grid is pasted unchanged at (left, top) of a black canvas; text is white (``L`` 255 or
RGB white), in Pillow's bundled Aileron at :data:`CAPTION_PX` px (Pillow >= 10.1 with FreeType), else
Pillow's bitmap font. Every size is measured from the font, so both read the same way. Row labels
are centred on their tile row and column labels on their tile column; labels that do not fit their
row or column pitch (one-pixel strips of non-image data, tiny tiles) are left out, all of an axis at
once, rather than drawn over each other. Nothing is drawn under or right of the grid, so the grid
ends at the canvas' bottom edge.

Pillow is imported on first use, as in :mod:`.images`: callers check for it first.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tuner.errors import TunerError

if TYPE_CHECKING:
    from PIL import Image, ImageFont

__all__ = ["CAPTION_PX", "Caption", "CaptionLayout", "add_caption", "caption_font", "caption_layout"]

CAPTION_PX = 16  # font size: about 10 px where the report shows a grid 380 px wide
MARGIN = 6  # px around every text block
SPACING = 2  # px between the lines of one label


@dataclass(frozen=True)
class Caption:
    """What to write around a grid. ``rows``: one label per tile row (or none), top to bottom;
    ``columns``: one per tile column (or none); ``corner``: above the row labels, beside the column
    labels (the columns' unit). A label may hold several lines ("\\n")."""

    title: str = ""
    rows: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()
    corner: str = ""


@dataclass(frozen=True)
class CaptionLayout:
    """Where the grid sits in the captioned image (px), the title band's height (the column labels
    start under it) and which label axes are drawn."""

    left: int
    top: int
    width: int
    height: int
    title_height: int
    rows_drawn: bool
    columns_drawn: bool


@functools.cache
def caption_font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled Aileron at :data:`CAPTION_PX` px; the bitmap default font (about 11 px) where
    Pillow is older than 10.1 (no ``size``) or built without FreeType."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=CAPTION_PX)
    except (TypeError, ImportError, OSError):  # TypeError: Pillow < 10.1; ImportError: no FreeType
        return ImageFont.load_default()


def _bbox(text: str) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of `text` drawn with its origin at (0, 0)."""
    from PIL import Image, ImageDraw

    box = ImageDraw.Draw(Image.new("L", (1, 1))).multiline_textbbox((0, 0), text, font=caption_font(), spacing=SPACING)
    return tuple(round(v) for v in box)


def _block(lines: int) -> tuple[int, int]:
    """(y0, y1) of a block of `lines` lines: from the font, not the letters, so bands keep one height."""
    _, y0, _, y1 = _bbox("\n".join(["Ag"] * lines))
    return y0, y1


def _lines(text: str) -> int:
    return text.count("\n") + 1


def caption_layout(caption: Caption, grid_size: tuple[int, int], cell: tuple[int, int], pad: int) -> CaptionLayout:
    """The captioned image's geometry for a grid of `grid_size` (width, height) px whose tiles are
    `cell` (height, width) px with `pad` px between them."""
    (width, height), (h, w) = grid_size, cell
    n_rows, n_cols = (height + pad) // (h + pad), (width + pad) // (w + pad)
    for name, labels, n in (("row", caption.rows, n_rows), ("column", caption.columns, n_cols)):
        if labels and len(labels) != n:
            raise TunerError(f"a caption needs one {name} label per tile {name}, but got {len(labels)} "
                             f"labels for {n} {name}s; pass {n} labels or none.")
    row_block = max((_block(_lines(r)) for r in caption.rows), key=lambda b: b[1] - b[0], default=(0, 0))
    rows_drawn = bool(caption.rows) and row_block[1] - row_block[0] <= h + pad
    widest = max((x1 - x0 for x0, _, x1, _ in map(_bbox, caption.columns)), default=0)
    columns_drawn = bool(caption.columns) and widest <= w + pad - 2  # 2 px apart at least

    labels = [*(caption.rows if rows_drawn else ()), *((caption.corner,) if columns_drawn and caption.corner else ())]
    left = max(_bbox(t)[2] for t in labels) + 2 * MARGIN if labels else 0
    title_height = _block(_lines(caption.title))[1] + 2 * MARGIN if caption.title else 0
    column_band = max(_block(_lines(c))[1] for c in caption.columns) + 2 * MARGIN if columns_drawn else 0
    title_width = _bbox(caption.title)[2] + 2 * MARGIN if caption.title else 0
    top = title_height + column_band
    return CaptionLayout(left, top, max(left + width, title_width), top + height, title_height, rows_drawn,
                         columns_drawn)


def add_caption(grid: Image.Image, caption: Caption, *, cell: tuple[int, int], pad: int) -> Image.Image:
    """`grid` pasted unchanged into a black canvas with `caption` written around it (see the module)."""
    from PIL import Image, ImageDraw

    layout = caption_layout(caption, grid.size, cell, pad)
    canvas = Image.new(grid.mode, (layout.width, layout.height), 0)
    canvas.paste(grid, (layout.left, layout.top))
    draw = ImageDraw.Draw(canvas)
    white = 255 if grid.mode == "L" else (255,) * len(grid.mode)
    font = caption_font()

    def write(x: float, y: float, text: str) -> None:
        draw.multiline_text((round(x), round(y)), text, fill=white, font=font, spacing=SPACING)

    h, w = cell
    if caption.title:
        write(MARGIN, MARGIN, caption.title)
    if layout.columns_drawn:
        y = layout.title_height + MARGIN
        if caption.corner:
            write(MARGIN, y, caption.corner)
        for c, text in enumerate(caption.columns):
            x0, _, x1, _ = _bbox(text)
            write(layout.left + c * (w + pad) + w / 2 - (x0 + x1) / 2, y, text)  # centred on the tile column
    if layout.rows_drawn:
        for r, text in enumerate(caption.rows):
            y0, y1 = _block(_lines(text))
            write(MARGIN, layout.top + r * (h + pad) + h / 2 - (y0 + y1) / 2, text)  # centred on the tile row
    return canvas
