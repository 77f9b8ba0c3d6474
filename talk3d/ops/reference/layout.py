"""Reference of :func:`talk3d.ops.transpose_inner`: the last two dimensions swapped in memory."""
from __future__ import annotations

import torch


def transpose_inner(x: torch.Tensor, *, impl: str = "torch") -> torch.Tensor:
    """``x`` ``[M, A, B]`` -> ``[M, B, A]`` contiguous."""
    if x.dim() != 3:
        raise ValueError(f"transpose_inner: x must be 3-D [M, A, B], got {tuple(x.shape)}")
    return x.transpose(1, 2).contiguous()
