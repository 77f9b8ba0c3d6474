"""The preprocessed talking-head dataset format: one folder per clip.

Written by ``make_synthetic_dataset`` and (later) by ``python -m talk3d.preprocess VIDEO``. With
N frames of side S, K landmarks, D-dim audio features (``DIR/`` holds):

===================== ======================== ================================================
file                  dtype, shape             content
===================== ======================== ================================================
manifest.json                                  see :func:`DatasetWriter.commit` / README below
frames.npy            uint8 [N, S, S, 3]       RGB crops (memory-mapped on read)
cameras.npy           float32 [N, 25]          EG3D labels: cam2world row-major (OpenCV camera
                                               axes, world +y up, face towards +z), then the
                                               3x3 intrinsics normalised by S
pose.npy              float32 [N, 3]           head yaw, pitch, roll (radians) in the camera's
                                               frame, R = R_y(yaw) R_x(pitch) R_z(roll)
blink.npy             float32 [N]              eye closure on AU45's scale (0 open, ~2+ closed)
landmarks.npy         float32 [N, K, 2]        (x, y) crop pixels; pixel (row, col) spans
                                               [col, col+1) x [row, row+1); names in manifest
mouth_mask.npy        uint8 [N, S, ceil(S/8)]  bit-packed (np.packbits along the width,
face_mask.npy         uint8 [N, S, ceil(S/8)]  big-endian bit order); :func:`unpack_mask`
audio.wav                                      16-kHz mono PCM16, 640 N samples
audio_features.npy    float32 [2N, D]          2 features per frame (see talk3d.audio)
(extra_files)         any dtype [N, ...]       e.g. mouth_opening.npy (synthetic ground truth)
===================== ======================== ================================================

Frames ``[0, N - N//11)`` are for training, the last ``N // 11`` (at least one) for validation;
the manifest stores both ranges. Folders are written atomically: everything goes to a sibling
``DIR.tmp-XXXXXXXX`` that is renamed to ``DIR`` only after it validates, so a crash never leaves a
folder that looks complete.
"""
from __future__ import annotations

import json
import math
import os
import platform
import shutil
import uuid
import wave as _wave
from pathlib import Path

import numpy as np
import torch

from ..audio.features import FEATURES_PER_FRAME, FPS, SAMPLE_RATE, SAMPLES_PER_FRAME, write_wav
from ..render.cameras import TALK3D_RIG, CameraRig, check_cameras

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "MANIFEST", "FILES", "DatasetError", "DatasetWriter",
    "validate_dataset", "load_manifest", "split_ranges", "pack_mask", "unpack_mask", "dataset_rig",
]

FORMAT_NAME = "talk3d-dataset"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: The standard arrays, by manifest key.
FILES = dict(frames="frames.npy", cameras="cameras.npy", pose="pose.npy", blink="blink.npy",
             landmarks="landmarks.npy", mouth_mask="mouth_mask.npy", face_mask="face_mask.npy",
             audio="audio.wav", audio_features="audio_features.npy")
#: Validation takes the last 1/11 of the frames (Talk3D's split).
VAL_FRACTION_DENOMINATOR = 11
#: audio.wav may differ from 640 N samples by this many frames (real videos' audio streams are
#: rarely exactly as long as the video stream).
AUDIO_LENGTH_TOL_FRAMES = 1


class DatasetError(ValueError):
    """A folder that is not a valid dataset; the message names the file and the problem."""


def split_ranges(num_frames: int) -> dict:
    """{'train': [0, n_train], 'val': [n_train, N]}: the last N // 11 frames (>= 1) validate."""
    n_val = max(1, num_frames // VAL_FRACTION_DENOMINATOR)
    if num_frames < 2:
        raise ValueError(f"a dataset needs at least 2 frames, got {num_frames}")
    return dict(train=[0, num_frames - n_val], val=[num_frames - n_val, num_frames])


def pack_mask(mask) -> np.ndarray:
    """[..., S, S] bool -> [..., S, ceil(S/8)] uint8 (np.packbits along the last axis)."""
    return np.packbits(np.asarray(mask, dtype=bool), axis=-1)


def unpack_mask(packed, size: int) -> np.ndarray:
    """[..., S, ceil(S/8)] uint8 -> [..., S, S] bool."""
    return np.unpackbits(np.asarray(packed), axis=-1, count=size).astype(bool)


def _versions() -> dict:
    from .. import __version__

    return dict(talk3d=__version__, numpy=np.__version__, torch=torch.__version__,
                python=platform.python_version())


# --------------------------------------------------------------------------------------------
# Reading and validation
# --------------------------------------------------------------------------------------------


def load_manifest(path) -> dict:
    """The parsed manifest of dataset folder ``path`` (format and version checked)."""
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"{path}: not a directory, so not a talk3d dataset folder")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise DatasetError(f"{path}: no {MANIFEST}, so not a talk3d dataset folder (make one with "
                           "`python -m talk3d.data synth --out DIR` or talk3d.preprocess)")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{mpath}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT_NAME:
        raise DatasetError(f"{mpath}: format is {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DatasetError(f"{mpath}: format_version {manifest.get('format_version')!r} is not "
                           f"supported (this talk3d reads version {FORMAT_VERSION})")
    for key in ("fps", "image_size", "num_frames", "split", "audio", "files", "landmarks"):
        if key not in manifest:
            raise DatasetError(f"{mpath}: missing key {key!r}")
    return manifest


