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
    w1 = torch.randn(case.hidden, case.C, **g) / case.C**0.5
    b1 = torch.randn(case.hidden, **g) * 0.1
    w2 = torch.randn(case.out, case.hidden, **g) / case.hidden**0.5
    b2 = torch.randn(case.out, **g) * 0.1
    return planes, xyz, w1, b1, w2, b2
