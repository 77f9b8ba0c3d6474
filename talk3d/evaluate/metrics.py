"""Evaluation metrics of the paper's Tables 1 and 2, each a pure function or a pluggable callable.

Images are ``[B, 3, H, W]`` float tensors in [-1, 1] (the model's convention, data range 2)
unless said otherwise; every per-image metric returns ``[B]``.

- :func:`psnr`: 10 log10(range^2 / MSE), MSE over all pixels and channels of one image.
- :func:`ssim`: Wang et al. 2004 on intensities from 0 (the [-1, 1] images as [0, 1]), an 11-tap
  Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, over the "valid" window positions, averaged
  over channels and positions.
- :class:`LPIPSMetric`: LPIPS v0.1 (AlexNet) through :mod:`talk3d.losses`, only with real weights.
- :func:`landmark_distance` (LMD): mean Euclidean distance between corresponding mouth landmarks,
  found by a pluggable :data:`LandmarkDetector`; :class:`MouthMaskOracle` is one for the synthetic
  head (no face landmark detector runs on generated frames here).
- :func:`mouth_opening_score`: fraction of dark pixels inside the mouth region (how open a mouth is,
  on the synthetic head); :func:`inner_lip_opening`: the inner-lip gap over the mouth's width, from
  the 20 mouth landmarks of a real face (how open a real mouth is).
- :func:`identity_similarity`, :func:`frechet_distance`: the maths of IDSIM and FID on features of
  user-supplied networks (face embedding, Inception); never run on random weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "SSIM_WINDOW", "SSIM_SIGMA", "SSIM_K1", "SSIM_K2", "DARK_LUMA", "LIP_MIN_RED", "LIP_GREEN_RED_RATIO",
    "Unavailable", "psnr", "ssim", "gaussian_window", "grow_region", "PRED_SEARCH_MARGIN", "LPIPSMetric",
    "LandmarkDetector",
    "MouthMaskOracle", "landmark_distance", "mouth_opening_score", "IBUG_MOUTH", "inner_lip_opening", "pearson", "identity_similarity",
    "frechet_distance", "to_unit_range",
]

# SSIM's standard settings (Wang et al. 2004; skimage / pytorch-msssim use the same).
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
# Lip and cavity pixels are at least this red (in [0, 1]): the darkest ones of the synthetic head,
# its shaded cavity, measured 0.137 at 64 px; half of that. Black is not a lip (its green / red
# ratio is 0 / 0).
LIP_MIN_RED = 0.07
# Mouth-region pixels darker than this luma (in [0, 1]) count as open mouth (the synthetic head's
# cavity has luma ~0.1 under its lighting; its lips ~0.4 and skin ~0.7).
DARK_LUMA = 0.25
# Lips and the mouth cavity are red-dominant: green / red below this ratio (skin ~0.74, lips
# ~0.39, cavity ~0.18). A ratio does not change under the head's shading or skin texture, which
# both scale the three channels alike.
LIP_GREEN_RED_RATIO = 0.56
# Rec. 601 luma weights.
LUMA = (0.299, 0.587, 0.114)
# For a uniform distribution over an interval, half its length is sqrt(3) standard deviations.
UNIFORM_HALF_EXTENT_PER_STD = math.sqrt(3.0)


@dataclass(frozen=True)
class Unavailable:
    """A metric that could not run, with the one-line reason (goes to metrics.json as-is)."""

    reason: str

    def to_json(self) -> dict:
        return {"available": False, "reason": self.reason}


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> the same in [0, 1]."""
    return (images.float().clamp(-1, 1) + 1) / 2


