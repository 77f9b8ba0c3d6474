"""Mouth and face masks in the crop, rasterised from the landmarks with PIL.

- mouth: the outer lip polygon (48-59) dilated by MOUTH_DILATION x the mouth width, so that it
  covers the lips, the skin they pull and the landmarks' error.
- face: the convex hull of the jaw line (0-16) and of the brows (17-26) moved up by
  FOREHEAD_EXTENSION x the eye-to-chin distance (landmarks stop at the brows; the forehead
  does not).
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["mouth_masks", "face_masks", "convex_hull", "MOUTH_DILATION", "FOREHEAD_EXTENSION"]

#: Dilation of the lip polygon, as a fraction of the mouth's width (corner to corner).
MOUTH_DILATION = 0.2
#: How far above the brows the face mask reaches, as a fraction of the eye-to-chin distance
#: (the hairline of an adult sits ~0.6 of that above the brows).
FOREHEAD_EXTENSION = 0.6


def convex_hull(points: np.ndarray) -> np.ndarray:
    """points [M, 2] -> hull vertices [H, 2] counter-clockwise (Andrew's monotone chain)."""
    pts = sorted(map(tuple, np.asarray(points, dtype=np.float64)))

    def half(seq):
        out = []
        for p in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(p)
        return out

    lower, upper = half(pts), half(pts[::-1])
    return np.array(lower[:-1] + upper[:-1])


def _raster(polygon: np.ndarray, size: int, width: float = 0.0) -> np.ndarray:
    """Fill polygon [M, 2] (crop pixels, continuous) in an S x S bool mask, plus an outline of
    ``width`` pixels (the dilation). PIL's integer pixel (i, j) is centred at (i + 0.5, j + 0.5)
    in our coordinates, hence the shift."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    pts = [tuple(p) for p in (np.asarray(polygon) - 0.5)]
    draw.polygon(pts, fill=1)
    if width >= 1:
        draw.line(pts + pts[:1], fill=1, width=int(round(width)), joint="curve")
        r = width / 2
        for x, y in pts:  # round caps at the vertices
            draw.ellipse((x - r, y - r, x + r, y + r), fill=1)
    return np.asarray(img, dtype=bool)


def mouth_masks(lm: np.ndarray, size: int) -> np.ndarray:
    """lm [N, 68, 2] crop pixels -> [N, S, S] bool."""
    out = np.zeros((lm.shape[0], size, size), dtype=bool)
    for i, p in enumerate(lm):
        width = np.linalg.norm(p[54] - p[48])
        out[i] = _raster(p[48:60], size, 2 * MOUTH_DILATION * width)
    return out


def face_masks(lm: np.ndarray, size: int) -> np.ndarray:
    """lm [N, 68, 2] crop pixels -> [N, S, S] bool."""
    out = np.zeros((lm.shape[0], size, size), dtype=bool)
    for i, p in enumerate(lm):
        eyes = p[36:48].mean(0)
        up = eyes - p[8]  # chin -> eyes: the face's up direction, with its length
        forehead = p[17:27] + FOREHEAD_EXTENSION * up
        out[i] = _raster(convex_hull(np.concatenate([p[0:27], forehead])), size)
    return out
