"""Memory layout of the planes: the fused kernels read them channels-last.

:func:`transpose_inner` swaps the last two dimensions of ``[M, A, B]`` in memory. The model's
planes arrive as ``[B, 3, C, H, W]`` (convolution outputs), so every render converts them to
channels-last (``[B * 3, C, H * W] -> [B * 3, H * W, C]``) and its backward converts the plane
gradient back. torch's strided copy does that about 7x slower than a plain copy on the CPU
(measured: 9.6 ms and 7.1 ms against 1.4 ms for 1 x 3 x 32 x 256^2 float planes), a third of the
field op's forward + backward there; the ``"cpu"`` back end is a tiled transpose. On CUDA torch's
copy is used (``"torch"``).
"""
from __future__ import annotations

import torch

from .. import extension
from .reference.layout import transpose_inner as _reference

__all__ = ["transpose_inner", "channels_last_planes", "channels_last_buffer", "planes_view"]

_CPU_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def transpose_inner(x: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """``x`` ``[M, A, B]`` -> ``[M, B, A]`` contiguous (no gradient of its own: see
    :func:`channels_last_planes` for the differentiable use). ``impl``: ``"auto"``, ``"torch"``
    or ``"cpu"``."""
    if x.dim() != 3:
        raise ValueError(f"transpose_inner: x must be 3-D [M, A, B], got {tuple(x.shape)}")
    if impl == "auto":
        impl = "cpu" if (x.device.type == "cpu" and extension.available()
                         and x.dtype in _CPU_DTYPES) else "torch"
    if impl == "torch":
        return _reference(x)
    if impl != "cpu":
        raise ValueError(f"transpose_inner: impl must be 'auto', 'torch' or 'cpu', got {impl!r}")
    if x.device.type != "cpu":
        raise ValueError(f"transpose_inner: impl='cpu' needs a CPU tensor, got one on {x.device}")
    extension.load()  # raises, saying how to build it, when the extension is missing
    return torch.ops.talk3d.transpose_inner(x)


class _ToChannelsLast(torch.autograd.Function):
    """Contiguous planes ``[B, 3, C, H, W]`` -> the same values as an API-shaped view of
    channels-last memory; the gradient goes back the same way."""

    @staticmethod
    def forward(ctx, planes):
        B, _, C, H, W = planes.shape
        cl = transpose_inner(planes.reshape(B * 3, C, H * W))  # [B * 3, H * W, C]
        return cl.view(B, 3, H, W, C).permute(0, 1, 4, 2, 3)

    @staticmethod
    def backward(ctx, grad):
        B, _, C, H, W = grad.shape
        # The field op's plane gradient is itself channels-last memory viewed [B, 3, C, H, W]: the
        # permute below is then a free view (reshape copies only otherwise).
        g = grad.permute(0, 1, 3, 4, 2).reshape(B * 3, H * W, C)
        return transpose_inner(g).view(B, 3, C, H, W)


def channels_last_planes(planes: torch.Tensor) -> torch.Tensor:
    """``[B, 3, C, H, W]`` planes viewed over channels-last memory (channel stride 1).

    The kernels gather all C channels of a texel at once, so they want channels innermost. Doing
    the copy here, once and under autograd, spares the forward and the backward op a copy each;
    planes already stored channels-last are returned as they are.
    """
    if planes.stride(2) == 1 or planes.shape[2] == 1:
        return planes
    B, _, C, H, W = planes.shape
    if planes.is_contiguous():
        if planes.device.type == "cpu" and extension.available() and planes.dtype in _CPU_DTYPES:
            return _ToChannelsLast.apply(planes)
        # a 3-D transpose copies ~1.5x faster than the 5-D permute
        cl = planes.view(B * 3, C, H * W).transpose(1, 2).contiguous().view(B, 3, H, W, C)
    else:
        cl = planes.permute(0, 1, 3, 4, 2).contiguous()
    return cl.permute(0, 1, 4, 2, 3)


def channels_last_buffer(planes: torch.Tensor) -> torch.Tensor:
    """``[B, 3, C, H, W]`` planes -> ``[B, 3, H, W, C]`` channel-contiguous memory, for several field
    calls on the same planes: each call takes its own :func:`planes_view` of it.

    Why not share one :func:`channels_last_planes` view: autograd sums the calls' plane gradients at
    the tensor they share. Two permuted-strided gradients it adds out of place, and slowly (two
    1 x 3 x 32 x 256^2 float gradients: 8.8 ms, on the 2-core CPU VM); at this buffer they arrive
    contiguous and, through :func:`planes_view`, owning their memory, so autograd adds the second
    into the first in place (1.25 ms in a 32² frame's backward; out of place into fresh memory it
    was 6.6 ms).
    """
    return channels_last_planes(planes).permute(0, 1, 3, 4, 2)


class _PlanesView(torch.autograd.Function):
    """``[B, 3, H, W, C]`` buffer -> its ``[B, 3, C, H, W]`` view; the gradient goes back contiguous and
    detached, so that it owns its storage (a plain ``permute``'s backward returns a view that keeps its
    base alive, and autograd then refuses to accumulate into it in place)."""

    @staticmethod
    def forward(ctx, buffer):
        return buffer.permute(0, 1, 4, 2, 3)

    @staticmethod
    def backward(ctx, grad):
        return grad.permute(0, 1, 3, 4, 2).contiguous().detach()


def planes_view(buffer: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W, C]`` buffer (:func:`channels_last_buffer`) -> ``[B, 3, C, H, W]`` planes for one
    field call (a view, no copy)."""
    if buffer.dim() != 5 or buffer.shape[1] != 3:
        raise ValueError(f"planes_view: buffer must be [B, 3, H, W, C], got {tuple(buffer.shape)}")
    if not torch.is_grad_enabled() or not buffer.requires_grad:
        return buffer.permute(0, 1, 4, 2, 3)
    return _PlanesView.apply(buffer)


def _fake(x):
    return x.new_empty(x.shape[0], x.shape[2], x.shape[1])


if extension.available():
    extension.load()
    torch.library.register_fake("talk3d::transpose_inner")(_fake)
