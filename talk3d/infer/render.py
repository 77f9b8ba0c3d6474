"""Rendering a trained talking head saying new speech, one 25-fps frame per 40 ms of audio.

The conditions of frame ``n`` (see :class:`talk3d.models.TalkingHead`):

- ``audio`` ``[8, 2, D]``: the window of the speech's features around ``n``, computed with the
  encoder the training data was made with (a model's audio layers only fit that one);
- ``camera`` ``[25]``: from the camera mode (``gt``, ``orbit``, ``fixed:YAW,PITCH``, a JSON file);
- ``blink`` ``[1]`` (``eye``) and ``pose`` ``[3]`` + ``landmarks`` ``[5, 2]`` (``pose``): the
  training clip's, cycled, or neutral ones.

Novel views (``orbit``, ``fixed``, ``[yaw, pitch]`` in JSON) are built with
:func:`talk3d.data.synthetic.head_cameras`, the function that made the training cameras (synthetic
data and ``talk3d.preprocess`` alike), so angle 0 is the training data's frontal view and the
angles mean what the training clip's ``pose.npy`` means: the head turned by (yaw, pitch) in front
of the fixed camera rig (positive yaw turns the face towards world +x).
"""
from __future__ import annotations

import contextlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..audio.features import SAMPLES_PER_FRAME, encoder_from_manifest, windows
from ..audio.files import AudioFileError, read_audio
from ..data.format import DatasetError, dataset_rig, load_manifest
from ..ops.backends import check_impl
from ..render.cameras import LABEL_SIZE, CameraRig, check_cameras

__all__ = ["InferenceError", "PoseRangeWarning", "TrainingClip", "load_training_clip", "read_speech",
           "num_frames_for", "camera_track", "render_speech", "resolve_size", "to_uint8", "to_uint8_frames", "PRECISIONS",
           "SIZES", "SOURCES", "ORBIT_YAW_DEG", "ORBIT_PITCH_DEG"]

# The paper's novel-view range: yaw within +-30 degrees, pitch within +-20 degrees.
ORBIT_YAW_DEG = 30.0
ORBIT_PITCH_DEG = 20.0


def audio_context(info: dict) -> tuple[int, int]:
    """(audio_window, audio_steps) of a run's model: the frames of each frame's audio window and the
    feature rows of each of them (:func:`talk3d.audio.windows`), from its saved deltaplane config."""
    from ..models import DeltaplaneConfig

    cfg = DeltaplaneConfig.from_dict(info["model"]["deltaplane"])
    return cfg.audio_window, cfg.audio_steps

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Empty-space skipping: the grid is the union of this many of the render's own frames (evenly
# spaced) and stops rays whose transmittance falls below EARLY_STOP (their remaining samples add
# under 0.1 % of a pixel's colour).
GRID_FRAMES = 16
EARLY_STOP = 1e-3
SIZES = ("sr", "raw")  # the super-resolved image, or the volume render at the run's resolution
SOURCES = ("train", "neutral")


class InferenceError(ValueError):
    """Bad inputs to inference (audio, camera spec, run folder), said in words."""


# --------------------------------------------------------------------------------------------
# The training clip: cameras, poses, blinks, landmarks and the audio encoder
# --------------------------------------------------------------------------------------------


@dataclass
class TrainingClip:
    """What inference reuses from the run's training data (N frames, K landmarks).

    cameras [N, 25] float32 EG3D labels; pose [N, 3] (yaw, pitch, roll rad); blink [N] float32;
    landmarks [N, K, 2] in [-1, 1] (as :class:`talk3d.data.TalkingHeadDataset` gives them);
    rig: the camera rig the cameras were made with; manifest: the dataset's manifest.
    """

    cameras: np.ndarray
    pose: np.ndarray
    blink: np.ndarray
    landmarks: np.ndarray
    rig: CameraRig
    manifest: dict

    @property
    def num_frames(self) -> int:
        return int(self.cameras.shape[0])

    def encoder(self):
        """The audio encoder the training features came from (same name and settings)."""
        return encoder_from_manifest(self.manifest["audio"])