def dataset_rig(manifest: dict) -> CameraRig:
    """The rig the dataset's cameras were built with (synthetic data records it; preprocess uses TALK3D_RIG)."""
    saved = manifest.get("settings", {}).get("rig")
    if saved:
        return CameraRig(float(saved["radius"]), tuple(saved["pivot"]), float(saved["focal"]))
    return TALK3D_RIG


def _open_array(path: Path, name: str, dtype, shape: tuple) -> np.ndarray:
    """Memory-map ``path`` and check dtype and shape (None in ``shape`` = any size; a trailing ``...``
    = any further dimensions)."""
    if not path.is_file():
        raise DatasetError(f"{path}: missing file (the manifest lists it as {name!r})")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DatasetError(f"{path}: unreadable or truncated .npy file ({e})") from None
    if dtype is not None and arr.dtype != np.dtype(dtype):
        raise DatasetError(f"{path}: dtype {arr.dtype}, expected {np.dtype(dtype)}")
    open_end = bool(shape) and shape[-1] is Ellipsis
    fixed = shape[:-1] if open_end else shape
    want = "(" + ", ".join(["*" if s is None else str(s) for s in fixed] + (["..."] if open_end else [])) + ")"
    ndim_ok = arr.ndim >= len(fixed) if open_end else arr.ndim == len(fixed)
    if not ndim_ok or any(s is not None and a != s for a, s in zip(arr.shape, fixed)):
        raise DatasetError(f"{path}: shape {tuple(arr.shape)}, expected {want} "
                           f"(num_frames = {shape[0]} in the manifest)")
    return arr


def _check_finite(path: Path, arr: np.ndarray) -> None:
    bad = ~np.isfinite(np.asarray(arr))
    if bad.any():
        first = np.argwhere(bad)[0].tolist()
        raise DatasetError(f"{path}: {int(bad.sum())} NaN or inf values (first at index {first})")


def validate_dataset(path) -> dict:
    """Check every file of a dataset folder against its manifest; return the manifest.

    Checks: presence of every listed file, dtype and shape of each array (frame count N, image
    size S, K landmarks, 2N audio features of the manifest's dim), finite cameras, pose, blink,
    landmarks and features, valid EG3D camera labels, the split ranges, and audio.wav's format
    and length. Frame pixels are not read (memory-mapped), so this is fast on large clips.

    Raises:
        DatasetError (a ValueError) naming the file and the problem.
    """
    path = Path(path)
    m = load_manifest(path)
    n, s, files = int(m["num_frames"]), int(m["image_size"]), m["files"]
    k, d = int(m["landmarks"]["count"]), int(m["audio"]["feature_dim"])
    mpath = path / MANIFEST
    for key in FILES:
        if key not in files:
            raise DatasetError(f"{mpath}: 'files' has no entry for {key!r}")
    if m["split"] != split_ranges(n):
        raise DatasetError(f"{mpath}: split {m['split']} is not {split_ranges(n)} for {n} frames")
    if int(m["audio"].get("features_per_frame", -1)) != FEATURES_PER_FRAME:
        raise DatasetError(f"{mpath}: audio.features_per_frame must be {FEATURES_PER_FRAME}")
    packed = math.ceil(s / 8)
    shapes = dict(frames=(np.uint8, (n, s, s, 3)), cameras=(np.float32, (n, 25)),
                  pose=(np.float32, (n, 3)), blink=(np.float32, (n,)),
                  landmarks=(np.float32, (n, k, 2)), mouth_mask=(np.uint8, (n, s, packed)),
                  face_mask=(np.uint8, (n, s, packed)),
                  audio_features=(np.float32, (FEATURES_PER_FRAME * n, d)))
    arrays = {}
    for key, (dtype, shape) in shapes.items():
        arrays[key] = _open_array(path / files[key], key, dtype, shape)
    for key in ("cameras", "pose", "blink", "landmarks", "audio_features"):
        _check_finite(path / files[key], arrays[key])
    try:
        check_cameras(torch.from_numpy(np.array(arrays["cameras"])))
    except ValueError as e:
        raise DatasetError(f"{path / files['cameras']}: invalid EG3D camera labels: {e}") from None
    for name, rel in m.get("extra_files", {}).items():
        _open_array(path / rel, f"extra {name}", None, (n, ...))
    _check_wav(path / files["audio"], n)
    return m


