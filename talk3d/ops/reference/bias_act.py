"""Reference of :func:`talk3d.ops.bias_act`: StyleGAN2's bias + leaky ReLU + gain + clamp as separate
PyTorch operations (what the fused op does in one pass over the tensor each way)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bias_act(x: torch.Tensor, b: torch.Tensor | None = None, *, slope: float = 0.2, gain: float = 1.0,
             clamp: float | None = None, impl: str = "torch") -> torch.Tensor:
    """x ``[N, C, ...]``, b ``[C]`` or None -> ``clamp(lrelu_slope(x + b) * gain, -clamp, clamp)``.

    ``slope`` is the leaky ReLU's slope below zero (1: linear, 0: ReLU). Computed in x's dtype.
    """
    if b is not None:
        x = x + b.to(x.dtype).reshape(1, -1, *([1] * (x.dim() - 2)))
    if slope != 1:
        x = F.leaky_relu(x, slope) if slope != 0 else F.relu(x)
    if gain != 1:
        x = x * gain
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    return x
