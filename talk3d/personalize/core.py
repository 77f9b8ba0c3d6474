"""VIVE3D-style personalisation of the triplane generator (Talk3D section 3.2).

1. Joint inversion of M frames: a shared identity latent ``w_ID`` plus per-frame offsets ``o_m``
   (in W, one vector for every layer, as the paper and release; W+ on request) and per-frame
   yaw/pitch refinements of the cameras, the generator frozen.
2. Pivotal tuning (PTI): the generator's synthesis backbone and decoder are fine-tuned on the same
   frames at the fixed pivots ``w_ID + o_m`` (the super-resolution stays the prior's, as in the
   release), optionally with PTI's locality regulariser (off by default: the release weighs it
   1e-4, in effect off).

The per-frame inversion of the whole video on the tuned generator (the paper's last step) is in
:mod:`talk3d.personalize.track`; without a prior, :mod:`talk3d.personalize.scratch` trains the
generator from random weights instead of steps 1-2.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..models import TriplaneGenerator

__all__ = ["PersonalizeConfig", "PersonalizationResult", "personalize", "refine_cameras",
           "reconstruction_loss", "render_frames"]


@dataclass
class PersonalizeConfig:
    """Settings of :func:`personalize` (defaults: the public release where it states them)."""

    invert_steps: int = 600          # release: 600 joint-inversion steps
    tune_steps: int = 400            # release: about 400 fine-tuning steps
    lr_invert: float = 0.01          # Adam on w_ID and the offsets (PTI's inversion rate)
    lr_camera: float = 1e-3          # Adam on the yaw/pitch deltas (radians)
    lr_tune: float = 1e-3            # release: 1e-3
    latent_space: str = "w"          # "w": one w_dim vector for every layer (the paper's, release's); "w+": per layer
    offset_weight: float = 1.0       # pulls each o_m towards 0 so w_ID carries the identity
    camera_weight: float = 10.0      # keeps refined cameras near the tracked ones (per rad^2)
    raw_weight: float = 1.0          # L1 of the low-res render vs the downsampled target
    lpips_weight: float = 1.0        # used only when an LPIPS module is given
    background_weight: float = 0.25  # loss weight outside the face mask (1: unmasked)
    # PTI's locality regulariser. Off: the release weighs it 1e-4 (in effect off), and at 1 it held a
    # tiny test's tuning L1 at 0.20 where it fell to 0.12 without (2026-12-07).
    locality_weight: float = 0.0
    locality_step: float = 0.1       # off-pivot latent: pivot + step * unit(w(z) - pivot) (the release's 0.1)
    locality_psi: float = 0.5        # truncation of the random w(z) (the release's)
    locality_samples: int = 1        # random latents per tuning step
    tune_superresolution: bool = False  # the release tunes the backbone and decoder; the SR stays the prior's
    tune_stop_lpips: float = 0.006   # tuning stops once the frames' LPIPS, summed, is at most this (the release's)
    tune_stop_l1: float = 0.0        # ... or their image L1 (0: off; the L1-only fallback's threshold)
    deterministic: bool = True       # fixed render samples: a smooth, reproducible objective
    impl: str = "auto"
    seed: int = 0


@dataclass
class PersonalizationResult:
    """What :func:`personalize` returns.

    generator: the tuned :class:`TriplaneGenerator` (eval mode, gradients off).
    w_id: ``[1, num_ws, w_dim]`` shared identity latent (in W: the same vector in every row).
    offsets: ``[M, num_ws, w_dim]`` per-frame offsets (pivots are ``w_id + offsets``).
    cameras: ``[M, 25]`` refined camera labels; ``camera_deltas`` ``[M, 2]`` (yaw, pitch) radians.
    history: one dict of losses per step (``phase`` 'invert' or 'tune').
    """

    generator: TriplaneGenerator
    w_id: torch.Tensor
    offsets: torch.Tensor
    cameras: torch.Tensor
    camera_deltas: torch.Tensor
    history: list = field(default_factory=list)


def _rot(yaw: torch.Tensor, pitch: torch.Tensor) -> torch.Tensor:
    """yaw, pitch ``[M]`` -> ``R_y(yaw) @ R_x(pitch)`` ``[M, 3, 3]`` (differentiable)."""
    cy, sy, cp, sp = torch.cos(yaw), torch.sin(yaw), torch.cos(pitch), torch.sin(pitch)
    o, i = torch.zeros_like(yaw), torch.ones_like(yaw)
    ry = torch.stack([cy, o, sy, o, i, o, -sy, o, cy], -1).reshape(-1, 3, 3)
    rx = torch.stack([i, o, o, o, cp, -sp, o, sp, cp], -1).reshape(-1, 3, 3)
    return ry @ rx


def refine_cameras(cameras: torch.Tensor, deltas: torch.Tensor, pivot) -> torch.Tensor:
    """Orbit each camera about ``pivot`` by small yaw/pitch angles.

    Args:
        cameras: ``[M, 25]`` EG3D labels (cam2world row-major + normalised intrinsics).
        deltas: ``[M, 2]`` (yaw, pitch) radians; yaw about world +y, pitch about world +x.
        pivot: 3 numbers, the point the cameras orbit (the rig's pivot).

    Returns:
        ``[M, 25]`` labels, differentiable in ``deltas``; equal to ``cameras`` at zero deltas.
    """
    m = cameras.shape[0]
    c2w = cameras[:, :16].reshape(m, 4, 4)
    rot = _rot(deltas[:, 0], deltas[:, 1]).to(cameras.dtype)  # [M, 3, 3]
    p = torch.as_tensor(pivot, dtype=cameras.dtype, device=cameras.device)
    new_r = rot @ c2w[:, :3, :3]
    new_t = (rot @ (c2w[:, :3, 3] - p)[..., None])[..., 0] + p
    top = torch.cat([new_r, new_t[..., None]], -1)  # [M, 3, 4]
    c2w_new = torch.cat([top, c2w[:, 3:4, :]], 1)  # [M, 4, 4]
    return torch.cat([c2w_new.reshape(m, 16), cameras[:, 16:]], 1)


def _masked_l1(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """x, y ``[B, 3, H, W]``; weight ``[B, 1, H, W]`` or None -> per-image ``[B]`` weighted mean |x - y|."""
    d = (x - y).abs().mean(1, keepdim=True)
    if weight is None:
        return d.flatten(1).mean(1)
    return (d * weight).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp_min(1e-8)


def reconstruction_loss(out: dict, target: torch.Tensor, mask: torch.Tensor | None, cfg: PersonalizeConfig,
                        lpips: nn.Module | None = None) -> tuple[torch.Tensor, dict]:
    """Per-image reconstruction loss of a render against its frame.

    Args:
        out: :meth:`TriplaneGenerator.synthesis` output (``image`` ``[B, 3, S, S]``, ``image_raw``
            ``[B, 3, h, h]``).
        target: ``[B, 3, S, S]`` in [-1, 1].
        mask: ``[B, 1, S, S]`` face mask in [0, 1], or None (unmasked).

    Returns:
        (loss ``[B]``, dict of scalar floats for the log).
    """
    weight = None
    if mask is not None and cfg.background_weight < 1:
        # The face decides the identity, but the rest of the frame is reconstructed too by the
        # later training, so the background keeps a small weight instead of none.
        weight = mask + cfg.background_weight * (1 - mask)
    l1 = _masked_l1(out["image"], target, weight)
    h = out["image_raw"].shape[-1]
    small = F.interpolate(target, size=(h, h), mode="area")
    w_small = None if weight is None else F.interpolate(weight, size=(h, h), mode="area")
    l1_raw = _masked_l1(out["image_raw"], small, w_small)
    loss = l1 + cfg.raw_weight * l1_raw
    logs = {"l1": float(l1.detach().mean()), "l1_raw": float(l1_raw.detach().mean())}
    if lpips is not None and cfg.lpips_weight > 0:
        lp = lpips(out["image"], target)  # [B]
        loss = loss + cfg.lpips_weight * lp
        logs["lpips"] = float(lp.detach().mean())
    return loss, logs


def render_frames(gen: TriplaneGenerator, ws: torch.Tensor, cameras: torch.Tensor, *, impl: str = "auto",
                  deterministic: bool = True, chunk: int = 4) -> dict:
    """Render ws ``[M, num_ws, w_dim]`` from cameras ``[M, 25]`` in chunks -> dict of ``image``, ``image_raw``."""
    outs = [gen.synthesis(ws[i:i + chunk], cameras[i:i + chunk], impl=impl, deterministic=deterministic)
            for i in range(0, ws.shape[0], chunk)]
    return {k: torch.cat([o[k] for o in outs]) for k in ("image", "image_raw")}


def _step(opt, loss: torch.Tensor, logs: dict, history: list, bar, **record) -> None:
    """One optimiser step on ``loss``; the step's losses (``logs`` + ``record``) go to the history and the bar."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    logs.update(loss=float(loss.detach()), **record)
    history.append(logs)
    bar.set_postfix(l1=f"{logs['l1']:.4f}", refresh=False)  # the update redraws, at its pace
    bar.update()


def _bar(total: int, desc: str, progress: bool):
    from ..progress import progress_bar
    import sys
    return progress_bar(total=total, desc=desc, unit="step", disable=not progress, file=sys.stderr, leave=False)


def invert(gen: TriplaneGenerator, frames: dict, cfg: PersonalizeConfig, *, lpips: nn.Module | None = None,
           progress: bool = False, history: list | None = None, pivot=None):
    """Joint inversion with the generator frozen.

    Args:
        frames: ``image`` ``[M, 3, S, S]``, ``camera`` ``[M, 25]``, optional ``face_mask`` ``[M, 1, S, S]``.
        pivot: the point the cameras' yaw/pitch refinement orbits (the dataset rig's); None: the
            generator's ``camera_pivot``.

    Returns:
        (w_id ``[1, num_ws, w_dim]``, offsets ``[M, num_ws, w_dim]``, deltas ``[M, 2]``), detached;
        in W (``cfg.latent_space``) every layer's row is the same vector.
    """
    if cfg.latent_space not in ("w", "w+"):
        raise ValueError(f"personalize: latent_space must be 'w' or 'w+', got {cfg.latent_space!r}")
    device = frames["image"].device
    target, cams, mask = frames["image"], frames["camera"], frames.get("face_mask")
    m = target.shape[0]
    w_avg = gen.backbone.mapping.w_avg.detach()
    rows = gen.num_ws if cfg.latent_space == "w+" else 1  # a W latent is broadcast to every layer
    w_id = w_avg[None, None].expand(1, rows, -1).clone().to(device).requires_grad_(True)
    offsets = torch.zeros(m, rows, w_avg.shape[0], device=device, requires_grad=True)
    deltas = torch.zeros(m, 2, device=device, requires_grad=True)
    opt = torch.optim.Adam([{"params": [w_id, offsets], "lr": cfg.lr_invert},
                            {"params": [deltas], "lr": cfg.lr_camera}])
    gen.requires_grad_(False)
    history = [] if history is None else history
    bar = _bar(cfg.invert_steps, "invert", progress)
    pivot = gen.cfg.camera_pivot if pivot is None else tuple(pivot)
    for step in range(cfg.invert_steps):
        c = refine_cameras(cams, deltas, pivot)
        ws = (w_id + offsets).expand(-1, gen.num_ws, -1)
        out = gen.synthesis(ws, c, impl=cfg.impl, deterministic=cfg.deterministic)
        rec, logs = reconstruction_loss(out, target, mask, cfg, lpips)
        # Squared norms per frame: offsets should only hold expression, not identity.
        reg_off = offsets.pow(2).sum(-1).mean()
        reg_cam = deltas.pow(2).sum(-1).mean()
        loss = rec.mean() + cfg.offset_weight * reg_off + cfg.camera_weight * reg_cam
        _step(opt, loss, logs, history, bar, phase="invert", step=step, offset_reg=float(reg_off.detach()),
              camera_reg=float(reg_cam.detach()))
    bar.close()
    def every_layer(t):  # [*, rows, w_dim] -> [*, num_ws, w_dim]
        return t.detach().expand(-1, gen.num_ws, -1).contiguous()

    return every_layer(w_id), every_layer(offsets), deltas.detach()


def _tunable(gen: TriplaneGenerator, superresolution: bool = True) -> list[nn.Parameter]:
    """The synthesis backbone, decoder and (``superresolution``) SR; the mapping stays frozen (the
    pivots are fixed ws)."""
    gen.requires_grad_(False)
    for mod in (gen.backbone.synthesis, gen.decoder) + ((gen.superresolution,) if superresolution else ()):
        mod.requires_grad_(True)
    return [p for p in gen.parameters() if p.requires_grad]


def locality_latents(gen: TriplaneGenerator, pivots: torch.Tensor, cameras: torch.Tensor, n: int, step: float,
                     psi: float, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """PTI's off-pivot latents, as the release draws them: ``pivot + step * unit(w(z) - pivot)`` with
    ``w(z)`` mapped at truncation ``psi``, for random z and a random frame (and its camera).

    pivots ``[M, num_ws, w_dim]``, cameras ``[M, 25]`` -> (ws ``[n, num_ws, w_dim]``, cameras ``[n, 25]``).
    """
    device = pivots.device
    pick = torch.randint(pivots.shape[0], (n,), generator=rng).to(device)
    z = torch.randn(n, gen.cfg.z_dim, generator=rng).to(device)
    c = cameras[pick]
    with torch.no_grad():
        wz = gen.mapping(z, c, truncation_psi=psi)
    direction = wz - pivots[pick]
    direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-8)[:, None, None]
    return pivots[pick] + step * direction, c


def pivotal_tune(gen: TriplaneGenerator, frames: dict, pivots: torch.Tensor, cameras: torch.Tensor,
                 cfg: PersonalizeConfig, *, lpips: nn.Module | None = None, progress: bool = False,
                 history: list | None = None, frozen: TriplaneGenerator | None = None) -> TriplaneGenerator:
    """Fine-tune ``gen`` in place at fixed pivots ``[M, num_ws, w_dim]`` and cameras ``[M, 25]``.

    ``frozen`` is the locality reference (default: a copy of ``gen`` taken before tuning).
    Returns ``gen`` (eval, no grads).
    """
    target, mask = frames["image"], frames.get("face_mask")
    if cfg.locality_weight <= 0:
        frozen = None
    elif frozen is None:
        frozen = copy.deepcopy(gen).requires_grad_(False)
    opt = torch.optim.Adam(_tunable(gen, superresolution=cfg.tune_superresolution), lr=cfg.lr_tune)
    rng = torch.Generator().manual_seed(cfg.seed + 1)
    history = [] if history is None else history
    bar = _bar(cfg.tune_steps, "tune", progress)
    for step in range(cfg.tune_steps):
        out = gen.synthesis(pivots, cameras, impl=cfg.impl, deterministic=cfg.deterministic)
        rec, logs = reconstruction_loss(out, target, mask, cfg, lpips)
        loss = rec.mean()
        if frozen is not None:
            ws, c = locality_latents(gen, pivots, cameras, cfg.locality_samples, cfg.locality_step,
                                     cfg.locality_psi, rng)
            with torch.no_grad():
                ref = frozen.synthesis(ws, c, impl=cfg.impl, deterministic=cfg.deterministic)
            cur = gen.synthesis(ws, c, impl=cfg.impl, deterministic=cfg.deterministic)
            loc = (cur["image"] - ref["image"]).abs().mean() + (cur["image_raw"] - ref["image_raw"]).abs().mean()
            if lpips is not None and cfg.lpips_weight > 0:
                loc = loc + cfg.lpips_weight * lpips(cur["image"], ref["image"]).mean()
            loss = loss + cfg.locality_weight * loc
            logs["locality"] = float(loc.detach())
        _step(opt, loss, logs, history, bar, phase="tune", step=step)
        # The release's early stop: the frames' LPIPS summed is at most tune_stop_lpips (measured
        # before this step; so small that it rarely ends the release's 400 steps early).
        summed = logs.get("lpips", float("inf")) * target.shape[0]
        if summed <= cfg.tune_stop_lpips or logs["l1"] < cfg.tune_stop_l1:
            break
    bar.close()
    return gen.eval().requires_grad_(False)


def personalize(generator: TriplaneGenerator, frames: dict, *, invert_steps: int | None = None,
                tune_steps: int | None = None, lpips: nn.Module | None = None, progress: bool = False,
                log: Callable[[str], None] | None = None, inverted: tuple | None = None,
                on_inverted: Callable[[tuple], None] | None = None, pivot=None, **settings) -> PersonalizationResult:
    """Personalise a prior generator to the M frames of one person.

    Args:
        generator: the prior; left untouched (a deep copy is tuned).
        frames: ``image`` ``[M, 3, S, S]`` in [-1, 1] (S = the generator's SR resolution),
            ``camera`` ``[M, 25]``, optional ``face_mask`` ``[M, 1, S, S]``; all on the generator's device.
        invert_steps, tune_steps: override the :class:`PersonalizeConfig` defaults.
        lpips: an :class:`talk3d.losses.LPIPS` module, or None for L1 only.
        inverted: ``(w_id, offsets, deltas)`` of an earlier inversion of the same frames (resuming):
            the inversion is skipped.
        on_inverted: called with ``(w_id, offsets, deltas)`` once the inversion is done (to save it).
        pivot: the point the per-frame camera refinement orbits: the dataset rig's pivot (None: the
            generator's ``camera_pivot``, FFHQ's).
        settings: any other :class:`PersonalizeConfig` field.

    Returns:
        :class:`PersonalizationResult`.
    """
    cfg = PersonalizeConfig(**settings)
    if invert_steps is not None:
        cfg.invert_steps = int(invert_steps)
    if tune_steps is not None:
        cfg.tune_steps = int(tune_steps)
    img = frames["image"]
    if img.ndim != 4 or img.shape[1] != 3:
        raise ValueError(f"personalize: frames['image'] must be [M, 3, S, S], got {tuple(img.shape)}")
    s = generator.cfg.sr_resolution
    if img.shape[-2:] != (s, s):
        raise ValueError(f"personalize: frames are {tuple(img.shape[-2:])} but the generator renders {s}x{s}")
    if frames["camera"].shape != (img.shape[0], 25):
        raise ValueError(f"personalize: frames['camera'] must be [M, 25], got {tuple(frames['camera'].shape)}")
    torch.manual_seed(cfg.seed)
    gen = copy.deepcopy(generator).eval()
    history: list = []
    if inverted is None:
        w_id, offsets, deltas = invert(gen, frames, cfg, lpips=lpips, progress=progress, history=history, pivot=pivot)
        if on_inverted is not None:
            on_inverted((w_id, offsets, deltas))
    else:
        w_id, offsets, deltas = (t.to(img.device) for t in inverted)
        if log is not None:
            log("inversion: resumed from the saved state")
    cameras = refine_cameras(frames["camera"], deltas, gen.cfg.camera_pivot if pivot is None else pivot).detach()
    if log is not None and history:
        log(f"inversion: L1 {history[0]['l1']:.4f} -> {history[-1]['l1']:.4f} over {cfg.invert_steps} steps")
    n_inv = len(history)
    gen = pivotal_tune(gen, frames, w_id + offsets, cameras, cfg, lpips=lpips, progress=progress, history=history)
    if log is not None and len(history) > n_inv:
        log(f"pivotal tuning: L1 {history[n_inv]['l1']:.4f} -> {history[-1]['l1']:.4f} over {cfg.tune_steps} steps")
    return PersonalizationResult(gen, w_id, offsets, cameras, deltas, history)
