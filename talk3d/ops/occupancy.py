"""Occupancy-grid marching: which intervals of each ray pass through occupied space.

Back ends: ``"torch"`` (the reference, :func:`talk3d.ops.reference.occupied_intervals`), ``"cpu"``
and ``"cuda"`` (``torch.ops.talk3d.occupied_intervals``: one cell walk per ray). The result is an
integer range and has no gradient.
"""
from __future__ import annotations

import math

import torch

from .. import extension
from . import backends
from .reference.occupancy import occupied_intervals as _reference

_IMPL_DTYPES = {"torch": (torch.float32, torch.float64), "cpu": (torch.float32, torch.float64),
                "cuda": (torch.float32, torch.float64)}


def occupied_intervals(
    origins: torch.Tensor,
    dirs: torch.Tensor,
    t: torch.Tensor,
    bits: torch.Tensor,
    res: int,
    box: float,
    outside_occupied: bool = False,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """First and last interval ``[t_i, t_{i+1}]`` of each ray that crosses an occupied cell.

    Args:
        origins: ``[B, R, 3]``, dirs: ``[B, R, 3]`` rays (float32/float64).
        t: ``[B, R, S]`` sorted sample depths (S >= 2), same dtype.
        bits: ``[ceil(res^3 / 8)]`` uint8 grid of the cube ``[-box/2, box/2]^3``; cell (x, y, z)
            is bit ``(z * res + y) * res + x``, least significant bit first.
        res: cells per side. box: cube side (EG3D's ``box_warp``).
        outside_occupied: whether space outside the cube (constant field) counts as occupied.
        impl: ``"auto"``, ``"torch"``, ``"cpu"`` or ``"cuda"``.

    Returns:
        int32 ``[B, R, 2]``: ``(k0, k1)`` inclusive, or ``(-1, -1)`` for a ray through empty space
        only. With every cell and the outside occupied it is ``(0, S - 2)`` for every ray.
    """
    for name, x in (("origins", origins), ("dirs", dirs), ("t", t), ("bits", bits)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"occupied_intervals: {name} must be a torch.Tensor")
    if origins.dim() != 3 or origins.shape[-1] != 3 or dirs.shape != origins.shape:
        raise ValueError(f"occupied_intervals: origins and dirs must be [B, R, 3], got {tuple(origins.shape)}, {tuple(dirs.shape)}")
    if t.dim() != 3 or t.shape[:2] != origins.shape[:2] or t.shape[2] < 2:
        raise ValueError(f"occupied_intervals: t must be [B, R, S >= 2] matching origins, got {tuple(t.shape)}")
    if not (isinstance(res, int) and res > 0):
        raise ValueError(f"occupied_intervals: res must be a positive int, got {res!r}")
    if not (isinstance(box, (int, float)) and math.isfinite(box) and box > 0):
        raise ValueError(f"occupied_intervals: box must be a positive finite number, got {box!r}")
    if bits.dtype != torch.uint8 or bits.shape != ((res**3 + 7) // 8,):
        raise ValueError(f"occupied_intervals: bits must be uint8 [{(res**3 + 7) // 8}] for res {res}, got {bits.dtype} {tuple(bits.shape)}")
    if dirs.dtype != origins.dtype or t.dtype != origins.dtype:
        raise TypeError("occupied_intervals: origins, dirs and t must share one dtype")
    impl = backends.resolve_impl("occupied_intervals", impl, origins, _IMPL_DTYPES)
    if impl == "torch":
        return _reference(origins, dirs, t, bits, res, float(box), bool(outside_occupied))
    return torch.ops.talk3d.occupied_intervals(origins, dirs, t, bits, res, float(box), bool(outside_occupied))


def _fake(origins, dirs, t, bits, res, box, outside_occupied):
    return origins.new_empty(*origins.shape[:2], 2, dtype=torch.int32)


if extension.available():
    extension.load()
    torch.library.register_fake("talk3d::occupied_intervals")(_fake)
