"""Personalised generator (Talk3D section 3.2, VIVE3D): invert a few frames, then pivotal tuning.

``python -m talk3d.personalize --prior PRIOR.safetensors --data DATASET --out PERSONAL.safetensors``;
from Python :func:`personalize` and :func:`load_personalized`.
"""
from .core import (PersonalizationResult, PersonalizeConfig, invert, pivotal_tune, personalize,
                   reconstruction_loss, refine_cameras, render_frames)
from .frames import load_frames, select_frames
from .io import load_personalized, read_personalization, save_personalized

__all__ = [
    "PersonalizationResult", "PersonalizeConfig", "invert", "pivotal_tune", "personalize",
    "reconstruction_loss", "refine_cameras", "render_frames", "load_frames", "select_frames",
    "load_personalized", "read_personalization", "save_personalized",
]
