"""EG3D's two-pass depth sampling: stratified coarse depths, then importance depths from their weights.

Every random number can be passed in (``jitter``, ``u``), so a test can feed an independent
implementation the same draws; ``deterministic=True`` replaces them with fixed values for inference
(coarse depths on the linspace, importance uniforms ``linspace(0, 1, n)`` as EG3D's ``det`` mode).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: Added to the smoothed coarse weights before sampling (EG3D): keeps some samples everywhere.
WEIGHT_FLOOR = 0.01
#: Added to the pdf before normalising, and the smallest CDF step that is divided by (EG3D).
PDF_EPS = 1e-5


def _generator(generator: torch.Generator | None) -> dict:
    """``generator=`` for torch.rand only when there is one: its overload with a generator takes
    concrete sizes only, and a compiled batch of symbolic size (torch.compile's dynamic shapes)
    then fails to trace."""
    return {} if generator is None else {"generator": generator}


def stratified_depths(
    n: int,
    ray_start,
    ray_end,
    shape: tuple[int, int],
    *,
    jitter: torch.Tensor | None = None,
    deterministic: bool = False,
    generator: torch.Generator | None = None,
    device=None,
    dtype=torch.float32,
) -> torch.Tensor:
    """Coarse depths ``linspace(start, end, n) + U[0, 1) * (end - start) / (n - 1)``.

    Args:
        n: samples per ray (>= 2).
        ray_start, ray_end: floats, or ``[B, R, 1]`` per-ray limits (the ray-box 'auto' mode).
        shape: ``(B, R)``.
        jitter: optional ``[B, R, n]`` uniforms in [0, 1) (EG3D draws them even at inference, so
            samples can pass ``ray_end``).
        deterministic: no jitter (depths exactly on the linspace).

    Returns:
        ``[B, R, n, 1]`` sorted depths.
    """
    if n < 2:
        raise ValueError(f"stratified_depths: need at least 2 samples per ray, got {n}")
    B, R = shape
    if isinstance(ray_start, torch.Tensor):
        device, dtype = ray_start.device, ray_start.dtype
    steps = torch.linspace(0, 1, n, device=device, dtype=dtype)
    start = ray_start if isinstance(ray_start, torch.Tensor) else torch.tensor(float(ray_start), device=device, dtype=dtype)
    end = ray_end if isinstance(ray_end, torch.Tensor) else torch.tensor(float(ray_end), device=device, dtype=dtype)
    if not isinstance(ray_start, torch.Tensor) and not float(ray_start) < float(ray_end):
        raise ValueError(f"stratified_depths: ray_start {ray_start} must be < ray_end {ray_end}")
    t = start + (end - start) * steps  # [n] or [B, R, n]
    t = t.expand(B, R, n)
    if jitter is not None:  # the caller's numbers (tests, reproductions): checked, one read-back
        if jitter.shape != (B, R, n):
            raise ValueError(f"stratified_depths: jitter must be [B={B}, R={R}, n={n}], got {tuple(jitter.shape)}")
        if not bool(((jitter >= 0) & (jitter < 1)).all()):
            # Outside [0, 1) the depths could leave their bins and come out unsorted, which the
            # compositing (fed these depths unchecked) would turn into a wrong image.
            raise ValueError("stratified_depths: jitter must lie in [0, 1)")
    elif not deterministic:
        jitter = torch.rand(B, R, n, device=device, dtype=dtype, **_generator(generator))
    if jitter is not None:
        t = t + jitter.to(t) * (end - start) / (n - 1)
    return t.unsqueeze(-1).contiguous()


def smoothed_weights(weights: torch.Tensor) -> torch.Tensor:
    """EG3D's smoothing of coarse interval weights: max-pool (2, stride 1, pad 1), avg-pool (2, 1), + 0.01.

    Args:
        weights: ``[M, S - 1]`` interval weights.
    Returns:
        ``[M, S - 1]``.
    """
    w = F.max_pool1d(weights.unsqueeze(1).float(), 2, 1, padding=1)
    w = F.avg_pool1d(w, 2, 1).squeeze(1)
    return w.to(weights.dtype) + WEIGHT_FLOOR


def invert_cdf(bins: torch.Tensor, weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Draw depths from the piecewise-constant pdf ``weights`` over ``bins`` by inverting its CDF.

    Follows EG3D's inversion: bins ``[bins_k, bins_{k+1}]`` for ``k < W`` carry weight ``k`` (bins
    has more edges than there are weights; the extra edges at the end are never reached). The
    caller adds EG3D's ``PDF_EPS`` to the weights (:func:`importance_depths`). A row of weights that
    sums to zero is not divided by its sum: its depths are the edge ``bins_W`` (finite, not NaN).

    Args:
        bins: ``[M, K]`` sorted edges. weights: ``[M, W]`` with ``W <= K - 1``, non-negative.
        u: ``[M, n]`` uniforms in [0, 1].
    Returns:
        ``[M, n]`` depths.
    """
    W = weights.shape[1]
    total = weights.sum(dim=-1, keepdim=True)
    pdf = weights / torch.where(total > 0, total, torch.ones_like(total))
    cdf = torch.cat([torch.zeros_like(pdf[:, :1]), torch.cumsum(pdf, dim=-1)], dim=-1)  # [M, W + 1]
    idx = torch.searchsorted(cdf, u.contiguous(), right=True)
    lo = (idx - 1).clamp_min(0)
    hi = idx.clamp_max(W)
    cdf_lo, cdf_hi = cdf.gather(1, lo), cdf.gather(1, hi)
    bin_lo, bin_hi = bins.gather(1, lo), bins.gather(1, hi)
    step = cdf_hi - cdf_lo
    step = torch.where(step < PDF_EPS, torch.ones_like(step), step)
    return bin_lo + (u - cdf_lo) / step * (bin_hi - bin_lo)


def importance_depths(
    t: torch.Tensor,
    weights: torch.Tensor,
    n: int,
    *,
    u: torch.Tensor | None = None,
    deterministic: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """EG3D's importance depths from the coarse pass (no gradient).

    The ``S - 1`` coarse interval weights are smoothed (:func:`smoothed_weights`); the interior
    ``S - 3`` of them weight the bins between the coarse interval midpoints, and ``n`` depths are
    drawn by inverting the CDF.

    Args:
        t: ``[B, R, S, 1]`` coarse depths. weights: ``[B, R, S - 1, 1]`` coarse interval weights.
        n: depths to draw per ray.
        u: optional ``[B, R, n]`` uniforms in [0, 1) (EG3D: plain, not stratified, uniforms).
        deterministic: ``u = linspace(0, 1, n)`` (EG3D's ``det``).

    Returns:
        ``[B, R, n, 1]`` depths (not sorted).
    """
    B, R, S, _ = t.shape
    if S < 4:
        raise ValueError(f"importance_depths: EG3D's smoothing needs at least 4 coarse samples, got {S}")
    with torch.no_grad():
        tt = t.reshape(B * R, S)
        w = smoothed_weights(weights.reshape(B * R, S - 1))
        mids = (tt[:, :-1] + tt[:, 1:]) / 2
        interior = w[:, 1:-1] + PDF_EPS
        if u is None:
            if deterministic:
                u = torch.linspace(0, 1, n, device=t.device, dtype=t.dtype).expand(B * R, n)
            else:
                u = torch.rand(B * R, n, device=t.device, dtype=t.dtype, **_generator(generator))
        elif u.shape != (B, R, n):
            raise ValueError(f"importance_depths: u must be [B={B}, R={R}, n={n}], got {tuple(u.shape)}")
        out = invert_cdf(mids, interior, u.reshape(B * R, n).to(t.dtype))
        return out.reshape(B, R, n, 1)
