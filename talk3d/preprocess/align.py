"""FFHQ-style face alignment, stabilised over time, and the crops it defines.

FFHQ's recipe (Karras et al., ``recreate_aligned_images``): from the eye centres and mouth
corners build an oriented square ``quad`` with centre ``c`` and half-side vector ``x`` (along
the crop's +u axis; the +v axis is ``x`` turned by +90 deg in image coordinates, y down). We
smooth ``c`` and ``x`` over time so that the crop does not shake with landmark noise, then
resample each frame into an ``S x S`` crop with bilinear interpolation (box-filtered first when
the crop shrinks the face by 2x or more, so that it does not alias).

Crop pixel (u, v) (continuous, pixel (row, col) spans [col, col+1) x [row, row+1)) shows image
point ``c - x - y + (u / S) 2x + (v / S) 2y`` with ``y = rot90(x)``.
"""
from __future__ import annotations

import numpy as np
import torch

from .landmarks import gaussian_smooth

__all__ = ["ffhq_quads", "rig_framing", "rig_quads", "smooth_quads", "crop_frames", "to_crop", "QUAD_SIGMA_FRAMES"]

#: Temporal smoothing of the crop's centre and axes, in frames (0.2 s). Larger gives a steadier
#: crop but lets the face drift in it during fast head motion; 5 frames keeps the drift below
#: ~2 % of the crop for head turns of 30 deg/s.
QUAD_SIGMA_FRAMES = 5.0


def _perp(v: np.ndarray) -> np.ndarray:
    """v [..., 2] turned by +90 deg in image coordinates (x right, y down): (x, y) -> (-y, x)."""
    return np.stack([-v[..., 1], v[..., 0]], axis=-1)


