"""Pure-PyTorch reference of occupancy-grid marching: every occupied cell tested as a box.

Independent of the kernels' cell walk (Amanatides-Woo): each ray is intersected with every occupied
cell's axis-aligned box, which is exact and simple, and costs O(rays x occupied cells).
"""
from __future__ import annotations

import torch


def unpack_bits(bits: torch.Tensor, res: int) -> torch.Tensor:
    """``[ceil(res^3 / 8)]`` uint8 -> ``[res, res, res]`` bool indexed ``[z, y, x]`` (LSB first)."""
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    flat = ((bits[:, None] >> shifts) & 1).bool().reshape(-1)[: res**3]
    return flat.reshape(res, res, res)


def pack_bits(occupied: torch.Tensor) -> torch.Tensor:
    """``[res, res, res]`` bool indexed ``[z, y, x]`` -> ``[ceil(res^3 / 8)]`` uint8 (LSB first)."""
    flat = occupied.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    flat = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, 8)
    weights = (1 << torch.arange(8, device=flat.device)).to(torch.uint8)
    return (flat * weights).sum(dim=1, dtype=torch.uint8)


def _slab(o, d, lo, hi):
    """Entry/exit depths of rays ``[M, 3]`` through boxes ``[K, 3]`` -> ``[M, K]`` each."""
    with torch.no_grad():
        inv = 1.0 / d  # +-inf for axis-parallel rays
        ta = (lo[None] - o[:, None]) * inv[:, None]
        tb = (hi[None] - o[:, None]) * inv[:, None]
        # 0 * inf = NaN when the origin lies on a face plane of a parallel ray: inside that slab.
        inside = (o[:, None] >= lo[None]) & (o[:, None] <= hi[None])
        t0 = torch.where(torch.isnan(ta) | torch.isnan(tb), torch.where(inside, -torch.inf, torch.inf), torch.minimum(ta, tb))
        t1 = torch.where(torch.isnan(ta) | torch.isnan(tb), torch.where(inside, torch.inf, -torch.inf), torch.maximum(ta, tb))
        return t0.amax(dim=-1), t1.amin(dim=-1)


def occupied_intervals(
    origins: torch.Tensor,
    dirs: torch.Tensor,
    t: torch.Tensor,
    bits: torch.Tensor,
    res: int,
    box: float,
    outside_occupied: bool,
) -> torch.Tensor:
    """First and last interval of each ray that passes through occupied space (reference).

    Args:
        origins: ``[B, R, 3]`` ray origins. dirs: ``[B, R, 3]`` ray directions.
        t: ``[B, R, S]`` sorted sample depths; intervals are ``[t_i, t_{i+1}]``.
        bits: ``[ceil(res^3 / 8)]`` uint8 occupancy bits of the cube ``[-box/2, box/2]^3``.
        res: cells per side. box: side of the cube.
        outside_occupied: whether space outside the cube counts as occupied.

    Returns:
        int32 ``[B, R, 2]``: inclusive interval range ``(k0, k1)``, ``(-1, -1)`` when none.
    """
    B, R, S = t.shape
    o, d, tt = origins.reshape(-1, 3), dirs.reshape(-1, 3), t.reshape(-1, S)
    t_lo, t_hi = tt[:, 0], tt[:, -1]
    occ = unpack_bits(bits, res)
    zyx = occ.nonzero().to(o.dtype)
    xyz = zyx.flip(-1)
    cell = box / res
    lo = xyz * cell - box / 2
    first = torch.full_like(t_lo, torch.inf)
    last = torch.full_like(t_lo, -torch.inf)
    if xyz.shape[0]:
        t0, t1 = _slab(o, d, lo, lo + cell)
        a = torch.maximum(t0, t_lo[:, None])
        b = torch.minimum(t1, t_hi[:, None])
        hit = a < b
        first = torch.where(hit, a, torch.inf).amin(dim=1)
        last = torch.where(hit, b, -torch.inf).amax(dim=1)
    if outside_occupied:
        half = torch.full((1, 3), box / 2, dtype=o.dtype, device=o.device)
        c0, c1 = _slab(o, d, -half, half)
        c0, c1 = c0[:, 0], c1[:, 0]
        hits = c0 < c1
        # The parts of [t_lo, t_hi] before the cube and after it (all of it for a miss).
        before_end = torch.where(hits, torch.minimum(c0, t_hi), t_hi)
        after_start = torch.where(hits, torch.maximum(c1, t_lo), t_lo)
        before = ~hits | (t_lo < c0)
        after = ~hits | (t_hi > c1)
        first = torch.where(before, torch.minimum(first, t_lo), first)
        last = torch.where(before, torch.maximum(last, before_end), last)
        first = torch.where(after, torch.minimum(first, after_start), first)
        last = torch.where(after, torch.maximum(last, t_hi), last)
    any_ = first <= last
    # Interval i overlaps [first, last] iff t_{i+1} >= first and t_i <= last.
    ok = (tt[:, 1:] >= first[:, None]) & (tt[:, :-1] <= last[:, None]) & any_[:, None]
    idx = torch.arange(S - 1, device=t.device)
    k0 = torch.where(ok, idx, S).amin(dim=1)
    k1 = torch.where(ok, idx, -1).amax(dim=1)
    none = ~ok.any(dim=1)
    k0 = torch.where(none, -1, k0)
    return torch.stack([k0, k1], dim=-1).to(torch.int32).reshape(B, R, 2)
