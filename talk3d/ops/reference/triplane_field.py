"""Pure-PyTorch reference of the fused triplane field (EG3D's sample_from_planes + OSGDecoder).

This is the ground truth every backend is tested against. It is written for clarity, with
``torch.nn.functional.grid_sample`` doing the bilinear taps, and materialises every intermediate.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: Plane conventions, by name -> the index pairs of (x, y, z) each plane reads, as (width, height).
#: ``eg3d`` is the original release (its third plane reads (z, x): the yz plane is never used,
#: eg3d issue #67); ``fixed`` is the corrected one Talk3D's checkpoint uses.
PLANE_AXES = {
    "fixed": ((0, 1), (0, 2), (2, 1)),
    "eg3d": ((0, 1), (0, 2), (2, 0)),
}

#: EG3D's output transform of the 32 features: sigmoid * (1 + 2 * eps) - eps.
FEATURE_EPS = 0.001


def project_points(xyz: torch.Tensor, box_warp: float, axes: str) -> torch.Tensor:
    """Scale points into [-1, 1] and project them onto the three planes.

    Args:
        xyz: ``[B, N, 3]`` points in the scene box.
    Returns:
        ``[B, 3, N, 2]`` grid_sample coordinates (width, height) per plane.
    """
    p = xyz * (2.0 / box_warp)
    return torch.stack([p[..., list(pair)] for pair in PLANE_AXES[axes]], dim=1)


def sample_triplane(planes: torch.Tensor, xyz: torch.Tensor, box_warp: float, axes: str) -> torch.Tensor:
    """Bilinear (align_corners=False, zero padding) taps of every plane, averaged.

    Args:
        planes: ``[B, 3, C, H, W]``.
        xyz: ``[B, N, 3]``.
    Returns:
        ``[B, N, C]`` the mean of the three sampled features.
    """
    B, _, C, H, W = planes.shape
    grid = project_points(xyz, box_warp, axes).to(planes.dtype)  # [B, 3, N, 2]
    N = grid.shape[2]
    sampled = F.grid_sample(
        planes.reshape(B * 3, C, H, W),
        grid.reshape(B * 3, 1, N, 2),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )  # [B*3, C, 1, N]
    return sampled.reshape(B, 3, C, N).mean(dim=1).transpose(1, 2)


def decode(features: torch.Tensor, w1, b1, w2, b2) -> tuple[torch.Tensor, torch.Tensor]:
    """EG3D's OSGDecoder on already-scaled weights.

    Args:
        features: ``[B, N, C]``; w1 ``[hidden, C]``; b1 ``[hidden]``; w2 ``[1 + F, hidden]``; b2 ``[1 + F]``.
    Returns:
        sigma ``[B, N, 1]`` (raw) and feat ``[B, N, F]``.
    """
    h = F.softplus(F.linear(features, w1, b1))
    out = F.linear(h, w2, b2)
    sigma = out[..., :1]
    feat = torch.sigmoid(out[..., 1:]) * (1 + 2 * FEATURE_EPS) - FEATURE_EPS
    return sigma, feat


def triplane_field(
    planes: torch.Tensor,
    xyz: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    *,
    box_warp: float = 1.0,
    axes: str = "fixed",
    impl: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference triplane field: sample, average, decode.

    Args:
        planes: ``[B, 3, C, H, W]`` feature planes.
        xyz: ``[B, N, 3]`` query points; the scene box is ``[-box_warp/2, box_warp/2]^3``.
        w1: ``[hidden, C]``, b1: ``[hidden]``, w2: ``[1 + F, hidden]``, b2: ``[1 + F]``: decoder
            weights with EG3D's ``1/sqrt(fan_in)`` already applied.
        box_warp: side of the scene cube.
        axes: plane convention, ``"fixed"`` or ``"eg3d"``.
        impl: accepted for signature parity with :func:`talk3d.ops.triplane_field`; must be ``"torch"``.
    Returns:
        sigma ``[B, N, 1]`` raw density and feat ``[B, N, F]`` features.
    """
    if impl != "torch":
        raise ValueError(f"the reference implementation is impl='torch', got impl={impl!r}")
    if axes not in PLANE_AXES:
        raise ValueError(f"axes must be one of {sorted(PLANE_AXES)}, got {axes!r}")
    features = sample_triplane(planes, xyz, box_warp, axes)
    return decode(features, w1, b1, w2, b2)