def ffhq_quads(lm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FFHQ's crop square of each frame from 68 landmarks.

    Args:
        lm: [N, 68, 2] image pixels.
    Returns:
        (centre [N, 2], half-side vector x [N, 2]) in image pixels.
    """
    eye_l, eye_r = lm[:, 36:42].mean(1), lm[:, 42:48].mean(1)  # image-left, image-right eye
    eye_avg, eye_to_eye = 0.5 * (eye_l + eye_r), eye_r - eye_l
    mouth_avg = 0.5 * (lm[:, 48] + lm[:, 54])
    eye_to_mouth = mouth_avg - eye_avg
    # The crop's +u axis: the eye line corrected by the face's up-down axis (turned to +u).
    x = eye_to_eye - _perp(eye_to_mouth)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    half = np.maximum(np.linalg.norm(eye_to_eye, axis=-1) * 2.0,
                      np.linalg.norm(eye_to_mouth, axis=-1) * 1.8)
    return eye_avg + 0.1 * eye_to_mouth, x * half[:, None]


def rig_framing(rig) -> tuple[float, np.ndarray]:
    """How the frontal camera of ``rig`` frames the world, relative to FFHQ's crop.

    FFHQ's crop goes with FFHQ's camera (focal 4.2647, pivot (0, 0, 0.2)): EG3D learned its heads
    from those crops with those cameras. A rig with another focal, radius or pivot (Talk3D's:
    focal 3.6, pivot (0, 0.05, 0.2)) sees the same head smaller or larger and shifted, so its crops
    must be framed accordingly, as the release's own cropping does by aligning every frame to the
    prior's mean face rendered with its rig. Near the pivot the two frontal views differ by a
    scale and a shift: crop coordinates q in [0, 1]^2 of FFHQ's framing appear at
    ``0.5 + k (q - 0.5) + shift`` in the rig's.

    Returns:
        (k, shift [2] (u, v) in shares of the crop side; v points down the image).
    """
    from ..data.synthetic import project_points
    from ..render.cameras import FFHQ_RIG, look_at_camera

    def project(r, points):  # [K, 3] world -> [K, 2] in [0, 1]^2 of r's frontal camera's image
        zero = torch.zeros(1, dtype=torch.float64)
        return torch.as_tensor(project_points(points, look_at_camera(zero, zero, rig=r), 1)[0])

    pivot = torch.tensor(FFHQ_RIG.pivot, dtype=torch.float64)
    pts = pivot + torch.tensor([[0.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.0, 0.1, 0.0]], dtype=torch.float64)
    a, b = project(FFHQ_RIG, pts), project(rig, pts)
    k = float((b[1:] - b[0]).norm(dim=1).mean() / (a[1:] - a[0]).norm(dim=1).mean())
    return k, (b[0] - 0.5 - k * (a[0] - 0.5)).numpy()


def rig_quads(centre: np.ndarray, axis: np.ndarray, rig) -> tuple[np.ndarray, np.ndarray]:
    """FFHQ crop squares (centre, half-side vector ``[N, 2]``) -> the squares that frame the same
    faces as ``rig``'s cameras see them (:func:`rig_framing`): ``1 / k`` the size, the centre moved
    against the shift. For FFHQ's rig itself the squares are unchanged."""
    k, (su, sv) = rig_framing(rig)
    axis = axis / k
    return centre - 2 * su * axis - 2 * sv * _perp(axis), axis


def smooth_quads(centre: np.ndarray, axis: np.ndarray, sigma: float = QUAD_SIGMA_FRAMES):
    """centre [N, 2], axis [N, 2] -> both smoothed over time (same shapes)."""
    return gaussian_smooth(centre, sigma), gaussian_smooth(axis, sigma)


def _affine(centre: np.ndarray, axis: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Crop -> image map p = A @ (u, v) + b. centre, axis [N, 2] -> (A [N, 2, 2], b [N, 2])."""
    y = _perp(axis)
    a = np.stack([2 * axis / size, 2 * y / size], axis=-1)  # columns: d p / du, d p / dv
    return a, centre - axis - y


def to_crop(points: np.ndarray, centre: np.ndarray, axis: np.ndarray, size: int) -> np.ndarray:
    """Image points [N, K, 2] -> crop pixels [N, K, 2] of the crops (centre, axis [N, 2])."""
    a, b = _affine(centre, axis, size)
    return np.einsum("nij,nkj->nki", np.linalg.inv(a), points - b[:, None])


#: Outside the video frame the crop shows the frame mirrored at its edge (as FFHQ pads), faded into
#: a blur of itself over this share of the crop side, so that the mirror's seam and detail do not
#: read as image content. (Clamping to the edge colour instead smears the border pixels into
#: streaks, which the model would learn as part of the head.)
PAD_FADE = 0.1
#: Side of the box filter (share of the crop side), applied twice, that makes the blur.
PAD_BLUR = 0.05


def _outside_distance(p: torch.Tensor, w: int, h: int) -> torch.Tensor:
    """Distance of image points p [..., 2] (pixels) outside the rectangle [0, w] x [0, h]; 0 inside."""
    dx = torch.clamp(-p[..., 0], min=0) + torch.clamp(p[..., 0] - w, min=0)
    dy = torch.clamp(-p[..., 1], min=0) + torch.clamp(p[..., 1] - h, min=0)
    return torch.sqrt(dx * dx + dy * dy)


def _box_blur(img: torch.Tensor, k: int) -> torch.Tensor:
    """img [B, C, S, S] blurred twice by a k x k box (reflect-padded: same size).

    Each box is a row pass then a column pass (a box filter is separable): 2k additions a pixel
    instead of k^2. At 512 px (k = 26) a k x k pool took 0.5 s a frame on 2 cores, nearly all of
    cropping's time."""
    for _ in range(2):
        img = torch.nn.functional.pad(img, (k // 2, (k - 1) // 2, k // 2, (k - 1) // 2), mode="reflect")
        img = torch.nn.functional.avg_pool2d(img, (1, k), stride=1)
        img = torch.nn.functional.avg_pool2d(img, (k, 1), stride=1)
    return img


def crop_frames(frames: np.ndarray, centre: np.ndarray, axis: np.ndarray, size: int) -> np.ndarray:
    """Resample frames [B, H, W, 3] uint8 into crops [B, S, S, 3] uint8.

    centre, axis: [B, 2] image pixels (see module doc). Where the crop reaches outside the frame it
    shows the frame mirrored, fading into a blur (``PAD_FADE``, ``PAD_BLUR``).
    """
    b, h, w = frames.shape[:3]
    a, off = _affine(centre, axis, size)
    img = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    # Shrink factor: image pixels per crop pixel. Pre-filter with an integer box when >= 2.
    scale = np.linalg.norm(a[:, :, 0], axis=-1)  # [B] image pixels per crop pixel
    shrink = int(np.floor(scale.min()))
    if shrink >= 2:
        img = torch.nn.functional.avg_pool2d(img, shrink, ceil_mode=True)
        a, off = a / shrink, off / shrink
        h, w = img.shape[2], img.shape[3]
    uv = (torch.arange(size, dtype=torch.float64) + 0.5)
    vv, uu = torch.meshgrid(uv, uv, indexing="ij")
    grid = torch.stack([uu, vv], -1).reshape(1, -1, 2)  # [1, S*S, 2] (u, v)
    at, bt = torch.from_numpy(a), torch.from_numpy(off)
    p = grid @ at.transpose(1, 2) + bt[:, None]  # [B, S*S, 2] image pixels
    # grid_sample with align_corners=False: -1 / +1 are the outer pixel edges, as here.
    norm = torch.stack([p[..., 0] / w * 2 - 1, p[..., 1] / h * 2 - 1], -1).float()
    out = torch.nn.functional.grid_sample(img, norm.reshape(b, size, size, 2), mode="bilinear",
                                          padding_mode="reflection", align_corners=False)
    # Outside distance in crop pixels (the map is a similarity: one scale per frame).
    outside = _outside_distance(p, w, h) / torch.from_numpy(np.linalg.norm(a[:, :, 0], axis=-1))[:, None]
    if bool((outside > 0).any()):
        fade = (outside / (PAD_FADE * size)).clamp(max=1.0).float().reshape(b, 1, size, size)
        blurred = _box_blur(out, max(1, round(PAD_BLUR * size)))
        out = out + fade * (blurred - out)
    return out.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
