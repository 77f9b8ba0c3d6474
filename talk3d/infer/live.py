"""Live rendering from the command line: ``python -m talk3d.infer --stream`` (a :class:`Talker` fed
as the audio arrives, frames written as they come out, and the latency measured).

Audio sources:
    a WAV file read in chunks of ``--chunk-ms`` (with ``--realtime``, each chunk is handed over
    only when it would exist had the file been spoken into a microphone), or ``-``: raw 16-kHz
    mono signed 16-bit little-endian PCM on stdin until it closes, e.g.
    ``ffmpeg -f pulse -i default -ar 16000 -ac 1 -f s16le - | python -m talk3d.infer --stream
    --audio - --out - ... | ffplay -f rawvideo -pixel_format rgb24 -video_size 512x512 -framerate 25 -``.
Frame sinks:
    an mp4 (frames encoded as they come, the received speech muxed alongside), or ``-``: raw
    RGB24 frames on stdout (the frame size is printed on stderr).
Latency:
    a frame's delay is the time from the moment the audio it waits for existed (the chunk that
    completed ``640 (n + 1) + Talker.latency_samples`` samples; at the end of the stream, the last
    chunk) to the moment the frame came out. It adds the model's render time (and any backlog) to
    the audio look-ahead ``Talker.latency_s``, which the report lists apart.
"""
from __future__ import annotations

import bisect
import sys
import time
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterator

import numpy as np

from ..audio.features import SAMPLE_RATE, SAMPLES_PER_FRAME
from .render import InferenceError

__all__ = ["ArrivalLog", "wave_chunks", "pcm_chunks", "LatencyReport", "frame_delays"]

PCM_BYTES = 2  # signed 16-bit samples on stdin


@dataclass
class ArrivalLog:
    """When each amount of audio existed: ``samples[i]`` samples in total at ``times[i]`` (seconds)."""

    samples: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)

    def add(self, total: int, at: float) -> None:
        self.samples.append(int(total))
        self.times.append(float(at))

    @property
    def total(self) -> int:
        return self.samples[-1] if self.samples else 0

    def time_for(self, samples: int) -> float:
        """The first time at which at least ``samples`` samples existed (the last time if never)."""
        if not self.samples:
            raise ValueError("ArrivalLog.time_for: no audio has arrived")
        i = bisect.bisect_left(self.samples, min(int(samples), self.total))
        return self.times[i]


def wave_chunks(wave: np.ndarray, chunk: int, log: ArrivalLog, *, realtime: bool = False,
                clock: Callable[[], float] = time.perf_counter,
                sleep: Callable[[float], None] = time.sleep) -> Iterator[np.ndarray]:
    """Chunks of ``chunk`` samples of a whole wave [T] (16-kHz mono), logging when each existed.

    With ``realtime``, chunk k (ending at sample e) is handed over no earlier than ``e / 16000`` s
    after the first request, as from a microphone; a consumer that falls behind gets it late, but
    its log time stays the moment it existed.
    """
    if chunk < 1:
        raise InferenceError(f"chunk size must be >= 1 sample, got {chunk}")
    start = clock()
    for s in range(0, wave.shape[0], chunk):
        e = min(wave.shape[0], s + chunk)
        if realtime:
            due = start + e / SAMPLE_RATE
            now = clock()
            if now < due:
                sleep(due - now)
            log.add(e, due)
        else:
            log.add(e, clock())
        yield wave[s:e]


def pcm_chunks(stream: BinaryIO, chunk: int, log: ArrivalLog,
               clock: Callable[[], float] = time.perf_counter) -> Iterator[np.ndarray]:
    """Raw 16-kHz mono s16le PCM from a binary stream, ``chunk`` samples at a time (the last one
    shorter), until it ends; logs the time each read returned. A trailing odd byte is an error."""
    if chunk < 1:
        raise InferenceError(f"chunk size must be >= 1 sample, got {chunk}")
    carry = b""
    total = 0
    while True:
        data = stream.read(chunk * PCM_BYTES - len(carry))
        if not data:
            break
        if total == 0 and not carry and data[:4] == b"RIFF":
            # A WAV file piped in: its 44-byte header would play as a click and its rate may not be 16 kHz.
            raise InferenceError("stdin holds a WAV file (it starts with RIFF), not raw PCM: pass it as --audio FILE, "
                                 "or strip the header: `ffmpeg -i IN -f s16le -ac 1 -ar 16000 -`")
        data = carry + data
        whole = len(data) - len(data) % PCM_BYTES
        carry = data[whole:]
        if whole == 0:
            continue
        samples = np.frombuffer(data[:whole], dtype="<i2").astype(np.float32) / 32768.0
        total += samples.shape[0]
        log.add(total, clock())
        yield samples
    if carry:
        raise InferenceError("the PCM on stdin ended in the middle of a sample (an odd number of bytes): "
                             "it must be signed 16-bit little-endian mono at 16 kHz")


