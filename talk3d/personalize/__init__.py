"""Personalised generator (Talk3D section 3.2, VIVE3D): invert a few frames, pivotal tuning, then a
per-frame inversion of the whole clip that refines every frame's camera.

``python -m talk3d.personalize --prior PRIOR.safetensors --data DATASET --out PERSONAL.safetensors``;
from Python :func:`personalize` and :func:`load_personalized`.
"""
from .core import (PersonalizationResult, PersonalizeConfig, invert, pivotal_tune, personalize,
                   reconstruction_loss, refine_cameras, render_frames)
from .cameras import preprocessed_cameras, refined_pose, write_refined_cameras
from .frames import load_frames, select_frames
from .scratch import train_from_scratch
from .track import TrackConfig, TrackState, track_batch, track_video
from .io import load_personalized, read_personalization, save_personalized

__all__ = [
    "PersonalizationResult", "PersonalizeConfig", "invert", "pivotal_tune", "personalize",
    "reconstruction_loss", "refine_cameras", "render_frames", "load_frames", "select_frames",
    "load_personalized", "read_personalization", "save_personalized", "TrackConfig", "TrackState", "track_batch",
    "track_video", "train_from_scratch", "preprocessed_cameras", "refined_pose",
    "write_refined_cameras",
]
