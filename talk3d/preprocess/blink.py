"""Eye blink on AU45's scale from the eye aspect ratio (EAR, Soukupova and Cech 2016).

EAR of one eye = (|p2 - p6| + |p3 - p5|) / (2 |p1 - p4|) over its six landmarks: ~0.25-0.3 open,
near 0 closed, and independent of the face's size. Its open value differs between people and
with yaw, so we calibrate per clip: the EAR that the eyes exceed in only
``100 - OPEN_PERCENTILE`` % of frames is "open" (people blink < 10 % of the time), mapped to 0;
an EAR of ``CLOSED_EAR_RATIO`` times that is "closed", mapped to ``CLOSED_AU45``. The scale is
linear between and continues past "closed" (clipped at 0 below "open").
"""
from __future__ import annotations

import numpy as np

__all__ = ["eye_aspect_ratio", "blink_au45", "OPEN_PERCENTILE", "CLOSED_EAR_RATIO", "CLOSED_AU45"]

#: Percentile of the clip's EAR taken as the open eye (eyes are open > 90 % of the time).
OPEN_PERCENTILE = 90.0
#: dlib's landmarks of a shut eye keep an EAR of about half the open one on real video (the lids'
#: contour has thickness, and the eyes are ~30 px wide in a webcam frame): 0.48-0.52 at the most
#: closed frames of two real clips of a man speaking (tests/test_preprocess_talking.py), so that is
#: where the scale reaches "closed". (The synthetic head's drawn lids close further and read 2.5+.
#: This was 0.15 before real talking heads were at hand: a real closed eye then read only ~1.1.)
CLOSED_EAR_RATIO = 0.5
#: AU45 intensity of a closed eye (OpenFace's AU45_r peaks at 2-3 in a blink).
CLOSED_AU45 = 2.0


def eye_aspect_ratio(lm: np.ndarray) -> np.ndarray:
    """lm [N, 68, 2] -> EAR [N], the mean over both eyes."""
    def ear(e):  # e [N, 6, 2]: corner, upper, upper, corner, lower, lower
        vertical = (np.linalg.norm(e[:, 1] - e[:, 5], axis=-1)
                    + np.linalg.norm(e[:, 2] - e[:, 4], axis=-1))
        return vertical / (2 * np.linalg.norm(e[:, 0] - e[:, 3], axis=-1) + 1e-9)
    return 0.5 * (ear(lm[:, 36:42]) + ear(lm[:, 42:48]))


def blink_au45(lm: np.ndarray) -> tuple[np.ndarray, dict]:
    """lm [N, 68, 2] -> (blink [N] float32 on AU45's scale, calibration dict)."""
    ear = eye_aspect_ratio(np.asarray(lm, dtype=np.float64))
    open_ear = float(np.percentile(ear, OPEN_PERCENTILE))
    closure = (open_ear - ear) / max(open_ear * (1 - CLOSED_EAR_RATIO), 1e-9)
    blink = CLOSED_AU45 * np.clip(closure, 0, None)
    return blink.astype(np.float32), dict(open_ear=open_ear, closed_ear_ratio=CLOSED_EAR_RATIO,
                                          open_percentile=OPEN_PERCENTILE, closed_au45=CLOSED_AU45)
