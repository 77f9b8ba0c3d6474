"""Inputs of the triplane field tests and benchmarks (shared so both build the same cases)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FieldCase:
    B: int = 2
    N: int = 300
    C: int = 8
    hidden: int = 16
    out: int = 5  # 1 + F
    H: int = 12
    W: int = 20
    box_warp: float = 1.0
    spread: float = 1.2  # points in spread * box: > 1 puts some outside the box

    def id(self) -> str:
        return f"B{self.B}N{self.N}C{self.C}h{self.hidden}o{self.out}_{self.H}x{self.W}_box{self.box_warp}"


#: How close (in texels) a test point may come to a texel edge. Within about an ulp of one, a float32
#: texel coordinate may round onto the edge (2z + 1 = 2.0624999 rounds to 2.0625): the float32 kernels
#: then take the next cell, whose bilinear slope differs, and dxyz jumps away from the float64
#: reference (seen once in 3e5 points, on the box's edge, on CPU and CUDA alike, 2026-12-04).
TEXEL_EDGE_MARGIN = 1e-4


def off_texel_edges(xyz: torch.Tensor, case: FieldCase) -> torch.Tensor:
    """``xyz`` ``[B, N, 3]`` with every coordinate moved at least :data:`TEXEL_EDGE_MARGIN` texels off
    the cell edges of both plane sizes (H and W: under either axis convention a coordinate indexes
    rows on one plane and columns on another; the edges are symmetric about 0, so mirrored axes have
    the same ones)."""
    for res in {case.H, case.W}:
        per_unit = res / case.box_warp  # texels per world unit
        tex = (xyz.double() * per_unit + res / 2) - 0.5  # texel coordinate (align_corners=False)
        near = (tex - tex.round()).abs() < TEXEL_EDGE_MARGIN
        xyz = torch.where(near, xyz + 3 * TEXEL_EDGE_MARGIN / per_unit, xyz)
    return xyz


def make_field_inputs(case: FieldCase, dtype=torch.float32, device="cpu", planes_layout="api"):
    """Random planes, points and already-scaled decoder weights.

    planes_layout: "api" ([B, 3, C, H, W] contiguous), "channels_last" (a permuted view of a
    [B, 3, H, W, C] buffer: the compiled back ends read it without a copy) or "strided" (a sliced,
    non-contiguous view).
    """
    g = dict(dtype=dtype, device=device)
    B, C, H, W = case.B, case.C, case.H, case.W
    if planes_layout == "api":
        planes = torch.randn(B, 3, C, H, W, **g)
    elif planes_layout == "channels_last":
        planes = torch.randn(B, 3, H, W, C, **g).permute(0, 1, 4, 2, 3)
    elif planes_layout == "strided":
        planes = torch.randn(B, 3, 2 * C, H, W + 3, **g)[:, :, ::2, :, 1 : W + 1]
    else:
        raise ValueError(planes_layout)
    xyz_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    xyz = (torch.rand(B, case.N, 3, dtype=xyz_dtype, device=device) - 0.5) * case.spread * case.box_warp
    xyz = off_texel_edges(xyz, case)
    w1 = torch.randn(case.hidden, case.C, **g) / case.C**0.5
    b1 = torch.randn(case.hidden, **g) * 0.1
    w2 = torch.randn(case.out, case.hidden, **g) / case.hidden**0.5
    b2 = torch.randn(case.out, **g) * 0.1
    return planes, xyz, w1, b1, w2, b2


def make_ray_points(B: int, rays_side: int, samples: int, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Points along camera rays, as the renderer queries the field: ``[B, rays_side^2 * samples, 3]``.

    EG3D's FFHQ geometry: a camera at radius 2.7 around the pivot (0, 0, 0.2), normalised focal
    4.2647, yaw within +-30 and pitch within +-20 degrees, stratified depths in [2.25, 3.3]; points
    are ray-major, so consecutive points are neighbours along a ray (the real access pattern).
    """
    pivot = torch.tensor([0.0, 0.0, 0.2], dtype=torch.float64)
    yaw = (torch.rand(B, dtype=torch.float64) * 2 - 1) * torch.pi / 6
    pitch = (torch.rand(B, dtype=torch.float64) * 2 - 1) * torch.pi / 9
    offset = torch.stack([torch.sin(yaw) * torch.cos(pitch), torch.sin(pitch), torch.cos(yaw) * torch.cos(pitch)], -1)
    cam = pivot + 2.7 * offset  # [B, 3]
    forward = torch.nn.functional.normalize(pivot - cam, dim=-1)
    right = torch.nn.functional.normalize(torch.cross(forward, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64).expand_as(forward), dim=-1), dim=-1)
    up = torch.cross(right, forward, dim=-1)
    pix = (torch.arange(rays_side, dtype=torch.float64) + 0.5) / rays_side - 0.5
    v, u = torch.meshgrid(pix / 4.2647, pix / 4.2647, indexing="ij")
    dirs = forward[:, None] + u.reshape(1, -1, 1) * right[:, None] + v.reshape(1, -1, 1) * up[:, None]
    dirs = torch.nn.functional.normalize(dirs, dim=-1)  # [B, R, 3]
    t = torch.linspace(2.25, 3.3, samples, dtype=torch.float64)
    t = t + torch.rand(B, dirs.shape[1], samples, dtype=torch.float64) * (1.05 / (samples - 1))
    pts = cam[:, None, None] + t[..., None] * dirs[:, :, None]  # [B, R, S, 3]
    return pts.reshape(B, -1, 3).to(device=device, dtype=dtype)


