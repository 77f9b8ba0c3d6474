"""The fused triplane field: sample three feature planes, average, decode with EG3D's MLP.

Back ends (``impl``):

- ``"torch"``: the pure-PyTorch reference (:func:`talk3d.ops.reference.triplane_field`).
- ``"cpu"``: the C++ kernel in ``talk3d._C`` (float32 / float64).
- ``"cuda"``: the CUDA kernel in ``talk3d._C`` (float32 / float16 / bfloat16 / float64).
- ``"triton"``: the Triton kernel (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``;
  float32 / float16 / bfloat16).
- ``"auto"``: the fastest available for the inputs' device and dtype.

The compiled ops are ``torch.ops.talk3d.triplane_field_fwd`` / ``_bwd``, and for training on the CPU
``triplane_field_fwd_train`` / ``_bwd_saved`` (the forward also returns each point's decoder input and
pre-activations, which the backward reads instead of recomputing them). Their autograd formulas and
fake (shape-only) implementations are registered here, so ``torch.compile`` and
``torch.library.opcheck`` work on them.
"""
from __future__ import annotations

import math

import torch

from .. import extension
from . import backends
from .reference import triplane_field as _reference
from .layout import channels_last_planes

#: Plane conventions by name -> the integer the kernels take.
AXES = {"fixed": 0, "eg3d": 1}
IMPLS = backends.IMPLS
_STORAGE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_IMPL_DTYPES = {
    "torch": _STORAGE_DTYPES,
    "cpu": (torch.float32, torch.float64),
    "cuda": _STORAGE_DTYPES,
    "triton": (torch.float32, torch.float16, torch.bfloat16),
}


def _triton_module():
    from ..kernels.triplane_field import triplane_field_triton

    return triplane_field_triton


def available_impls(device: torch.device | str = "cpu") -> list[str]:
    """Back ends that can run on ``device`` in this installation (``"auto"`` excluded)."""
    return backends.available_impls(device)


