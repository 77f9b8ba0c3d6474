"""The EG3D triplane renderer: rays -> two-pass samples -> fused field -> fused compositing.

Two paths produce the same image:

- dense (training, any ``impl``; ``impl="torch"`` is the pure-PyTorch reference): EG3D exactly, 48
  stratified + 48 importance samples per ray, all evaluated;
- occupancy skipping (inference, ``grid=``): only coarse samples whose intervals cross occupied
  cells are evaluated (all in one field call, or in chunks of ``chunk`` depths so a ray stops
  once its transmittance falls under ``early_stop``); importance depths come from the same pdf as
  the dense path's and only those inside evaluated intervals, before the ray's transmittance
  falls under ``early_stop``, are kept; the evaluated samples are composited in depth order
  without merging their features (``_composite_selected``). With a full grid and
  ``early_stop=0`` it equals the dense render.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import nn

from ..ops import composite, composite_weights, triplane_field
from ..ops.layout import channels_last_buffer, planes_view
from ..ops.reference.composite import TRANSMITTANCE_EPS, interval_alpha, interval_weights, transmittance_before
from .cameras import generate_rays, ray_box_limits
from .occupancy_grid import OccupancyGrid
from .sampling import importance_depths, stratified_depths


class DecoderWeights(NamedTuple):
    """EG3D's OSGDecoder with its run-time scaling applied: w1 ``[64, 32]``, b1 ``[64]``, w2 ``[33, 64]``, b2 ``[33]``."""

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor


@dataclass(frozen=True)
class RenderConfig:
    """What EG3D's ``rendering_kwargs`` hold for the neural renderer (FFHQ defaults)."""

    resolution: int = 128
    ray_start: float | str = 2.25  # "auto" (with ray_end "auto"): the ray's entry into the cube
    ray_end: float | str = 3.3
    coarse_samples: int = 48
    importance_samples: int = 48
    box_warp: float = 1.0
    axes: str = "fixed"  # plane convention, see talk3d.ops.triplane_field

    def __post_init__(self):
        auto = (self.ray_start == "auto", self.ray_end == "auto")
        if auto[0] != auto[1]:
            raise ValueError("RenderConfig: ray_start and ray_end must both be 'auto' or both numbers")
        if not auto[0] and not (0 <= float(self.ray_start) < float(self.ray_end)):
            raise ValueError(f"RenderConfig: need 0 <= ray_start < ray_end, got {self.ray_start}, {self.ray_end}")
        if self.coarse_samples < 4 or self.importance_samples < 0:
            raise ValueError("RenderConfig: need coarse_samples >= 4 and importance_samples >= 0")
        if self.resolution < 1:
            raise ValueError(f"RenderConfig: resolution must be positive, got {self.resolution}")

    @property
    def coarse_step(self) -> float:
        """Spacing of the coarse samples (the occupancy grid's opacity step)."""
        if self.ray_start == "auto":
            return math.sqrt(3) * self.box_warp / (self.coarse_samples - 1)
        return (float(self.ray_end) - float(self.ray_start)) / (self.coarse_samples - 1)


class RenderRandoms(NamedTuple):
    """The random numbers of one render: ``[B, R, coarse]`` jitter and ``[B, R, importance]`` uniforms."""

    coarse_jitter: torch.Tensor
    importance_u: torch.Tensor


@dataclass
class RenderOutput:
    feature_image: torch.Tensor  # [B, F, H, W]; channels 0-2 are the low-resolution RGB
    depth: torch.Tensor          # [B, 1, H, W]
    weight_sum: torch.Tensor     # [B, 1, H, W]
    samples_per_ray: float       # field evaluations per ray, both passes


def _impls(impl: str) -> tuple[str, str]:
    """(field impl, composite impl) for the renderer's ``impl``."""
    if impl == "triton":
        return "triton", "auto"
    return impl, impl


