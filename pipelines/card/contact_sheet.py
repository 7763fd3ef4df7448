"""The dataset card's sample pairs: a contact sheet of kept images with their final captions."""

from __future__ import annotations

import io
import textwrap

import numpy as np

from pipelines.card.figures import PALETTE, new_figure, to_png

COLUMNS = 4
CAPTION_WIDTH = 34  # characters per line under a thumbnail
CAPTION_LINES = 4


def contact_sheet_png(samples: list[tuple[bytes | None, str]]) -> bytes:
    """A grid of encoded images, each with its caption wrapped underneath."""
    rows = max(1, -(-len(samples) // COLUMNS))
    figure = new_figure(2.6 * COLUMNS, 2.6 * rows)
    grid = figure.subplots(rows, COLUMNS, squeeze=False)
    for axes in grid.flat[len(samples) :]:
        axes.axis("off")
    for axes, (data, text) in zip(grid.flat, samples):
        pixels = _pixels(data)
        if pixels is None:
            axes.text(0.5, 0.5, "image does not decode", ha="center", va="center", fontsize=8, color=PALETTE.dropped)
        else:
            axes.imshow(pixels)
        # The caption as the x label: below the image, and tight_layout makes room for it.
        axes.set_xticks([])
        axes.set_yticks([])
        for spine in axes.spines.values():
            spine.set_visible(False)
        axes.set_xlabel(wrap(text or ""), fontsize=7.5)
    return to_png(figure)


def wrap(text: str, width: int = CAPTION_WIDTH, lines: int = CAPTION_LINES) -> str:
    """``text`` on at most ``lines`` lines of ``width`` characters, ending in an ellipsis when cut."""
    wrapped = textwrap.wrap(" ".join(text.split()), width) or [""]
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][: width - 1].rstrip() + "…"
    return "\n".join(wrapped)


def _pixels(data: bytes | None, size: int = 256) -> np.ndarray | None:
    from PIL import Image, UnidentifiedImageError

    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")
            img.thumbnail((size, size))
            return np.asarray(img)
    except (UnidentifiedImageError, OSError, ValueError):
        return None
