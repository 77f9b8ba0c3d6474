"""Streaming inference: video frames of a trained talking head as its speech arrives (issue 8).

Example::

    import talk3d

    talker = talk3d.Talker("runs/synth", device="cuda", precision="bf16")   # loads the model once
    print(talker.latency_s)                      # 0.29: look-ahead audio each frame waits for

    def microphone():                            # any iterable of 1-D float32 16-kHz mono chunks,
        while (chunk := read_from_somewhere()) is not None:   # of any length (empty ones too)
            yield chunk

    for frame in talker.stream(microphone()):    # [S, S, 3] uint8 RGB, 25 per second of audio
        show(frame)

    frames = list(talker.render(wave16k))        # offline: talk3d.infer.render_speech, same settings

When does frame ``n`` come out?
    Frame ``n`` shows the 40 ms of audio ``[640 n, 640 (n + 1))`` (16 kHz, 25 fps). Its audio
    condition is the window of frames ``n - 4 .. n + 3`` (the run's ``audio_window``, 8 by default),
    each read as ``audio_steps`` feature rows centred on it (16 by default, 320 ms: the last row is
    the first of frame ``n + 7``), and the log-mel feature of a 20-ms slot reads its 40-ms STFT
    window, 10 ms past the slot. So frame ``n`` is yielded as soon as ``640 (n + 1) +
    latency_samples`` samples have arrived, with ``latency_samples = 7 * 640 + 160 = 4640``
    (:attr:`Talker.latency_frames` = 7.25 frames, :attr:`Talker.latency_s` = 290 ms) for a log-mel
    run with the default window; a run trained with ``audio_steps = 2`` (each frame's own 40 ms)
    waits ``3 * 640 + 160 = 2080`` (130 ms). After ``R`` samples, ``max(0, (R - latency_samples) //
    640)`` frames have been yielded. That is the audio look-ahead only; add the render time of a
    frame (and the chunk size of the audio source) for the end-to-end delay. When the iterable
    ends, the remaining frames are flushed: the audio is zero-padded to whole frames and the last
    frames' windows are clamped, exactly as offline.

Does streaming give the offline frames?
    For log-mel runs (what ``talk3d.data`` and ``talk3d.preprocess`` make by default): yes, to fp32
    rounding, for any chunking. The log-mel encoder is local (no per-clip normalisation; a feature
    reads only its own STFT window), so re-encoding a short frame-aligned context around the new
    frames (one frame before them, the audio received after them) with the run's own
    :meth:`LogMelEncoder.encode` computes the very same rows as encoding the whole clip; cameras,
    blinks, poses and landmarks are the offline ones exactly. What is not bit-exact is rounding:
    the encoder's mel filterbank is one matrix product over all the rows it is given, and MKL's
    sgemm rounds a row differently depending on the row count and where the row falls in its
    blocking, which a stream (not knowing the clip's length) cannot reproduce. Measured on the CPU
    (200 random lengths and chunkings): 65 % of the runs bit-identical features, 0.3 % of the
    rows off by at most one ulp (9.5e-7 on values up to 8); frames are then bit-identical or off
    by fp32 rounding (about 1e-6 on the [-1, 1] image, rarely one uint8 level on one pixel). A
    row-by-row filterbank product in ``LogMelEncoder`` would make streams bit-exact (it would
    change the features of existing datasets by an ulp, so it is left to the encoder's owner).
    ``batch`` adds the same kind of rounding: a stream groups the frames that happen to be ready,
    and the model rounds differently for different batch sizes (also about 1e-6).

    wav2vec2 runs: an approximation. wav2vec2 normalises the wave over the whole clip and its
    transformer attends over the whole clip, so no bounded context reproduces the offline
    features. The stream re-encodes ``wav2vec2_context_s`` seconds of audio before the new frames
    plus everything received after them, and waits ``wav2vec2_lookahead_s`` of audio past a slot
    before taking its feature (this is the encoder's part of the latency, instead of log-mel's
    10 ms). Features (and so frames) differ from the offline ones by an amount that depends on the
    checkpoint and shrinks with longer contexts; with the whole clip in one chunk and a context
    longer than the clip they are identical. Each new frame costs one wav2vec2 pass over the context.

Cameras, blinks and poses for a stream of unknown length:
    ``gt``, JSON files, ``fixed:YAW,PITCH``, ``eye``/``pose`` ``train`` and ``neutral``: as offline
    (the training clip or the JSON cycled back and forth from frame 0; per frame, independent of
    the length). ``orbit``: offline, the figure-eight spans the whole clip; a stream does not know
    its length, so its orbit repeats every :data:`STREAM_ORBIT_PERIOD` frames (10 s); it equals
    the offline orbit of a clip of exactly that many frames.
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from ..audio.features import (FEATURES_PER_FRAME, HOP, SAMPLE_RATE, SAMPLES_PER_FRAME, AudioEncoder, LogMelEncoder,
                              Wav2Vec2Encoder, window_reach, windows)
from ..devices import resolve_device
from ..ops.backends import check_impl
from .render import (IMPLS, PRECISIONS, SOURCES, InferenceError, TrainingClip, audio_context,
                     _check_choice, _checked_track, check_speech, _cycle, _novel_view_cameras, _orbit_angles,
                     _to_device, to_uint8_frames, camera_track, load_training_clip, render_speech, resolve_size)

__all__ = ["Talker", "STREAM_ORBIT_PERIOD", "WAV2VEC2_CONTEXT_S", "WAV2VEC2_LOOKAHEAD_S"]

#: Frames per figure-eight of the ``orbit`` camera in a stream (10 s at 25 fps).
STREAM_ORBIT_PERIOD = 250
#: wav2vec2 runs: seconds of audio re-encoded before the new frames' audio (default).
WAV2VEC2_CONTEXT_S = 2.0
#: wav2vec2 runs: seconds of audio after a feature's slot awaited before computing it (default).
WAV2VEC2_LOOKAHEAD_S = 0.2


class _StreamingFeatures:
    """Audio features computed as samples arrive, equal to ``encoder.encode`` of the whole wave
    (for log-mel: up to the rounding of its filterbank product, see the module docstring).

    Feature ``k`` reads the samples ``[320 k - back, 320 (k + 1) + ahead)``. After each
    :meth:`push` the features of frames whose two slots' reads lie inside the received audio are
    computed ("final") by encoding the frame-aligned stretch from ``ceil(back / 640)`` frames
    before the first new frame to the end of the received audio and keeping the new frames' rows:
    their reads touch neither the stretch's edge padding nor the zeros it is padded with, so a
    local encoder gives exactly its whole-clip values. :meth:`finish` computes the rest as
    ``encode`` does at the clip's end (zero-padding to whole frames, then the encoder's own edge
    padding). Only the audio still needed is kept.

    Args:
        encoder: a :class:`LogMelEncoder` (exact) or a :class:`Wav2Vec2Encoder` (approximate:
            ``context_s`` before and ``lookahead_s`` after each slot stand in for the whole clip).
    """

    def __init__(self, encoder: AudioEncoder, *, context_s: float = WAV2VEC2_CONTEXT_S,
                 lookahead_s: float = WAV2VEC2_LOOKAHEAD_S):
        self.encoder = encoder
        if isinstance(encoder, LogMelEncoder):
            # encode() reflect-pads by `left` so that window k (stride HOP) starts at 320 k - left.
            left = encoder.win_length // 2 - HOP // 2
            self.back, self.ahead, self.exact = left, encoder.win_length - HOP - left, True
        elif isinstance(encoder, Wav2Vec2Encoder):
            if not (context_s >= 0 and lookahead_s >= 0 and math.isfinite(context_s + lookahead_s)):
                raise InferenceError(f"wav2vec2 context and look-ahead must be finite seconds >= 0, got "
                                     f"{context_s}, {lookahead_s}")
            self.back, self.ahead, self.exact = round(context_s * SAMPLE_RATE), round(lookahead_s * SAMPLE_RATE), False
        else:
            raise NotImplementedError(f"streaming features for the audio encoder {type(encoder).__name__} "
                                      f"({encoder.name}): only log-mel (exact) and wav2vec2 (approximate) runs stream")
        self.back_frames = -(-self.back // SAMPLES_PER_FRAME)
        self._buf = np.zeros(0, np.float32)  # samples [640 * _buf_frame, received)
        self._buf_frame = 0
        self.received = 0  # samples pushed so far
        self.done = 0  # frames whose features have been returned
        self.num_frames: int | None = None  # known after finish()

    def _encode(self, start: int, stop: int, num_frames: int) -> np.ndarray:
        """Rows of frames [start, stop) from the audio [640 a, received), a = start - back_frames."""
        a = max(0, start - self.back_frames)
        sub = self._buf[(a - self._buf_frame) * SAMPLES_PER_FRAME:]
        rows = self.encoder.encode(sub, num_frames - a)  # [2 (num_frames - a), D]
        return rows[FEATURES_PER_FRAME * (start - a):FEATURES_PER_FRAME * (stop - a)]

    def _trim(self) -> None:
        keep = max(0, self.done - self.back_frames)
        if keep > self._buf_frame:
            self._buf = self._buf[(keep - self._buf_frame) * SAMPLES_PER_FRAME:].copy()
            self._buf_frame = keep

    def push(self, samples: np.ndarray) -> np.ndarray:
        """samples [t] float32 -> features [2 k, D] of the k frames that became final (k >= 0)."""
        if self.num_frames is not None:
            raise RuntimeError("_StreamingFeatures: push after finish")
        if samples.size:
            self._buf = np.concatenate([self._buf, samples])
            self.received += int(samples.size)
        final = max(self.done, (self.received - self.ahead) // SAMPLES_PER_FRAME)
        if final <= self.done:
            return np.zeros((0, self.encoder.dim), np.float32)
        total = -(-self.received // SAMPLES_PER_FRAME)  # frames touched by the received audio
        out = self._encode(self.done, final, total)
        self.done = final
        self._trim()
        return out

    def finish(self) -> np.ndarray:
        """Features [2 k, D] of the remaining frames; afterwards ``num_frames`` is the clip's count."""
        if self.num_frames is None:
            self.num_frames = -(-self.received // SAMPLES_PER_FRAME)
        if self.done >= self.num_frames:
            return np.zeros((0, self.encoder.dim), np.float32)
        out = self._encode(self.done, self.num_frames, self.num_frames)
        self.done = self.num_frames
        self._buf, self._buf_frame = np.zeros(0, np.float32), self.num_frames
        return out


def _check_chunk(index: int, chunk) -> np.ndarray:
    """One chunk of the stream -> [t] float32, or InferenceError naming the chunk."""
    if isinstance(chunk, (float, np.floating)):
        raise InferenceError(f"stream: audio chunk {index} is a single sample: stream() takes an iterable of "
                             "chunks (arrays of samples); for a whole wave pass [wave]")
    return check_speech(chunk, f"stream: audio chunk {index}")


class Talker:
    """A trained run, loaded once, that renders speech offline (:meth:`render`) or as it streams in
    (:meth:`stream`). See the module's docstring for the latency and what streaming reproduces.

    Args:
        run_dir: a run folder of ``python -m talk3d.train`` (its training data folder must exist:
            the audio encoder's settings and the training cameras, blinks and poses come from it).
        device: where to render (default: ``cuda`` when available, else ``cpu``).
        precision: 'fp32', 'bf16' or 'fp16' (autocast).
        camera: 'gt', 'orbit' (in a stream: period :data:`STREAM_ORBIT_PERIOD` frames),
            'fixed:YAW,PITCH' or a JSON file (see :func:`talk3d.infer.camera_track`).
        eye, pose: 'train' or 'neutral' (see :func:`talk3d.infer.render_speech`).
        size: 'sr' (super-resolved) or 'raw' (the volume render), or the pixel size of one of them.
        impl: the field op's back end ('auto', 'torch', 'cpu', 'cuda', 'triton').
        batch: at most this many frames per forward pass; a stream renders the frames that are
            ready, up to ``batch`` at a time, and never waits to fill a batch.
        checkpoint: file in ``run_dir/checkpoints`` (default ``latest.pt``).
        wav2vec2_context_s, wav2vec2_lookahead_s: wav2vec2 runs only (see the module docstring).

    Raises InferenceError for bad settings or a missing training data folder, FileNotFoundError /
    ValueError for a missing or damaged run (as :func:`talk3d.train.load_talking_head`).
    """

    def __init__(self, run_dir, *, device=None, precision: str = "fp32", camera: str = "gt", eye: str = "train",
                 pose: str = "train", size: str = "sr", impl: str = "auto", batch: int = 1,
                 checkpoint: str = "latest.pt", wav2vec2_context_s: float = WAV2VEC2_CONTEXT_S,
                 wav2vec2_lookahead_s: float = WAV2VEC2_LOOKAHEAD_S):
        from ..train import load_talking_head  # training code: import when a Talker is made

        _check_choice("precision", precision, PRECISIONS)
        _check_choice("eye", eye, SOURCES)
        _check_choice("pose", pose, SOURCES)
        _check_choice("impl", impl, IMPLS)
        if isinstance(batch, bool) or int(batch) != batch or int(batch) < 1:
            raise InferenceError(f"batch must be an integer >= 1, got {batch!r}")
        self.precision, self.camera, self.eye, self.pose, self.size, self.impl = precision, str(camera), eye, pose, \
            size, impl
        self.batch = int(batch)
        self.run_dir = Path(run_dir)
        try:
            self.device = resolve_device(device, "device")
            check_impl(impl, self.device)
        except ValueError as e:
            raise InferenceError(str(e)) from None
        self.model, self.info = load_talking_head(run_dir, checkpoint=checkpoint, device=self.device)
        self.size = size = resolve_size(size, self.info)
        self.clip: TrainingClip = load_training_clip(self.info)
        trained = self.info.get("audio_encoder", self.clip.manifest["audio"]["encoder"])
        if self.clip.manifest["audio"]["encoder"] != trained:
            raise InferenceError(f"the run was trained on {trained!r} features but its data folder now has "
                                 f"{self.clip.manifest['audio']['encoder']!r}")
        self.encoder = self.clip.encoder()
        self._context_s, self._lookahead_s = float(wav2vec2_context_s), float(wav2vec2_lookahead_s)
        probe = _StreamingFeatures(self.encoder, context_s=self._context_s, lookahead_s=self._lookahead_s)
        self._encoder_ahead, self.exact = probe.ahead, probe.exact
        self.window, self.steps = audio_context(self.info)
        # window frames before and after frame n whose features frame n reads
        self._reach_back, self._reach_ahead = window_reach(self.window, self.steps)
        self._resolution = int(self.info["model"]["render_resolution"])
        self._key = "image" if size == "sr" else "image_raw"
        # [P, 25]: frame n's camera is row n % P; checked once here, not per frame on the device
        self._cameras = _checked_track(self._camera_table(), self.camera)
        period = self.clip.num_frames
        self._clip_cycle = _cycle(max(1, 2 * period - 2), period)  # frame n -> clip row _clip_cycle[n % len]
        self._mean_landmarks = self.clip.landmarks.mean(axis=0)

    # ---------------------------------------------------------------------------------------------
    # Latency
    # ---------------------------------------------------------------------------------------------

    @property
    def latency_samples(self) -> int:
        """Samples of audio past the end of frame n's own 640 that frame n waits for: whole frames
        of window look-ahead plus the encoder's. For a log-mel run with an 8-frame window, 4640
        with 16 feature rows a frame (7 frames + 160 samples of STFT), 2080 with 2 (3 frames)."""
        return self._reach_ahead * SAMPLES_PER_FRAME + self._encoder_ahead

    @property
    def latency_frames(self) -> float:
        """:attr:`latency_samples` in 25-fps frames (7.25 for a log-mel run; 3.25 with 2 rows)."""
        return self.latency_samples / SAMPLES_PER_FRAME

    @property
    def latency_s(self) -> float:
        """:attr:`latency_samples` in seconds (0.29 for a log-mel run; 0.13 with 2 rows)."""
        return self.latency_samples / SAMPLE_RATE

    # ---------------------------------------------------------------------------------------------
    # Conditions
    # ---------------------------------------------------------------------------------------------

    def _camera_table(self) -> torch.Tensor:
        """One period of the camera track: [P, 25], frame n -> row n % P (any spec is periodic)."""
        spec = self.camera
        if spec == "orbit":
            return _novel_view_cameras(_orbit_angles(STREAM_ORBIT_PERIOD), self.clip.rig)
        first = camera_track(spec, 1, self.clip)  # checks the spec (InferenceError when bad)
        if spec == "gt":
            entries = self.clip.num_frames
        elif spec.startswith("fixed:"):
            return first
        else:  # a JSON list, cycled back and forth like the training clip
            entries = len(json.loads(Path(spec).read_text()))
        return camera_track(spec, max(1, 2 * entries - 2), self.clip)

    def _conditions(self, frames: np.ndarray, features: np.ndarray, first: int) -> dict[str, torch.Tensor]:
        """The model's conditions for frame indices ``frames``; ``features`` hold frames [first, ...)."""
        cams = self._cameras[torch.from_numpy(frames % self._cameras.shape[0])]
        rows = self._clip_cycle[frames % self._clip_cycle.shape[0]]
        k = frames.shape[0]
        blinks = self.clip.blink[rows] if self.eye == "train" else np.zeros(k, np.float32)
        if self.pose == "train":
            poses, landmarks = self.clip.pose[rows], self.clip.landmarks[rows]
        else:
            poses = np.zeros((k, 3), np.float32)
            landmarks = np.repeat(self._mean_landmarks[None], k, axis=0)
        cond = dict(
            camera=cams,
            audio=torch.from_numpy(np.stack([windows(features, int(i) - first, self.window, self.steps)
                                             for i in frames])),
            blink=torch.from_numpy(np.ascontiguousarray(blinks[:, None])),
            pose=torch.from_numpy(np.ascontiguousarray(poses)),
            landmarks=torch.from_numpy(np.ascontiguousarray(landmarks)),
        )
        return _to_device(cond, self.device)

    def _render_frames(self, start: int, stop: int, features: np.ndarray, first: int) -> Iterator[np.ndarray]:
        """Frames [start, stop), ``batch`` per forward pass (the context managers never span a yield)."""
        dtype = PRECISIONS[self.precision]
        for s in range(start, stop, self.batch):
            cond = self._conditions(np.arange(s, min(stop, s + self.batch)), features, first)
            amp = torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
            with torch.inference_mode(), amp:
                out = self.model(cond, impl=self.impl, deterministic=True, resolution=self._resolution,
                                 check_cameras=False)[self._key]  # checked once (_checked_track)
            yield from to_uint8_frames(out)

    # ---------------------------------------------------------------------------------------------
    # Public API
    # ---------------------------------------------------------------------------------------------

    def stream(self, audio_chunks: Iterable) -> Iterator[np.ndarray]:
        """Frames [S, S, 3] uint8 of the speech in ``audio_chunks``, each as soon as its audio is in.

        Args:
            audio_chunks: an iterable of 1-D floating-point arrays of 16-kHz mono samples in
                [-1, 1] (converted to float32), of any lengths, empty ones included.

        Yields ``num_frames_for(all the audio)`` frames in all (none for an empty stream): frame n
        once ``640 (n + 1) + latency_samples`` samples have been read, the rest when the iterable
        ends. Chunks are read lazily: the next chunk is taken only when no frame is ready. Raises
        InferenceError (naming the chunk's index) at a chunk that is not 1-D, not floating-point
        numbers, or holds NaN/inf; the frames before it have been yielded by then.
        """
        feats = _StreamingFeatures(self.encoder, context_s=self._context_s, lookahead_s=self._lookahead_s)
        back, look = self._reach_back, self._reach_ahead  # frames before / after n that n reads
        store = np.zeros((0, self.encoder.dim), np.float32)  # features of frames [first, feats.done)
        first = 0
        emitted = 0
        for index, chunk in enumerate(audio_chunks):
            new = feats.push(_check_chunk(index, chunk))
            if not new.shape[0]:
                continue
            store = np.concatenate([store, new])
            ready = feats.done - look  # frames whose whole window is final
            if ready > emitted:
                yield from self._render_frames(emitted, ready, store, first)
                emitted = ready
                keep = max(0, emitted - back)  # the oldest frame a later window reads
                store = store[FEATURES_PER_FRAME * (keep - first):]
                first = keep
        store = np.concatenate([store, feats.finish()])
        if feats.num_frames > emitted:  # windows now clamp at the clip's last frame, as offline
            yield from self._render_frames(emitted, feats.num_frames, store, first)

    def render(self, wave16k) -> Iterator[np.ndarray]:
        """Offline frames of a whole wave [T] (16-kHz mono): :func:`talk3d.infer.render_speech` with
        this Talker's model and settings (its ``orbit`` spans the clip; a stream's repeats)."""
        return render_speech(self.model, self.info, wave16k, camera=self.camera, size=self.size,
                             precision=self.precision, batch=self.batch, eye=self.eye, pose=self.pose,
                             impl=self.impl, clip=self.clip)

    def __repr__(self) -> str:
        return (f"Talker({str(self.run_dir)!r}, device={str(self.device)!r}, precision={self.precision!r}, "
                f"camera={self.camera!r}, encoder={self.encoder.name!r}, latency={self.latency_s * 1000:.0f} ms)")