def _check_inputs(planes, decoder, cameras):
    if not isinstance(planes, torch.Tensor) or planes.dim() != 5 or planes.shape[1] != 3:
        raise ValueError(f"render: planes must be [B, 3, C, H, W], got {getattr(planes, 'shape', type(planes))}")
    if not isinstance(cameras, torch.Tensor) or cameras.dim() != 2 or cameras.shape != (planes.shape[0], 25):
        raise ValueError(f"render: cameras must be [B={planes.shape[0]}, 25], got {getattr(cameras, 'shape', type(cameras))}")
    if not isinstance(decoder, DecoderWeights):
        decoder = DecoderWeights(*decoder)
    return decoder


class _SharedPlanes:
    """Planes that several field calls read: a channels-last buffer ``[B, 3, H, W, C]``, viewed as
    ``[B, 3, C, H, W]`` by each call (see :func:`talk3d.ops.layout.channels_last_buffer`)."""

    def __init__(self, planes: torch.Tensor):
        self.buffer = channels_last_buffer(planes)
        self.dtype = planes.dtype

    def view(self) -> torch.Tensor:
        return planes_view(self.buffer)


def _field(planes, decoder, xyz, cfg, impl):
    """sigma ``[B, N, 1]``, feat ``[B, N, F]`` at points ``[B, N, 3]``. ``planes``: ``[B, 3, C, H, W]``
    or :class:`_SharedPlanes`."""
    if isinstance(planes, _SharedPlanes):
        planes = planes.view()
    return triplane_field(planes, xyz, *decoder, box_warp=cfg.box_warp, axes=cfg.axes, impl=impl)


def _depth_limits(o, d, cfg):
    if cfg.ray_start == "auto":
        start, end, _ = ray_box_limits(o, d, cfg.box_warp)
        return start, end
    return cfg.ray_start, cfg.ray_end


def _to_image(x: torch.Tensor, res: int) -> torch.Tensor:
    B, R, C = x.shape
    return x.permute(0, 2, 1).reshape(B, C, res, res)


def render(
    planes: torch.Tensor,
    decoder,
    cameras: torch.Tensor,
    config: RenderConfig = RenderConfig(),
    *,
    impl: str = "auto",
    randoms: RenderRandoms | None = None,
    deterministic: bool = False,
    grid: OccupancyGrid | None = None,
    early_stop: float = 0.0,
    chunk: int | None = None,
    check_cameras: bool = True,
) -> RenderOutput:
    """Render feature images of triplanes from cameras.

    Args:
        planes: ``[B, 3, C, H, W]`` triplanes (any storage dtype the field op takes; cast the
            decoder to the same dtype for bf16/fp16 inference).
        decoder: :class:`DecoderWeights` (or a 4-tuple) with EG3D's scaling applied.
        cameras: ``[B, 25]`` EG3D camera labels.
        config: :class:`RenderConfig`.
        impl: back end of the field and compositing ops: ``"auto"``, ``"torch"`` (the pure-PyTorch
            reference path), ``"cpu"``, ``"cuda"`` or ``"triton"`` (field only).
        randoms: the render's random numbers; default: drawn from torch's generator.
        deterministic: fixed numbers instead (inference): no coarse jitter, ``u = linspace(0, 1)``.
        grid: an :class:`OccupancyGrid` to skip empty space (inference: no gradient flows).
        early_stop: with ``grid``, stop a ray once its transmittance falls under this (0: never):
            no importance sample past that point, nor coarse ones when ``chunk`` is set.
        chunk: with ``grid``, coarse samples per ray evaluated between termination checks; None
            (default): all in one pass. Each chunk is a field call and two host syncs: on the head
            scene (64², 4 % of the grid occupied, ``early_stop=1e-3``) one pass evaluates 27.3
            samples a ray against 26.3 in chunks of 8, and takes 45 ms against 51 on the CPU; on
            a GPU, where the chunked path was host-bound (9.4 ms against 3.4 dense on an H200),
            the saving in syncs should count for more (not yet measured there).
        check_cameras: False skips the cameras' checks (:func:`generate_rays`'s ``check``), for
            callers that made them already: :class:`talk3d.models.TalkingHead` checks once per call
            before any GPU work, the trainer's dataset when it loaded.

    Returns:
        :class:`RenderOutput`.
    """
    # Rays, depths and compositing weights need fp32 (an autocast bf16 matmul breaks the camera's
    # rotation check and moves samples by centimetres): the render follows the planes' dtype, never
    # autocast's.
    with torch.autocast(planes.device.type, enabled=False):
        return _render(planes, decoder, cameras, config, impl, randoms, deterministic, grid, early_stop, chunk,
                       check_cameras)


