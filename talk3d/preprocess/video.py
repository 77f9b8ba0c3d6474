"""Video and audio input/output through PyAV (FFmpeg's demuxers and codecs, so any common
container and codec).

Frames are resampled to the dataset's 25 fps by nearest timestamp (duplicating or dropping source
frames), audio to 16 kHz mono. Output frame ``n`` shows time ``t0 + n / 25`` where ``t0`` is the
first video frame's timestamp; the audio is shifted by the same ``t0`` so that sound and picture
stay in sync whatever the streams' start times.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..audio.features import SAMPLE_RATE
from .errors import PreprocessError

__all__ = ["VideoInfo", "probe_video", "iter_frames", "read_audio_track", "write_video",
           "fit_audio", "load_audio_file"]


@dataclass
class VideoInfo:
    """What the container says about a file (durations are estimates until decoded)."""

    path: str
    width: int
    height: int
    source_fps: float
    duration: float | None  # seconds, None when the container does not say
    has_audio: bool
    start_time: float  # seconds of the video stream's first timestamp (0 when unknown)

    def to_dict(self) -> dict:
        return asdict(self)


def _open(path):
    import av

    path = Path(path)
    if not path.is_file():
        raise PreprocessError(f"{path}: no such file")
    try:
        return av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError) as e:
        raise PreprocessError(f"{path}: not a readable video file ({e})") from None


def _quarter_turns(frame) -> int:
    """Counter-clockwise quarter turns that show ``frame`` upright: FFmpeg's libraries leave a
    video's rotation flag (phones record portrait clips as rotated landscape) to the caller, and
    PyAV reports it as ``frame.rotation``, degrees counter-clockwise (-90: turn clockwise)."""
    return int(round(float(getattr(frame, "rotation", 0) or 0) / 90.0)) % 4


def _upright(image: np.ndarray, turns: int) -> np.ndarray:
    """[H, W, 3] stored image -> as displayed (np.rot90 turns counter-clockwise)."""
    return np.ascontiguousarray(np.rot90(image, turns)) if turns else image


def probe_video(path) -> VideoInfo:
    """Open ``path`` and describe its first video stream; PreprocessError if there is none."""
    import av

    with _open(path) as c:
        if not c.streams.video:
            raise PreprocessError(f"{path}: the file has no video stream")
        v = c.streams.video[0]
        rate = v.average_rate or v.base_rate or v.guessed_rate
        duration = None
        if v.duration is not None and v.time_base is not None:
            duration = float(v.duration * v.time_base)
        elif c.duration is not None:
            duration = c.duration / 1e6  # container durations are in AV_TIME_BASE (us)
        start = float(v.start_time * v.time_base) if v.start_time is not None and v.time_base else 0.0
        width, height = int(v.codec_context.width), int(v.codec_context.height)
        try:  # the size as displayed: a quarter-turned (portrait phone) clip swaps its sides
            if _quarter_turns(next(c.decode(v))) % 2:
                width, height = height, width
        except (StopIteration, av.error.FFmpegError):
            pass  # no decodable frame: iter_frames says so
        return VideoInfo(str(path), width, height,
                         float(rate) if rate else float("nan"), duration, bool(c.streams.audio),
                         start)


def iter_frames(path, fps: int = 25, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """Decoded RGB frames [H, W, 3] uint8 resampled to ``fps`` by nearest timestamp, upright as a
    player shows them (a rotation flag applied).

    Output frame n is the source frame nearest to ``t0 + n / fps``; the last output frame is the
    last whose time falls before the source's end (last timestamp + one source frame period).
    Deterministic, so two passes over a file give the same frames.
    """
    import av

    with _open(path) as c:
        if not c.streams.video:
            raise PreprocessError(f"{path}: the file has no video stream")
        stream = c.streams.video[0]
        stream.thread_type = "AUTO"  # frame-threaded decoding: several times faster on HD
        src_period = 1.0 / float(stream.average_rate or fps)
        t0, prev, prev_t, n = None, None, None, 0
        try:
            for k, frame in enumerate(c.decode(stream)):
                t = frame.time if frame.time is not None else k * src_period
                if t0 is None:
                    t0 = t
                # (PyAV 18.1.1 hands out views with padded rows, e.g. 1152-byte rows for a 352-px
                # frame: consumers that need contiguous pixels copy them, as DlibDetector does.)
                image = _upright(frame.to_ndarray(format="rgb24"), _quarter_turns(frame))
                if prev is not None:
                    # Every output time nearer to prev than to this frame gets prev.
                    while t0 + n / fps < 0.5 * (prev_t + t):
                        yield prev
                        n += 1
                        if max_frames is not None and n >= max_frames:
                            return
                prev, prev_t = image, t
        except av.error.FFmpegError as e:
            raise PreprocessError(f"{path}: video decoding failed after {n} frames ({e})") from None
        if prev is None:
            raise PreprocessError(f"{path}: the video stream has no decodable frames")
        while t0 + n / fps < prev_t + src_period - 1e-6:
            yield prev
            n += 1
            if max_frames is not None and n >= max_frames:
                return


def read_audio_track(path, start_time: float = 0.0) -> np.ndarray:
    """The first audio stream of ``path`` as [T] float32 16-kHz mono, sample 0 at ``start_time``
    (the video's first timestamp, seconds). PreprocessError when there is no audio stream."""
    from ..audio.files import AudioFileError, NoAudioStreamError, decode_audio_stream

    try:
        wave, first = decode_audio_stream(path)
    except NoAudioStreamError as e:
        raise PreprocessError(f"{e}; pass the sound track with --audio FILE") from None
    except AudioFileError as e:
        raise PreprocessError(str(e)) from None
    if wave.size == 0:
        raise PreprocessError(f"{path}: the audio stream has no decodable samples")
    # Align to the video: audio that starts later is padded, earlier is cut.
    shift = int(round(((first or 0.0) - start_time) * SAMPLE_RATE))
    if shift > 0:
        wave = np.concatenate([np.zeros(shift, np.float32), wave])
    elif shift < 0:
        wave = wave[-shift:]
    return wave


def write_video(path, frames, fps: int = 25, wave=None, sample_rate: int = SAMPLE_RATE,
                codec: str = "libx264", crf: int = 18) -> Path:
    """Encode frames [N, H, W, 3] uint8 (H, W even for yuv420p) to ``path`` (container from the
    suffix, e.g. .mp4 / .mkv), with ``wave`` [T] float in [-1, 1] at ``sample_rate`` as AAC.

    Used by the tests (videos of the synthetic head) and handy for checking a dataset by eye.
    """
    import av

    frames = np.asarray(frames)
    path = Path(path)
    with av.open(str(path), "w") as c:
        v = c.add_stream(codec, rate=fps)
        v.height, v.width = int(frames.shape[1]), int(frames.shape[2])
        v.pix_fmt = "yuv420p"
        v.options = {"crf": str(crf)}
        a = None
        if wave is not None:
            a = c.add_stream("aac", rate=sample_rate)
            a.layout = "mono"
        for img in frames:
            for packet in v.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img),
                                                              format="rgb24")):
                c.mux(packet)
        for packet in v.encode(None):
            c.mux(packet)
        if a is not None:
            samples = np.asarray(wave, dtype=np.float32).reshape(1, -1)
            block = 1024  # AAC's frame size
            for s in range(0, samples.shape[1], block):
                f = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, s:s + block]),
                                               format="flt", layout="mono")
                f.sample_rate = sample_rate
                f.pts = s
                for packet in a.encode(f):
                    c.mux(packet)
            for packet in a.encode(None):
                c.mux(packet)
    return path


def fit_audio(wave, num_frames: int, samples_per_frame: int) -> np.ndarray:
    """wave [T] -> [num_frames * samples_per_frame]: zero-padded or cut at the end."""
    total = num_frames * samples_per_frame
    wave = np.asarray(wave, dtype=np.float32).reshape(-1)[:total]
    return np.pad(wave, (0, total - wave.size))


def load_audio_file(path) -> np.ndarray:
    """--audio: a WAV or any file PyAV decodes -> [T] float32 16-kHz mono (:func:`talk3d.audio.read_audio`)."""
    from ..audio.files import AudioFileError, read_audio

    try:
        wave = read_audio(path)
    except AudioFileError as e:
        raise PreprocessError(f"--audio {e}") from None
    if wave.size == 0:
        raise PreprocessError(f"--audio {path}: the file holds no samples (zero-length audio)")
    return wave
