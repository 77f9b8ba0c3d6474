"""Reference of :func:`talk3d.ops.binomial_filter2d`: pad (or crop), then a depthwise 4x4 convolution."""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: [1, 3, 3, 1] / 8: the 1-D factor of EG3D's resampling filter (upfirdn2d's ``setup_filter``).
BINOMIAL_TAPS = (0.125, 0.375, 0.375, 0.125)


def binomial_filter2d(x: torch.Tensor, padding=(0, 0, 0, 0), gain: float = 1.0, *, impl: str = "torch") -> torch.Tensor:
    """``x`` ``[N, C, H, W]`` -> ``[N, C, H + top + bottom - 3, W + left + right - 3]``.

    ``padding`` = ``(left, right, top, bottom)`` zero columns/rows added (negative: cropped); the
    result is ``gain`` times the 4x4 filter ``k k^T`` (``k`` = :data:`BINOMIAL_TAPS`) applied to the
    padded input without further padding.
    """
    left, right, top, bottom = (int(p) for p in padding)
    x = F.pad(x, [max(left, 0), max(right, 0), max(top, 0), max(bottom, 0)])
    x = x[..., max(-top, 0): x.shape[2] - max(-bottom, 0), max(-left, 0): x.shape[3] - max(-right, 0)]
    k = torch.tensor(BINOMIAL_TAPS, dtype=x.dtype, device=x.device)
    w = (k[:, None] * k[None, :] * gain).expand(x.shape[1], 1, 4, 4)
    return F.conv2d(x, w, groups=x.shape[1])