@dataclass
class LatencyReport:
    """Frame delays (seconds) of a live render and the audio look-ahead they include."""

    delays: np.ndarray
    lookahead_s: float
    wall_s: float

    def summary(self) -> str:
        d = self.delays * 1000
        if d.size == 0:
            return "no frames (empty audio)"
        return (f"{d.size} frames in {self.wall_s:.2f} s ({d.size / self.wall_s:.1f} frames/s); audio look-ahead "
                f"{self.lookahead_s * 1000:.0f} ms; render delay after it: mean {d.mean():.0f} ms, "
                f"95th percentile {np.percentile(d, 95):.0f} ms, max {d.max():.0f} ms")


def frame_delays(yield_times: list[float], log: ArrivalLog, latency_samples: int) -> np.ndarray:
    """Delay of each frame n: its yield time minus the time the audio it waits for existed."""
    return np.array([t - log.time_for(SAMPLES_PER_FRAME * (n + 1) + latency_samples)
                     for n, t in enumerate(yield_times)])


def run_live(talker, chunks: Iterator[np.ndarray], log: ArrivalLog, sink, *,
             clock: Callable[[], float] = time.perf_counter) -> LatencyReport:
    """Render ``chunks`` through ``talker.stream`` into ``sink`` (``open(width, height)``,
    ``audio(samples)``, ``frame(frame)``, ``close()``, ``abort()``); returns the latency report."""
    received: list[np.ndarray] = []

    def tapped():
        for c in chunks:
            c = np.asarray(c, dtype=np.float32)
            received.append(c)
            yield c

    yields: list[float] = []
    start = clock()
    opened = False
    try:
        for frame in talker.stream(tapped()):
            if not opened:
                sink.open(frame.shape[1], frame.shape[0])
                opened = True
            if received:  # the speech that arrived, handed over before its frames
                sink.audio(np.concatenate(received))
                received.clear()
            sink.frame(frame)
            yields.append(clock())
        if opened and received:
            sink.audio(np.concatenate(received))
        sink.close()
    except BaseException:
        sink.abort()
        raise
    return LatencyReport(frame_delays(yields, log, talker.latency_samples), talker.latency_s, clock() - start)


class Mp4Sink:
    """Frames into an H.264 mp4 as they come, with the received speech as its AAC track."""

    def __init__(self, path):
        self.path, self.writer = path, None

    def open(self, width: int, height: int) -> None:
        from .video import StreamingVideoWriter

        self.writer = StreamingVideoWriter(self.path, width, height, audio_stream=True)

    def audio(self, samples: np.ndarray) -> None:
        self.writer.push_audio(samples)

    def frame(self, frame: np.ndarray) -> None:
        self.writer.write(frame)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


class RawSink:
    """Raw RGB24 frames to a binary stream (stdout by default); the size goes to stderr once."""

    def __init__(self, stream: BinaryIO | None = None, info: BinaryIO | None = None):
        self.stream = stream if stream is not None else sys.stdout.buffer
        self.info = info if info is not None else sys.stderr

    def open(self, width: int, height: int) -> None:
        print(f"raw frames on stdout: rgb24 {width}x{height} at 25 fps (ffplay -f rawvideo -pixel_format rgb24 "
              f"-video_size {width}x{height} -framerate 25 -)", file=self.info)

    def audio(self, samples: np.ndarray) -> None:  # the caller has the speech already
        pass

    def frame(self, frame: np.ndarray) -> None:
        self.stream.write(np.ascontiguousarray(frame).tobytes())
        self.stream.flush()

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass
