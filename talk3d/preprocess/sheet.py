"""A contact sheet: a grid of crops with their landmarks, to check a dataset at a glance."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["contact_sheet"]


def contact_sheet(crops, lm68: np.ndarray, lm5: np.ndarray, path, *, count: int = 16,
                  tile: int = 192) -> None:
    """Write a PNG grid of ``count`` evenly spaced crops with landmarks drawn.

    Args:
        crops: [N, S, S, 3] uint8 (memory-mapped is fine: only ``count`` are read).
        lm68: [N, 68, 2] crop pixels (green dots); lm5: [N, 5, 2] (red dots, larger).
    """
    n, s = crops.shape[0], crops.shape[1]
    picks = np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(int))
    cols = math.ceil(math.sqrt(picks.size))
    rows = math.ceil(picks.size / cols)
    sheet = Image.new("RGB", (cols * tile, rows * tile), (40, 40, 40))
    scale = tile / s
    for k, i in enumerate(picks):
        im = Image.fromarray(np.asarray(crops[i])).resize((tile, tile), Image.BILINEAR)
        d = ImageDraw.Draw(im)
        for pts, colour, r in ((lm68[i], (0, 255, 0), 1.5), (lm5[i], (255, 0, 0), 3)):
            for x, y in pts * scale:
                d.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        d.text((4, 4), str(int(i)), fill=(255, 255, 0))
        sheet.paste(im, ((k % cols) * tile, (k // cols) * tile))
    sheet.save(path)
