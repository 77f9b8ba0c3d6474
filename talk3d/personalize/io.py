"""Reading and writing personalised generators.

A personalised generator is an ordinary talk3d checkpoint (``talk3d.prior.save_checkpoint``) of
the tuned weights, so :func:`talk3d.prior.load_generator` reads it unchanged. The identity latent
cannot go into the state dict: ``load_generator`` checks every tensor name against the generator
and rejects unknown ones. It is stored in the JSON config instead (one self-contained file; float32
values survive JSON exactly, and even FFHQ's 14 x 512 latent is only ~150 kB of text):

- ``personalized``: true
- ``w_id``: nested list ``[num_ws][w_dim]`` (the shared identity latent, batch dim dropped)
- ``personalization``: ``frame_ids`` (clip frame numbers), ``cameras`` ``[M][25]`` (refined),
  ``camera_deltas`` ``[M][2]`` (yaw, pitch radians), ``offsets`` ``[M][num_ws][w_dim]``,
  ``settings`` (the :class:`PersonalizeConfig`), ``losses`` (first/last per phase), ``lpips`` (status line)
"""
from __future__ import annotations

import dataclasses

import torch

from ..models import TriplaneGenerator
from ..prior.checkpoint import load_checkpoint, save_checkpoint
from ..prior.convert import checkpoint_config, load_generator
from .core import PersonalizationResult, PersonalizeConfig

__all__ = ["save_personalized", "load_personalized", "read_personalization"]


def _summary(history: list) -> dict:
    out = {}
    for phase in ("invert", "tune"):
        rows = [h for h in history if h["phase"] == phase]
        if rows:
            out[phase] = {"first": rows[0], "last": rows[-1], "steps": len(rows)}
    return out


def save_personalized(path, result: PersonalizationResult, *, source: str | None = None,
                      frame_ids=None, settings: PersonalizeConfig | None = None, lpips: str = "",
                      overwrite: bool = False) -> dict:
    """Write ``result`` to ``path`` (.safetensors or .pt); returns the stored config."""
    gen = result.generator
    config = checkpoint_config(gen.cfg, source=source)
    config["personalized"] = True
    config["w_id"] = result.w_id[0].detach().cpu().float().tolist()
    config["personalization"] = {
        "frame_ids": None if frame_ids is None else [int(i) for i in frame_ids],
        "cameras": result.cameras.detach().cpu().float().tolist(),
        "camera_deltas": result.camera_deltas.detach().cpu().float().tolist(),
        "offsets": result.offsets.detach().cpu().float().tolist(),
        "settings": None if settings is None else dataclasses.asdict(settings),
        "losses": _summary(result.history),
        "lpips": lpips,
    }
    return save_checkpoint(path, gen.state_dict(), config, overwrite=overwrite)


def read_personalization(path) -> dict:
    """The checkpoint's config, checked to be personalised (``ValueError`` otherwise)."""
    _, config = load_checkpoint(path)
    if not config.get("personalized") or "w_id" not in config:
        raise ValueError(f"{path} is not a personalised generator (no 'personalized'/'w_id' in its config); "
                         "make one with python -m talk3d.personalize")
    return config


def load_personalized(path, *, device="cpu") -> tuple[TriplaneGenerator, torch.Tensor]:
    """(generator in eval mode with gradients off, w_id ``[1, num_ws, w_dim]``) from ``path``."""
    config = read_personalization(path)
    gen = load_generator(path, device=device)
    w_id = torch.tensor(config["w_id"], dtype=torch.float32, device=device)[None]
    if w_id.shape != (1, gen.num_ws, gen.cfg.w_dim):
        raise ValueError(f"{path}: w_id has shape {tuple(w_id.shape)}, expected {(1, gen.num_ws, gen.cfg.w_dim)}")
    return gen, w_id