# --------------------------------------------------------------------------------------------
# PSNR, SSIM
# --------------------------------------------------------------------------------------------


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, in dB.

    Args:
        pred, target: [B, C, H, W] (float in [-1, 1] with data_range 2, or uint8 / 0..255 with
            data_range 255).
        data_range: max - min of the value range.

    Returns:
        [B] float64: 10 log10(data_range^2 / MSE); +inf for identical images.
    """
    if pred.shape != target.shape:
        raise ValueError(f"psnr: shapes differ, {tuple(pred.shape)} vs {tuple(target.shape)}")
    # float64: uint8 differences would wrap, and float32 loses digits for tiny errors.
    diff = pred.double() - target.double()
    mse = diff.pow(2).flatten(1).mean(dim=1)  # [B]
    return 10 * torch.log10(data_range ** 2 / mse)  # mse 0 -> inf, as it should be


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA, dtype=torch.float64) -> torch.Tensor:
    """[size] 1-D Gaussian taps summing to 1 (SSIM's window is its outer product)."""
    x = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(pred: torch.Tensor, target: torch.Tensor, *, value_range: tuple[float, float] = (-1.0, 1.0),
         window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004).

    SSIM's luminance term ``(2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)`` assumes intensities
    from 0 (black) up: it is not invariant to a shift. Images in ``value_range`` = (lo, hi) are
    therefore scored as ``x - lo`` in [0, L], L = hi - lo (for the model's [-1, 1] the same as the
    usual [0, 1] with L = 1: SSIM is invariant to a common scale of images and L).
    Local means, variances and covariance come from a separable Gaussian window over the valid
    positions (no padding, as the reference implementation); SSIM's map
    ``(2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))`` with
    C1 = (K1 L)^2, C2 = (K2 L)^2 is averaged over positions and channels. Images smaller than
    the window use the largest odd window that fits.

    Args:
        pred, target: [B, C, H, W] with values in value_range ((0, 255) for 8-bit images).

    Returns:
        [B] float64 in [-1, 1]; 1 for identical images.
    """
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(f"ssim: expected two [B, C, H, W] of one shape, got {tuple(pred.shape)}, {tuple(target.shape)}")
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"ssim: value_range must be (low, high) with high > low, got {value_range}")
    data_range = hi - lo
    x, y = pred.double() - lo, target.double() - lo
    c = x.shape[1]
    size = min(window, x.shape[-1], x.shape[-2])
    size -= (size + 1) % 2  # keep it odd so the window has a centre
    g = gaussian_window(size, sigma).to(x.device)
    gh = g.view(1, 1, 1, size).repeat(c, 1, 1, 1)  # [C, 1, 1, k] depthwise, along the width
    gv = g.view(1, 1, size, 1).repeat(c, 1, 1, 1)  # [C, 1, k, 1] along the height

    def blur(t):  # [B, C, H, W] -> [B, C, H-k+1, W-k+1]
        return F.conv2d(F.conv2d(t, gh, groups=c), gv, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2)
    return (num / den).flatten(1).mean(dim=1)


# --------------------------------------------------------------------------------------------
# LPIPS
# --------------------------------------------------------------------------------------------


class LPIPSMetric:
    """LPIPS (AlexNet, v0.1) when real weights are found, else unavailable with lpips_status's line.

    ``metric.available``; ``metric.reason`` (why not, or where the weights came from);
    ``metric(pred, target)`` [B, 3, H, W] in [-1, 1] -> [B] (lower is better).
    """

    def __init__(self, weights_dir: str | None = None, device="cpu"):
        from ..losses import LPIPS, find_lpips_weights, lpips_status

        self.reason = lpips_status(weights_dir)
        self.net = None
        try:
            weights = find_lpips_weights(weights_dir)
        except (ValueError, OSError) as e:  # found but unusable: lpips_status already says so
            weights = None
            self.reason = f"{self.reason} ({e})" if str(e) not in self.reason else self.reason
        if weights is not None:
            self.net = LPIPS(weights).to(device)

    @property
    def available(self) -> bool:
        return self.net is not None

    def min_size(self) -> int:
        return self.net.spec.min_size if self.net is not None else 0

    @torch.no_grad()
    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.net is None:
            raise RuntimeError(f"LPIPS unavailable: {self.reason}")
        return self.net(pred.float(), target.float()).double()


# --------------------------------------------------------------------------------------------
# Mouth landmarks (LMD) and mouth opening
# --------------------------------------------------------------------------------------------

#: images [B, 3, S, S] in [-1, 1], mouth region [B, 1, S, S] (or None: the detector finds the
#: face itself) -> mouth landmarks [B, K, 2] pixel (x, y), NaN rows where no mouth was found.
LandmarkDetector = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def _luma(images01: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> [B, H, W] luma."""
    w = torch.tensor(LUMA, dtype=images01.dtype, device=images01.device).view(1, 3, 1, 1)
    return (images01 * w).sum(dim=1)


