"""Per-frame inversion of the whole video on the tuned generator (Talk3D section 3.2, last step).

With the personalised generator and ``w_ID`` fixed, every frame gets its own yaw/pitch refinement
of the tracked camera (and, optionally, a latent offset that absorbs its expression so the pose
does not have to), optimised against that frame. The refined cameras replace the tracked ones
as the cameras training uses.

Frames are solved ``batch`` consecutive frames at a time (independent problems in one forward
pass, which is what keeps a GPU busy); each batch is warm-started from the last solved frame of
the previous one, since a tracker's errors drift slowly along a clip. Each frame stops on its own
(no relative improvement of ``rel_tol`` for ``patience`` steps) and keeps its best iterate; a
batch ends when all of its frames have stopped or at ``max_steps``.

Progress is saved after every batch (:class:`TrackState`), so a long video resumes where it
stopped.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..models import TriplaneGenerator
from .core import PersonalizeConfig, reconstruction_loss, refine_cameras

__all__ = ["TrackConfig", "TrackState", "track_batch", "track_video"]


@dataclass
class TrackConfig:
    """Settings of the per-frame inversion."""

    max_steps: int = 50            # per batch of frames (release: 50 on each frame after the first)
    first_steps: int = 200         # for the first batch, which has no warm start (release: 200)
    patience: int = 5              # steps without improvement before a frame stops
    rel_tol: float = 0.0           # a relative improvement must exceed this to count (0: any)
    batch: int = 4                 # consecutive frames solved together
    lr_camera: float = 3e-3        # Adam on the yaw/pitch deltas (radians)
    lr_offset: float = 5e-3        # Adam on the per-frame latent offsets
    refine_offsets: bool = False   # per-frame offsets absorb expression, but also trade against the pose
    offset_weight: float = 1.0     # squared-norm pull of the offsets towards 0
    warm_start: bool = True        # start each batch from the previous batch's last frame

    def check(self) -> None:
        if min(self.max_steps, self.first_steps, self.batch, self.patience) < 1:
            raise ValueError(f"TrackConfig: max_steps, batch and patience must be >= 1, got {self}")


def track_batch(gen: TriplaneGenerator, w_id: torch.Tensor, images: torch.Tensor, cameras: torch.Tensor,
                masks: torch.Tensor | None, init_deltas: torch.Tensor, init_offsets: torch.Tensor | None,
                cfg: PersonalizeConfig, tcfg: TrackConfig, *, pivot, lpips: nn.Module | None = None) -> dict:
    """Refine the cameras of B frames at once, each frame stopping on its own.

    Args:
        gen: the (tuned) generator; its parameters are not changed.
        w_id: ``[1, num_ws, w_dim]`` identity latent.
        images: ``[B, 3, S, S]`` targets in [-1, 1]; masks ``[B, 1, S, S]`` face masks or None.
        cameras: ``[B, 25]`` tracked cameras (the deltas are relative to these).
        init_deltas: ``[B, 2]`` starting (yaw, pitch) radians; init_offsets ``[B, num_ws, w_dim]`` or None.
        pivot: the point the cameras orbit (the rig's pivot).

    Returns:
        dict of ``deltas`` ``[B, 2]`` and ``offsets`` ``[B, num_ws, w_dim]`` (each frame's best
        iterate), ``loss_first`` / ``loss_best`` ``[B]`` and ``steps`` ``[B]`` (int64), all detached.
    """
    b = images.shape[0]
    device = images.device
    deltas = init_deltas.detach().clone().to(device).requires_grad_(True)
    groups = [{"params": [deltas], "lr": tcfg.lr_camera}]
    offsets = torch.zeros(b, gen.num_ws, w_id.shape[-1], device=device)
    if init_offsets is not None:
        offsets = init_offsets.detach().clone().to(device)
    if tcfg.refine_offsets:
        offsets.requires_grad_(True)
        groups.append({"params": [offsets], "lr": tcfg.lr_offset})
    opt = torch.optim.Adam(groups)
    best = torch.full((b,), float("inf"), device=device)
    first = torch.zeros(b, device=device)
    best_deltas, best_offsets = deltas.detach().clone(), offsets.detach().clone()
    stale = torch.zeros(b, dtype=torch.int64, device=device)
    steps = torch.zeros(b, dtype=torch.int64, device=device)
    active = torch.ones(b, dtype=torch.bool, device=device)
    for step in range(tcfg.max_steps):
        c = refine_cameras(cameras, deltas, pivot)
        out = gen.synthesis(w_id.expand(b, -1, -1) + offsets, c, impl=cfg.impl, deterministic=True)
        rec, _ = reconstruction_loss(out, images, masks, cfg, lpips)  # [B]
        per_frame = rec + tcfg.offset_weight * offsets.pow(2).sum(-1).mean(-1)
        with torch.no_grad():
            if step == 0:
                first.copy_(per_frame)
            better = (per_frame < best * (1 - tcfg.rel_tol)) & active
            # The loss is evaluated at the iterate before this step's update: keep that one.
            best_deltas[better], best_offsets[better] = deltas[better], offsets[better]
            best = torch.where(better | ((per_frame < best) & active), per_frame, best)
            stale = torch.where(better, torch.zeros_like(stale), stale + active.long())
            steps += active.long()
            active &= stale < tcfg.patience
        if not bool(active.any()):
            break
        opt.zero_grad(set_to_none=True)
        # Frames are independent, so the sum gives each frame its own gradient.
        per_frame.sum().backward()
        opt.step()
    return {"deltas": best_deltas, "offsets": best_offsets, "loss_first": first.detach(), "loss_best": best,
            "steps": steps}


@dataclass
class TrackState:
    """Per-frame results so far (N frames), saved after every batch to resume a long video.

    deltas ``[N, 2]`` radians; loss_first / loss_best ``[N]``; steps ``[N]``; done: frames solved
    (a prefix of the clip); last_offset ``[num_ws, w_dim]``: the warm start of the next batch.
    """

    deltas: np.ndarray
    loss_first: np.ndarray
    loss_best: np.ndarray
    steps: np.ndarray
    done: int
    last_offset: np.ndarray
    settings: dict

    @classmethod
    def fresh(cls, n: int, num_ws: int, w_dim: int, settings: dict) -> "TrackState":
        return cls(np.zeros((n, 2), np.float32), np.zeros(n, np.float32), np.zeros(n, np.float32),
                   np.zeros(n, np.int64), 0, np.zeros((num_ws, w_dim), np.float32), settings)

    def save(self, path) -> None:
        """Atomically write to ``path`` (.npz): a crash mid-write leaves the previous state."""
        tmp = f"{path}.tmp.npz"
        np.savez(tmp, deltas=self.deltas, loss_first=self.loss_first, loss_best=self.loss_best, steps=self.steps,
                 done=np.int64(self.done), last_offset=self.last_offset,
                 settings=np.frombuffer(json.dumps(self.settings, sort_keys=True).encode(), np.uint8))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path, n: int, settings: dict) -> "TrackState":
        """Read a saved state; ``ValueError`` if it is corrupt or from other frames or settings."""
        import zipfile

        try:
            with np.load(path, allow_pickle=False) as z:
                saved = json.loads(bytes(z["settings"]).decode())
                state = cls(z["deltas"], z["loss_first"], z["loss_best"], z["steps"], int(z["done"]),
                            z["last_offset"], saved)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path}: unreadable per-frame inversion state ({e}); delete it to start over") from None
        if state.deltas.shape != (n, 2) or not 0 <= state.done <= n:
            raise ValueError(f"{path}: state is for {state.deltas.shape[0]} frames, this clip has {n}; "
                             "delete it to start over")
        if saved != json.loads(json.dumps(settings, sort_keys=True)):
            raise ValueError(f"{path}: saved with other settings ({saved}); delete it to start over")
        return state


def track_video(gen: TriplaneGenerator, w_id: torch.Tensor, load: Callable[[int, int], dict], n: int,
                cfg: PersonalizeConfig, tcfg: TrackConfig, *, pivot, lpips: nn.Module | None = None,
                state: TrackState | None = None, state_path=None, progress: bool = False,
                on_batch: Callable[[int, int, dict], None] | None = None) -> TrackState:
    """Per-frame inversion of frames ``0 .. n-1``, in order, ``tcfg.batch`` at a time.

    Args:
        load: ``load(start, stop)`` -> dict of ``image`` ``[b, 3, S, S]``, ``camera`` ``[b, 25]`` (the
            tracked cameras) and optional ``face_mask`` ``[b, 1, S, S]``, on the generator's device.
        n: frames in the clip.
        state: a :class:`TrackState` to continue (frames ``state.done ..``), else a fresh one.
        state_path: where to save the state after each batch (None: not saved).
        on_batch: called as ``on_batch(start, stop, result)`` after each batch (previews, logs).

    Returns:
        The finished :class:`TrackState` (``done == n``).
    """
    import sys

    from ..progress import progress_bar

    tcfg.check()
    gen.requires_grad_(False)
    device = w_id.device
    settings = {"track": asdict(tcfg), "loss": asdict(cfg)}
    if state is None:
        state = TrackState.fresh(n, gen.num_ws, w_id.shape[-1], settings)
    bar = progress_bar(total=n, initial=state.done, desc="per-frame inversion", unit="frame", disable=not progress,
               file=sys.stderr, leave=False)
    for start in range(state.done, n, tcfg.batch):
        stop = min(n, start + tcfg.batch)
        frames = load(start, stop)
        b = stop - start
        if tcfg.warm_start and start > 0:
            init_d = torch.from_numpy(state.deltas[start - 1]).to(device).expand(b, 2)
            init_o = torch.from_numpy(state.last_offset).to(device).expand(b, -1, -1)
        else:
            init_d, init_o = torch.zeros(b, 2, device=device), None
        steps = tcfg.max_steps if start > 0 and tcfg.warm_start else max(tcfg.first_steps, tcfg.max_steps)
        res = track_batch(gen, w_id, frames["image"], frames["camera"], frames.get("face_mask"), init_d, init_o,
                          cfg, replace(tcfg, max_steps=steps), pivot=pivot, lpips=lpips)
        state.deltas[start:stop] = res["deltas"].cpu().numpy()
        state.loss_first[start:stop] = res["loss_first"].cpu().numpy()
        state.loss_best[start:stop] = res["loss_best"].cpu().numpy()
        state.steps[start:stop] = res["steps"].cpu().numpy()
        state.last_offset = res["offsets"][-1].cpu().numpy()
        state.done = stop
        if state_path is not None:
            state.save(state_path)
        if on_batch is not None:
            on_batch(start, stop, res)
        bar.set_postfix(loss=f"{float(res['loss_best'].mean()):.4f}", steps=int(res["steps"].max()),
                        refresh=False)  # the update redraws, at the bar's pace
        bar.update(b)
    bar.close()
    return state
