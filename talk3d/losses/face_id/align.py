"""Alignment: FFHQ-aligned crops (or per-image landmarks) -> dlib's 150x150 face chips."""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from .common import CHIP_PADDING, CHIP_SIZE


# dlib's mean face (get_face_chip_details), in units of the face box before padding, x right, y down.
# iBUG-68 index -> (x, y): only these 33 points (nose, eyes, upper lip) enter dlib's fit. Measured
# through dlib.get_face_chip_details: its similarity fit is linear in the landmarks, so ~200 random
# landmark sets and the transforms dlib returned determine the template; it reproduces dlib's
# transforms to ~1e-11. tests/test_face_id.py re-checks it against dlib when dlib is installed.
DLIB_TEMPLATE_68 = {
    27: (0.490127, 0.203352), 28: (0.490127, 0.307009), 29: (0.490127, 0.409805),
    30: (0.490127, 0.515625), 31: (0.366880, 0.587326), 32: (0.426036, 0.609345),
    33: (0.490127, 0.628106), 34: (0.554217, 0.609345), 35: (0.613373, 0.587326),
    36: (0.121737, 0.216423), 37: (0.187122, 0.178758), 38: (0.265825, 0.179852),
    39: (0.334606, 0.231733), 40: (0.260918, 0.245099), 41: (0.182743, 0.244077),
    42: (0.645647, 0.231733), 43: (0.714428, 0.179852), 44: (0.793132, 0.178758),
    45: (0.858516, 0.216423), 46: (0.797510, 0.244077), 47: (0.719335, 0.245099),
    48: (0.254149, 0.780233), 49: (0.340985, 0.745405), 50: (0.428858, 0.727388),
    51: (0.490127, 0.742578), 52: (0.551395, 0.727388), 53: (0.639268, 0.745405),
    54: (0.726104, 0.780233), 60: (0.290379, 0.784792), 61: (0.428096, 0.778746),
    62: (0.490127, 0.785343), 63: (0.552157, 0.778746), 64: (0.689874, 0.784792),
}
# The same for dlib's 5-point predictor, in its order: image-right eye outer and inner corner,
# image-left eye outer and inner corner, bottom of the nose.
DLIB_TEMPLATE_5 = ((0.859567, 0.213498), (0.646060, 0.228967), (0.120575, 0.213727),
                   (0.334085, 0.229064), (0.490112, 0.627798))
# A crop shrunk by more than this (crop pixels per chip pixel) is low-pass resized first, so that
# bilinear sampling does not alias; below it bilinear alone is close to dlib's own resampling.
MAX_SHRINK = 1.5


def _template(num_landmarks: int) -> tuple[list[int], torch.Tensor]:
    """(landmark indices used, their template positions [N, 2] in chip pixels, continuous)."""
    if num_landmarks == 68:
        idx, pts = list(DLIB_TEMPLATE_68), list(DLIB_TEMPLATE_68.values())
    elif num_landmarks == 5:
        idx, pts = list(range(5)), list(DLIB_TEMPLATE_5)
    else:
        raise ValueError(f"landmarks: need 68 (iBUG) or 5 (dlib's 5-point order) points, got {num_landmarks}")
    unit = (torch.tensor(pts, dtype=torch.float64) + CHIP_PADDING) / (1 + 2 * CHIP_PADDING)
    return idx, unit * CHIP_SIZE


