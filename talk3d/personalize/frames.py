"""Choosing and loading the few frames that personalisation inverts (VIVE3D's M frames)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

__all__ = ["select_frames", "load_frames"]


def select_frames(pose, m: int) -> list[int]:
    """Farthest-point sampling of ``m`` frames on (yaw, pitch).

    Args:
        pose: ``[N, >=2]`` (yaw, pitch[, roll]) in radians, e.g. the dataset's ``pose.npy``.
        m: how many frames to pick (``1 <= m <= N``).

    Returns:
        ``m`` distinct frame indices (positions in ``pose``), in the order picked. The first is the
        frame farthest from the mean pose (an extreme), each next the frame farthest from all
        picked so far, so a handful of frames covers the range of head poses: the shared identity
        latent then has to explain the face from several sides, not one view.
    """
    yp = np.asarray(pose, dtype=np.float64)
    if yp.ndim != 2 or yp.shape[1] < 2:
        raise ValueError(f"select_frames: pose must be [N, >=2] (yaw, pitch, ...), got shape {yp.shape}")
    yp = yp[:, :2]
    n = yp.shape[0]
    if not 1 <= m <= n:
        raise ValueError(f"select_frames: cannot pick {m} frames out of {n}")
    if not np.isfinite(yp).all():
        raise ValueError("select_frames: pose contains NaN or inf")
    first = int(np.argmax(((yp - yp.mean(0)) ** 2).sum(1)))
    picked = [first]
    dist = ((yp - yp[first]) ** 2).sum(1)  # [N] squared distance to the nearest picked frame
    for _ in range(m - 1):
        nxt = int(np.argmax(dist))  # ties (e.g. duplicate poses) resolve to the lowest index
        picked.append(nxt)
        dist = np.minimum(dist, ((yp - yp[nxt]) ** 2).sum(1))
    if len(set(picked)) != m:  # fewer distinct poses than m: fill with unused frames in order
        seen = list(dict.fromkeys(picked))
        rest = [i for i in range(n) if i not in seen]
        picked = seen + rest[: m - len(seen)]
    return picked


def load_frames(data_dir, *, frames: int = 4, frame_ids: Sequence[int] | None = None,
                image_size: int | None = None) -> dict:
    """Load the personalisation frames from a dataset folder's training split.

    Args:
        data_dir: a dataset folder (``talk3d.data`` format).
        frames: how many frames to pick by :func:`select_frames` when ``frame_ids`` is None.
        frame_ids: explicit frame numbers of the clip (they must lie in the training split, so the
            validation frames stay unseen).
        image_size: resize to this side (the generator's SR resolution).

    Returns:
        dict with ``image`` ``[M, 3, S, S]`` in [-1, 1], ``camera`` ``[M, 25]``, ``pose`` ``[M, 3]``,
        ``face_mask`` ``[M, 1, S, S]`` in [0, 1], ``index`` ``[M]`` int64 (clip frame numbers).
    """
    from ..data import TalkingHeadDataset

    ds = TalkingHeadDataset(Path(data_dir), "train", image_size=image_size)
    n = len(ds)
    if frame_ids is not None:
        ids = [int(i) for i in frame_ids]
        if not ids:
            raise ValueError("frame ids: give at least one")
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ValueError(f"frame ids {bad} are out of range: {data_dir} has {n} training frames "
                             f"(ids 0..{n - 1})")
        if len(set(ids)) != len(ids):
            raise ValueError(f"frame ids repeat: {ids}")
    else:
        if frames < 1:
            raise ValueError(f"--frames must be >= 1, got {frames}")
        if frames > n:
            raise ValueError(f"{data_dir} has only {n} training frames; cannot pick {frames} "
                             "(use fewer --frames or a longer clip)")
        pose = np.asarray(ds._open()["pose"])[ds.frame_indices]  # [n, 3]
        ids = select_frames(pose, frames)
    items = [ds[i] for i in ids]
    # Always the tracker's cameras, also when an earlier run wrote refined ones: personalisation
    # refines them itself, and a re-run must not start from its own previous output.
    from .cameras import preprocessed_cameras

    cams, pose = preprocessed_cameras(data_dir)
    clip_ids = [int(it["index"]) for it in items]
    return {
        "image": torch.stack([it["image"] for it in items]),
        "camera": torch.from_numpy(cams[clip_ids]),
        "pose": torch.from_numpy(pose[clip_ids]),
        "face_mask": torch.stack([it["face_mask"] for it in items]),
        "index": torch.tensor([int(it["index"]) for it in items], dtype=torch.int64),
    }