def _render(planes, decoder, cameras, config, impl, randoms, deterministic, grid, early_stop, chunk, check_cameras):
    decoder = _check_inputs(planes, decoder, cameras)
    o, d = generate_rays(cameras.float() if cameras.dtype != torch.float64 else cameras, config.resolution,
                         check=check_cameras)
    B, R = o.shape[:2]
    Sc, Si = config.coarse_samples, config.importance_samples
    if randoms is not None:
        if randoms.coarse_jitter.shape != (B, R, Sc) or randoms.importance_u.shape != (B, R, Si):
            raise ValueError(f"render: randoms must be [B, R, {Sc}] and [B, R, {Si}] with B={B}, R={R}")
    start, end = _depth_limits(o, d, config)
    t_c = stratified_depths(Sc, start, end, (B, R), jitter=None if randoms is None else randoms.coarse_jitter,
                            deterministic=deterministic, device=o.device, dtype=o.dtype)
    u = None if randoms is None else randoms.importance_u
    if grid is None:
        return _render_dense(planes, decoder, o, d, t_c, u, config, impl, deterministic)
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"render: chunk must be a positive int or None, got {chunk!r}")
    with torch.no_grad():
        return _render_skipping(planes, decoder, o, d, t_c, u, config, impl, deterministic, grid, early_stop, chunk)


def _points(o, d, t):
    """``[B, R, 3]`` rays at depths ``[B, R, S, 1]`` -> ``[B, R * S, 3]``."""
    B, R, S, _ = t.shape
    return (o[:, :, None] + d[:, :, None] * t).reshape(B, R * S, 3)


def _take_along_rays(order: torch.Tensor, *xs: torch.Tensor) -> list[torch.Tensor]:
    """``x[b, r, order[b, r, j]]`` for each x: samples ``[B, R, S, F]`` reordered along each ray by
    ``order`` ``[B, R, S, 1]``. Whole rows of F values through ``index_select`` (backward:
    ``index_add_``), not ``gather`` with the index expanded to every feature: on the CPU, for a 32²
    frame's 96 x 32 features, 1.5 / 3.6 ms forward / backward against 6.2 / 9.6 ms. Same values,
    bit for bit."""
    B, R, S, _ = order.shape
    rows = (torch.arange(B * R, device=order.device).mul_(S)[:, None] + order.reshape(B * R, S)).reshape(-1)
    return [x.reshape(B * R * S, -1).index_select(0, rows).reshape(B, R, S, -1) for x in xs]