class MouthMaskOracle:
    """Mouth landmarks of the synthetic head from its known mouth region (a landmark oracle).

    Inside the region the lips may cover (the dataset's / synthetic renderer's ``mouth_mask`` for
    that camera, given for the target and used for the prediction too), lip and cavity pixels
    are the red-dominant ones (green / red < LIP_GREEN_RED_RATIO, red >= LIP_MIN_RED). Their centroid and the
    centroid +- sqrt(3) standard deviations along x and y (the ends of a uniform spread: mouth
    corners, upper and lower lip) are the K = 5 landmarks, in the order centre, left, right,
    top, bottom. Moments rather than min/max keep single stray pixels from moving the corners.

    Call: images [B, 3, S, S] in [-1, 1], mouth_mask [B, 1, S, S] -> [B, 5, 2] pixel (x, y)
    (pixel (row, col) has centre (col + 0.5, row + 0.5)); NaN where no lip pixel is found.
    """

    name = "mouth-mask oracle (synthetic head: red-dominant pixels inside the known mouth region)"
    num_landmarks = 5

    def __call__(self, images: torch.Tensor, mouth_mask: torch.Tensor | None) -> torch.Tensor:
        if mouth_mask is None:
            raise ValueError("MouthMaskOracle needs the mouth region (synthetic data only)")
        rgb = to_unit_range(images).double()  # [B, 3, S, S]
        ratio = rgb[:, 1] / rgb[:, 0].clamp_min(1e-3)  # [B, S, S]
        lip = (ratio < LIP_GREEN_RED_RATIO) & (rgb[:, 0] >= LIP_MIN_RED)  # [B, S, S]
        w = (lip & (mouth_mask[:, 0] >= 0.5)).double()  # [B, S, S]
        b, h, wd = w.shape
        ys = (torch.arange(h, dtype=torch.float64) + 0.5).view(1, h, 1)
        xs = (torch.arange(wd, dtype=torch.float64) + 0.5).view(1, 1, wd)
        n = w.sum(dim=(1, 2))  # [B]
        safe = n.clamp_min(1)
        cx = (w * xs).sum(dim=(1, 2)) / safe
        cy = (w * ys).sum(dim=(1, 2)) / safe
        sx = ((w * (xs - cx.view(b, 1, 1)) ** 2).sum(dim=(1, 2)) / safe).sqrt() * UNIFORM_HALF_EXTENT_PER_STD
        sy = ((w * (ys - cy.view(b, 1, 1)) ** 2).sum(dim=(1, 2)) / safe).sqrt() * UNIFORM_HALF_EXTENT_PER_STD
        pts = torch.stack([torch.stack([cx, cy], -1), torch.stack([cx - sx, cy], -1), torch.stack([cx + sx, cy], -1),
                           torch.stack([cx, cy - sy], -1), torch.stack([cx, cy + sy], -1)], dim=1)  # [B, 5, 2]
        pts[n == 0] = math.nan
        return pts


#: The rendered frame's mouth is searched in the target's mouth region grown by this fraction of
#: the image side (4 px at 64^2): a mouth drawn a little off its place is found, and measured.
PRED_SEARCH_MARGIN = 1 / 16


