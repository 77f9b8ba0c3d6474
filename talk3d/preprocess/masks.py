"""Mouth and face masks in the crop, rasterised from the landmarks (a pixel is in a mask when its
centre is).

- mouth: the outer lip polygon (48-59) dilated by MOUTH_DILATION x the mouth width, so that it
  covers the lips, the skin they pull and the landmarks' error.
- face: the convex hull of the jaw line (0-16) and of the brows (17-26) moved up by
  FOREHEAD_EXTENSION x the eye-to-chin distance (landmarks stop at the brows; the forehead
  does not).
- foreground: the person, head to the crop's lower edge: the face, an ellipse around it for
  the hair, the neck under the jaw and the shoulders widening to the bottom of the crop, all
  drawn in the face's own frame (so a tilted head tilts them). A geometric prior from the
  landmarks, not a segmentation: it over-covers loose hair and under-covers wide shoulders.
"""
from __future__ import annotations

import numpy as np

__all__ = ["mouth_masks", "face_masks", "foreground_masks", "convex_hull", "MOUTH_DILATION",
           "FOREHEAD_EXTENSION"]

#: Dilation of the lip polygon, as a fraction of the mouth's width (corner to corner).
MOUTH_DILATION = 0.2
#: How far above the brows the face mask reaches, as a fraction of the eye-to-chin distance
#: (the hairline of an adult sits ~0.6 of that above the brows).
FOREHEAD_EXTENSION = 0.6
#: Foreground proportions, in units of the face width (jaw corner to jaw corner, points 0-16)
#: or of the eye-to-chin distance: hair reaches HAIR_SIDE widths past each side of the face and
#: HAIR_TOP eye-to-chin above the forehead; the neck is NECK_WIDTH face widths wide; the shoulders
#: start NECK_LENGTH eye-to-chin below the chin and reach SHOULDER_WIDTH face widths
#: SHOULDER_DROP eye-to-chin further down.
HAIR_SIDE, HAIR_TOP = 0.05, 0.3
NECK_WIDTH, NECK_LENGTH, SHOULDER_WIDTH, SHOULDER_DROP = 0.7, 0.5, 3.0, 0.3


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


def _fill(polygon: np.ndarray, size: int) -> np.ndarray:
    """[S, S] bool: pixel (row y, column x) is in when its centre (x + 0.5, y + 0.5) lies inside
    polygon [M, 2] (continuous crop pixels; even-odd rule; an edge's lower and left sides count).

    A scanline fill: each row's centre line crosses the edges at sorted x, each pair of crossings
    [x0, x1) fills the columns whose centres fall in it. Exact, where PIL's polygon fill snaps
    float vertices down to the pixel grid and fills inclusively (a pixel too many on the top and
    left edges)."""
    p = np.asarray(polygon, np.float64)
    a, b = p, np.roll(p, -1, axis=0)  # edges a -> b
    mask = np.zeros((size, size), dtype=bool)
    y0, y1 = max(0, int(np.floor(p[:, 1].min()))), min(size, int(np.ceil(p[:, 1].max())) + 1)
    if y1 <= y0:
        return mask
    yc = np.arange(y0, y1)[:, None] + 0.5  # [Y, 1] row centres
    crosses = (a[:, 1] <= yc) != (b[:, 1] <= yc)  # [Y, E]: half-open in y, so a vertex counts once
    dy = np.where(crosses, b[:, 1] - a[:, 1], 1.0)
    x = np.where(crosses, a[:, 0] + (yc - a[:, 1]) * (b[:, 0] - a[:, 0]) / dy, np.inf)
    x = np.sort(x, axis=1)  # the crossings first (an even count per row), then inf
    if x.shape[1] % 2:
        x = np.pad(x, ((0, 0), (0, 1)), constant_values=np.inf)
    # Columns with centres in [x0, x1): ceil(x0 - 0.5) .. ceil(x1 - 0.5) - 1.
    start = np.clip(np.ceil(x[:, 0::2] - 0.5), 0, size)
    stop = np.clip(np.ceil(x[:, 1::2] - 0.5), 0, size)
    rows = np.broadcast_to(np.arange(y1 - y0)[:, None], start.shape)
    ok = np.isfinite(x[:, 1::2]) & (stop > start)
    diff = np.zeros((y1 - y0, size + 1), dtype=np.int32)
    np.add.at(diff, (rows[ok], start[ok].astype(np.int64)), 1)
    np.add.at(diff, (rows[ok], stop[ok].astype(np.int64)), -1)
    mask[y0:y1] = np.cumsum(diff[:, :size], axis=1) > 0
    return mask