def _check_wav(path: Path, num_frames: int) -> None:
    if not path.is_file():
        raise DatasetError(f"{path}: missing file (the manifest lists it as 'audio')")
    try:
        with _wave.open(str(path), "rb") as f:
            rate, channels, width, length = (f.getframerate(), f.getnchannels(),
                                              f.getsampwidth(), f.getnframes())
    except (_wave.Error, EOFError) as e:
        raise DatasetError(f"{path}: not a PCM WAV file ({e})") from None
    if (rate, channels, width) != (SAMPLE_RATE, 1, 2):
        raise DatasetError(f"{path}: {rate} Hz, {channels} channel(s), {8 * width}-bit; expected "
                           f"{SAMPLE_RATE} Hz mono 16-bit")
    expected = num_frames * SAMPLES_PER_FRAME
    if abs(length - expected) > AUDIO_LENGTH_TOL_FRAMES * SAMPLES_PER_FRAME:
        raise DatasetError(f"{path}: {length} samples, expected {expected} ({num_frames} frames "
                           f"at {FPS} fps)")


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


class DatasetWriter:
    """Writes a dataset folder atomically. Use as a context manager::

        with DatasetWriter(out, n, size) as w:
            w.write_frames(0, images, face_mask=..., mouth_mask=...)   # in any chunks
            w.set_arrays(cameras=..., pose=..., blink=..., landmarks=...)
            w.set_audio(wave, features, encoder)
            w.commit(source="video.mp4", settings={...}, landmark_names=[...])

    Frames and masks go straight to memory-mapped files, so clips larger than RAM work. Leaving
    the block without ``commit`` (an exception) deletes the temporary folder.
    """

    def __init__(self, out_dir, num_frames: int, image_size: int, *, num_landmarks: int = 5,
                 overwrite: bool = False):
        self.path = Path(out_dir)
        self.n, self.s, self.k = int(num_frames), int(image_size), int(num_landmarks)
        self.overwrite = overwrite
        self._check_target()
        split_ranges(self.n)  # refuses < 2 frames early
        self.tmp = self.path.parent / f"{self.path.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir(parents=True)
        self.committed = False
        mm = np.lib.format.open_memmap
        packed = math.ceil(self.s / 8)
        self._frames = mm(self.tmp / FILES["frames"], "w+", np.uint8, (self.n, self.s, self.s, 3))
        self._masks = {key: mm(self.tmp / FILES[key], "w+", np.uint8, (self.n, self.s, packed))
                       for key in ("face_mask", "mouth_mask")}
        self._written = np.zeros(self.n, dtype=bool)
        self._have: set[str] = set()
        self._audio_meta: dict | None = None
        self._extras: dict[str, str] = {}

    def _check_target(self) -> None:
        p = self.path
        if not p.exists():
            return
        if not self.overwrite:
            raise FileExistsError(f"{p} already exists; pass overwrite=True (--overwrite) to "
                                  "replace it")
        # Never delete a folder that is not a dataset: overwrite is for datasets only.
        if not p.is_dir() or (any(p.iterdir()) and not (p / MANIFEST).is_file()):
            raise FileExistsError(f"{p} exists and is not a talk3d dataset folder; refusing to "
                                  "replace it even with overwrite=True")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self.committed:
            self._frames = self._masks = None
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False

    def write_frames(self, start: int, images, *, face_mask, mouth_mask) -> None:
        """images [b, S, S, 3] uint8; face_mask, mouth_mask [b, S, S] bool; frames start.."""
        images = np.asarray(images)
        b = images.shape[0]
        if images.shape[1:] != (self.s, self.s, 3) or images.dtype != np.uint8:
            raise ValueError(f"write_frames: images must be uint8 [b, {self.s}, {self.s}, 3], got "
                             f"{images.dtype} {images.shape}")
        if start < 0 or start + b > self.n:
            raise IndexError(f"write_frames: frames {start}..{start + b} outside [0, {self.n})")
        self._frames[start:start + b] = images
        for key, mask in (("face_mask", face_mask), ("mouth_mask", mouth_mask)):
            mask = np.asarray(mask)
            if mask.shape != (b, self.s, self.s):
                raise ValueError(f"write_frames: {key} must be [{b}, {self.s}, {self.s}]")
            self._masks[key][start:start + b] = pack_mask(mask)
        self._written[start:start + b] = True

    def _save(self, key: str, arr, dtype, shape) -> None:
        arr = np.asarray(arr, dtype=dtype)
        if arr.shape != shape:
            raise ValueError(f"{key} must have shape {shape}, got {arr.shape}")
        np.save(self.tmp / FILES[key], arr)
        self._have.add(key)

    def set_arrays(self, *, cameras, pose, blink, landmarks) -> None:
        """cameras [N, 25], pose [N, 3], blink [N], landmarks [N, K, 2] (crop pixels)."""
        n = self.n
        self._save("cameras", cameras, np.float32, (n, 25))
        self._save("pose", pose, np.float32, (n, 3))
        self._save("blink", blink, np.float32, (n,))
        self._save("landmarks", landmarks, np.float32, (n, self.k, 2))

    def set_audio(self, wave, features, encoder) -> None:
        """wave [T] at 16 kHz (fitted to 640 N samples), features [2N, D] from ``encoder``."""
        wave = np.asarray(wave, dtype=np.float32).reshape(-1)
        total = self.n * SAMPLES_PER_FRAME
        wave = np.pad(wave[:total], (0, max(0, total - wave.size)))
        write_wav(self.tmp / FILES["audio"], wave, SAMPLE_RATE)
        self._save("audio_features", features, np.float32, (FEATURES_PER_FRAME * self.n, encoder.dim))
        self._have.add("audio")
        self._audio_meta = dict(sample_rate=SAMPLE_RATE, encoder=encoder.name,
                                feature_dim=int(encoder.dim),
                                features_per_frame=FEATURES_PER_FRAME,
                                encoder_settings=encoder.settings())

    def add_extra(self, name: str, array) -> None:
        """An extra per-frame array [N, ...] saved as ``name.npy`` (listed in extra_files)."""
        array = np.asarray(array)
        if array.shape[:1] != (self.n,):
            raise ValueError(f"extra {name!r} must have {self.n} rows, got {array.shape}")
        np.save(self.tmp / f"{name}.npy", array)
        self._extras[name] = f"{name}.npy"

    def commit(self, *, source: str, settings: dict, landmark_names, ibug68_indices=None) -> Path:
        """Write manifest.json, validate, and move the folder into place."""
        missing = sorted(set(FILES) - {"frames", "face_mask", "mouth_mask"} - self._have)
        if missing:
            raise ValueError(f"commit: nothing written for {missing}")
        if not self._written.all():
            raise ValueError(f"commit: frames {np.flatnonzero(~self._written)[:10].tolist()}... "
                             "were never written")
        if len(landmark_names) != self.k:
            raise ValueError(f"commit: {len(landmark_names)} landmark names for K = {self.k}")
        for arr in (self._frames, *self._masks.values()):
            arr.flush()
        self._frames = self._masks = None
        manifest = dict(
            format=FORMAT_NAME, format_version=FORMAT_VERSION, source=str(source), fps=FPS,
            image_size=self.s, num_frames=self.n, split=split_ranges(self.n),
            camera=dict(convention="eg3d", label_size=25, description=(
                "cam2world 4x4 row-major (OpenCV camera axes: x right, y down, z forward; world "
                "+y up, face towards +z) then intrinsics 3x3 row-major normalised by image size"),
                pose="head yaw, pitch, roll radians; R = R_y(yaw) R_x(pitch) R_z(roll)"),
            audio=self._audio_meta,
            landmarks=dict(count=self.k, names=list(landmark_names),
                           ibug68_indices=None if ibug68_indices is None else list(ibug68_indices),
                           coords="crop pixels (x, y); pixel (row, col) spans [col, col+1) x "
                                  "[row, row+1)"),
            masks=dict(storage="np.packbits along the width (bitorder big), uint8 [N, S, ceil(S/8)]",
                       face_mask="head foreground (face and hair), 1 inside",
                       mouth_mask="region the lips can cover, 1 inside"),
            blink="AU45 scale: 0 open, ~2+ closed",
            files=dict(FILES), extra_files=dict(self._extras), settings=settings,
            versions=_versions())
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        validate_dataset(self.tmp)
        self._check_target()  # something may have appeared at the target meanwhile
        old = None
        if self.path.exists():
            old = self.path.parent / f"{self.path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.path