def grow_region(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """mask [B, 1, H, W] (>= 0.5 inside) grown by ``pixels`` in every direction (a square dilation)."""
    if pixels <= 0:
        return mask
    inside = (mask >= 0.5).float()
    return F.max_pool2d(inside, kernel_size=2 * pixels + 1, stride=1, padding=pixels)


def landmark_distance(pred_points: torch.Tensor, target_points: torch.Tensor) -> torch.Tensor:
    """LMD per image: the mean over K landmarks of the Euclidean distance between corresponding points.

    Args:
        pred_points, target_points: [B, K, 2] (x, y), in pixels of one image size.

    Returns:
        [B] float64 (NaN where either side has a NaN landmark: not detected).
    """
    if pred_points.shape != target_points.shape or pred_points.shape[-1] != 2:
        raise ValueError(f"landmark_distance: expected two [B, K, 2], got {tuple(pred_points.shape)}, "
                         f"{tuple(target_points.shape)}")
    return (pred_points.double() - target_points.double()).norm(dim=-1).mean(dim=-1)


def mouth_opening_score(images: torch.Tensor, mouth_mask: torch.Tensor) -> torch.Tensor:
    """How open the mouth is: the fraction of the mouth region that is dark (luma < DARK_LUMA).

    An open mouth shows its dark cavity; a closed one only lips and skin. Measured on rendered
    and real frames alike, so its correlation with the audio says whether the lips follow it.

    Args:
        images: [B, 3, S, S] in [-1, 1]; mouth_mask: [B, 1, S, S] in [0, 1] (>= 0.5 inside).

    Returns:
        [B] float64 in [0, 1] (0 where the region is empty).
    """
    dark = (_luma(to_unit_range(images)) < DARK_LUMA).double()  # [B, S, S]
    region = (mouth_mask[:, 0] >= 0.5).double()
    return (dark * region).sum(dim=(1, 2)) / region.sum(dim=(1, 2)).clamp_min(1)


#: The point order of a detector's mouth landmarks that :func:`inner_lip_opening` reads: iBUG-68's
#: points 48-67 (outer lip 48-59 from the left corner, inner lip 60-67), as dlib's 68-point model
#: gives them. A detector says it returns these with ``points = IBUG_MOUTH``.
IBUG_MOUTH = "ibug68 mouth points 48-67"
# In that order (offsets from point 48): the inner lips' upper points 61, 62, 63 face the lower
# points 67, 66, 65; the mouth's corners are 48 and 54.
_INNER_UPPER, _INNER_LOWER, _CORNERS = [13, 14, 15], [19, 18, 17], (0, 6)


def inner_lip_opening(mouth_points: torch.Tensor) -> torch.Tensor:
    """How open a real mouth is: the mean gap between the inner lips (iBUG 61-67, 62-66, 63-65)
    over the mouth's width (48-54), so that it does not change with the face's size in the image.

    The dark-pixel fraction (:func:`mouth_opening_score`) reads the synthetic head's dark cavity; on
    real faces shadows, beards and teeth move it too. Correlation with the speech's RMS per frame on
    two real talking clips at 128 px (dlib's landmarks): this 0.43 and 0.48, the dark fraction 0.31
    and 0.14 (tests/test_preprocess_talking.py). At 64 px dlib sees less: 0.25 and 0.37 against 0.28
    and 0.13 (docs/log.md, 2026-12-07, thirteenth session).

    Args:
        mouth_points: ``[B, 20, 2]`` pixel (x, y) in :data:`IBUG_MOUTH` order; NaN rows: no face.

    Returns:
        ``[B]`` float64, 0 for closed lips, about 0.3-0.5 wide open; NaN where the points are NaN
        or the corners coincide.
    """
    if mouth_points.ndim != 3 or mouth_points.shape[1:] != (20, 2):
        raise ValueError(f"inner_lip_opening: expected [B, 20, 2] mouth points ({IBUG_MOUTH}), "
                         f"got {tuple(mouth_points.shape)}")
    p = mouth_points.double()
    gap = (p[:, _INNER_UPPER] - p[:, _INNER_LOWER]).norm(dim=-1).mean(dim=-1)  # [B]
    width = (p[:, _CORNERS[0]] - p[:, _CORNERS[1]]).norm(dim=-1)  # [B]
    return torch.where(width > 0, gap / width, torch.full_like(gap, math.nan))


def pearson(a, b) -> float | None:
    """Pearson correlation of two [N] sequences over the pairs where both are finite (a frame
    without a found mouth is left out); None when undefined (under 2 such pairs, or a constant one)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.size != b.size:
        raise ValueError(f"pearson: lengths differ, {a.size} vs {b.size}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


# --------------------------------------------------------------------------------------------
# Identity similarity and FID on user-supplied features
# --------------------------------------------------------------------------------------------


def identity_similarity(pred_embeddings: torch.Tensor, target_embeddings: torch.Tensor) -> torch.Tensor:
    """IDSIM: cosine similarity of face embeddings (e.g. ArcFace), [B, E] x [B, E] -> [B] in [-1, 1]."""
    return F.cosine_similarity(pred_embeddings.double(), target_embeddings.double(), dim=-1)


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite [D, D] matrix (eigenvalues clamped at 0)."""
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """FID's Fréchet distance between Gaussians fitted to two feature sets [N, D], [M, D].

    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2})``, with tr((S_a S_b)^{1/2}) computed as
    tr((S_a^{1/2} S_b S_a^{1/2})^{1/2}) (same eigenvalues, and symmetric, so eigh is stable).
    On Inception pool features of real and generated frames this is FID.
    """
    a, b = feats_a.double(), feats_b.double()
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("frechet_distance: needs at least 2 samples per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T).reshape(a.shape[1], a.shape[1]), torch.cov(b.T).reshape(b.shape[1], b.shape[1])
    root_a = _sqrtm_psd(s_a)
    cross = _sqrtm_psd(root_a @ s_b @ root_a)
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * torch.trace(cross))