def _render_dense(planes, decoder, o, d, t_c, u, cfg, impl, deterministic):
    f_impl, c_impl = _impls(impl)
    if f_impl != "torch":
        planes = _SharedPlanes(planes)  # channels-last once for both passes (and once in the backward)
    B, R, Sc, _ = t_c.shape
    Si = cfg.importance_samples
    sigma_c, feat_c = _field(planes, decoder, _points(o, d, t_c), cfg, f_impl)
    sigma_c, feat_c = sigma_c.reshape(B, R, Sc, 1), feat_c.reshape(B, R, Sc, -1)
    if Si > 0:
        with torch.no_grad():
            w_c = interval_weights(sigma_c.detach().to(t_c.dtype), t_c)
        t_f = importance_depths(t_c, w_c, Si, u=u, deterministic=deterministic)
        sigma_f, feat_f = _field(planes, decoder, _points(o, d, t_f), cfg, f_impl)
        sigma_f, feat_f = sigma_f.reshape(B, R, Si, 1), feat_f.reshape(B, R, Si, -1)
        t = torch.cat([t_c, t_f], dim=2)
        if c_impl != "torch":
            img, depth, wsum = _composite_unmerged(sigma_c, feat_c, sigma_f, feat_f, t, c_impl)
            res = cfg.resolution
            return RenderOutput(_to_image(img, res), _to_image(depth, res), _to_image(wsum, res), float(Sc + Si))
        t, order = torch.sort(t, dim=2, stable=True)
        sigma, feat = _take_along_rays(order, torch.cat([sigma_c, sigma_f], dim=2), torch.cat([feat_c, feat_f], dim=2))
    else:
        t, sigma, feat = t_c, sigma_c, feat_c
    sigma, feat, t = _composite_dtype(sigma, feat, t)
    # t is the stratified depths, or out of torch.sort: no sortedness check (a host sync a frame).
    img, depth, wsum = composite(sigma, feat, t, impl=c_impl, check_sorted=False)
    res = cfg.resolution
    return RenderOutput(_to_image(img, res), _to_image(depth, res), _to_image(wsum, res), float(Sc + Si))


def _slot_weights(sigma, t, impl):
    """Each sample's weight ``omega`` in the compositing's feature sum, with the samples left where
    they are: sigma, t ``[B, R, S, 1]`` in any order along each ray. Only the densities are put in
    depth order (a stable sort: ties keep the earlier slot first); ``composite_weights`` weighs
    them and the weights go back to the slots. Returns omega ``[B, R, S, 1]`` (slot order), depth
    and weight sum ``[B, R, 1]``, in sigma's dtype widened to fp32."""
    t, order = torch.sort(t, dim=2, stable=True)
    (sigma,) = _take_along_rays(order, sigma)
    sigma = _widened(sigma)  # the depths go in sigma's dtype: fp32 (see _widened)
    # t comes out of torch.sort: no sortedness check (on a GPU it would stall every frame on a sync).
    omega_sorted, depth, wsum = composite_weights(sigma, t.to(sigma.dtype), impl=impl, check_sorted=False)
    return torch.zeros_like(omega_sorted).scatter(2, order, omega_sorted), depth, wsum


def _composite_unmerged(sigma_c, feat_c, sigma_f, feat_f, t, impl):
    """Composite the coarse and fine samples without merging their features by depth.

    sigma_c / feat_c ``[B, R, Sc, 1 | F]`` and sigma_f / feat_f ``[B, R, Si, 1 | F]`` as the passes
    gave them; t ``[B, R, Sc + Si, 1]`` their depths, coarse then fine (not sorted). Each sample's
    weight comes from :func:`_slot_weights` and each pass's features are summed where they lie
    (a matrix product a ray). Equal to compositing the merged samples, without copying every
    feature row twice (concatenated, then gathered into depth order; at the release's sizes on an
    H200 that gather was 7.6 ms of a batch of 8 frames' 26.5-ms render, the largest cost after the
    field).

    Returns the feature image ``[B, R, F]``, depth and weight sum ``[B, R, 1]``.
    """
    Sc = sigma_c.shape[2]
    omega, depth, wsum = _slot_weights(torch.cat([sigma_c, sigma_f], dim=2), t, impl)
    feat_c, feat_f = _cpu_widened(feat_c), _cpu_widened(feat_f)
    omega = omega.to(feat_c.dtype)
    C = omega[:, :, :Sc].transpose(-1, -2) @ feat_c + omega[:, :, Sc:].transpose(-1, -2) @ feat_f  # [B, R, 1, F]
    return C[:, :, 0] * 2 - 1, depth, wsum


# Density given to samples left out of a composite (never evaluated): far enough below zero that
# softplus(mid - 1) of any interval touching one is exactly 0 in fp32, so the interval takes no
# light, whatever its length.
_LEFT_OUT_SIGMA = -1e30


