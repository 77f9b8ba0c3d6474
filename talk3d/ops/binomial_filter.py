"""EG3D's 4x4 binomial FIR filter (the super-resolution's up/down-sampling filter) as one pass.

Back ends: ``"torch"`` (the reference, :func:`talk3d.ops.reference.binomial_filter2d`: a depthwise
convolution), ``"cpu"`` and ``"cuda"`` (``torch.ops.talk3d.binomial_filter2d``); ``impl="auto"`` takes the
compiled kernel where there is one. On a GPU PyTorch's depthwise 4x4 convolution falls to slow
kernels; on the 2-core CPU VM the C++ kernel is as fast as oneDNN's convolution or faster (10.0 vs
10.5 ms for 2 x 64 x 129^2, 11.4 vs 16.3 ms for 2 x 32 x 257^2 float32, 2026-12-04), which also
pads in a separate copy.

The filter is symmetric, so the gradient is the same filter applied to the output gradient with
the padding mirrored (``3 - p`` on each side): the backward calls the op itself, and so has a
backward of its own.
"""
from __future__ import annotations

import torch

from .. import extension
from . import backends
from .reference.binomial_filter import binomial_filter2d as _reference

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_IMPL_DTYPES = {"torch": _FLOATS, "cpu": _FLOATS, "cuda": _FLOATS}
_TAPS = 4


def _pads(padding) -> tuple[int, int, int, int]:
    if isinstance(padding, int):
        return padding, padding, padding, padding
    if len(padding) != 4:
        raise ValueError(f"binomial_filter2d: padding must be an int or (left, right, top, bottom), got {padding!r}")
    return tuple(int(p) for p in padding)  # type: ignore[return-value]


class _BinomialFilter2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, top, left, out_h, out_w, gain):
        ctx.geometry = (top, left, x.shape[2], x.shape[3], gain)
        return torch.ops.talk3d.binomial_filter2d(x, top, left, out_h, out_w, gain)

    @staticmethod
    def backward(ctx, grad):
        top, left, H, W, gain = ctx.geometry
        # dx[p, q] = gain * sum_{a, b} k_a k_b dy[p + top - a, q + left - b]; with k_a = k_{3-a} that
        # is the filter again, its window starting at dy[p - (3 - top), q - (3 - left)].
        dx = _BinomialFilter2d.apply(grad, _TAPS - 1 - top, _TAPS - 1 - left, H, W, gain)
        return dx, None, None, None, None, None


def binomial_filter2d(x: torch.Tensor, padding=(0, 0, 0, 0), gain: float = 1.0, *, impl: str = "auto") -> torch.Tensor:
    """``gain`` times EG3D's 4x4 filter (outer product of [1, 3, 3, 1] / 8) over ``x`` zero-padded.

    Args:
        x: ``[N, C, H, W]`` float32/float64/float16/bfloat16.
        padding: ``(left, right, top, bottom)`` (or one int for all four) zero columns/rows around
            ``x``; negative values crop.
        gain: scale of the result (``up**2`` after zero-insertion upsampling).
        impl: ``"auto"``, ``"torch"``, ``"cpu"`` or ``"cuda"``.

    Returns:
        ``[N, C, H + top + bottom - 3, W + left + right - 3]`` in ``x``'s dtype (accumulated in
        float32, float64 for float64).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError("binomial_filter2d: x must be a torch.Tensor")
    if x.dim() != 4:
        raise ValueError(f"binomial_filter2d: x must be [N, C, H, W], got {tuple(x.shape)}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"binomial_filter2d: x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    left, right, top, bottom = _pads(padding)
    out_h, out_w = x.shape[2] + top + bottom - (_TAPS - 1), x.shape[3] + left + right - (_TAPS - 1)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"binomial_filter2d: padding {(left, right, top, bottom)} leaves no output for a "
                         f"{x.shape[2]} x {x.shape[3]} input ({out_h} x {out_w})")
    impl = backends.resolve_impl("binomial_filter2d", impl, x, _IMPL_DTYPES)
    if impl == "torch":
        return _reference(x, (left, right, top, bottom), gain)
    return _BinomialFilter2d.apply(x, top, left, out_h, out_w, float(gain))


def _fake(x, top, left, out_h, out_w, gain):
    # The kernels write NHWC for a dense channels-last input, else NCHW
    # (csrc/binomial_filter: binomial_filter_output).
    out = x.new_empty(x.shape[0], x.shape[1], out_h, out_w)
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return out.contiguous(memory_format=torch.channels_last)
    return out


if extension.available():
    extension.load()
    torch.library.register_fake("talk3d::binomial_filter2d")(_fake)
