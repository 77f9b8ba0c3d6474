"""Pure-PyTorch reference of the compositing op: EG3D's MipRayMarcher2, written from its numerics.

Each ray's samples are integrated over the intervals between neighbours: an interval's density and
features are the means of its two end samples, its density is ``softplus(sigma_mid - 1)``, and
transmittance is the exclusive cumulative product of ``1 - alpha + 1e-10``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: EG3D's guard added to ``1 - alpha`` in the transmittance product.
TRANSMITTANCE_EPS = 1e-10


def interval_alpha(sigma: torch.Tensor, t: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Opacity ``alpha = 1 - exp(-softplus(sigma_mid - 1) * delta)`` of the intervals between
    neighbouring samples: ``[..., S - 1, 1]`` from sigma, t ``[..., S, 1]``; intervals marked False
    in ``valid`` (``[..., S - 1, 1]`` bool) get 0."""
    delta = t[..., 1:, :] - t[..., :-1, :]
    density = F.softplus((sigma[..., :-1, :] + sigma[..., 1:, :]) / 2 - 1)
    alpha = 1 - torch.exp(-density * delta)
    if valid is not None:
        alpha = torch.where(valid, alpha, torch.zeros_like(alpha))
    return alpha


def transmittance_before(alpha: torch.Tensor) -> torch.Tensor:
    """Transmittance at the start of each interval: the exclusive cumulative product of
    ``1 - alpha + eps`` along the samples, ``[..., S - 1, 1]``."""
    shifted = torch.cat([torch.ones_like(alpha[..., :1, :]), 1 - alpha + TRANSMITTANCE_EPS], dim=-2)
    return torch.cumprod(shifted, dim=-2)[..., :-1, :]


def interval_weights(sigma: torch.Tensor, t: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Weights of the intervals between neighbouring samples (EG3D's ``weights``).

    Args:
        sigma: ``[..., S, 1]`` raw densities.
        t: ``[..., S, 1]`` sorted depths.
        valid: optional ``[..., S - 1, 1]`` bool; intervals marked False get alpha 0.

    Returns:
        ``[..., S - 1, 1]`` weights ``alpha_i * T_i``.
    """
    alpha = interval_alpha(sigma, t, valid)
    return alpha * transmittance_before(alpha)


def _depth(w, t):
    """Expected depth ``Dnum / W`` ``[..., 1]`` of interval weights ``w`` ``[..., S - 1, 1]`` and
    depths ``t`` ``[..., S, 1]`` (NaN where W == 0, as EG3D gives), and W ``[..., 1]``."""
    t_mid = (t[..., :-1, :] + t[..., 1:, :]) / 2
    weight_sum = w.sum(dim=-2)
    # Dnum / W, NaN where W == 0 as EG3D gives; dividing by a safe W there keeps that ray's
    # gradient at 0 instead of NaN (EG3D's backward would produce 0/0 and poison the batch).
    has_weight = weight_sum > 0
    depth = (w * t_mid).sum(dim=-2) / torch.where(has_weight, weight_sum, torch.ones_like(weight_sum))
    return torch.where(has_weight, depth, torch.full_like(depth, float("nan"))), weight_sum


def _composite_dense(sigma, feat, t, valid=None):
    w = interval_weights(sigma, t, valid)
    feat_mid = (feat[..., :-1, :] + feat[..., 1:, :]) / 2
    feat_img = (w * feat_mid).sum(dim=-2) * 2 - 1
    depth, weight_sum = _depth(w, t)
    return feat_img, depth, weight_sum


def finish_depth(depth: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """EG3D's depth clean-up: NaN (no weight) -> +inf, then clamp to the global depth range of ``t``."""
    depth = torch.nan_to_num(depth, float("inf"))
    return torch.clamp(depth, torch.min(t), torch.max(t))


def unpack(packed_info: torch.Tensor, *values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Scatter packed per-sample values ``[N, C]`` into padded per-ray tensors ``[R, S_max, C]``.

    Returns the mask ``[R, S_max]`` of real samples and the padded tensors (zeros where padded).
    """
    starts, counts = packed_info[:, 0], packed_info[:, 1]
    R = packed_info.shape[0]
    s_max = int(counts.max()) if R > 0 else 0
    local = torch.arange(s_max, device=packed_info.device)
    mask = local[None, :] < counts[:, None]
    index = (starts[:, None] + local[None, :]).clamp_max(max(values[0].shape[0] - 1, 0))
    padded = []
    for v in values:
        g = v[index.reshape(-1)].reshape(R, s_max, v.shape[-1])
        padded.append(torch.where(mask[..., None], g, torch.zeros_like(g)))
    return mask, padded


def composite(
    sigma: torch.Tensor,
    feat: torch.Tensor,
    t: torch.Tensor,
    *,
    packed_info: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Composite samples along rays, EG3D's MipRayMarcher2 (reference).

    Args:
        sigma: ``[B, R, S, 1]`` raw densities (packed: ``[N, 1]``).
        feat: ``[B, R, S, F]`` features (packed: ``[N, F]``).
        t: ``[B, R, S, 1]`` depths, sorted along each ray (packed: ``[N, 1]``).
        packed_info: ``[R, 2]`` int64 (first sample, sample count) per ray for the packed layout;
            ``None`` for the dense layout. A ray's samples are contiguous and rays do not overlap.

    Returns:
        ``(feat_img, depth, weight_sum)``: ``[B, R, F]`` features mapped by ``x * 2 - 1``, ``[B, R, 1]``
        expected depth (NaN -> inf, clamped to ``[t.min(), t.max()]``) and ``[B, R, 1]`` accumulated
        weight (packed: ``[R, F]``, ``[R, 1]``, ``[R, 1]``).
    """
    if packed_info is None:
        feat_img, depth, weight_sum = _composite_dense(sigma, feat, t)
        return feat_img, finish_depth(depth, t), weight_sum
    mask, (s, f, tt) = unpack(packed_info, sigma, feat, t)
    valid = (mask[:, :-1] & mask[:, 1:])[..., None]
    feat_img, depth, weight_sum = _composite_dense(s, f, tt, valid)
    return feat_img, finish_depth(depth, t), weight_sum


def composite_weights(sigma: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each sample's weight in EG3D's feature sum, instead of the sum itself (reference).

    :func:`composite`'s feature image is ``2 * sum_j omega_j f_j - 1`` with
    ``omega_j = (w_{j-1} + w_j) / 2`` (``w`` the interval weights, 0 past either end): a sum that
    does not depend on the order of the samples, so a caller holding features in another order
    (two unmerged sample sets, say) can sum them without reordering them.

    Args:
        sigma: ``[B, R, S, 1]`` raw densities.
        t: ``[B, R, S, 1]`` depths, sorted along each ray.

    Returns:
        ``(omega, depth, weight_sum)``: ``[B, R, S, 1]``, and ``[B, R, 1]`` twice as :func:`composite`.
    """
    w = interval_weights(sigma, t)
    padded = torch.nn.functional.pad(w, (0, 0, 1, 1))  # w_{-1} = w_{S-1} = 0
    omega = (padded[..., :-1, :] + padded[..., 1:, :]) / 2
    depth, weight_sum = _depth(w, t)
    return omega, finish_depth(depth, t), weight_sum