def _composite_selected(sigma, t, selected, parts, offsets, impl):
    """Composite only the ``selected`` samples of each ray, in depth order, as if packed.

    sigma ``[B, R, S, 1]`` (the evaluated densities at their depth slots, anything elsewhere), t
    ``[B, R, S, 1]`` (each slot's depth; slots need not be sorted), selected ``[B, R, S]``; parts:
    :class:`_Samples` whose rows are the selected slots, part i's ``index`` counting from slot
    ``offsets[i]``; together they hold each selected slot once.

    Equal to :func:`composite` of the selected samples merged and packed by depth, without
    merging any feature row: left-out slots move past the last depth with a density that takes no
    light (``_LEFT_OUT_SIGMA``), so :func:`_slot_weights` gives each selected sample its weight,
    and each part's features are summed ray by ray with those weights
    (``segment_reduce``: in order, no atomics, so deterministic on a GPU too). The packed merge it
    replaces sorted every sample twice (by depth, then by ray), gathered every feature row, and
    counted the rays' samples with ``bincount`` (a host sync on a GPU).

    Returns the feature image ``[B, R, F]``, depth and weight sum ``[B, R, 1]``; depth as
    ``composite``'s, clamped to the range of the selected depths.
    """
    B, R, S, _ = t.shape
    keep = selected[..., None]
    t_real = torch.where(keep, t, t.new_tensor(float("-inf"))).amax()
    t_real_min = torch.where(keep, t, t.new_tensor(float("inf"))).amin()
    t = torch.where(keep, t, t_real + 1)
    sigma = torch.where(keep, _widened(sigma), _LEFT_OUT_SIGMA)
    omega, depth, wsum = _slot_weights(sigma, t, impl)
    depth = depth.clamp(t_real_min.to(depth.dtype), t_real.to(depth.dtype))  # not to the moved depths
    omega = omega.view(B * R, S)
    C = None
    for part, first in zip(parts, offsets):
        weighted = omega[part.ray, first + part.index][:, None] * _cpu_widened(part.feat)  # [M_i, F], fp32
        sums = torch.segment_reduce(weighted, "sum", lengths=part.count, unsafe=True)  # [B * R, F]
        C = sums if C is None else C + sums
    return (C * 2 - 1).view(B, R, -1), depth, wsum


def _widened(x: torch.Tensor) -> torch.Tensor:
    """Half-precision field outputs -> fp32, for compositing on any device.

    The compositing ops take sigma, features and depths in one dtype, and depths cannot be half:
    bf16 spaces numbers near EG3D's depths (2.25-3.3) 0.016 apart, coarser than the samples
    themselves (0.022 apart in the coarse pass, closer in the fine one), and fp16 0.002 apart.
    """
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _cpu_widened(x: torch.Tensor) -> torch.Tensor:
    """Half-precision features widened on the CPU only, as they always were there. A GPU keeps them
    half for the feature sum (a batched matrix product, accumulated in fp32 by cuBLAS)."""
    return _widened(x) if x.device.type == "cpu" else x


def _composite_dtype(sigma, feat, t):
    """sigma, feat and t as the compositing kernels take them: one dtype, at least fp32."""
    sigma, feat = _widened(sigma), _widened(feat)
    return sigma, feat, t.to(sigma.dtype)


class _Samples(NamedTuple):
    """Evaluated samples, packed ray by ray (rows ``b * R + r`` ascending): ray ``[M]`` (b * R + r),
    index ``[M]`` (along the ray's depths), sigma ``[M, 1]``, feat ``[M, F]``, and count ``[B * R]``
    (samples of each ray, so the rows of ray i are the count[i] after those of rays < i)."""
    ray: torch.Tensor
    index: torch.Tensor
    sigma: torch.Tensor
    feat: torch.Tensor
    count: torch.Tensor


