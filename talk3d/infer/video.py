"""A streaming H.264 + AAC writer: frames are encoded as they arrive, never held together.

The audio is muxed alongside: after video frame ``n`` the writer encodes the speech up to the end
of that frame (``(n + 1) * 640`` samples at 16 kHz), so the two streams stay interleaved in the
file and memory stays flat however long the clip. The file is written under a temporary name and
renamed when closed without error, so a failed or interrupted render leaves no half file behind.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..audio.features import FPS, SAMPLE_RATE

__all__ = ["StreamingVideoWriter", "VIDEO_CODEC", "AUDIO_CODEC", "CRF"]

VIDEO_CODEC = "libx264"
AUDIO_CODEC = "aac"
PIX_FMT = "yuv420p"  # what players expect; needs even width and height (chroma is halved)
CRF = 18  # x264 quality: visually near-lossless
AAC_FRAME = 1024  # samples per AAC frame
LAYOUTS = {1: "mono", 2: "stereo"}  # channels -> FFmpeg layout
#: Sample rates AAC encodes (MPEG-4's sampling-frequency table).
AAC_RATES = (7350, 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)


class StreamingVideoWriter:
    """Write RGB frames [H, W, 3] uint8 at 25 fps to ``path`` with ``wave`` as its AAC track.

    Args:
        path: output file; the container comes from the suffix (.mp4, .mkv, ...).
        width, height: frame size (even: yuv420p).
        wave: [T] (mono) or [C, T] (C = 1 or 2: mono or stereo) float32 in [-1, 1] at ``sample_rate``,
            or None for a silent video.
        fps: frames per second.
        audio_stream: the speech arrives while writing (live rendering): start with no audio and
            hand it over with :meth:`push_audio` as it comes (``wave`` must be None). Only the
            samples not yet encoded are kept.

    Use as a context manager; :meth:`write` one frame at a time.
    """

    def __init__(self, path, width: int, height: int, wave=None, *, fps: int = FPS,
                 sample_rate: int = SAMPLE_RATE, crf: int = CRF, audio_stream: bool = False):
        import av

        if width % 2 or height % 2:
            raise ValueError(f"StreamingVideoWriter: {PIX_FMT} needs an even frame size, got {width}x{height}")
        self.path = Path(path)
        self._tmp = self.path.with_name(f"{self.path.stem}.partial{self.path.suffix}")
        self.width, self.height, self.fps, self.sample_rate = int(width), int(height), int(fps), int(sample_rate)
        if audio_stream and wave is not None:
            raise ValueError("StreamingVideoWriter: pass either wave or audio_stream=True, not both")
        if wave is not None:
            wave = np.asarray(wave, dtype=np.float32)
            wave = wave.reshape(1, -1) if wave.ndim == 1 else wave
            if wave.ndim != 2 or wave.shape[0] not in LAYOUTS:
                raise ValueError(f"StreamingVideoWriter: wave must be [T] or [C, T] with C in {tuple(LAYOUTS)}, "
                                 f"got {list(wave.shape)}")
        self._wave = np.zeros((1, 0), np.float32) if audio_stream else (
            None if wave is None else np.ascontiguousarray(wave))
        self._layout = "mono" if self._wave is None else LAYOUTS[self._wave.shape[0]]
        self._wave_start = 0  # sample index of self._wave[:, 0] (a stream drops what is encoded)
        self._audio_stream = bool(audio_stream)
        self._audio_done = 0  # samples of the wave already sent to the encoder
        self.frames = 0
        self._container = av.open(str(self._tmp), "w")
        self._v = self._container.add_stream(VIDEO_CODEC, rate=self.fps)
        self._v.width, self._v.height, self._v.pix_fmt = self.width, self.height, PIX_FMT
        self._v.options = {"crf": str(crf)}
        self._a = None
        if self._wave is not None:
            self._a = self._container.add_stream(AUDIO_CODEC, rate=self.sample_rate)
            self._a.layout = self._layout

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, frame) -> None:
        """frame: [H, W, 3] uint8 RGB."""
        import av

        frame = np.ascontiguousarray(frame)
        if frame.shape != (self.height, self.width, 3) or frame.dtype != np.uint8:
            raise ValueError(f"StreamingVideoWriter.write: expected [{self.height}, {self.width}, 3] uint8, "
                             f"got {list(frame.shape)} {frame.dtype}")
        for packet in self._v.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            self._container.mux(packet)
        self.frames += 1
        self._feed_audio(self.frames * self.sample_rate // self.fps)

    def push_audio(self, samples) -> None:
        """More of the speech ([T] float32 mono at ``sample_rate``), for a writer made with
        ``audio_stream=True``; it is encoded as the frames it belongs to are written."""
        if not self._audio_stream:
            raise ValueError("StreamingVideoWriter.push_audio: the writer was made with a whole wave")
        samples = np.asarray(samples, dtype=np.float32).reshape(1, -1)
        self._wave = np.concatenate([self._wave, samples], axis=1)
        self._feed_audio(self.frames * self.sample_rate // self.fps)

    def _feed_audio(self, until: int) -> None:
        import av

        if self._a is None:
            return
        until = min(until, self._wave_start + self._wave.shape[1])
        while self._audio_done < until:
            # Whole AAC frames where possible: the encoder buffers partial ones itself anyway.
            end = min(until, self._audio_done + AAC_FRAME)
            lo, hi = self._audio_done - self._wave_start, end - self._wave_start
            # Packed float: [1, T] mono, or [1, 2 T] stereo with the channels interleaved.
            chunk = np.ascontiguousarray(self._wave[:, lo:hi].T).reshape(1, -1)
            f = av.AudioFrame.from_ndarray(chunk, format="flt", layout=self._layout)
            f.sample_rate, f.pts = self.sample_rate, self._audio_done
            for packet in self._a.encode(f):
                self._container.mux(packet)
            self._audio_done = end
        if self._audio_stream:  # keep only what is not encoded yet
            self._wave = self._wave[:, self._audio_done - self._wave_start:]
            self._wave_start = self._audio_done

    def close(self) -> Path:
        """Flush the encoders, close the file and move it into place; returns the path."""
        if self._container is None:
            return self.path
        if self._a is not None:
            self._feed_audio(self._wave_start + self._wave.shape[1])  # the rest of the speech
            for packet in self._a.encode(None):
                self._container.mux(packet)
        for packet in self._v.encode(None):
            self._container.mux(packet)
        self._container.close()
        self._container = None
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Close without keeping anything (after an error)."""
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # noqa: BLE001 - the file is discarded anyway
                pass
            self._container = None
        self._tmp.unlink(missing_ok=True)