def _raster(polygon: np.ndarray, size: int, width: float = 0.0) -> np.ndarray:
    """Fill polygon [M, 2] (crop pixels, continuous) in an S x S bool mask, pixel (row y, column x)
    taken by its centre (x + 0.5, y + 0.5), dilated by ``width / 2``: a pixel whose centre lies
    within that distance of the outline is in too."""
    mask = _fill(polygon, size)
    r = width / 2
    if r <= 0:
        return mask
    p = np.asarray(polygon, np.float64)
    lo = np.clip(np.floor(p.min(0) - r).astype(int), 0, size)
    hi = np.clip(np.ceil(p.max(0) + r).astype(int) + 1, 0, size)
    if (hi <= lo).any():
        return mask
    # Distance of the centres of the polygon's box (grown by r) to each edge segment.
    c = np.stack(np.meshgrid(np.arange(lo[0], hi[0]) + 0.5, np.arange(lo[1], hi[1]) + 0.5), -1)  # [Y, X, 2]
    a, ab = p, np.roll(p, -1, axis=0) - p
    ap = c[..., None, :] - a  # [Y, X, E, 2]
    t = np.clip((ap * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0, 1)
    near = (np.linalg.norm(ap - t[..., None] * ab, axis=-1) <= r).any(-1)
    mask[lo[1]:hi[1], lo[0]:hi[0]] |= near
    return mask


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


def _ellipse(centre: np.ndarray, a: np.ndarray, b: np.ndarray, n: int = 48) -> np.ndarray:
    """Polygon [n, 2] of the ellipse centre + cos(t) a + sin(t) b (a, b: semi-axis vectors)."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)[:, None]
    return centre + np.cos(t) * a + np.sin(t) * b


def foreground_masks(lm: np.ndarray, size: int) -> np.ndarray:
    """lm [N, 68, 2] crop pixels -> [N, S, S] bool: head, hair, neck and shoulders (see module doc)."""
    out = face_masks(lm, size)
    for i, p in enumerate(lm):
        up = p[36:48].mean(0) - p[8]  # chin -> eyes
        length = np.linalg.norm(up)
        u = up / max(length, 1e-6)  # the face's up, unit
        r = np.array([-u[1], u[0]])  # perpendicular
        if np.dot(r, p[16] - p[0]) < 0:
            r = -r  # r points from the jaw's first point to its last
        width = abs(np.dot(p[16] - p[0], r))
        mid = 0.5 * (p[0] + p[16])
        # Hair: an ellipse around the face reaching above the forehead.
        top = p[17:27].mean(0) + (FOREHEAD_EXTENSION + HAIR_TOP) * up
        centre = 0.5 * (top + p[8])
        hair = _ellipse(centre, (0.5 + HAIR_SIDE) * width * r, 0.5 * np.linalg.norm(top - p[8]) * u)
        # Neck and shoulders: from the jaw down (along -u) to past the crop's lower edge.
        chin = p[8] - mid  # chin relative to the jaw's midpoint
        neck_top = mid + np.dot(chin, u) * 0.5 * u
        neck_bottom = p[8] - NECK_LENGTH * length * u
        shoulder = neck_bottom - SHOULDER_DROP * length * u  # where the shoulders reach full width
        far = neck_bottom - 2.0 * size * u  # well past the crop's edge
        n, w = NECK_WIDTH / 2 * width * r, SHOULDER_WIDTH / 2 * width * r
        body = np.array([neck_top - n, neck_top + n, neck_bottom + n, shoulder + w, far + w,
                         far - w, shoulder - w, neck_bottom - n])
        out[i] |= _raster(hair, size) | _raster(body, size)
    return out