def _eval_selected(planes, decoder, o, d, t, select, cfg, impl) -> _Samples:
    """Evaluate the field at the selected samples only. o, d ``[B, R, 3]``; t ``[B, R, S, 1]``;
    select ``[B, R, S]`` bool. Returns the selected samples packed, in row-major order of select.

    One field call for the whole batch: each batch element's selected points are packed to the
    front of its row of a ``[B, N_max, 3]`` tensor (N_max: the largest count; the padding is
    evaluated and dropped). Two host syncs a call (N_max and the index list), not a loop over
    the batch with a sync per element.
    """
    B, R, S, _ = t.shape
    F = decoder.w2.shape[0] - 1
    count = select.reshape(B * R, S).sum(dim=1)
    flat = select.reshape(B, R * S)
    n_max = int(flat.sum(dim=1).max())
    if n_max == 0:
        empty = torch.zeros(0, dtype=torch.long, device=t.device)
        none = dict(dtype=planes.dtype, device=t.device)
        return _Samples(empty, empty, torch.zeros(0, 1, **none), torch.zeros(0, F, **none), count)
    b, k = flat.nonzero(as_tuple=True)
    slot = flat.cumsum(dim=1).sub_(1)[b, k]  # position of each selected sample within its row
    r, j = k // S, k % S
    xyz = torch.zeros(B, n_max, 3, dtype=o.dtype, device=o.device)
    xyz[b, slot] = o[b, r] + d[b, r] * t[b, r, j]
    sigma, feat = _field(planes, decoder, xyz, cfg, impl)
    return _Samples(b * R + r, j, sigma[b, slot], feat[b, slot], count)


def _transmittance(sigma, t, valid):
    """Transmittance after all valid intervals: ``[B, R]``. sigma, t ``[B, R, S, 1]``, valid
    ``[B, R, S - 1]`` (the others let all light through, as in :func:`interval_weights`)."""
    alpha = interval_alpha(sigma, t, valid[..., None])
    return (1 - alpha + TRANSMITTANCE_EPS).prod(dim=-2)[..., 0]


