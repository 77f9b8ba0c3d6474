"""Speech from files: WAV by our own reader, every other container and codec through PyAV.

Users bring speech as MP3, M4A/AAC, FLAC, Opus or the sound track of a video as often as WAV. WAV is
read without FFmpeg (:func:`talk3d.audio.read_wav`: the formats audio tools write); anything else,
and WAVs whose codec that reader does not take (ADPCM, mu-law), goes to FFmpeg's demuxers and
decoders through PyAV, resampled by FFmpeg to 16 kHz, its channels averaged as :func:`read_wav` does.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .features import SAMPLE_RATE, read_wav

__all__ = ["AudioFileError", "NoAudioStreamError", "decode_audio_stream", "read_audio", "read_soundtrack"]


class AudioFileError(ValueError):
    """A speech file that cannot be read; the message names the file and what is wrong."""


class NoAudioStreamError(AudioFileError):
    """A readable media file without an audio stream (e.g. a silent video)."""


def _check_file(path: Path) -> None:
    """AudioFileError for a folder or a missing file, naming it."""
    if path.is_dir():
        raise AudioFileError(f"{path}: a folder, not an audio file")
    if not path.is_file():
        raise AudioFileError(f"{path}: no such file")


def _open_audio(path: Path, no_pyav: str):
    """(av, the open container, its first audio stream) of ``path``; AudioFileError (the file's
    name and what is wrong) for a folder, a missing file, no PyAV, a non-media file or no audio."""
    _check_file(path)
    try:
        import av
    except ImportError:
        raise AudioFileError(f"{path}: {no_pyav}") from None
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError) as e:
        raise AudioFileError(f"{path}: not a readable audio or video file ({e})") from None
    if not container.streams.audio:
        container.close()
        raise NoAudioStreamError(f"{path}: the file has no audio stream")
    return av, container, container.streams.audio[0]


def decode_audio_stream(path) -> tuple[np.ndarray, float | None]:
    """The first audio stream of any file FFmpeg reads (audio or video container).

    Returns:
        (wave ``[T]`` float32 16-kHz mono, the first decoded frame's timestamp in seconds or None
        when the stream has none). The wave may be empty (a stream with no samples).
    Raises:
        AudioFileError: no such file, PyAV missing, not a media file, no audio stream, or a
        decoding error.
    """
    path = Path(path)
    av, container, stream = _open_audio(path, "reading audio other than WAV needs PyAV (pip install av), or "
                                              "convert it: `ffmpeg -i IN -ac 1 -ar 16000 OUT.wav`")
    with container:
        # Planar float at 16 kHz in the stream's own channel layout; the channels are averaged
        # here, as read_wav does, not by FFmpeg's mono downmix ((L + R) / sqrt(2) for stereo):
        # the same speech from a video and from a WAV must reach the audio encoder at one level.
        resampler = av.AudioResampler(format="fltp", rate=SAMPLE_RATE)
        chunks, first = [], None
        try:
            for frame in container.decode(stream):
                if first is None and frame.time is not None:
                    first = float(frame.time)
                chunks += [out.to_ndarray().mean(axis=0) for out in resampler.resample(frame)]
            chunks += [out.to_ndarray().mean(axis=0) for out in resampler.resample(None)]  # flush
        except av.error.FFmpegError as e:
            raise AudioFileError(f"{path}: audio decoding failed ({e})") from None
    wave = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    return wave, first


def read_audio(path) -> np.ndarray:
    """Speech from a WAV or any audio or video file FFmpeg decodes -> ``[T]`` float32 16-kHz mono.

    A ``.wav`` is read by :func:`talk3d.audio.read_wav` (no FFmpeg needed), falling back to PyAV
    for WAV codecs it does not take; other files go to PyAV. Empty audio is returned as it is:
    callers say what an empty wave means for them.

    Raises:
        AudioFileError: the file cannot be read (see :func:`decode_audio_stream`).
    """
    path = Path(path)
    _check_file(path)
    wav_error = None
    if path.suffix.lower() == ".wav":
        try:
            return read_wav(path, sample_rate=SAMPLE_RATE)[0]
        except (ValueError, EOFError) as e:
            wav_error = e  # e.g. a compressed WAV (ADPCM, mu-law): FFmpeg may read it
    try:
        return decode_audio_stream(path)[0]
    except AudioFileError as e:
        if wav_error is not None:
            raise AudioFileError(f"{path}: not a WAV file our reader takes ({wav_error}), and FFmpeg "
                                 f"cannot read it either ({e})") from None
        raise


def read_soundtrack(path, max_channels: int = 2, rates: tuple[int, ...] | None = None) -> tuple[np.ndarray, int]:
    """The file's first audio stream as it sounds, for a video's sound track: its own sample rate,
    its channels (more than ``max_channels`` mixed down by FFmpeg to stereo). With ``rates`` (those
    an encoder takes), a rate not among them is resampled to the lowest one above it (else the
    highest).

    Returns:
        (wave [C, T] float32, C = 1 or 2, sample rate). Raises AudioFileError as
        :func:`decode_audio_stream`.
    """
    path = Path(path)
    av, container, stream = _open_audio(path, "reading a sound track needs PyAV (pip install av)")
    with container:
        rate = int(stream.rate or stream.codec_context.sample_rate)
        if rates and rate not in rates:
            rate = min((r for r in rates if r > rate), default=max(rates))
        channels = min(max_channels, max(1, stream.codec_context.channels))
        resampler = av.AudioResampler(format="fltp", layout="mono" if channels == 1 else "stereo", rate=rate)
        chunks = []
        try:
            for frame in container.decode(stream):
                chunks += [out.to_ndarray() for out in resampler.resample(frame)]
            chunks += [out.to_ndarray() for out in resampler.resample(None)]
        except av.error.FFmpegError as e:
            raise AudioFileError(f"{path}: audio decoding failed ({e})") from None
    wave = np.concatenate(chunks, axis=1).astype(np.float32) if chunks else np.zeros((channels, 0), np.float32)
    return wave, rate
