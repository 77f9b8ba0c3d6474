"""Action unit error (AUE, the paper's Table 2) from OpenFace 2's facial action unit intensities.

The paper measures AUE with OpenFace (Baltrusaitis et al., its reference [4]), a C++ tool that is
the user's to install (https://github.com/TadasBaltrusaitis/OpenFace: the ``FeatureExtraction``
binary and its model files). talk3d writes the rendered and the real held-out frames as two image
folders, runs ``FeatureExtraction -fdir`` on each and reads the CSVs it writes. No other AU
estimator gives numbers comparable with the paper's, so without OpenFace AUE is reported
unavailable, with the reason.

AUE as the published talking-head evaluation scripts compute it (TalkingGaussian's ``auerror.py``
and the works that reuse it): for each of OpenFace's 17 AU intensity outputs (``AUxx_r``, 0-5),
the mean over frames of the squared difference between the rendered and the real frame, summed
over the 17 AUs. AUE-lower (the 9 lower-face AUs: lips, chin, jaw) and AUE-upper (the 8 others:
brows, cheeks, lids, blink) are the same sums over those subsets. Frames where OpenFace lost the
face on either side (``success`` = 0) are left out and counted.
"""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["AU_INTENSITIES", "LOWER_FACE_AUS", "UPPER_FACE_AUS", "OPENFACE_ENV", "OPENFACE_BINARY", "AUTrack",
           "OpenFaceError", "read_openface_csv", "action_unit_error", "find_openface", "OpenFaceAU"]

#: OpenFace 2's AU intensity outputs (the ``AUxx_r`` columns), in its CSV order.
AU_INTENSITIES = ("AU01", "AU02", "AU04", "AU05", "AU06", "AU07", "AU09", "AU10", "AU12", "AU14", "AU15",
                  "AU17", "AU20", "AU23", "AU25", "AU26", "AU45")
#: Lower face: upper-lip raiser, lip-corner puller, dimpler, lip-corner depressor, chin raiser,
#: lip stretcher, lip tightener, lips part, jaw drop. What the audio drives.
LOWER_FACE_AUS = ("AU10", "AU12", "AU14", "AU15", "AU17", "AU20", "AU23", "AU25", "AU26")
#: Upper face: brows, upper lid, cheek raiser, lid tightener, nose wrinkler, blink.
UPPER_FACE_AUS = ("AU01", "AU02", "AU04", "AU05", "AU06", "AU07", "AU09", "AU45")
#: Environment variable naming the FeatureExtraction binary (or OpenFace's build/bin folder).
OPENFACE_ENV = "TALK3D_OPENFACE"
OPENFACE_BINARY = "FeatureExtraction"
#: Lines of OpenFace's own output quoted in an error.
ERROR_TAIL_LINES = 8


class OpenFaceError(RuntimeError):
    """OpenFace failed, or wrote a CSV that is not its format; the message says which and why."""


@dataclass(frozen=True)
class AUTrack:
    """One image sequence's AU intensities as OpenFace reports them.

    frame: [N] int, OpenFace's 1-based frame numbers (images in name order).
    success: [N] bool, whether OpenFace tracked the face in that frame.
    intensity: [N, 17] float64, the ``AUxx_r`` columns in :data:`AU_INTENSITIES` order.
    """

    frame: np.ndarray
    success: np.ndarray
    intensity: np.ndarray


def read_openface_csv(path: str | os.PathLike) -> AUTrack:
    """OpenFace 2's per-frame CSV (FeatureExtraction's ``-aus`` output or its full output) -> AUTrack.

    Column names are read with OpenFace's leading spaces stripped. A file without the frame,
    success or any of the 17 intensity columns, with no rows, or with a non-number where a number
    belongs raises :class:`OpenFaceError` naming the file and the problem.
    """
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise OpenFaceError(f"{path}: cannot read OpenFace's CSV ({e})") from None
    if not rows:
        raise OpenFaceError(f"{path}: empty; expected OpenFace's CSV with a header row")
    header = [h.strip() for h in rows[0]]
    wanted = ["frame", "success"] + [f"{au}_r" for au in AU_INTENSITIES]
    missing = [w for w in wanted if w not in header]
    if missing:
        raise OpenFaceError(f"{path}: not an OpenFace AU file: columns {', '.join(missing)} missing "
                            f"(run FeatureExtraction with -aus)")
    cols = [header.index(w) for w in wanted]
    face_col = header.index("face_id") if "face_id" in header else None
    values = []
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if face_col is not None and row[face_col].strip() not in ("0", "0.0"):
            continue  # FaceLandmarkVidMulti's other faces: the first one is the subject
        try:
            values.append([float(row[c]) for c in cols])
        except (ValueError, IndexError):
            raise OpenFaceError(f"{path}, line {line}: expected {len(header)} numbers, got {row[:4]}...") from None
    if not values:
        raise OpenFaceError(f"{path}: no frames (OpenFace read no images)")
    v = np.asarray(values, np.float64)
    return AUTrack(frame=v[:, 0].astype(np.int64), success=v[:, 1] > 0.5, intensity=v[:, 2:])