def _check_tensor(name: str, t, rank: int, shape: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"triplane_field: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"triplane_field: {name} must have shape {shape}, got {tuple(t.shape)}")


def _validate(planes, xyz, w1, b1, w2, b2, box_warp, axes) -> None:
    _check_tensor("planes", planes, 5, "[B, 3, C, H, W]")
    _check_tensor("xyz", xyz, 3, "[B, N, 3]")
    _check_tensor("w1", w1, 2, "[hidden, C]")
    _check_tensor("b1", b1, 1, "[hidden]")
    _check_tensor("w2", w2, 2, "[1 + F, hidden]")
    _check_tensor("b2", b2, 1, "[1 + F]")
    B, P, C, H, W = planes.shape
    if P != 3 or min(B, C, H, W) == 0:
        raise ValueError(f"triplane_field: planes must be [B, 3, C, H, W] with no empty dim, got {tuple(planes.shape)}")
    if xyz.shape[0] != B or xyz.shape[2] != 3:
        raise ValueError(f"triplane_field: xyz must be [B={B}, N, 3], got {tuple(xyz.shape)}")
    if xyz.shape[1] == 0:
        raise ValueError("triplane_field: xyz has no points (N == 0)")
    if w1.shape[1] != C:
        raise ValueError(f"triplane_field: w1 must be [hidden, C={C}] to match planes, got {tuple(w1.shape)}")
    hidden = w1.shape[0]
    if b1.shape[0] != hidden:
        raise ValueError(f"triplane_field: b1 must be [hidden={hidden}], got {tuple(b1.shape)}")
    if w2.shape[1] != hidden or w2.shape[0] < 1:
        raise ValueError(f"triplane_field: w2 must be [1 + F, hidden={hidden}], got {tuple(w2.shape)}")
    if b2.shape[0] != w2.shape[0]:
        raise ValueError(f"triplane_field: b2 must be [1 + F={w2.shape[0]}], got {tuple(b2.shape)}")
    if planes.dtype not in _STORAGE_DTYPES:
        raise TypeError(f"triplane_field: planes dtype {planes.dtype} is not supported; use one of {_STORAGE_DTYPES}")
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if t.dtype != planes.dtype:
            raise TypeError(f"triplane_field: {name} has dtype {t.dtype} but planes have {planes.dtype}; they must match")
        if t.device != planes.device:
            raise ValueError(f"triplane_field: {name} is on {t.device} but planes are on {planes.device}")
    want = torch.float64 if planes.dtype == torch.float64 else torch.float32
    if xyz.dtype != want:
        # Half-precision coordinates cannot address a 256^2 plane to sub-texel accuracy.
        raise TypeError(f"triplane_field: xyz must be {want} for {planes.dtype} planes, got {xyz.dtype}")
    if xyz.device != planes.device:
        raise ValueError(f"triplane_field: xyz is on {xyz.device} but planes are on {planes.device}")
    if not (isinstance(box_warp, (int, float)) and math.isfinite(box_warp) and box_warp > 0):
        raise ValueError(f"triplane_field: box_warp must be a positive finite number, got {box_warp!r}")
    if axes not in AXES:
        raise ValueError(f"triplane_field: axes must be one of {sorted(AXES)}, got {axes!r}")


def _resolve_impl(impl: str, planes: torch.Tensor) -> str:
    return backends.resolve_impl("triplane_field", impl, planes, _IMPL_DTYPES)


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
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluate the triplane radiance field at points, fused (sample + mean + decoder MLP).

    Args:
        planes: ``[B, 3, C, H, W]`` feature planes. Kept channels-last in memory (e.g. a permuted
            view of a ``[B, 3, H, W, C]`` buffer) the compiled back ends read them without a copy.
        xyz: ``[B, N, 3]`` points (float32; float64 with float64 planes). The scene box is
            ``[-box_warp/2, box_warp/2]^3``; points outside it read zero features.
        w1: ``[hidden, C]``, b1: ``[hidden]``, w2: ``[1 + F, hidden]``, b2: ``[1 + F]``: decoder
            weights with EG3D's ``1/sqrt(fan_in)`` already applied, same dtype as ``planes``.
        box_warp: side of the scene cube (EG3D FFHQ: 1.0).
        axes: plane convention, ``"fixed"`` (Talk3D) or ``"eg3d"`` (the original release).
        impl: ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        ``(sigma, feat)``: ``[B, N, 1]`` raw density and ``[B, N, F]`` features
        (``sigmoid * 1.002 - 0.001``), in the planes' dtype.

    Memory: when an input needs a gradient, the ``"cpu"`` back end keeps ``[B, N, C + hidden]``
    activations for the backward (up to :data:`SAVE_LIMIT_BYTES`; past it, and on the GPU, the
    backward recomputes them), and with planes in the API layout their channels-last copy; its
    plane gradient then comes back in the API layout too (channels-last planes get a channels-last
    gradient).

    Example:
        >>> planes = torch.randn(1, 3, 32, 64, 64)
        >>> xyz = torch.rand(1, 100, 3) - 0.5
        >>> w1, b1 = torch.randn(64, 32) / 32**0.5, torch.zeros(64)
        >>> w2, b2 = torch.randn(33, 64) / 64**0.5, torch.zeros(33)
        >>> sigma, feat = triplane_field(planes, xyz, w1, b1, w2, b2, impl="torch")
        >>> sigma.shape, feat.shape
        (torch.Size([1, 100, 1]), torch.Size([1, 100, 32]))
    """
    _validate(planes, xyz, w1, b1, w2, b2, box_warp, axes)
    impl = _resolve_impl(impl, planes)
    if impl == "torch":
        return _reference(planes, xyz, w1, b1, w2, b2, box_warp=box_warp, axes=axes)
    if impl == "triton":
        return _TritonField.apply(planes, xyz, w1, b1, w2, b2, float(box_warp), AXES[axes])
    if impl == "cpu" and _keeps_activations(planes, xyz, w1, b1, w2, b2):
        # The CPU training pair: the forward keeps each point's decoder input and pre-activations
        # ([B, N, C + hidden]) so the backward does not sample and decode every point again. It
        # takes the planes in any layout: API-layout planes it copies channels-last itself and keeps
        # the copy for the backward, whose plane gradient comes back in the API layout (the bands
        # of phase B transposed as they are written), with no layout pass over the gradient.
        sigma, feat, _saved, _planes_cl = torch.ops.talk3d.triplane_field_fwd_train(
            planes, xyz, w1, b1, w2, b2, float(box_warp), AXES[axes])
        return sigma, feat
    args = (channels_last_planes(planes), xyz, w1, b1, w2, b2, float(box_warp), AXES[axes])
    return torch.ops.talk3d.triplane_field_fwd(*args)


#: Largest activation store of the CPU training forward; past it the backward recomputes the
#: forward instead (as the CUDA kernel always does). 1 GiB is ~2.2 M points at the EG3D size, far
#: beyond a CPU training step (the demo's is ~50 k points).
SAVE_LIMIT_BYTES = 1 << 30


def _keeps_activations(planes, xyz, w1, b1, w2, b2) -> bool:
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in (planes, xyz, w1, b1, w2, b2)):
        return False
    B, N = xyz.shape[:2]
    return B * N * (w1.shape[0] + w1.shape[1]) * planes.element_size() <= SAVE_LIMIT_BYTES


# --- autograd and fake implementations of the compiled ops --------------------------------------


def _setup_context(ctx, inputs, output):
    planes, xyz, w1, b1, w2, b2, box_warp, axes = inputs
    ctx.save_for_backward(planes, xyz, w1, b1, w2, b2)
    ctx.box_warp, ctx.axes = box_warp, axes


def _output_grads(ctx, grad_sigma, grad_feat):
    planes, xyz, w1, b1, w2, b2 = ctx.saved_tensors[:6]
    B, N = xyz.shape[:2]
    if grad_sigma is None:
        grad_sigma = planes.new_zeros(B, N, 1)
    if grad_feat is None:
        grad_feat = planes.new_zeros(B, N, w2.shape[0] - 1)
    return grad_sigma, grad_feat


def _backward(ctx, grad_sigma, grad_feat):
    grad_sigma, grad_feat = _output_grads(ctx, grad_sigma, grad_feat)
    needs = [bool(n) for n in ctx.needs_input_grad[:6]]
    grads = torch.ops.talk3d.triplane_field_bwd(
        grad_sigma, grad_feat, *ctx.saved_tensors, ctx.box_warp, ctx.axes, needs
    )
    return tuple(g if n else None for g, n in zip(grads, needs)) + (None, None)


def _setup_context_train(ctx, inputs, output):
    planes, xyz, w1, b1, w2, b2, box_warp, axes = inputs
    _sigma, feat, saved, planes_cl = output
    ctx.mark_non_differentiable(saved, planes_cl)
    ctx.set_materialize_grads(False)  # no zero-filled [B, N, C + hidden] gradient for `saved`
    # With a channels-last copy the backward reads only the copy: the API-layout planes are not kept
    # (an intermediate such as P_ID + deltaplane would otherwise be held twice until the backward).
    ctx.copied = planes_cl.numel() > 0
    ctx.save_for_backward(planes_cl if ctx.copied else planes, xyz, w1, b1, w2, b2, saved, feat)
    ctx.box_warp, ctx.axes = box_warp, axes


def _backward_train(ctx, grad_sigma, grad_feat, _grad_saved, _grad_planes_cl):
    grad_sigma, grad_feat = _output_grads(ctx, grad_sigma, grad_feat)
    needs = [bool(n) for n in ctx.needs_input_grad[:6]]
    planes, *rest = ctx.saved_tensors
    planes_cl = planes if ctx.copied else planes.new_empty(0)
    if ctx.copied:  # the copy [B, 3, H, W, C] stands in for the planes' shape
        planes = planes.permute(0, 1, 4, 2, 3)
    grads = torch.ops.talk3d.triplane_field_bwd_saved(
        grad_sigma, grad_feat, planes, *rest, planes_cl, ctx.box_warp, ctx.axes, needs
    )
    return tuple(g if n else None for g, n in zip(grads, needs)) + (None, None)


def _fake_fwd(planes, xyz, w1, b1, w2, b2, box_warp, axes):
    B, N = xyz.shape[:2]
    return planes.new_empty(B, N, 1), planes.new_empty(B, N, w2.shape[0] - 1)


def _planes_copied(planes) -> bool:
    """Whether the compiled back ends copy these planes channels-last (their channels are not
    contiguous in memory): csrc's planes_copied, for the fake implementations."""
    return planes.stride(2) != 1 and planes.shape[2] > 1 and planes.numel() > 0


def _fake_fwd_train(planes, xyz, w1, b1, w2, b2, box_warp, axes):
    B, N = xyz.shape[:2]
    _, _, C, H, W = planes.shape
    sigma, feat = _fake_fwd(planes, xyz, w1, b1, w2, b2, box_warp, axes)
    planes_cl = planes.new_empty(B, 3, H, W, C) if _planes_copied(planes) else planes.new_empty(0)
    return sigma, feat, planes.new_empty(B, N, w1.shape[1] + w1.shape[0]), planes_cl


def _fake_bwd_saved(grad_sigma, grad_feat, planes, xyz, w1, b1, w2, b2, saved, feat, planes_cl, box_warp, axes,
                    needs):
    grads = _fake_bwd(grad_sigma, grad_feat, planes, xyz, w1, b1, w2, b2, box_warp, axes, needs)
    if needs[0] and planes_cl.numel() > 0:  # the forward copied the planes: an API-layout gradient
        grads = (planes.new_empty(planes.shape), *grads[1:])
    return grads


def _fake_bwd(grad_sigma, grad_feat, planes, xyz, w1, b1, w2, b2, box_warp, axes, needs):
    B, _, C, H, W = planes.shape
    out = []
    for t, need in zip((planes, xyz, w1, b1, w2, b2), needs):
        if not need:
            out.append(t.new_empty(0))
        elif t is planes and planes.device.type == "cpu" and _planes_copied(planes):
            out.append(planes.new_empty(B, 3, C, H, W))  # the CPU kernel copied them: an API-layout gradient
        elif t is planes:  # channels-last buffer viewed as [B, 3, C, H, W]
            out.append(planes.new_empty(B, 3, H, W, C).permute(0, 1, 4, 2, 3))
        else:
            out.append(torch.empty_like(t, memory_format=torch.contiguous_format))
    return tuple(out)


def _register_compiled_ops() -> None:
    if not extension.available():
        return
    extension.load()
    torch.library.register_fake("talk3d::triplane_field_fwd")(_fake_fwd)
    torch.library.register_fake("talk3d::triplane_field_bwd")(_fake_bwd)
    torch.library.register_autograd(
        "talk3d::triplane_field_fwd", _backward, setup_context=_setup_context
    )
    torch.library.register_fake("talk3d::triplane_field_fwd_train")(_fake_fwd_train)
    torch.library.register_fake("talk3d::triplane_field_bwd_saved")(_fake_bwd_saved)
    torch.library.register_autograd(
        "talk3d::triplane_field_fwd_train", _backward_train, setup_context=_setup_context_train
    )


_register_compiled_ops()


# --- Triton --------------------------------------------------------------------------------------


class _TritonField(torch.autograd.Function):
    """Autograd around the Triton kernels; they take channels-last planes and return fp32 grads."""

    @staticmethod
    def forward(ctx, planes, xyz, w1, b1, w2, b2, box_warp, axes):
        planes_cl = planes.permute(0, 1, 3, 4, 2)
        if planes_cl.stride(-1) != 1:
            planes_cl = planes_cl.contiguous()
        weights = [t.contiguous() for t in (w1, b1, w2, b2)]
        ctx.save_for_backward(planes_cl, xyz, *weights)
        ctx.box_warp, ctx.axes = box_warp, axes
        return _triton_module().field_forward(planes_cl, xyz.contiguous(), *weights, box_warp, axes)

    @staticmethod
    def backward(ctx, grad_sigma, grad_feat):
        planes_cl, xyz, w1, b1, w2, b2 = ctx.saved_tensors
        needs = tuple(bool(n) for n in ctx.needs_input_grad[:6])
        grads = _triton_module().field_backward(
            grad_sigma.contiguous(), grad_feat.contiguous(), planes_cl, xyz.contiguous(),
            w1, b1, w2, b2, ctx.box_warp, ctx.axes, needs,
        )
        like = (planes_cl, xyz, w1, b1, w2, b2)
        out = [None if g is None else g.to(t.dtype) for g, t in zip(grads, like)]
        if out[0] is not None:
            out[0] = out[0].permute(0, 1, 4, 2, 3)
        return (*out, None, None)