def accumulation_probe(dtype=torch.float32, device="cpu"):
    """Inputs on which a decoder that sums in fp32 gets the exact outputs and one that keeps its sums
    in half precision cannot: a large term first, small ones that a half-precision running sum drops
    (2048 + 1 is 2048 in fp16 and bf16), then the large term taken away. Every input, every decoder
    input and activation (f = 1, h in {30, 32, 2048}) and the exact sigma (91) are representable in
    fp16 and bf16, so rounding the dot products' operands to half, as tensor-core kernels do, loses
    nothing; and every partial sum is an integer below 2^24, exact in fp32 in any order.

    Returns the inputs (planes ``[1, 3, 32, 16, 16]``, xyz ``[1, 24, 3]`` float32, w1, b1, w2, b2 in
    ``dtype``) and the exact sigma ``[1, 24, 1]`` and feat ``[1, 24, 32]`` in float64.
    """
    C, HID, OUT, H, W = 32, 64, 33, 16, 16
    planes = torch.ones(1, 3, C, H, W)
    # Points at texel centres ((2k + 1) / 16 - 1 in grid_sample's coordinates): one tap of weight 1
    # per plane, so f = 1 exactly whatever the plane convention.
    k = torch.randint(0, H, (1, 24, 3), generator=torch.Generator().manual_seed(5))
    xyz = ((2 * k + 1) / H - 1) / 2
    w1 = torch.zeros(HID, C)
    w1[0, 0] = w1[62, 0] = 2048.0          # h = 2048
    w1[1:62, 0] = 32.0                     # h = 32
    w1[63, 0], w1[63, 1:31], w1[63, 31] = 2048.0, 1.0, -2048.0   # pre = 30 (a half sum: 0)
    w2 = torch.zeros(OUT, HID)
    w2[0, 0], w2[0, 1:62], w2[0, 62], w2[0, 63] = 1.0, 1 / 32, -1.0, 1.0   # sigma = 91
    w2[1, 0], w2[1, 1:62], w2[1, 62], w2[1, 63] = 1.0, 1 / 32, -1.0, -2.0  # o = 1
    b1, b2 = torch.zeros(HID), torch.zeros(OUT)
    inputs = [t.to(device) for t in (planes.to(dtype), xyz, w1.to(dtype), b1.to(dtype), w2.to(dtype), b2.to(dtype))]
    o = torch.zeros(1, 24, OUT - 1, dtype=torch.float64)
    o[..., 0] = 1.0
    exact_feat = torch.sigmoid(o) * 1.002 - 0.001
    return inputs, torch.full((1, 24, 1), 91.0, dtype=torch.float64), exact_feat
