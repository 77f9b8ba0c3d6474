"""The dataset's cameras before and after per-frame inversion.

Refined cameras are written back into the dataset folder as the cameras training uses, with the
tracked (preprocessed) ones kept:

- ``files.cameras`` -> ``cameras_refined.npy`` and ``files.pose`` -> ``pose_refined.npy``, so every
  reader (training, inference, evaluation) takes the refined ones without knowing about them;
- ``extra_files.cameras_preprocessed`` / ``pose_preprocessed``: the tracker's originals, which
  every later refinement starts from again (a re-run never refines refined cameras);
- ``camera_refinement``: what made them (checkpoint, settings, per-clip statistics).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..data.format import FILES, MANIFEST, load_manifest, validate_dataset
from ..render.cameras import euler_to_rotation, rotation_to_euler

__all__ = ["REFINED_FILES", "preprocessed_cameras", "is_refined", "refined_pose",
           "write_refined_cameras"]

REFINED_FILES = {"cameras": "cameras_refined.npy", "pose": "pose_refined.npy"}
_KEPT = {"cameras": "cameras_preprocessed", "pose": "pose_preprocessed"}


def is_refined(manifest: dict) -> bool:
    return manifest["files"]["cameras"] != FILES["cameras"]


def preprocessed_cameras(data_dir) -> tuple[np.ndarray, np.ndarray]:
    """The tracked cameras ``[N, 25]`` and poses ``[N, 3]``, whether or not refined ones exist."""
    data_dir = Path(data_dir)
    m = load_manifest(data_dir)
    extra = m.get("extra_files", {})
    cams = extra.get(_KEPT["cameras"], m["files"]["cameras"])
    pose = extra.get(_KEPT["pose"], m["files"]["pose"])
    return (np.load(data_dir / cams).astype(np.float32), np.load(data_dir / pose).astype(np.float32))


def refined_pose(pose: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """Head poses matching cameras refined by :func:`talk3d.personalize.refine_cameras`.

    The dataset's cameras are ``cam2world = T(pose)^-1 C0`` (:func:`talk3d.data.synthetic.head_cameras`),
    so their rotation is ``R^T C0`` with ``R = euler(pose)``; refining turns it into
    ``D R^T C0 = (R D^T)^T C0`` with ``D = R_y(dyaw) R_x(dpitch)``: the head rotation becomes ``R D^T``.

    pose ``[N, 3]`` (yaw, pitch, roll rad), deltas ``[N, 2]`` -> ``[N, 3]`` float32.
    """
    p = torch.as_tensor(np.asarray(pose), dtype=torch.float64)
    d = torch.as_tensor(np.asarray(deltas), dtype=torch.float64)
    r = euler_to_rotation(p[:, 0], p[:, 1], p[:, 2])
    dr = euler_to_rotation(d[:, 0], d[:, 1], torch.zeros_like(d[:, 0]))
    yaw, pitch, roll = rotation_to_euler(r @ dr.transpose(1, 2))
    return torch.stack([yaw, pitch, roll], 1).float().numpy()


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.stem + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def write_refined_cameras(data_dir, cameras: np.ndarray, pose: np.ndarray, record: dict, *,
                          overwrite: bool = False) -> dict:
    """Make ``cameras`` ``[N, 25]`` / ``pose`` ``[N, 3]`` the dataset's cameras, keeping the tracked ones.

    Raises FileExistsError when the dataset already has refined cameras and not ``overwrite``;
    ValueError when the shapes do not match the clip. Returns the new manifest (validated).
    """
    data_dir = Path(data_dir)
    m = load_manifest(data_dir)
    n = int(m["num_frames"])
    cameras, pose = np.asarray(cameras, np.float32), np.asarray(pose, np.float32)
    if cameras.shape != (n, 25) or pose.shape != (n, 3):
        raise ValueError(f"write_refined_cameras: expected [{n}, 25] cameras and [{n}, 3] poses, got "
                         f"{cameras.shape} and {pose.shape}")
    if not (np.isfinite(cameras).all() and np.isfinite(pose).all()):
        raise ValueError("write_refined_cameras: NaN or inf in the refined cameras")
    was_refined = is_refined(m)
    if was_refined and not overwrite:
        raise FileExistsError(f"{data_dir} already has refined cameras ({m['files']['cameras']}, from "
                              f"{m.get('camera_refinement', {}).get('checkpoint', '?')}); pass --overwrite to replace them")
    for key, arr in (("cameras", cameras), ("pose", pose)):
        _atomic_save(data_dir / REFINED_FILES[key], arr)
    extra = dict(m.get("extra_files", {}))
    for key in ("cameras", "pose"):
        if not was_refined or _KEPT[key] not in extra:
            extra[_KEPT[key]] = m["files"][key]
        m["files"][key] = REFINED_FILES[key]
    m["extra_files"] = extra
    m["camera_refinement"] = record
    tmp = data_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(m, indent=2))
    os.replace(tmp, data_dir / MANIFEST)
    return validate_dataset(data_dir)