def _fit_similarity(src: torch.Tensor, dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares similarity dst ~ A src + t (as dlib's find_similarity_transform).

    src [N, 2], dst [B, N, 2] -> (A [B, 2, 2] = [[a, -b], [b, a]], t [B, 2]).
    """
    src = src.to(dst)
    s0, d0 = src - src.mean(0), dst - dst.mean(1, keepdim=True)
    norm = (s0 ** 2).sum()
    a = (s0[None, :, 0] * d0[..., 0] + s0[None, :, 1] * d0[..., 1]).sum(1) / norm
    b = (s0[None, :, 0] * d0[..., 1] - s0[None, :, 1] * d0[..., 0]).sum(1) / norm
    mat = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], -2)
    t = dst.mean(1) - (mat @ src.mean(0)[:, None])[..., 0]
    return mat, t


def _dlib_sampling(mat: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dlib's chip sampling for the fitted map ``p = mat c + t`` (chip -> image pixels, continuous).

    dlib puts its 150 chip pixel centres on a box of side 150 s - 1 image pixels (s = |mat|, the
    image pixels per chip pixel) about the mapped chip centre, not 149 s: the map is scaled by
    (150 s - 1) / (149 s) about the chip centre, 1 + (s - 1) / (149 s): 0.3 % at s = 2, at most
    0.7 % (0.5 chip pixel at the chip's edge). Emulated so chips match dlib's (measured: to 4e-5
    px). mat [B, 2, 2], t [B, 2] -> the same.
    """
    s = torch.linalg.det(mat).abs().sqrt()
    k = (CHIP_SIZE * s - 1) / ((CHIP_SIZE - 1) * s)
    centre = torch.full((2, 1), CHIP_SIZE / 2, dtype=mat.dtype, device=mat.device)
    mapped = (mat @ centre)[..., 0] + t
    mat = mat * k[:, None, None]
    return mat, mapped - (mat @ centre)[..., 0]


def chip_affine_from_landmarks(landmarks: torch.Tensor, size: int) -> torch.Tensor:
    """Per-image crop -> chip map fitted as dlib does, as ``F.affine_grid`` thetas.

    Args:
        landmarks: [B, 68, 2] iBUG or [B, 5, 2] dlib-5 points in crop pixels, continuous (pixel
            (row, col) spans [col, col + 1) x [row, row + 1), talk3d's dataset convention).
        size: the crop side S.
    Returns:
        theta [B, 2, 3]: chip coordinates -> crop coordinates, both normalised to [-1, 1]
        (``align_corners=False``).
    """
    lm = torch.as_tensor(landmarks, dtype=torch.float64)
    idx, tmpl = _template(lm.shape[1])
    mat, t = _fit_similarity(tmpl, lm[:, idx])
    mat, t = _dlib_sampling(mat, t)
    # chip normalised n -> chip pixels (n + 1) * 75 -> crop pixels A c + t -> crop normalised.
    lin = mat * (CHIP_SIZE / size)
    off = lin.sum(-1) + 2 * t / size - 1  # lin @ (1, 1): the chip's normalised origin is pixel 75
    return torch.cat([lin, off[..., None]], dim=-1).float()


def _mean_face_ffhq_landmarks(size: int) -> np.ndarray:
    """dlib's mean face placed in an S x S FFHQ crop by talk3d.preprocess's (FFHQ's) recipe: [68, 2],
    NaN where the template has no point."""
    from ...preprocess.align import ffhq_quads, to_crop

    lm = np.full((1, 68, 2), np.nan)
    idx, tmpl = _template(68)
    lm[0, idx] = tmpl.numpy()  # the mean face as it sits in a chip: any similarity of it would do
    centre, axis = ffhq_quads(lm)
    return to_crop(lm, centre, axis, size)[0]


@functools.lru_cache(maxsize=16)
def _ffhq_theta(size: int) -> torch.Tensor:
    lm = torch.from_numpy(_mean_face_ffhq_landmarks(size))[None]
    return chip_affine_from_landmarks(lm, size)[0]


def ffhq_chip_affine(size: int) -> torch.Tensor:
    """The fixed crop -> chip map for FFHQ-aligned S x S crops: theta [2, 3] (normalised coordinates).

    FFHQ's crop and dlib's chip are both similarity transforms of the landmarks, so for the mean
    face the two differ by one fixed similarity: fitted here (as dlib fits) from the template
    points' positions in a crop. It depends on S only through dlib's sampling convention
    (:func:`_dlib_sampling`, < 0.7 %). Faces far from the mean (wide mouth, strong expression,
    large yaw) are aligned less well than with their own landmarks (:func:`chip_affine_from_landmarks`).
    """
    return _ffhq_theta(int(size)).clone()


def align_to_chip(images: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
    """FFHQ-aligned crops -> dlib face chips, differentiably (bilinear ``grid_sample``).

    Args:
        images: [B, 3, S, S] RGB in [-1, 1], aligned as talk3d.preprocess crops them (FFHQ's recipe).
        landmarks: optional [B, 68, 2] or [B, 5, 2] crop pixels: each image's own map (as dlib
            would align that face) instead of the mean face's.
    Returns:
        chips [B, 3, 150, 150] in [-1, 1]; outside the crop black (-1), as dlib fills it.

    With landmarks, chips match dlib's ``get_face_chip`` of the same image and points to < 1 grey
    level on average. Not emulated: when dlib shrinks a face by more than 2x it resamples through
    an image pyramid, which shifts its chip by 0.5 image pixel per level (< 0.25 chip pixel).
    """
    b, _, h, w = images.shape
    if h != w:
        raise ValueError(f"align_to_chip: square crops needed, got {h}x{w}")
    if landmarks is None:
        theta = ffhq_chip_affine(h).expand(b, 2, 3)
    else:
        theta = chip_affine_from_landmarks(landmarks, h)
    theta = theta.to(images.device, torch.float32)
    images = _prefilter(images, theta)
    grid = F.affine_grid(theta, [b, 3, CHIP_SIZE, CHIP_SIZE], align_corners=False)
    # Sample (x + 1) with zero padding, so that outside reads -1 (black) after the shift back.
    out = F.grid_sample(images.float() + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out - 1.0


def _prefilter(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resize (antialiased) crops that the chip would shrink by > MAX_SHRINK; normalised coordinates,
    hence theta, are unchanged. images [B, 3, S, S] -> [B, 3, S', S']."""
    size = images.shape[-1]
    # Crop pixels per chip pixel: sqrt|det| of the normalised map, times S / 150.
    shrink = float(torch.linalg.det(theta[:, :, :2]).abs().sqrt().min()) * size / CHIP_SIZE
    if shrink <= MAX_SHRINK:
        return images
    new = max(1, round(size / shrink))
    return F.interpolate(images.float(), size=(new, new), mode="bilinear", antialias=True, align_corners=False)
