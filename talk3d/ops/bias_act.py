"""StyleGAN2's bias + leaky ReLU + gain + clamp in one pass: ``talk3d.ops.bias_act``.

Back ends: ``"torch"`` (the reference, :func:`talk3d.ops.reference.bias_act`: four PyTorch
operations), ``"cpu"`` and ``"cuda"`` (``torch.ops.talk3d.bias_act_fwd``/``_bwd``, per-element math in
``csrc/include/talk3d/bias_act_math.h``); ``impl="auto"`` takes the compiled kernel where there is one.

Every layer of the super-resolution ends in these four steps, on the network's largest activations
(2 x 128 x 512^2 a training step): separately each reads and writes the whole tensor, forward and
backward, and autograd keeps two of the intermediates. The fused op reads x once and writes y once;
its backward reads the gradient and y (which the next convolution keeps anyway) and writes dx.
The sign of y is that of x + b (gain > 0), and y inside (-clamp, clamp) means the clamp let the
gradient through; only an output landing exactly on the clamp differs from PyTorch's clamp, which
passes that gradient.
"""
from __future__ import annotations

import torch

from .. import extension
from . import backends
from .reference.bias_act import bias_act as _reference

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_IMPL_DTYPES = {"torch": _FLOATS, "cpu": _FLOATS, "cuda": _FLOATS}


class _BiasAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b, slope, gain, clamp):
        y = torch.ops.talk3d.bias_act_fwd(x, b, slope, gain, clamp)
        ctx.save_for_backward(y)
        ctx.params = (slope, gain, clamp)
        ctx.has_b = b is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        dx = torch.ops.talk3d.bias_act_bwd(grad, y, *ctx.params)
        db = None
        if ctx.has_b and ctx.needs_input_grad[1]:
            dims = [d for d in range(dx.dim()) if d != 1]
            db = dx.sum(dim=dims, dtype=torch.float64 if dx.dtype == torch.float64 else torch.float32)
        return (dx if ctx.needs_input_grad[0] else None), db, None, None, None


def bias_act(x: torch.Tensor, b: torch.Tensor | None = None, *, slope: float = 0.2, gain: float = 1.0,
             clamp: float | None = None, impl: str = "auto") -> torch.Tensor:
    """``clamp(lrelu_slope(x + b) * gain, -clamp, clamp)`` with b broadcast along dim 1.

    Args:
        x: ``[N, C, ...]`` float32/float64/float16/bfloat16, any layout (NCHW and channels-last are
            kept; others are made contiguous).
        b: ``[C]`` or None, any float dtype (the kernels add it in float32, float64 for float64 x).
        slope: the leaky ReLU's slope below zero (1: linear, 0: ReLU).
        gain: > 0.
        clamp: None, or a bound >= 0 for ``|y|``.
        impl: ``"auto"``, ``"torch"``, ``"cpu"`` or ``"cuda"``.

    Returns:
        y of x's shape, dtype and layout (the kernels round once, from float32; the reference rounds
        after every step in x's dtype).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError("bias_act: x must be a torch.Tensor")
    if x.dim() < 2:
        raise ValueError(f"bias_act: x must be [N, C, ...], got {tuple(x.shape)}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"bias_act: x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    if b is not None and (b.dim() != 1 or b.shape[0] != x.shape[1]):
        raise ValueError(f"bias_act: b must be [C] = [{x.shape[1]}], got {tuple(b.shape)}")
    if b is not None and b.device != x.device:
        raise ValueError(f"bias_act: b is on {b.device} but x is on {x.device}")
    if not gain > 0:
        raise ValueError(f"bias_act: gain must be > 0, got {gain}")
    if clamp is not None and not clamp >= 0:
        raise ValueError(f"bias_act: clamp must be None or >= 0, got {clamp}")
    impl = backends.resolve_impl("bias_act", impl, x, _IMPL_DTYPES)
    if impl == "torch":
        return _reference(x, b, slope=slope, gain=gain, clamp=clamp)
    if b is not None:
        b = b.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    return _BiasAct.apply(x, b, float(slope), float(gain), -1.0 if clamp is None else float(clamp))


def _fake_fwd(x, b, slope, gain, clamp):
    # The kernels keep a dense input's layout (csrc/bias_act: bias_act_dense).
    dense = x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
    return torch.empty_like(x) if dense else torch.empty_like(x, memory_format=torch.contiguous_format)


def _fake_bwd(grad, y, slope, gain, clamp):
    return _fake_fwd(y, None, slope, gain, clamp)


if extension.available():
    extension.load()
    torch.library.register_fake("talk3d::bias_act_fwd")(_fake_fwd)
    torch.library.register_fake("talk3d::bias_act_bwd")(_fake_bwd)
