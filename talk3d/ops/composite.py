"""Fused compositing along rays: EG3D's MipRayMarcher2 in one pass per ray.

Back ends (``impl``): ``"torch"`` (the reference, :func:`talk3d.ops.reference.composite`), ``"cpu"``
(C++, float32/float64), ``"cuda"`` (float32/float64/float16/bfloat16, fp32 accumulation) and
``"auto"``. There is no Triton kernel: the op is one sequential scan per ray over memory it reads
once, which the CUDA kernel already does at bandwidth.

The compiled ops are ``torch.ops.talk3d.composite_fwd`` / ``_bwd`` and, for
:func:`composite_weights` (each sample's weight instead of the summed features),
``composite_weights_fwd`` / ``_bwd``. The backward recomputes the
transmittance from the inputs and the saved outputs (see ``csrc/include/talk3d/composite_math.h``):
nothing per sample is stored between forward and backward, and nothing divides by ``1 - alpha``.
"""
from __future__ import annotations

import torch

from .. import extension
from . import backends
from .reference.composite import composite as _reference
from .reference.composite import composite_weights as _reference_weights
from .reference.composite import finish_depth

_STORAGE = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_IMPL_DTYPES = {
    "torch": _STORAGE,
    "cpu": (torch.float32, torch.float64),
    "cuda": _STORAGE,
}


def available_impls(device: torch.device | str = "cpu") -> list[str]:
    """Back ends of :func:`composite` that can run on ``device`` here (``"auto"`` excluded)."""
    return backends.available_impls(device, triton=False)


def _fail(msg: str, exc=ValueError):
    raise exc(f"composite: {msg}")


def _validate(sigma, feat, t, packed_info, check_sorted: bool = True) -> None:
    """feat None: composite_weights' inputs (sigma and t only, dense)."""
    named = [("sigma", sigma), ("t", t)] + ([("feat", feat)] if feat is not None else [])
    for name, x in named:
        if not isinstance(x, torch.Tensor):
            _fail(f"{name} must be a torch.Tensor, got {type(x).__name__}", TypeError)
        if x.dtype not in _STORAGE:
            _fail(f"{name} dtype {x.dtype} is not supported; use one of {_STORAGE}", TypeError)
        if x.dtype != sigma.dtype:
            _fail(f"{name} has dtype {x.dtype} but sigma has {sigma.dtype}; they must match", TypeError)
        if x.device != sigma.device:
            _fail(f"{name} is on {x.device} but sigma is on {sigma.device}")
    if packed_info is None:
        if sigma.dim() != 4 or sigma.shape[-1] != 1:
            _fail(f"sigma must be [B, R, S, 1], got {tuple(sigma.shape)}")
        if feat is not None and (feat.dim() != 4 or feat.shape[:3] != sigma.shape[:3]):
            _fail(f"feat must be [B, R, S, F] matching sigma {tuple(sigma.shape)}, got {tuple(feat.shape)}")
        if t.shape != sigma.shape:
            _fail(f"t must be [B, R, S, 1] like sigma, got {tuple(t.shape)}")
        if sigma.shape[2] < 2:
            _fail(f"each ray needs at least 2 samples (one interval), got S={sigma.shape[2]}")
        sorted_ok = not check_sorted or t.shape[2] < 2 or bool((t[:, :, 1:] >= t[:, :, :-1]).all())
    else:
        if not isinstance(packed_info, torch.Tensor) or packed_info.dim() != 2 or packed_info.shape[1] != 2:
            _fail("packed_info must be a [R, 2] tensor of (first sample, count)")
        if packed_info.dtype != torch.int64:
            _fail(f"packed_info must be int64, got {packed_info.dtype}", TypeError)
        if packed_info.device != sigma.device:
            _fail(f"packed_info is on {packed_info.device} but sigma is on {sigma.device}")
        if sigma.dim() != 2 or sigma.shape[1] != 1:
            _fail(f"packed sigma must be [N, 1], got {tuple(sigma.shape)}")
        if feat.dim() != 2 or feat.shape[0] != sigma.shape[0]:
            _fail(f"packed feat must be [N={sigma.shape[0]}, F], got {tuple(feat.shape)}")
        if t.shape != sigma.shape:
            _fail(f"packed t must be [N, 1] like sigma, got {tuple(t.shape)}")
        start, count = packed_info[:, 0], packed_info[:, 1]
        if packed_info.shape[0] and bool(((start < 0) | (count < 0) | (start + count > sigma.shape[0])).any()):
            _fail(f"packed_info addresses samples outside [0, {sigma.shape[0]})")
        sorted_ok = True
        if check_sorted:  # depth order within each ray: every sample but a ray's last against its successor
            local = torch.arange(int(count.sum()), device=sigma.device) - torch.repeat_interleave(count.cumsum(0) - count, count)
            first = torch.repeat_interleave(start, count) + local
            i = first[local < torch.repeat_interleave(count, count) - 1]
            sorted_ok = bool((t[i + 1, 0] >= t[i, 0]).all())
    if feat is not None and feat.shape[-1] == 0:
        _fail("feat has no channels (F == 0)")
    if not sorted_ok:
        _fail("t must be sorted (non-decreasing) along each ray")


