"""Inference: a trained talking head saying new speech, written as an mp4 with the speech muxed in.

``python -m talk3d.infer --run RUN --audio SPEECH.wav --out OUT.mp4`` (see ``__main__``), or from
Python::

    model, info = load_talking_head(run, device="cuda")
    wave = read_speech("speech.wav")                       # [T] 16-kHz mono
    for frame in render_speech(model, info, wave, camera="orbit"):
        ...                                                # [S, S, 3] uint8

or, loading the run once and streaming the speech as it arrives (see :mod:`talk3d.infer.talker`)::

    talker = Talker(run, device="cuda")
    for frame in talker.stream(chunks):                    # 1-D float32 16-kHz chunks of any length
        ...                                                # frame n: once 640 (n + 1) + talker.latency_samples are in
"""
from .render import (ORBIT_PITCH_DEG, ORBIT_YAW_DEG, PRECISIONS, SIZES, SOURCES, InferenceError, PoseRangeWarning,
                     TrainingClip, camera_track, load_training_clip, num_frames_for, read_speech, render_speech)
from .talker import Talker
from .video import StreamingVideoWriter

__all__ = ["Talker", "render_speech", "read_speech", "num_frames_for", "camera_track", "load_training_clip",
           "TrainingClip", "InferenceError", "PoseRangeWarning", "StreamingVideoWriter", "PRECISIONS", "SIZES",
           "SOURCES", "ORBIT_YAW_DEG", "ORBIT_PITCH_DEG"]
