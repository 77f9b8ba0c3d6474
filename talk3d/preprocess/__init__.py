"""Real videos -> talk3d datasets: ``python -m talk3d.preprocess VIDEO --out DIR``.

Modules: video (PyAV decoding/encoding), landmarks (detector interface, dlib, smoothing), align
(FFHQ crops), pose (PnP -> EG3D cameras), blink (EAR -> AU45), masks, sheet (contact sheet),
cache (the resumable work folder), pipeline (the steps).
"""
from .errors import PreprocessError
from .landmarks import DlibDetector, LandmarkDetector
from .pipeline import preprocess_video
from .video import write_video

__all__ = ["PreprocessError", "DlibDetector", "LandmarkDetector", "preprocess_video",
           "write_video"]
