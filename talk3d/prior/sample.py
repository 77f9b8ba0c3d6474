"""Render faces from a generator: one image per seed and an orbit video, so a user can see a prior works."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from ..progress import progress_bar

from ..models import TriplaneGenerator
from ..render import look_at_camera

__all__ = ["parse_seeds", "to_uint8", "sample_images", "orbit_frames"]


def parse_seeds(text: str) -> list[int]:
    """``"0-3,7"`` -> ``[0, 1, 2, 3, 7]``."""
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            seeds += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
        except ValueError:
            raise ValueError(f"seeds: cannot read {part!r} (use e.g. '0-3,7')") from None
    if not seeds:
        raise ValueError("seeds: none given")
    return seeds


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` in [-1, 1] -> ``[H, W, 3]`` uint8."""
    return ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def _cameras(gen: TriplaneGenerator, yaw_deg: float, pitch_deg: float, device) -> torch.Tensor:
    yaw = torch.tensor([math.radians(yaw_deg)], device=device)
    pitch = torch.tensor([math.radians(pitch_deg)], device=device)
    return look_at_camera(yaw, pitch, rig=gen.cfg.camera_rig())


def _latent(gen: TriplaneGenerator, seed: int, device) -> torch.Tensor:
    # numpy's generator, as EG3D's scripts: seed s gives the same z on every machine and device.
    z = np.random.RandomState(seed).randn(1, gen.cfg.z_dim)
    return torch.from_numpy(z).float().to(device)


@torch.no_grad()
def sample_images(gen: TriplaneGenerator, seeds: list[int], *, yaw: float = 0.0, pitch: float = 0.0,
                  truncation: float = 0.7, impl: str = "auto", progress: bool = True) -> list[np.ndarray]:
    """One ``[S, S, 3]`` uint8 image per seed at (yaw, pitch) degrees; conditioned on the frontal camera."""
    device = next(gen.parameters()).device
    cond = _cameras(gen, 0.0, 0.0, device)
    cams = _cameras(gen, yaw, pitch, device)
    out = []
    for seed in progress_bar(seeds, desc="seeds", unit="img", disable=not progress):
        ws = gen.mapping(_latent(gen, seed, device), cond, truncation_psi=truncation)
        img = gen.synthesis(ws, cams, impl=impl, deterministic=True)["image"][0]
        out.append(to_uint8(img))
    return out


@torch.no_grad()
def orbit_frames(gen: TriplaneGenerator, seed: int, *, frames: int = 48, yaw_range: float = 30.0,
                 pitch_range: float = 10.0, truncation: float = 0.7, impl: str = "auto",
                 progress: bool = True) -> list[np.ndarray]:
    """An orbit of one identity: yaw sweeps +-yaw_range and pitch +-pitch_range degrees."""
    device = next(gen.parameters()).device
    ws = gen.mapping(_latent(gen, seed, device), _cameras(gen, 0.0, 0.0, device), truncation_psi=truncation)
    out = []
    for k in progress_bar(range(frames), desc=f"orbit seed {seed}", unit="frame", disable=not progress):
        a = 2 * math.pi * k / frames
        cams = _cameras(gen, yaw_range * math.sin(a), pitch_range * math.cos(a), device)
        out.append(to_uint8(gen.synthesis(ws, cams, impl=impl, deterministic=True)["image"][0]))
    return out


def _have_pyav() -> bool:
    import importlib.util

    return importlib.util.find_spec("av") is not None


def write_outputs(images: dict[str, np.ndarray], gifs: dict[str, list[np.ndarray]], out_dir, *,
                  overwrite: bool = False, fps: int = 24) -> list[Path]:
    """PNG per image and an orbit video per orbit (H.264 mp4 with PyAV, else an animated GIF);
    refuses to replace files unless ``overwrite``."""
    from PIL import Image

    out_dir = Path(out_dir)
    video_ext = "mp4" if _have_pyav() else "gif"
    targets = [out_dir / f"{n}.png" for n in images] + [out_dir / f"{n}.{video_ext}" for n in gifs]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"would overwrite {existing[:5]}{' ...' if len(existing) > 5 else ''}; "
                              "pass --overwrite or choose another --out")
    os.makedirs(out_dir, exist_ok=True)
    for name, img in images.items():
        Image.fromarray(img).save(out_dir / f"{name}.png")
    for name, frames in gifs.items():
        if video_ext == "mp4":
            from ..infer.video import StreamingVideoWriter

            h, w = frames[0].shape[:2]
            with StreamingVideoWriter(out_dir / f"{name}.mp4", w, h, fps=fps) as video:
                for f in frames:
                    video.write(f)
        else:
            first, *rest = [Image.fromarray(f) for f in frames]
            first.save(out_dir / f"{name}.gif", save_all=True, append_images=rest, duration=int(1000 / fps), loop=0)
    return targets
