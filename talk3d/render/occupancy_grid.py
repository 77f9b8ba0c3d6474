"""A bit-packed occupancy grid over the triplane cube, kept up to date the way nerfacc's
``OccGridEstimator`` does (EMA of the max opacity, warm-up on every cell, then a random quarter
plus the occupied cells, threshold ``min(mean, 0.01)``).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ..ops import occupied_intervals
from ..ops.reference.occupancy import pack_bits, unpack_bits


class OccupancyGrid(nn.Module):
    """Which cells of the cube ``[-box/2, box/2]^3`` hold density, as ``res^3`` bits.

    The grid stores per-cell opacity ``density * step_size`` (an EMA of the max seen), and the
    bits ``opacity > threshold``.

    The cube must hold every point the renderer samples, not just the triplane's own cube: a point
    outside the triplane cube in one axis still reads the plane spanned by the other two, so the
    field is not empty there. EG3D's FFHQ cameras (radius 2.7, depths 2.25-3.3, yaw +-30, pitch
    +-20) sample within about [-0.75, 0.75]^3, hence the default side 1.6 for box_warp 1. Space
    outside the grid's cube counts as occupied (``outside``, default True), so a grid that is too
    small costs speed, never pixels.

    Args:
        resolution: cells per side (default 128, as nerfacc).
        box: side of the grid's cube, centred at the origin.
        ema_decay: ``occ = max(decay * occ, new)`` on every update.
        threshold: upper bound of the occupancy threshold, ``min(mean opacity, threshold)``.
        warmup_steps: updates before this step refresh every cell; later ones a random quarter
            plus the occupied cells.
        update_every: :meth:`update_every_n_steps` refreshes on steps divisible by this.
    """

    def __init__(self, resolution: int = 128, box: float = 1.6, *, ema_decay: float = 0.95,
                 threshold: float = 0.01, warmup_steps: int = 256, update_every: int = 16):
        super().__init__()
        if not (isinstance(resolution, int) and 1 <= resolution <= 1024):
            raise ValueError(f"OccupancyGrid: resolution must be an int in [1, 1024], got {resolution!r}")
        if not (math.isfinite(box) and box > 0):
            raise ValueError(f"OccupancyGrid: box must be positive, got {box!r}")
        self.resolution, self.box = resolution, float(box)
        self.ema_decay, self.threshold = float(ema_decay), float(threshold)
        self.warmup_steps, self.update_every = int(warmup_steps), int(update_every)
        n = resolution**3
        self.register_buffer("opacity", torch.zeros(n))
        self.register_buffer("bits", torch.zeros((n + 7) // 8, dtype=torch.uint8))
        self.register_buffer("outside", torch.ones((), dtype=torch.bool))
        self._sync_outside(True)  # the buffer's value, kept on the host (_outside_flag)

    # --- state ------------------------------------------------------------------------------

    @property
    def occupied(self) -> torch.Tensor:
        """``[res, res, res]`` bool, indexed ``[z, y, x]``."""
        return unpack_bits(self.bits, self.resolution)

    def occupied_fraction(self) -> float:
        return float(self.occupied.float().mean())

    def fill(self, occupied: bool = True) -> "OccupancyGrid":
        """Mark every cell and the outside occupied (or empty): a full grid renders exactly dense."""
        self.bits.fill_(0xFF if occupied else 0)
        self._set_outside(bool(occupied))
        return self

    def set_occupied(self, occupied: torch.Tensor, outside: bool = True) -> "OccupancyGrid":
        """Set the bits from a ``[res, res, res]`` bool tensor indexed ``[z, y, x]``."""
        r = self.resolution
        if occupied.shape != (r, r, r):
            raise ValueError(f"OccupancyGrid.set_occupied: expected [{r}, {r}, {r}], got {tuple(occupied.shape)}")
        self.bits.copy_(pack_bits(occupied.to(self.bits.device).bool()))
        self._set_outside(bool(outside))
        return self

    # --- updates ----------------------------------------------------------------------------

    def cell_points(self, index: torch.Tensor, jitter: bool = True,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """World points ``[K, 3]`` in the cells ``index [K]`` (random inside each, drawn from
        ``generator`` or torch's global one; or the centres)."""
        r = self.resolution
        x, y, z = index % r, (index // r) % r, index // (r * r)
        ijk = torch.stack([x, y, z], dim=-1).to(self.opacity.dtype)
        offset = (torch.rand(ijk.shape, generator=generator, dtype=ijk.dtype, device=ijk.device) if jitter
                  else torch.full_like(ijk, 0.5))
        return (ijk + offset) / r * self.box - self.box / 2

    @torch.no_grad()
    def update(self, step: int, density_fn: Callable[[torch.Tensor], torch.Tensor], step_size: float,
               *, chunk: int = 1 << 18, generator: torch.Generator | None = None) -> None:
        """Refresh the grid from the field.

        Args:
            step: training step (decides warm-up or partial refresh).
            density_fn: world points ``[K, 3]`` -> activated density ``[K]`` (EG3D:
                ``softplus(sigma - 1)``).
            step_size: the render's sample spacing; opacity = density * step_size.
            generator: draws the cells' probe points (and the partial refresh's cells); None:
                torch's global generator. A seeded one makes the grid a function of the field alone.
        """
        n = self.opacity.numel()
        device = self.opacity.device
        if step < self.warmup_steps:
            index = torch.arange(n, device=device)
        else:
            uniform = torch.randint(0, n, (n // 4,), device=device, generator=generator)
            index = torch.cat([uniform, self.occupied.reshape(-1).nonzero()[:, 0]]).unique()
        points = (self.cell_points(index[i:i + chunk], generator=generator) for i in range(0, index.numel(), chunk))
        new = torch.cat([density_fn(p).reshape(-1).to(self.opacity) for p in points]) * step_size
        self.opacity[index] = torch.maximum(self.opacity[index] * self.ema_decay, new)
        thre = min(float(self.opacity.mean()), self.threshold)
        r = self.resolution
        self.bits.copy_(pack_bits((self.opacity > thre).reshape(r, r, r)))

    def update_every_n_steps(self, step: int, density_fn, step_size: float) -> bool:
        """:meth:`update` on steps divisible by ``update_every``; returns whether it ran."""
        if step % self.update_every:
            return False
        self.update(step, density_fn, step_size)
        return True

    # --- marching ---------------------------------------------------------------------------

    def occupied_intervals(self, origins: torch.Tensor, dirs: torch.Tensor, t: torch.Tensor,
                           impl: str = "auto") -> torch.Tensor:
        """``[B, R, 2]`` first/last interval of each ray through occupied space (see the op)."""
        return occupied_intervals(origins, dirs, t, self.bits, self.resolution, self.box,
                                  self._outside_flag(), impl=impl)

    def _outside_flag(self) -> bool:
        """``outside`` as a Python bool, read from the buffer only after it changed behind the
        grid's back (reading a GPU tensor's value waits for the device; a render would wait once a
        frame). The grid's own writers (fill, set_occupied, ``outside_occupied =``,
        load_state_dict) update both. Other changes are seen by the buffer's identity (``.to()``,
        reassignment) and version counter (in-place writes); a buffer made in inference mode has
        no version counter, so in-place writes to it by hand are not seen: use
        ``outside_occupied``."""
        buf = self.outside
        seen = self.__dict__.get("_outside_seen")
        if seen is None or seen[0] is not buf or (not buf.is_inference() and seen[1] != buf._version):
            self._sync_outside(bool(buf))
        return self._outside

    def _sync_outside(self, value: bool) -> None:
        buf = self.outside
        object.__setattr__(self, "_outside", value)
        object.__setattr__(self, "_outside_seen", (buf, -1 if buf.is_inference() else buf._version))

    @property
    def outside_occupied(self) -> bool:
        """Whether space outside the grid's cube counts as occupied."""
        return self._outside_flag()

    @outside_occupied.setter
    def outside_occupied(self, value: bool) -> None:
        self._set_outside(bool(value))

    def _set_outside(self, value: bool) -> None:
        self.outside.fill_(value)
        self._sync_outside(value)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._sync_outside(bool(self.outside))  # once, at load


#: Bounds of :func:`grid_resolution_for` (cells per side).
MIN_GRID_RESOLUTION, MAX_GRID_RESOLUTION = 16, 128


def grid_resolution_for(config, box: float = 1.6) -> int:
    """Cells per side so that a cell is about one coarse sample spacing of ``config`` (a
    :class:`RenderConfig`), rounded up to a multiple of 8, within [16, 128].

    Skipping decides per coarse interval, so cells much finer than the spacing skip little more,
    while building the grid costs ``res^3`` field evaluations per frame. EG3D's sampling (48 coarse
    samples over depths 2.25..3.3) gives 72; the CPU demo's 12 coarse samples give 24.
    """
    cells = box / config.coarse_step
    return int(min(MAX_GRID_RESOLUTION, max(MIN_GRID_RESOLUTION, 8 * math.ceil(cells / 8))))
