"""Fused triplane field in Triton: bilinear taps of three planes, their mean, the two-layer
softplus decoder and EG3D's output transform in one kernel per direction.

One program handles ``BLOCK`` points of one batch item. The backward recomputes the forward per
point (nothing per point is kept in global memory), reduces the weight gradients inside the program
with ``tl.dot`` and adds them, and the plane gradients, to fp32 buffers with ``tl.atomic_add``.

Ground truth: ``talk3d/ops/reference/triplane_field.py``. Runs on CUDA tensors, and on CPU tensors
under ``TRITON_INTERPRET=1`` (how it is tested on machines without a GPU).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

#: EG3D's output transform: sigmoid * (1 + 2 * eps) - eps.
_FEATURE_EPS = tl.constexpr(0.001)
#: torch.nn.functional.softplus' default threshold (beta = 1): above it softplus is the identity.
_SOFTPLUS_THRESHOLD = tl.constexpr(20.0)

_AXES_BY_NAME = {"fixed": 0, "eg3d": 1}


# ----------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _plane_uv(q0, q1, q2, PLANE: tl.constexpr, AXES: tl.constexpr):
    """(width, height) coordinates plane PLANE reads.

    fixed (AXES=0): (0,1) (0,2) (2,1); eg3d (AXES=1): (0,1) (0,2) (2,0).
    """
    if PLANE == 0:
        u = q0
        v = q1
    elif PLANE == 1:
        u = q0
        v = q2
    else:
        u = q2
        if AXES == 0:
            v = q1
        else:
            v = q0
    return u, v


@triton.jit
def _bilinear_setup(u, v, H, W):
    """grid_sample(align_corners=False) source coordinates -> top-left tap and fractions.

    ix is clamped to [-2, W + 1] (iy likewise) before the int conversion: every tap of a clamped
    point is outside the plane anyway, and it keeps huge coordinates from overflowing int32. NaN
    points are sent to (-2, -2) so they read zero like any outside point.
    """
    ix = ((u + 1.0) * W - 1.0) * 0.5
    iy = ((v + 1.0) * H - 1.0) * 0.5
    finite = (ix == ix) & (iy == iy)
    ix = tl.where(finite, tl.minimum(tl.maximum(ix, -2.0), W + 1.0), -2.0)
    iy = tl.where(finite, tl.minimum(tl.maximum(iy, -2.0), H + 1.0), -2.0)
    x0f = tl.floor(ix)
    y0f = tl.floor(iy)
    tx = ix - x0f
    ty = iy - y0f
    return x0f.to(tl.int32), y0f.to(tl.int32), tx, ty


@triton.jit
def _tap_ptrs(plane_ptr, x, y, H, W, s_y, s_x, rmask, offs_c, cmask):
    """Pointers [BLOCK, CP] and mask of one tap (x, y) [BLOCK]; outside taps are masked (read 0)."""
    inside = rmask & (x >= 0) & (x < W) & (y >= 0) & (y < H)
    row = y.to(tl.int64) * s_y + x.to(tl.int64) * s_x
    ptrs = plane_ptr + row[:, None] + offs_c[None, :]
    return ptrs, inside[:, None] & cmask[None, :]


@triton.jit
def _sample_mean(planes_b, s_p, s_y, s_x, q0, q1, q2, rmask, offs_c, cmask, H, W,
                 AXES: tl.constexpr, BLOCK: tl.constexpr, CP: tl.constexpr):
    """Mean over the three planes of the bilinear taps -> f [BLOCK, CP] fp32 (padded channels 0)."""
    f = tl.zeros((BLOCK, CP), dtype=tl.float32)
    for PLANE in tl.static_range(3):
        u, v = _plane_uv(q0, q1, q2, PLANE, AXES)
        x0, y0, tx, ty = _bilinear_setup(u, v, H, W)
        plane_ptr = planes_b + PLANE * s_p
        p00, m00 = _tap_ptrs(plane_ptr, x0, y0, H, W, s_y, s_x, rmask, offs_c, cmask)
        p10, m10 = _tap_ptrs(plane_ptr, x0 + 1, y0, H, W, s_y, s_x, rmask, offs_c, cmask)
        p01, m01 = _tap_ptrs(plane_ptr, x0, y0 + 1, H, W, s_y, s_x, rmask, offs_c, cmask)
        p11, m11 = _tap_ptrs(plane_ptr, x0 + 1, y0 + 1, H, W, s_y, s_x, rmask, offs_c, cmask)
        v00 = tl.load(p00, mask=m00, other=0.0).to(tl.float32)
        v10 = tl.load(p10, mask=m10, other=0.0).to(tl.float32)
        v01 = tl.load(p01, mask=m01, other=0.0).to(tl.float32)
        v11 = tl.load(p11, mask=m11, other=0.0).to(tl.float32)
        wx1 = tx[:, None]
        wy1 = ty[:, None]
        wx0 = 1.0 - wx1
        wy0 = 1.0 - wy1
        f += (v00 * wx0 + v10 * wx1) * wy0 + (v01 * wx0 + v11 * wx1) * wy1
    return f * (1.0 / 3.0)


@triton.jit
def _log1p(x):
    # Accurate log(1 + x) for small x without libdevice (the interpreter has none): the rounding
    # error of 1 + x cancels in log(u) * x / (u - 1).
    u = 1.0 + x
    d = u - 1.0
    return tl.where(d == 0.0, x, tl.log(u) * (x / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _lowp_dot(a, b, LOWP_DOT: tl.constexpr):
    """a [M, K] fp32 rounded to b's half dtype, times b [K, N] half, accumulated in fp32.

    LOWP_DOT=False computes the same product on fp32 copies of the rounded operands: the Triton
    interpreter multiplies the raw bit patterns of bfloat16 dot operands (triton-lang/triton#11584).
    """
    a = a.to(b.dtype)
    if LOWP_DOT:
        c = tl.dot(a, b, out_dtype=tl.float32)
    else:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return c


@triton.jit
def _decode(f, w1_ptr, b1_ptr, w2_ptr, b2_ptr, C, HID, F,
            CP: tl.constexpr, HP: tl.constexpr, FP: tl.constexpr,
            HALF: tl.constexpr, LOWP_DOT: tl.constexpr, DOT_PREC: tl.constexpr):
    """pre = f W1^T + b1, h = softplus(pre), then the decoder output split in two:
    sigma = h . w2[0] + b2[0] ([BLOCK]) and o = h W2[1:]^T + b2[1:] ([BLOCK, FP]); all fp32.

    The density row is a broadcast-multiply-reduce instead of a dot column so that 1 + F outputs
    pad to next_pow2(F) (32 for EG3D) rather than next_pow2(1 + F) (64).
    fp32 weights use DOT_PREC dots (ieee: exact); half-precision weights feed the tensor cores in
    their own dtype with fp32 accumulation. Each weight tile is loaded right before its dot (it
    is tiny and cache-resident) rather than kept live across the kernel: as a dot operand it is
    replicated per warp and costs many registers.
    """
    offs_c = tl.arange(0, CP)
    offs_h = tl.arange(0, HP)
    offs_f = tl.arange(0, FP)
    cmask = offs_c < C
    hmask = offs_h < HID
    fmask = offs_f < F
    w1t = tl.load(w1_ptr + offs_h[None, :] * C + offs_c[:, None],
                  mask=hmask[None, :] & cmask[:, None], other=0.0)  # [CP, HP]
    if HALF:
        pre = _lowp_dot(f, w1t, LOWP_DOT)
    else:
        pre = tl.dot(f, w1t, input_precision=DOT_PREC)
    pre += tl.load(b1_ptr + offs_h, mask=hmask, other=0.0).to(tl.float32)[None, :]
    # torch's softplus: identity above the threshold, log1p(exp(x)) below it.
    h = tl.where(pre > _SOFTPLUS_THRESHOLD, pre,
                 _log1p(tl.exp(tl.minimum(pre, _SOFTPLUS_THRESHOLD))))

    w2s = tl.load(w2_ptr + offs_h, mask=hmask, other=0.0).to(tl.float32)  # density row, [HP]
    w2ft = tl.load(w2_ptr + (1 + offs_f[None, :]) * HID + offs_h[:, None],
                   mask=fmask[None, :] & hmask[:, None], other=0.0)  # feature rows^T, [HP, FP]
    if HALF:
        o = _lowp_dot(h, w2ft, LOWP_DOT)
        # Same rounding of h as the dot operands get.
        sigma = tl.sum(h.to(w2ft.dtype).to(tl.float32) * w2s[None, :], axis=1)
    else:
        o = tl.dot(h, w2ft, input_precision=DOT_PREC)
        sigma = tl.sum(h * w2s[None, :], axis=1)
    sigma += tl.load(b2_ptr).to(tl.float32)
    o += tl.load(b2_ptr + 1 + offs_f, mask=fmask, other=0.0).to(tl.float32)[None, :]
    return pre, h, sigma, o


@triton.jit
def _load_xyz(xyz_ptr, b, offs_n, rmask, N, scale):
    """q = xyz * (2 / box_warp) for the block's points, three [BLOCK] fp32 vectors."""
    base = xyz_ptr + (b * N + offs_n.to(tl.int64)) * 3
    q0 = tl.load(base + 0, mask=rmask, other=0.0) * scale
    q1 = tl.load(base + 1, mask=rmask, other=0.0) * scale
    q2 = tl.load(base + 2, mask=rmask, other=0.0) * scale
    return q0, q1, q2


@triton.jit
def _tap_backward(plane_ptr, dplane_ptr, x, y, wgt, g, H, W, C, s_y, s_x, rmask, offs_c, cmask,
                  NEED_PLANES: tl.constexpr, NEED_XYZ: tl.constexpr):
    """Backward of one bilinear tap (x, y) [BLOCK] with weight wgt [BLOCK].

    Scatter-adds g * wgt into the contiguous fp32 dplanes (if NEED_PLANES) and returns
    sum_c g * plane[tap] [BLOCK] for the coordinate gradient (zeros unless NEED_XYZ).
    """
    gdot = tl.zeros_like(wgt)
    if NEED_PLANES:
        # dplanes is contiguous [B, 3, H, W, C]: strides (3HWC, HWC, WC, C, 1).
        dptrs, m = _tap_ptrs(dplane_ptr, x, y, H, W, W * C, C, rmask, offs_c, cmask)
        tl.atomic_add(dptrs, g * wgt[:, None], mask=m)
    if NEED_XYZ:
        ptrs, m = _tap_ptrs(plane_ptr, x, y, H, W, s_y, s_x, rmask, offs_c, cmask)
        gdot = tl.sum(g * tl.load(ptrs, mask=m, other=0.0).to(tl.float32), axis=1)
    return gdot


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _field_fwd_kernel(
    planes_ptr, s_b, s_p, s_y, s_x,
    xyz_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
    sigma_ptr, feat_ptr,
    N, H, W, C, HID, F, scale,
    AXES: tl.constexpr, HALF: tl.constexpr, LOWP_DOT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK: tl.constexpr, CP: tl.constexpr, HP: tl.constexpr, FP: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid * BLOCK + tl.arange(0, BLOCK)
    rmask = offs_n < N
    offs_c = tl.arange(0, CP)
    cmask = offs_c < C
    offs_f = tl.arange(0, FP)
    row = b * N + offs_n.to(tl.int64)

    q0, q1, q2 = _load_xyz(xyz_ptr, b, offs_n, rmask, N, scale)
    f = _sample_mean(planes_ptr + b * s_b, s_p, s_y, s_x, q0, q1, q2, rmask, offs_c, cmask, H, W,
                     AXES, BLOCK, CP)
    pre, h, sigma, o = _decode(f, w1_ptr, b1_ptr, w2_ptr, b2_ptr, C, HID, F, CP, HP, FP,
                               HALF, LOWP_DOT, DOT_PREC)

    tl.store(sigma_ptr + row, sigma.to(sigma_ptr.dtype.element_ty), mask=rmask)
    feat = tl.sigmoid(o) * (1.0 + 2.0 * _FEATURE_EPS) - _FEATURE_EPS
    tl.store(feat_ptr + row[:, None] * F + offs_f[None, :], feat.to(feat_ptr.dtype.element_ty),
             mask=rmask[:, None] & (offs_f[None, :] < F))


@triton.jit
def _field_bwd_kernel(
    planes_ptr, s_b, s_p, s_y, s_x,
    xyz_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
    gsigma_ptr, gfeat_ptr,
    dplanes_ptr, dxyz_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr,
    N, H, W, C, HID, F, scale,
    AXES: tl.constexpr, HALF: tl.constexpr, LOWP_DOT: tl.constexpr, DOT_PREC: tl.constexpr,
    NEED_PLANES: tl.constexpr, NEED_XYZ: tl.constexpr, NEED_W1: tl.constexpr,
    NEED_B1: tl.constexpr, NEED_W2: tl.constexpr, NEED_B2: tl.constexpr,
    BLOCK: tl.constexpr, CP: tl.constexpr, HP: tl.constexpr, FP: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid * BLOCK + tl.arange(0, BLOCK)
    rmask = offs_n < N
    offs_c = tl.arange(0, CP)
    cmask = offs_c < C
    offs_h = tl.arange(0, HP)
    hmask = offs_h < HID
    offs_f = tl.arange(0, FP)
    fmask = offs_f < F
    row = b * N + offs_n.to(tl.int64)

    # ---- recompute the forward -----------------------------------------------------------------
    q0, q1, q2 = _load_xyz(xyz_ptr, b, offs_n, rmask, N, scale)
    planes_b = planes_ptr + b * s_b
    f = _sample_mean(planes_b, s_p, s_y, s_x, q0, q1, q2, rmask, offs_c, cmask, H, W,
                     AXES, BLOCK, CP)
    pre, h, sigma, o = _decode(f, w1_ptr, b1_ptr, w2_ptr, b2_ptr, C, HID, F, CP, HP, FP,
                               HALF, LOWP_DOT, DOT_PREC)

    # ---- output transform ------------------------------------------------------------------------
    # The backward dots run on fp32 operands whatever the storage dtype: upstream gradients are
    # often tiny (means over many rays) and would underflow in fp16. Padded rows and columns load
    # zero gradients, so they add nothing below.
    dsig = tl.load(gsigma_ptr + row, mask=rmask, other=0.0).to(tl.float32)  # [BLOCK]
    gf = tl.load(gfeat_ptr + row[:, None] * F + offs_f[None, :],
                 mask=rmask[:, None] & fmask[None, :], other=0.0).to(tl.float32)
    s = tl.sigmoid(o)
    do = gf * ((1.0 + 2.0 * _FEATURE_EPS) * s * (1.0 - s))  # [BLOCK, FP]

    if NEED_W2:
        # Row 0 of dW2 (density) is a column sum, rows 1..F a dot.
        tl.atomic_add(dw2_ptr + offs_h, tl.sum(dsig[:, None] * h, axis=0), mask=hmask)
        dw2f = tl.dot(tl.trans(do), h, input_precision=DOT_PREC)  # [FP, HP]
        tl.atomic_add(dw2_ptr + (1 + offs_f[:, None]) * HID + offs_h[None, :], dw2f,
                      mask=fmask[:, None] & hmask[None, :])
    if NEED_B2:
        tl.atomic_add(db2_ptr, tl.sum(dsig, axis=0))
        tl.atomic_add(db2_ptr + 1 + offs_f, tl.sum(do, axis=0), mask=fmask)

    if NEED_W1 or NEED_B1 or NEED_PLANES or NEED_XYZ:
        # ---- decoder hidden layer ----------------------------------------------------------------
        w2s = tl.load(w2_ptr + offs_h, mask=hmask, other=0.0).to(tl.float32)  # [HP]
        w2f = tl.load(w2_ptr + (1 + offs_f[:, None]) * HID + offs_h[None, :],
                      mask=fmask[:, None] & hmask[None, :], other=0.0).to(tl.float32)  # [FP, HP]
        dh = tl.dot(do, w2f, input_precision=DOT_PREC) + dsig[:, None] * w2s[None, :]
        dpre = tl.where(pre > _SOFTPLUS_THRESHOLD, dh, dh * tl.sigmoid(pre))  # [BLOCK, HP]
        if NEED_W1:
            dw1 = tl.dot(tl.trans(dpre), f, input_precision=DOT_PREC)  # [HP, CP]
            tl.atomic_add(dw1_ptr + offs_h[:, None] * C + offs_c[None, :], dw1,
                          mask=hmask[:, None] & cmask[None, :])
        if NEED_B1:
            tl.atomic_add(db1_ptr + offs_h, tl.sum(dpre, axis=0), mask=hmask)

        if NEED_PLANES or NEED_XYZ:
            # ---- sampling ------------------------------------------------------------------------
            w1 = tl.load(w1_ptr + offs_h[:, None] * C + offs_c[None, :],
                         mask=hmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)  # [HP, CP]
            # d(mean)/d(plane sample) = 1/3, folded in once here.
            g = tl.dot(dpre, w1, input_precision=DOT_PREC) * (1.0 / 3.0)  # [BLOCK, CP]
            dq0 = tl.zeros((BLOCK,), dtype=tl.float32)
            dq1 = tl.zeros((BLOCK,), dtype=tl.float32)
            dq2 = tl.zeros((BLOCK,), dtype=tl.float32)
            dplanes_b = dplanes_ptr + b * (3 * H * W * C)
            for PLANE in tl.static_range(3):
                u, v = _plane_uv(q0, q1, q2, PLANE, AXES)
                x0, y0, tx, ty = _bilinear_setup(u, v, H, W)
                plane = planes_b + PLANE * s_p
                dplane = dplanes_b + PLANE * (H * W * C)
                # One tap at a time (scatter its share of g, read it back for dxyz) keeps a single
                # [BLOCK, CP] pointer tile live; all four at once spill on sm_90.
                g00 = _tap_backward(plane, dplane, x0, y0, (1.0 - tx) * (1.0 - ty), g, H, W, C,
                                    s_y, s_x, rmask, offs_c, cmask, NEED_PLANES, NEED_XYZ)
                g10 = _tap_backward(plane, dplane, x0 + 1, y0, tx * (1.0 - ty), g, H, W, C,
                                    s_y, s_x, rmask, offs_c, cmask, NEED_PLANES, NEED_XYZ)
                g01 = _tap_backward(plane, dplane, x0, y0 + 1, (1.0 - tx) * ty, g, H, W, C,
                                    s_y, s_x, rmask, offs_c, cmask, NEED_PLANES, NEED_XYZ)
                g11 = _tap_backward(plane, dplane, x0 + 1, y0 + 1, tx * ty, g, H, W, C,
                                    s_y, s_x, rmask, offs_c, cmask, NEED_PLANES, NEED_XYZ)
                if NEED_XYZ:
                    # Bilinear derivative: d/dix = right - left taps, d/diy = bottom - top, each
                    # already reduced against g over the channels.
                    dix = (g10 - g00) * (1.0 - ty) + (g11 - g01) * ty
                    diy = (g01 - g00) * (1.0 - tx) + (g11 - g10) * tx
                    # dix/du = W/2, diy/dv = H/2; route them to the coordinates this plane reads.
                    du = dix * (W * 0.5)
                    dv = diy * (H * 0.5)
                    if PLANE == 0:
                        dq0 += du
                        dq1 += dv
                    elif PLANE == 1:
                        dq0 += du
                        dq2 += dv
                    else:
                        dq2 += du
                        if AXES == 0:
                            dq1 += dv
                        else:
                            dq0 += dv
            if NEED_XYZ:
                base = dxyz_ptr + row * 3
                tl.store(base + 0, dq0 * scale, mask=rmask)
                tl.store(base + 1, dq1 * scale, mask=rmask)
                tl.store(base + 2, dq2 * scale, mask=rmask)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def _launch_config(dtype: torch.dtype, backward: bool, block, num_warps) -> tuple[int, int]:
    """Default (points per program, warps): the settings with the least register spilling found
    by compiling the EG3D sizes (C=32, HID=64, F=32) for sm_90 (not timed on a GPU).

    fp32 dots are exact FMA dots whose operands are replicated per thread, so fp32 takes 32
    points; the backward keeps more tiles live and takes 32 in every dtype.
    """
    if block is None:
        block = 32 if backward or dtype == torch.float32 else 64
    if num_warps is None:
        num_warps = 8
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16 (tl.dot), got {block}")
    return int(block), int(num_warps)


def _pad(n: int) -> int:
    # tl.dot needs every dimension >= 16; tl.arange needs powers of two.
    return max(16, triton.next_power_of_2(max(int(n), 1)))


def _axes_id(axes) -> int:
    if isinstance(axes, str):
        return _AXES_BY_NAME[axes]
    if int(axes) not in (0, 1):
        raise ValueError(f"axes must be 0 (fixed) or 1 (eg3d), got {axes!r}")
    return int(axes)


def _check(planes_cl, xyz, w1, b1, w2, b2):
    if planes_cl.dim() != 5 or planes_cl.shape[1] != 3:
        raise ValueError(f"planes_cl must be [B, 3, H, W, C], got {tuple(planes_cl.shape)}")
    if planes_cl.stride(-1) != 1:
        raise ValueError("planes_cl must be channels-last (channel stride 1)")
    if planes_cl.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"planes dtype must be float32/float16/bfloat16, got {planes_cl.dtype}")
    B, _, H, W, C = planes_cl.shape
    if xyz.shape != (B, xyz.shape[1], 3) or xyz.dtype != torch.float32:
        raise ValueError(f"xyz must be float32 [B, N, 3], got {xyz.dtype} {tuple(xyz.shape)}")
    HID = w1.shape[0]
    if w1.shape != (HID, C) or b1.shape != (HID,) or w2.dim() != 2 or w2.shape[1] != HID \
            or b2.shape != (w2.shape[0],):
        raise ValueError("decoder weights must be w1 [HID, C], b1 [HID], w2 [O, HID], b2 [O]")
    for t in (w1, b1, w2, b2):
        if t.dtype != planes_cl.dtype:
            raise TypeError("decoder weights must have the planes' dtype")


def _common(planes_cl, xyz, w1, b1, w2, b2, box_warp, axes):
    _check(planes_cl, xyz, w1, b1, w2, b2)
    B, _, H, W, C = planes_cl.shape
    half = planes_cl.dtype != torch.float32
    return dict(
        planes=planes_cl, strides=tuple(planes_cl.stride()[:4]),
        xyz=xyz.contiguous(), w1=w1.contiguous(), b1=b1.contiguous(),
        w2=w2.contiguous(), b2=b2.contiguous(),
        B=B, N=xyz.shape[1], H=H, W=W, C=C, HID=w1.shape[0], O=w2.shape[0],
        scale=2.0 / float(box_warp), axes=_axes_id(axes), half=half,
        # fp32 weights: exact dots (matches the reference to ~1e-6); half weights: tf32 is as
        # precise as their storage and keeps the fp32 backward dots on the tensor cores.
        dot_prec="tf32" if half else "ieee",
        # The interpreter (CPU tensors) cannot dot bfloat16 operands; see _lowp_dot.
        lowp_dot=not (planes_cl.dtype == torch.bfloat16 and planes_cl.device.type == "cpu"),
    )


def field_forward(planes_cl, xyz, w1, b1, w2, b2, box_warp: float, axes: int,
                  block: int | None = None,
                  num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused triplane field forward.

    Args:
        planes_cl: ``[B, 3, H, W, C]`` channels-last planes (channel stride 1, other strides free),
            float32 / float16 / bfloat16.
        xyz: ``[B, N, 3]`` float32 points.
        w1 ``[HID, C]``, b1 ``[HID]``, w2 ``[O, HID]``, b2 ``[O]``: decoder weights, planes' dtype.
        box_warp: side of the scene cube. axes: 0 = "fixed", 1 = "eg3d" (names accepted too).
        block, num_warps: points per program (power of two, >= 16) and warps; None picks
            the defaults of :func:`_launch_config`.
    Returns:
        sigma ``[B, N, 1]`` and feat ``[B, N, O - 1]`` in the planes' dtype.
    """
    p = _common(planes_cl, xyz, w1, b1, w2, b2, box_warp, axes)
    block, num_warps = _launch_config(planes_cl.dtype, False, block, num_warps)
    B, N, O = p["B"], p["N"], p["O"]
    dtype, device = planes_cl.dtype, planes_cl.device
    sigma = torch.empty((B, N, 1), dtype=dtype, device=device)
    feat = torch.empty((B, N, O - 1), dtype=dtype, device=device)
    if B == 0 or N == 0:
        return sigma, feat
    grid = (triton.cdiv(N, block), B)
    _field_fwd_kernel[grid](
        p["planes"], *p["strides"],
        p["xyz"], p["w1"], p["b1"], p["w2"], p["b2"],
        sigma, feat if feat.numel() else sigma,  # O == 1: no feature is stored, any pointer does
        N, p["H"], p["W"], p["C"], p["HID"], O - 1, p["scale"],
        AXES=p["axes"], HALF=p["half"], LOWP_DOT=p["lowp_dot"], DOT_PREC=p["dot_prec"],
        BLOCK=block, CP=_pad(p["C"]), HP=_pad(p["HID"]), FP=_pad(O - 1),
        num_warps=num_warps,
    )
    return sigma, feat


def field_backward(grad_sigma, grad_feat, planes_cl, xyz, w1, b1, w2, b2, box_warp: float,
                   axes: int, needs: tuple[bool, bool, bool, bool, bool, bool],
                   block: int | None = None,
                   num_warps: int | None = None) -> tuple[torch.Tensor | None, ...]:
    """Fused triplane field backward (recomputes the forward per point).

    Args:
        grad_sigma: ``[B, N, 1]``, grad_feat: ``[B, N, O - 1]``, float32 or the planes' dtype.
        planes_cl, xyz, w1, b1, w2, b2, box_warp, axes: as in :func:`field_forward`.
        needs: which of (planes, xyz, w1, b1, w2, b2) want a gradient; the rest is skipped.
        block, num_warps: as in :func:`field_forward`.
    Returns:
        (dplanes_cl ``[B, 3, H, W, C]`` contiguous, dxyz ``[B, N, 3]``, dw1, db1, dw2, db2), all
        float32, None where not needed.
    """
    p = _common(planes_cl, xyz, w1, b1, w2, b2, box_warp, axes)
    block, num_warps = _launch_config(planes_cl.dtype, True, block, num_warps)
    B, N, H, W, C, HID, O = (p[k] for k in ("B", "N", "H", "W", "C", "HID", "O"))
    device = planes_cl.device
    needs = tuple(bool(n) for n in needs)
    if len(needs) != 6:
        raise ValueError("needs must have 6 entries (planes, xyz, w1, b1, w2, b2)")
    if tuple(grad_sigma.shape) != (B, N, 1) or tuple(grad_feat.shape) != (B, N, O - 1):
        raise ValueError(f"grad_sigma / grad_feat must be [B, N, 1] / [B, N, O - 1], got "
                         f"{tuple(grad_sigma.shape)} / {tuple(grad_feat.shape)}")

    def zeros(shape, need):
        return torch.zeros(shape, dtype=torch.float32, device=device) if need else None

    outs = (
        zeros((B, 3, H, W, C), needs[0]), zeros((B, N, 3), needs[1]),
        zeros((HID, C), needs[2]), zeros((HID,), needs[3]),
        zeros((O, HID), needs[4]), zeros((O,), needs[5]),
    )
    if B == 0 or N == 0 or not any(needs):
        return outs
    gs = grad_sigma.contiguous()
    gf = grad_feat.contiguous() if grad_feat.numel() else gs  # O == 1: never read
    dummy = p["xyz"]  # stands in for unneeded outputs; the constexpr flags keep it untouched
    ptrs = [o if o is not None else dummy for o in outs]
    grid = (triton.cdiv(N, block), B)
    _field_bwd_kernel[grid](
        p["planes"], *p["strides"],
        p["xyz"], p["w1"], p["b1"], p["w2"], p["b2"],
        gs, gf, *ptrs,
        N, H, W, C, HID, O - 1, p["scale"],
        AXES=p["axes"], HALF=p["half"], LOWP_DOT=p["lowp_dot"], DOT_PREC=p["dot_prec"],
        NEED_PLANES=needs[0], NEED_XYZ=needs[1], NEED_W1=needs[2],
        NEED_B1=needs[3], NEED_W2=needs[4], NEED_B2=needs[5],
        BLOCK=block, CP=_pad(C), HP=_pad(HID), FP=_pad(O - 1),
        num_warps=num_warps,
    )
    return outs