def load_training_clip(info: dict) -> TrainingClip:
    """The run's training dataset folder (``info["data"]``) as a :class:`TrainingClip`.

    Raises InferenceError when the folder is gone: the audio encoder's settings, the cameras and
    the eye/pose signals all come from it.
    """
    data = Path(info["data"])
    try:
        manifest = load_manifest(data)
    except DatasetError as e:
        raise InferenceError(
            f"the run's training data folder {data} cannot be read ({e}); inference needs it for the "
            "audio encoder's settings (name, feature size, STFT settings) and the training cameras, "
            "blinks and poses: restore it (or edit 'data' in the run's config.json to where it now is)"
        ) from None
    files = manifest["files"]
    arrays = {k: np.load(data / files[k]) for k in ("cameras", "pose", "blink", "landmarks")}
    cams = arrays["cameras"]
    if cams.ndim != 2 or cams.shape[1] != LABEL_SIZE or cams.shape[0] == 0:
        raise InferenceError(f"{data / files['cameras']}: expected [N, {LABEL_SIZE}] camera labels, got {list(cams.shape)}")
    bad = ~np.isfinite(cams).all(axis=1)
    if bad.any():
        raise InferenceError(f"{data / files['cameras']}: {int(bad.sum())} of {cams.shape[0]} training cameras hold "
                             f"NaN or inf (first: frame {int(np.flatnonzero(bad)[0])}); the gt camera track and "
                             "the eye/pose signals come from this file: preprocess the clip again")
    # Same normalisation as TalkingHeadDataset: crop pixels -> [-1, 1] (align_corners=False edges).
    landmarks = arrays["landmarks"].astype(np.float32) / float(manifest["image_size"]) * 2 - 1
    rig = dataset_rig(manifest)
    return TrainingClip(cameras=arrays["cameras"].astype(np.float32), pose=arrays["pose"].astype(np.float32),
                        blink=arrays["blink"].astype(np.float32).reshape(-1), landmarks=landmarks, rig=rig,
                        manifest=manifest)


def _cycle(num_frames: int, period: int) -> np.ndarray:
    """[num_frames] indices into a clip of ``period`` frames, back and forth (0 1 2 1 0 1 ...).

    Ping-pong rather than wrap-around: a wrap would jump from the clip's last pose and camera to
    its first in one frame.
    """
    if period == 1:
        return np.zeros(num_frames, dtype=np.int64)
    t = np.arange(num_frames) % (2 * period - 2)
    return np.where(t < period, t, 2 * period - 2 - t)


# --------------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------------


def read_speech(path) -> np.ndarray:
    """Speech from a WAV (integer PCM or float) or any audio or video file FFmpeg decodes (MP3,
    M4A/AAC, FLAC, Opus, a video's sound track; through PyAV), any rate and channel count ->
    [T] float32 16-kHz mono (:func:`talk3d.audio.read_audio`).

    Raises InferenceError (missing, unreadable, no audio stream, no samples, NaN) with the path in
    the message.
    """
    path = Path(path)
    try:
        wave = read_audio(path)
    except AudioFileError as e:  # (what FFmpeg cannot decode, no conversion by FFmpeg would help)
        raise InferenceError(f"--audio {e}") from None
    if wave.size == 0:
        raise InferenceError(f"--audio {path}: the file holds no samples (zero-length audio)")
    if not np.isfinite(wave).all():
        raise InferenceError(f"--audio {path}: the audio contains NaN or inf")
    return wave