def composite(
    sigma: torch.Tensor,
    feat: torch.Tensor,
    t: torch.Tensor,
    *,
    packed_info: torch.Tensor | None = None,
    impl: str = "auto",
    check_sorted: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Composite samples along rays with EG3D's MipRayMarcher2 semantics, fused.

    Args:
        sigma: ``[B, R, S, 1]`` raw densities (packed: ``[N, 1]``).
        feat: ``[B, R, S, F]`` features (packed: ``[N, F]``).
        t: ``[B, R, S, 1]`` depths, sorted along each ray (packed: ``[N, 1]``).
        packed_info: ``None`` for the dense layout, or ``[R, 2]`` int64 (first sample, count) per
            ray for a variable number of samples per ray; a ray's samples are contiguous and rays
            do not overlap (nerfacc's packed layout).
        impl: ``"auto"``, ``"torch"``, ``"cpu"`` or ``"cuda"``.
        check_sorted: verify that ``t`` is sorted along each ray (a device-to-host sync on a GPU;
            as :func:`composite_weights`'). The packed ranges are checked either way.

    Returns:
        ``(feat_img, depth, weight_sum)``: ``[B, R, F]`` (``sum w f_mid`` mapped by ``x * 2 - 1``),
        ``[B, R, 1]`` expected depth (no weight -> ``t.max()``; clamped to ``[t.min(), t.max()]``),
        ``[B, R, 1]`` accumulated weight. Packed: ``[R, F]``, ``[R, 1]``, ``[R, 1]``.

    Example:
        >>> s, f = torch.randn(1, 4, 8, 1), torch.rand(1, 4, 8, 3)
        >>> t = torch.linspace(2.25, 3.3, 8).expand(1, 4, 8)[..., None]
        >>> img, depth, acc = composite(s, f, t, impl="torch")
        >>> img.shape, depth.shape, acc.shape
        (torch.Size([1, 4, 3]), torch.Size([1, 4, 1]), torch.Size([1, 4, 1]))
    """
    _validate(sigma, feat, t, packed_info, check_sorted)
    impl = backends.resolve_impl("composite", impl, sigma, _IMPL_DTYPES)
    if impl == "torch":
        return _reference(sigma, feat, t, packed_info=packed_info)
    feat_img, depth, weight_sum = torch.ops.talk3d.composite_fwd(sigma, feat, t, packed_info)
    return feat_img, finish_depth(depth, t), weight_sum


def composite_weights(sigma: torch.Tensor, t: torch.Tensor, *, impl: str = "auto", check_sorted: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each sample's weight in the compositing's feature sum, fused (dense layout).

    :func:`composite`'s feature image is ``2 * sum_j omega_j f_j - 1``; this op returns the
    ``omega_j`` (``(w_{j-1} + w_j) / 2``, ``w`` the interval weights) with the depth and weight sum,
    and leaves the sum to the caller. The sum does not depend on the samples' order, so a renderer
    that merges coarse and fine samples by depth sorts only ``t`` and ``sigma``, scatters ``omega``
    back, and sums each pass's features where they lie (a matrix product) instead of gathering
    every feature row into merged order. Backward as :func:`composite`'s: transmittance recomputed,
    nothing divided by ``1 - alpha``.

    Args:
        sigma: ``[B, R, S, 1]`` raw densities.
        t: ``[B, R, S, 1]`` depths, sorted along each ray.
        impl: ``"auto"``, ``"torch"`` (:func:`talk3d.ops.reference.composite_weights`), ``"cpu"``
            or ``"cuda"``.
        check_sorted: verify that ``t`` is sorted (a device-to-host sync on a GPU). Callers whose
            ``t`` comes out of ``torch.sort`` (the renderer) pass False; unsorted input then gives
            wrong weights, never an error.

    Returns:
        ``(omega, depth, weight_sum)``: ``[B, R, S, 1]``, ``[B, R, 1]`` (as :func:`composite`'s),
        ``[B, R, 1]``.

    Example:
        >>> s, f = torch.randn(1, 4, 8, 1), torch.rand(1, 4, 8, 3)
        >>> t = torch.linspace(2.25, 3.3, 8).expand(1, 4, 8)[..., None]
        >>> omega, depth, acc = composite_weights(s, t, impl="torch")
        >>> img = 2 * (omega * f).sum(dim=2) - 1   # == composite(s, f, t)[0]
    """
    _validate(sigma, None, t, None, check_sorted)
    impl = backends.resolve_impl("composite", impl, sigma, _IMPL_DTYPES)
    if impl == "torch":
        return _reference_weights(sigma, t)
    omega, depth, weight_sum = torch.ops.talk3d.composite_weights_fwd(sigma, t)
    return omega, finish_depth(depth, t), weight_sum


# --- autograd and fake implementations of the compiled ops --------------------------------------


def _setup_context(ctx, inputs, output):
    sigma, feat, t, packed_info = inputs
    ctx.save_for_backward(sigma, feat, t, packed_info, *output)


def _backward(ctx, g_feat, g_depth, g_wsum):
    sigma, feat, t, packed_info, o_feat, o_depth, o_wsum = ctx.saved_tensors
    g_feat = torch.zeros_like(o_feat) if g_feat is None else g_feat
    g_depth = torch.zeros_like(o_depth) if g_depth is None else g_depth
    g_wsum = torch.zeros_like(o_wsum) if g_wsum is None else g_wsum
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    grads = torch.ops.talk3d.composite_bwd(
        g_feat, g_depth, g_wsum, sigma, feat, t, packed_info, o_feat, o_depth, o_wsum, needs
    )
    return tuple(g if n else None for g, n in zip(grads, needs)) + (None,)


def _fake_fwd(sigma, feat, t, packed_info):
    lead = sigma.shape[:2] if packed_info is None else packed_info.shape[:1]
    F = feat.shape[-1]
    return sigma.new_empty(*lead, F), sigma.new_empty(*lead, 1), sigma.new_empty(*lead, 1)


def _fake_bwd(g_feat, g_depth, g_wsum, sigma, feat, t, packed_info, o_feat, o_depth, o_wsum, needs):
    return tuple(
        torch.empty_like(x, memory_format=torch.contiguous_format) if n else x.new_empty(0)
        for x, n in zip((sigma, feat, t), needs)
    )


def _setup_weights_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _weights_backward(ctx, g_omega, g_depth, g_wsum):
    sigma, t, o_omega, o_depth, o_wsum = ctx.saved_tensors
    g_omega = torch.zeros_like(o_omega) if g_omega is None else g_omega
    g_depth = torch.zeros_like(o_depth) if g_depth is None else g_depth
    g_wsum = torch.zeros_like(o_wsum) if g_wsum is None else g_wsum
    needs = [bool(n) for n in ctx.needs_input_grad[:2]]
    grads = torch.ops.talk3d.composite_weights_bwd(g_omega, g_depth, g_wsum, sigma, t, o_omega, o_depth, o_wsum,
                                                   needs)
    return tuple(g if n else None for g, n in zip(grads, needs))


def _fake_weights_fwd(sigma, t):
    lead = sigma.shape[:2]
    return torch.empty_like(sigma, memory_format=torch.contiguous_format), sigma.new_empty(*lead, 1), \
        sigma.new_empty(*lead, 1)


def _fake_weights_bwd(g_omega, g_depth, g_wsum, sigma, t, o_omega, o_depth, o_wsum, needs):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) if n else x.new_empty(0)
                 for x, n in zip((sigma, t), needs))


def _register_compiled_ops() -> None:
    if not extension.available():
        return
    extension.load()
    torch.library.register_fake("talk3d::composite_fwd")(_fake_fwd)
    torch.library.register_fake("talk3d::composite_bwd")(_fake_bwd)
    torch.library.register_autograd("talk3d::composite_fwd", _backward, setup_context=_setup_context)
    torch.library.register_fake("talk3d::composite_weights_fwd")(_fake_weights_fwd)
    torch.library.register_fake("talk3d::composite_weights_bwd")(_fake_weights_bwd)
    torch.library.register_autograd("talk3d::composite_weights_fwd", _weights_backward,
                                    setup_context=_setup_weights_context)


_register_compiled_ops()