def action_unit_error(pred: AUTrack, target: AUTrack) -> dict:
    """AUE of a rendered sequence against the real one (see the module docstring).

    Both tracks must cover the same frames (the same frame numbers). Returns a dict with ``aue``,
    ``aue_lower``, ``aue_upper`` (None when no frame pair was tracked on both sides), ``frames``
    (pairs scored), ``of`` (pairs given) and ``per_frame`` (each pair's summed squared error over
    the 17 AUs, None where a side was lost).
    """
    if pred.frame.shape != target.frame.shape or not np.array_equal(pred.frame, target.frame):
        raise OpenFaceError(f"OpenFace read {len(pred.frame)} rendered and {len(target.frame)} real frames, "
                            "or other frame numbers: the two image folders must hold the same frames")
    ok = pred.success & target.success  # [N]
    sq = (pred.intensity - target.intensity) ** 2  # [N, 17]
    lower = np.array([au in LOWER_FACE_AUS for au in AU_INTENSITIES])

    def total(columns) -> float | None:
        return float(sq[ok][:, columns].mean(axis=0).sum()) if ok.any() else None

    return {"aue": total(slice(None)), "aue_lower": total(lower), "aue_upper": total(~lower),
            "frames": int(ok.sum()), "of": int(ok.size),
            "per_frame": [float(s) if k else None for s, k in zip(sq.sum(axis=1), ok)]}


def _resolve(path: Path, origin: str) -> Path:
    path = path.expanduser()
    if path.is_dir():
        path = path / OPENFACE_BINARY
    if not path.is_file() or not os.access(path, os.X_OK):
        raise FileNotFoundError(f"OpenFace {origin}: {path} is not an executable {OPENFACE_BINARY} "
                                "(build OpenFace 2 from https://github.com/TadasBaltrusaitis/OpenFace "
                                "and give its build/bin/FeatureExtraction)")
    return path


def find_openface(explicit: str | os.PathLike | None = None) -> Path | None:
    """OpenFace's FeatureExtraction binary, or None when there is none.

    Search order: ``explicit`` (the binary, or the folder holding it), ``$TALK3D_OPENFACE`` (same),
    then ``FeatureExtraction`` on the PATH. An explicit path or environment value that is not an
    executable raises FileNotFoundError (a typo must not silently drop the metric).
    """
    if explicit is not None:
        return _resolve(Path(explicit), "given explicitly")
    env = os.environ.get(OPENFACE_ENV)
    if env:
        return _resolve(Path(env), f"from ${OPENFACE_ENV}")
    found = shutil.which(OPENFACE_BINARY)
    return Path(found) if found else None


class OpenFaceAU:
    """Runs OpenFace's FeatureExtraction on a folder of frames and reads its AU intensities.

    ``estimator(frames_dir, out_dir, name) -> AUTrack``: the images of ``frames_dir`` (read by
    OpenFace in name order) -> ``out_dir/name.csv`` -> the track.
    """

    def __init__(self, executable: str | os.PathLike):
        self.executable = Path(executable)
        self.name = f"OpenFace {OPENFACE_BINARY} ({self.executable})"

    def command(self, frames_dir: Path, out_dir: Path, name: str) -> list[str]:
        """The command line: an image sequence in, AUs only out, no window."""
        return [str(self.executable), "-fdir", str(frames_dir), "-out_dir", str(out_dir), "-of", name,
                "-aus", "-q"]

    def __call__(self, frames_dir: str | os.PathLike, out_dir: str | os.PathLike, name: str) -> AUTrack:
        frames_dir, out_dir = Path(frames_dir), Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            done = subprocess.run(self.command(frames_dir, out_dir, name), capture_output=True, text=True,
                                  errors="replace")
        except OSError as e:
            raise OpenFaceError(f"{self.executable} could not be started: {e}") from None
        said = "\n".join((done.stdout + done.stderr).strip().splitlines()[-ERROR_TAIL_LINES:])
        if done.returncode != 0:
            raise OpenFaceError(f"{self.executable} exited with status {done.returncode} on {frames_dir}:\n{said}")
        out = out_dir / f"{name}.csv"
        if not out.is_file():
            raise OpenFaceError(f"{self.executable} wrote no {out}:\n{said}")
        return read_openface_csv(out)