def num_frames_for(wave16k) -> int:
    """Video frames for a 16-kHz wave [T]: ceil(duration * 25), so the video covers all the audio."""
    return -(-int(np.asarray(wave16k).shape[0]) // SAMPLES_PER_FRAME)


# --------------------------------------------------------------------------------------------
# Cameras
# --------------------------------------------------------------------------------------------


def _novel_view_cameras(yaw_pitch_deg: np.ndarray, rig: CameraRig) -> torch.Tensor:
    """[F, 2] (yaw, pitch) degrees -> [F, 25] labels, as the training data built its cameras."""
    from ..data.synthetic import head_cameras  # the synthetic module pulls in rendering code: import late

    rad = np.radians(np.asarray(yaw_pitch_deg, dtype=np.float64).reshape(-1, 2))
    pose = np.concatenate([rad, np.zeros((rad.shape[0], 1))], axis=1)  # no roll
    return head_cameras(pose, rig)


def _orbit_angles(num_frames: int) -> np.ndarray:
    """[F, 2] degrees: a figure-eight over the clip, starting frontal, reaching yaw +-30, pitch +-20."""
    u = np.arange(num_frames, dtype=np.float64) / max(num_frames, 1)
    return np.stack([ORBIT_YAW_DEG * np.sin(2 * math.pi * u), ORBIT_PITCH_DEG * np.sin(4 * math.pi * u)], axis=1)


def _cameras_from_json(path: Path, num_frames: int, rig: CameraRig) -> torch.Tensor:
    try:
        entries = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InferenceError(f"--camera {path}: not a readable JSON file ({e})") from None
    if not isinstance(entries, list) or not entries:
        raise InferenceError(f"--camera {path}: expected a non-empty JSON list, one entry per frame")
    try:
        arr = np.asarray(entries, dtype=np.float64)
    except (ValueError, TypeError):
        raise InferenceError(f"--camera {path}: entries must all be [yaw, pitch] (degrees) or all "
                             f"{LABEL_SIZE}-number camera labels") from None
    if arr.ndim != 2 or arr.shape[1] not in (2, LABEL_SIZE):
        raise InferenceError(f"--camera {path}: entries must be [yaw, pitch] (degrees) or {LABEL_SIZE}-number "
                             f"camera labels, got shape {list(arr.shape)}")
    if not np.isfinite(arr).all():
        raise InferenceError(f"--camera {path}: NaN or inf in the cameras")
    if arr.shape[1] == 2:
        _check_angles(arr, f"--camera {path}", per_entry=True)
        _warn_past_paper_range(arr, f"--camera {path}")
    arr = arr[_cycle(num_frames, arr.shape[0])]
    if arr.shape[1] == 2:
        return _novel_view_cameras(arr, rig)
    labels = torch.from_numpy(arr).float()
    try:
        check_cameras(labels)
    except ValueError as e:
        raise InferenceError(f"--camera {path}: {e}") from None
    return labels


#: Head angles a camera may take, degrees: past these the head turns away or over.
MAX_YAW_DEG, MAX_PITCH_DEG = 180.0, 90.0


def _check_angles(angles: np.ndarray, where: str, per_entry: bool = False) -> None:
    """angles [N, 2] (yaw, pitch) degrees: refuse the first past MAX_YAW_DEG / MAX_PITCH_DEG (often
    radians given for degrees), naming its entry when ``per_entry``."""
    bad = np.flatnonzero((np.abs(angles[:, 0]) > MAX_YAW_DEG) | (np.abs(angles[:, 1]) >= MAX_PITCH_DEG))
    if bad.size:
        i = int(bad[0])
        raise InferenceError(f"{where}{f', entry {i}' if per_entry else ''}: yaw must be within +-180 and pitch "
                             f"within +-90 degrees, got ({angles[i, 0]:g}, {angles[i, 1]:g}) (the paper's novel "
                             "views span yaw +-30, pitch +-20)")


class PoseRangeWarning(UserWarning):
    """A camera past the paper's novel-view range (yaw +-30, pitch +-20 degrees)."""


def _warn_past_paper_range(angles: np.ndarray, where: str) -> None:
    """angles [N, 2] (yaw, pitch) degrees: warn (PoseRangeWarning) when any is past the paper's range
    (ORBIT_YAW_DEG, ORBIT_PITCH_DEG): there a camera sees parts of the head no training frame showed."""
    far = np.flatnonzero((np.abs(angles[:, 0]) > ORBIT_YAW_DEG) | (np.abs(angles[:, 1]) > ORBIT_PITCH_DEG))
    if far.size:
        i = int(far[0])
        warnings.warn(f"{where}: {far.size} of {len(angles)} camera(s) past the paper's novel-view range (yaw "
                      f"+-{ORBIT_YAW_DEG:g}, pitch +-{ORBIT_PITCH_DEG:g} degrees), the first at ({angles[i, 0]:g}, "
                      f"{angles[i, 1]:g}): no training frame saw the head from there, so expect smeared or "
                      "missing parts", PoseRangeWarning, stacklevel=3)


def camera_track(spec: str, num_frames: int, clip: TrainingClip) -> torch.Tensor:
    """Cameras [num_frames, 25] float32 for a camera spec.

    ``gt``: the training clip's cameras, cycled back and forth; ``orbit``: yaw +-30 and pitch
    +-20 degrees over the clip; ``fixed:YAW,PITCH`` (degrees); or a path to a JSON list with one
    entry per frame, [yaw, pitch] degrees or 25-number labels (cycled when shorter). Angles past
    +-180 yaw or +-90 pitch raise :class:`InferenceError`; past the paper's range (+-30, +-20) they
    render with a :class:`PoseRangeWarning`.
    """
    spec = str(spec)
    if spec == "gt":
        return torch.from_numpy(clip.cameras[_cycle(num_frames, clip.num_frames)])
    if spec == "orbit":
        return _novel_view_cameras(_orbit_angles(num_frames), clip.rig)
    if spec.startswith("fixed:"):
        try:
            yaw, pitch = (float(v) for v in spec[len("fixed:"):].split(","))
        except ValueError:
            raise InferenceError(f"--camera {spec!r}: expected fixed:YAW,PITCH in degrees, e.g. fixed:20,-5") from None
        if not (math.isfinite(yaw) and math.isfinite(pitch)):
            raise InferenceError(f"--camera {spec!r}: angles must be finite")
        angles = np.tile([[yaw, pitch]], (num_frames, 1))
        _check_angles(angles[:1], f"--camera {spec!r}")
        _warn_past_paper_range(angles[:1], f"--camera {spec!r}")
        return _novel_view_cameras(angles, clip.rig)
    path = Path(spec)
    if path.is_file():
        return _cameras_from_json(path, num_frames, clip.rig)
    raise InferenceError(f"--camera {spec!r}: not 'gt', 'orbit', 'fixed:YAW,PITCH' or an existing JSON file")


def _checked_track(cameras: torch.Tensor, spec: str) -> torch.Tensor:
    """The whole camera track checked once, on the host, so no frame checks its cameras on the
    device (a read-back each, which waits for the GPU)."""
    try:
        check_cameras(cameras)
    except ValueError as e:
        raise InferenceError(f"--camera {spec}: {e}") from None
    return cameras


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """images [B, 3, S, S] in [-1, 1] (any float dtype) -> [B, 3, S, S] uint8 on their device: the
    8-bit values a video shows."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class _HostFrames:
    """A batch of frames on its way to the host as [B, S, S, 3] uint8 (converted on the device, a
    quarter of the float bytes). On a GPU the copy is queued (into pinned memory) behind the
    batch's work and :meth:`numpy` waits for it alone, so the caller can queue the next batch
    first and encode this one while the GPU renders the next."""

    def __init__(self, images: torch.Tensor):  # [B, 3, S, S] in [-1, 1], any float dtype
        x = to_uint8(images).permute(0, 2, 3, 1).contiguous()
        self.event = None
        if x.device.type == "cuda":
            self.host = x.to("cpu", non_blocking=True)  # a pinned destination
            self.event = torch.cuda.Event()
            # On the stream the copy went to: x's device's, which need not be the current device.
            self.event.record(torch.cuda.current_stream(x.device))
        else:
            self.host = x.cpu()

    def numpy(self) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()
        return self.host.numpy()


def to_uint8_frames(images: torch.Tensor) -> np.ndarray:
    """images [B, 3, S, S] in [-1, 1] (any float dtype) -> [B, S, S, 3] uint8, as a video shows them."""
    return _HostFrames(images).numpy()


def _to_device(cond: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Host condition tensors -> float32 on ``device``. To a GPU through pinned memory with
    non-blocking copies: a copy from pageable memory first waits for the GPU to finish all the
    work already queued, so the next batch could not be queued while one renders."""
    cond = {k: v.to(torch.float32) for k, v in cond.items()}
    if device.type != "cuda":
        return {k: v.to(device) for k, v in cond.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in cond.items()}


#: Back ends of the field op (``impl=``).
IMPLS = ("auto", "torch", "cpu", "cuda", "triton")


def check_speech(wave, what: str) -> np.ndarray:
    """Speech handed over as an array -> [T] float32, or InferenceError naming ``what``: samples must
    be floating point in [-1, 1] (PCM16 integers would play 32768x too loud), one channel (a [T, 2]
    array flattened would interleave the channels) and finite."""
    try:
        arr = np.asarray(wave)
    except Exception as e:  # noqa: BLE001 (anything np.asarray refuses)
        raise InferenceError(f"{what} is not an array of samples ({e})") from None
    if not np.issubdtype(arr.dtype, np.floating):
        hint = " (PCM16 integers: divide by 32768 first)" if np.issubdtype(arr.dtype, np.integer) else ""
        raise InferenceError(f"{what} has dtype {arr.dtype}; expected floating-point samples in [-1, 1] at 16 kHz{hint}")
    if arr.ndim != 1:
        raise InferenceError(f"{what} has shape {list(arr.shape)}; expected a 1-D array of 16-kHz mono samples "
                             "(average the channels and resample first)")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise InferenceError(f"{what} contains NaN or inf")
    return arr


def resolve_size(size, info: dict) -> str:
    """'sr' / 'raw', or the pixel size of one of them for this run (512 -> 'sr', 128 -> 'raw' at the
    release's sizes)."""
    if size in SIZES:
        return size
    px = {"sr": int(info["model"]["generator"]["sr_resolution"]), "raw": int(info["model"]["render_resolution"])}
    try:
        want = int(str(size))
    except ValueError:
        raise InferenceError(f"size must be one of {SIZES} or a pixel size ({px['sr']} or {px['raw']} for this "
                             f"run), got {size!r}") from None
    for name, value in px.items():
        if value == want:
            return name
    raise InferenceError(f"size {want}: this run outputs {px['sr']}x{px['sr']} (sr, the super-resolved image) and "
                         f"renders {px['raw']}x{px['raw']} (raw)")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise InferenceError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def compile_for_inference(model, *, backend: str = "inductor", skip_empty: bool = False) -> None:
    """``torch.compile`` a :class:`talk3d.models.TalkingHead` in place for :func:`render_speech`.

    The whole per-frame forward (U-Net, render, SR) becomes one graph: every step of the dense
    render has a fixed shape and reads nothing back (the cameras are checked before the graph, in
    the model's prologue, or once per track by :func:`render_speech`). On CUDA it runs in
    reduce-overhead mode, so each batch replays one CUDA graph instead of dispatching each of its
    operations from Python (813 aten operations a forward at the release's sizes, views
    included). With ``skip_empty`` the render's sample counts depend on the data, so only the
    U-Net's per-frame part (attention and decoder; the encoder is cached) is compiled. Pair with
    ``whole_batches=True``: a last, shorter batch would compile again.
    """
    device = next(model.parameters()).device
    # (backend="cudagraphs" captures CUDA graphs without inductor's code generation; modes are
    # inductor's alone.)
    mode = "reduce-overhead" if device.type == "cuda" and backend == "inductor" else None
    target = model.deltaplane.predictor if skip_empty else model
    target.compile(backend=backend, mode=mode)


def render_speech(model, info: dict, wave16k, *, camera: str = "gt", size: str = "sr", precision: str = "fp32",
                  batch: int = 4, eye: str = "train", pose: str = "train", impl: str = "auto",
                  clip: TrainingClip | None = None, skip_empty: bool = False,
                  whole_batches: bool = False) -> Iterator[np.ndarray]:
    """Frames of ``model`` saying ``wave16k``, rendered ``batch`` at a time and yielded one by one.

    Args:
        model: a :class:`talk3d.models.TalkingHead` (e.g. from :func:`talk3d.train.load_talking_head`),
            on the device to render on.
        info: the run's config.json (``load_talking_head``'s second result).
        wave16k: [T] float 16-kHz mono speech; gives ``num_frames_for(wave16k)`` frames.
        camera: see :func:`camera_track`.
        size: 'sr' (the super-resolved image, S = the generator's ``sr_resolution``; or that S as
            a number) or 'raw' (the
            volume render at the run's ``render_resolution``).
        precision: 'fp32', 'bf16' or 'fp16' (autocast on the model's device; bf16 on a CPU works
            but is slow).
        batch: frames per forward pass.
        eye: 'train' (the training clip's blinks, cycled) or 'neutral' (blink 0).
        pose: 'train' (the training clip's pose and landmarks, cycled) or 'neutral' (pose 0,
            landmarks the clip's mean).
        impl: the field op's back end ('auto', 'torch', 'cpu', 'cuda', 'triton').
        clip: the training clip, when already loaded (default: ``load_training_clip(info)``).
        skip_empty: skip empty space with an occupancy grid of this render's frames (the union
            over ``GRID_FRAMES`` of them, dilated by a cell; :meth:`TalkingHead.occupancy_grid`)
            and stop rays at transmittance ``EARLY_STOP``. Close to the dense render, not equal.
        whole_batches: render the last batch at full size too (its extra frames repeat the last
            one and are dropped): a compiled model (:func:`compile_for_inference`) then runs one
            shape only.

    Returns:
        An iterator of [S, S, 3] uint8 RGB frames. Everything is checked (and the audio encoded)
        before it is returned, so bad inputs fail at the call, not at the first frame.
    """
    size = resolve_size(size, info)
    _check_choice("precision", precision, PRECISIONS)
    _check_choice("eye", eye, SOURCES)
    _check_choice("pose", pose, SOURCES)
    _check_choice("impl", impl, IMPLS)
    try:
        check_impl(impl, next(model.parameters()).device)
    except ValueError as e:
        raise InferenceError(str(e)) from None
    if int(batch) < 1:
        raise InferenceError(f"batch must be >= 1, got {batch}")
    batch = int(batch)
    wave = check_speech(wave16k, "render_speech: the audio")
    if wave.size == 0:
        raise InferenceError("render_speech: the audio is empty (zero samples)")
    clip = clip if clip is not None else load_training_clip(info)
    if clip.manifest["audio"]["encoder"] != info.get("audio_encoder", clip.manifest["audio"]["encoder"]):
        raise InferenceError(f"the run was trained on {info['audio_encoder']!r} features but its data folder now has "
                             f"{clip.manifest['audio']['encoder']!r}")
    n = num_frames_for(wave)
    features = clip.encoder().encode(wave, n)  # [2 n, D]
    window, steps = audio_context(info)
    cameras = _checked_track(camera_track(camera, n, clip), camera)  # [n, 25]
    idx = _cycle(n, clip.num_frames)
    blinks = clip.blink[idx] if eye == "train" else np.zeros(n, np.float32)  # [n]
    if pose == "train":
        poses, landmarks = clip.pose[idx], clip.landmarks[idx]  # [n, 3], [n, K, 2]
    else:
        poses = np.zeros((n, 3), np.float32)
        landmarks = np.repeat(clip.landmarks.mean(axis=0, keepdims=True), n, axis=0)
    resolution = int(info["model"]["render_resolution"])
    key = "image" if size == "sr" else "image_raw"
    device = next(model.parameters()).device
    dtype = PRECISIONS[precision]

    def conditions(ids) -> dict[str, torch.Tensor]:
        ids = np.asarray(ids)
        cond = dict(
            camera=cameras[torch.from_numpy(ids)],
            audio=torch.from_numpy(np.stack([windows(features, i, window, steps) for i in ids])),
            blink=torch.from_numpy(np.ascontiguousarray(blinks[ids, None])),
            pose=torch.from_numpy(np.ascontiguousarray(poses[ids])),
            landmarks=torch.from_numpy(np.ascontiguousarray(landmarks[ids])),
        )
        return _to_device(cond, device)

    def frames() -> Iterator[np.ndarray]:
        amp = (torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext())
        skip = {}
        if skip_empty:
            sample = np.unique(np.linspace(0, n - 1, min(n, GRID_FRAMES)).round().astype(np.int64))
            with torch.inference_mode():
                grid = model.occupancy_grid([conditions(sample[i:i + batch]) for i in range(0, len(sample), batch)])
            skip = dict(grid=grid, early_stop=EARLY_STOP)
        previous = None  # the batch before, still on its way to the host
        for s in range(0, n, batch):
            ids = list(range(s, min(n, s + batch)))
            real = len(ids)
            if whole_batches:
                ids += [n - 1] * (batch - real)
            with torch.inference_mode(), amp:
                out = model(conditions(ids), impl=impl, deterministic=True, resolution=resolution,
                            check_cameras=False, **skip)[key]  # the track was checked (_checked_track)
            current = _HostFrames(out[:real])  # queued; the previous batch's frames are handed out meanwhile
            if previous is not None:
                yield from previous.numpy()
            previous = current
        if previous is not None:
            yield from previous.numpy()

    return frames()