def _render_skipping(planes, decoder, o, d, t_c, u, cfg, impl, deterministic, grid, early_stop, chunk):
    f_impl, c_impl = _impls(impl)
    if f_impl != "torch":
        planes = _SharedPlanes(planes)  # channels-last once here, not in each chunk's field call
    B, R, Sc, _ = t_c.shape
    Si = cfg.importance_samples
    ranges = grid.occupied_intervals(o, d, t_c[..., 0].contiguous(), impl="torch" if impl == "torch" else "auto")
    k0, k1 = ranges[..., 0:1].long(), ranges[..., 1:2].long()
    j = torch.arange(Sc, device=t_c.device)
    live = (k0 >= 0) & (j >= k0) & (j <= k1 + 1)  # [B, R, Sc] samples of live intervals
    # Only sigma is kept dense (termination and the importance pdf need it per coarse depth);
    # features stay packed, so memory and the final merge scale with the samples evaluated.
    sigma_c = torch.zeros(B * R, Sc, 1, dtype=planes.dtype, device=t_c.device)
    evaluated = torch.zeros(B, R, Sc, dtype=torch.bool, device=t_c.device)
    alive = live.any(dim=-1)
    parts = []
    chunk = Sc if chunk is None else chunk
    for j0 in range(0, Sc, chunk):
        sel = torch.zeros_like(evaluated)
        sel[..., j0:j0 + chunk] = live[..., j0:j0 + chunk] & alive[..., None]
        # (A chunk with nothing selected costs one sync; later chunks may hold other rays' samples.)
        part = _eval_selected(planes, decoder, o, d, t_c, sel, cfg, f_impl)
        sigma_c[part.ray, part.index] = part.sigma
        parts.append(part)
        evaluated |= sel
        if early_stop > 0:
            valid = evaluated[..., :-1] & evaluated[..., 1:]
            alive &= _transmittance(sigma_c.view(B, R, Sc, 1).to(t_c.dtype), t_c, valid) >= early_stop
    interval_live = evaluated[..., :-1] & evaluated[..., 1:]  # [B, R, Sc - 1]
    if Si > 0:
        # The dense path's pdf (skipped intervals only lose their ~0 weight), so the importance
        # depths land where the dense render puts them; those in skipped intervals are dropped.
        alpha = interval_alpha(sigma_c.view(B, R, Sc, 1).to(t_c.dtype), t_c, interval_live[..., None])
        t_before = transmittance_before(alpha)  # [B, R, Sc - 1, 1]
        w_c = alpha * t_before  # interval_weights, with the transmittance kept for early_stop
        t_f = importance_depths(t_c, w_c, Si, u=u, deterministic=deterministic)
        k = torch.searchsorted(t_c[..., 0].contiguous(), t_f[..., 0].contiguous(), right=True) - 1
        inside = (k >= 0) & (k <= Sc - 2)
        k = k.clamp(0, Sc - 2)
        sel_f = inside & interval_live.gather(2, k)
        if early_stop > 0:  # none past the depth where the coarse transmittance falls under it
            sel_f &= t_before[..., 0].gather(2, k) >= early_stop
        parts.append(_eval_selected(planes, decoder, o, d, t_f, sel_f, cfg, f_impl))
    # Composite the evaluated samples (coarse parts, then the fine one) as if packed in depth order,
    # without merging them: see _composite_selected.
    S_all = Sc + Si
    sel_all = evaluated if Si == 0 else torch.cat([evaluated, sel_f], dim=2)  # [B, R, S_all]
    t_all = t_c if Si == 0 else torch.cat([t_c, t_f], dim=2)  # [B, R, S_all, 1]
    sigma_all = torch.zeros(B * R, S_all, 1, dtype=sigma_c.dtype, device=t_c.device)
    sigma_all[:, :Sc] = sigma_c
    if Si > 0:
        sigma_all[parts[-1].ray, Sc + parts[-1].index] = parts[-1].sigma
    offsets = [0] * (len(parts) - (Si > 0)) + [Sc] * (Si > 0)  # each part's first depth slot
    M = sum(p.ray.numel() for p in parts)
    if M == 0:  # nothing occupied on any ray: an empty image
        F = decoder.w2.shape[0] - 1
        img = t_c.new_zeros(B * R, F)
        depth, wsum = t_c.new_zeros(B * R, 1), t_c.new_zeros(B * R, 1)
    else:
        img, depth, wsum = _composite_selected(sigma_all.view(B, R, S_all, 1), t_all, sel_all, parts, offsets, c_impl)
        img, depth, wsum = img.reshape(B * R, -1), depth.reshape(B * R, 1), wsum.reshape(B * R, 1)
    # Rays with no weight: the dense path's clamp sends their depth to the far end of all samples.
    depth = torch.where(wsum > 0, depth, t_c.max().to(depth.dtype))
    res = cfg.resolution
    shape = lambda x: _to_image(x.reshape(B, R, -1), res)  # noqa: E731
    return RenderOutput(shape(img), shape(depth), shape(wsum), M / (B * R))


class Renderer(nn.Module):
    """:func:`render` as a module holding its :class:`RenderConfig` and (optionally) a grid."""

    def __init__(self, config: RenderConfig = RenderConfig(), grid: OccupancyGrid | None = None):
        super().__init__()
        self.config = config
        self.grid = grid

    def forward(self, planes, decoder, cameras, **kwargs) -> RenderOutput:
        if self.grid is not None and not torch.is_grad_enabled() and "grid" not in kwargs:
            kwargs["grid"] = self.grid
        return render(planes, decoder, cameras, self.config, **kwargs)

    def density(self, planes: torch.Tensor, decoder) -> Callable[[torch.Tensor], torch.Tensor]:
        """``points [K, 3] -> softplus(sigma - 1) [K]``, max over the batch: the grid's density_fn."""
        decoder = DecoderWeights(*decoder)

        def fn(points: torch.Tensor) -> torch.Tensor:
            xyz = points.to(torch.float64 if planes.dtype == torch.float64 else torch.float32)
            xyz = xyz[None].expand(planes.shape[0], -1, -1).contiguous()
            sigma, _ = _field(planes, decoder, xyz, self.config, "auto")
            return torch.nn.functional.softplus(sigma.float() - 1).amax(dim=0)[..., 0]

        return fn
