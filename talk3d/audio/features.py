"""Audio I/O, resampling and per-frame audio features.

Timing convention (shared by every encoder and the dataset format): audio runs at 16 kHz mono and
video at 25 fps, so one frame owns 640 samples. Features come at 50 per second: feature ``k``
describes the 20-ms slot of samples ``[320 k, 320 (k + 1))``, so frame ``n`` owns features
``2n`` and ``2n + 1``. ``encode`` of a wave for ``N`` frames returns ``[2N, D]``; a wave shorter
than ``640 N`` samples is zero-padded, a longer one cropped.
"""
from __future__ import annotations

import json
import math
import wave as _wave
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "SAMPLE_RATE", "FPS", "FEATURES_PER_FRAME", "HOP", "SAMPLES_PER_FRAME", "AudioEncoder",
    "LogMelEncoder", "Wav2Vec2Encoder", "encoder_from_manifest", "read_wav", "write_wav",
    "resample", "windows", "window_reach",
]

SAMPLE_RATE = 16000
FPS = 25
FEATURES_PER_FRAME = 2
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
HOP = SAMPLES_PER_FRAME // FEATURES_PER_FRAME  # 320 samples = 20 ms per feature

#: Half-width, in input samples at the lower of the two rates, of the windowed-sinc kernel used
#: by :func:`resample`. 32 zero crossings each side puts the Hann-windowed sinc's stop-band
#: below -60 dB, plenty for speech features.
RESAMPLE_HALF_WIDTH = 32
#: Output samples per resampling chunk: bounds memory to chunk * 2 * half-width floats.
_RESAMPLE_CHUNK = 1 << 16


# --------------------------------------------------------------------------------------------
# WAV files
# --------------------------------------------------------------------------------------------


#: WAV format tags: integer PCM, IEEE float, and WAVE_FORMAT_EXTENSIBLE (whose sub-format GUID
#: starts with one of the other two tags).
_WAV_PCM, _WAV_FLOAT, _WAV_EXTENSIBLE = 1, 3, 0xFFFE


def _wav_chunks(path: Path) -> tuple[bytes, bytes]:
    """The ``fmt `` and ``data`` chunks of a RIFF/WAVE file (other chunks skipped). Python's
    ``wave`` module is not used: before 3.12 it refuses IEEE-float and WAVE_FORMAT_EXTENSIBLE files,
    which Audacity, ffmpeg (more than two channels, 24-bit) and most DAWs write."""
    raw = path.read_bytes()
    if len(raw) < 12 or raw[:4] != b"RIFF" or raw[8:12] != b"WAVE":
        raise ValueError(f"read_wav: {path} is not a WAV file (no RIFF/WAVE header)")
    fmt = data = None
    pos = 12
    while pos + 8 <= len(raw):
        cid, size = raw[pos:pos + 4], int.from_bytes(raw[pos + 4:pos + 8], "little")
        body = raw[pos + 8:pos + 8 + size]
        if cid == b"fmt ":
            fmt = body
        elif cid == b"data":
            data = body  # a data chunk cut short (a truncated file) keeps what is there
            break
        pos += 8 + size + (size & 1)  # chunks are padded to even sizes
    if fmt is None or len(fmt) < 16:
        raise ValueError(f"read_wav: {path} has no valid 'fmt ' chunk (truncated or not a WAV file)")
    if data is None:
        raise ValueError(f"read_wav: {path} has no 'data' chunk (truncated or not a WAV file)")
    return fmt, data


def read_wav(path, *, sample_rate: int | None = SAMPLE_RATE) -> tuple[np.ndarray, int]:
    """Read a WAV file (integer PCM of 8/16/24/32 bits or 32/64-bit float, plain or
    WAVE_FORMAT_EXTENSIBLE) as mono float32 in [-1, 1].

    Channels are averaged. With ``sample_rate`` set (16 kHz by default) the wave is resampled
    to it; ``None`` keeps the file's rate.

    Returns:
        (wave [T] float32, rate).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"read_wav: no such file: {path}")
    fmt, raw = _wav_chunks(path)
    tag, channels, rate = (int.from_bytes(fmt[a:b], "little") for a, b in ((0, 2), (2, 4), (4, 8)))
    bits = int.from_bytes(fmt[14:16], "little")
    if tag == _WAV_EXTENSIBLE and len(fmt) >= 26:
        tag = int.from_bytes(fmt[24:26], "little")  # the sub-format GUID's first two bytes
    if channels < 1 or rate < 1:
        raise ValueError(f"read_wav: {path} declares {channels} channels at {rate} Hz")
    width = (bits + 7) // 8
    raw = raw[:len(raw) - len(raw) % (width * channels)] if width else raw
    if tag == _WAV_FLOAT and width in (4, 8):
        data = np.frombuffer(raw, "<f4" if width == 4 else "<f8").astype(np.float32)
    elif tag != _WAV_PCM:
        raise ValueError(f"read_wav: {path} holds audio of WAV format {tag:#x}, not PCM or float "
                         "(convert it, e.g. `ffmpeg -i IN -ac 1 -ar 16000 OUT.wav`)")
    elif width == 1:  # 8-bit WAV is unsigned
        data = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        data = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        ints = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        ints = np.where(ints >= 1 << 23, ints - (1 << 24), ints)  # sign-extend 24 bits
        data = ints.astype(np.float32) / float(1 << 23)
    elif width == 4:
        data = (np.frombuffer(raw, "<i4").astype(np.float64) / float(1 << 31)).astype(np.float32)
    else:
        raise ValueError(f"read_wav: {path} has unsupported sample width {width} bytes")
    data = data.reshape(-1, channels).mean(axis=1, dtype=np.float32)
    if sample_rate is not None and rate != sample_rate:
        data = resample(data, rate, sample_rate)
        rate = sample_rate
    return np.ascontiguousarray(data, dtype=np.float32), rate


def write_wav(path, wave, sample_rate: int = SAMPLE_RATE) -> None:
    """Write ``wave`` ([T] float in [-1, 1], clipped) as mono PCM16."""
    data = np.asarray(wave, dtype=np.float64).reshape(-1)
    if not np.isfinite(data).all():
        raise ValueError("write_wav: wave contains NaN or inf")
    ints = np.round(np.clip(data, -1.0, 1.0) * 32767.0).astype("<i2")
    with _wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(int(sample_rate))
        f.writeframes(ints.tobytes())


def resample(wave, src_rate: int, dst_rate: int) -> np.ndarray:
    """Band-limited resampling with a Hann-windowed sinc kernel.

    Output sample ``j`` sits at input position ``j * src / dst``; its value is the kernel-weighted
    sum of the input samples within :data:`RESAMPLE_HALF_WIDTH` zero crossings. When
    downsampling, the sinc's cutoff is lowered to the new Nyquist frequency (anti-aliasing).
    Edges are zero-padded. Works for any ratio, not only rational ones.

    Args:
        wave: [T] float array.

    Returns:
        [round(T * dst / src)] float32.
    """
    x = torch.as_tensor(np.asarray(wave, dtype=np.float32)).reshape(-1).double()
    if src_rate == dst_rate:
        return x.float().numpy()
    if src_rate <= 0 or dst_rate <= 0:
        raise ValueError(f"resample: rates must be > 0, got {src_rate} -> {dst_rate}")
    ratio = src_rate / dst_rate
    cutoff = min(1.0, 1.0 / ratio)  # of the input Nyquist frequency
    half = int(math.ceil(RESAMPLE_HALF_WIDTH / cutoff))  # taps each side, in input samples
    n_out = int(round(x.numel() / ratio))
    padded = torch.nn.functional.pad(x, (half, half + 1))
    out = torch.empty(n_out, dtype=torch.float64)
    offsets = torch.arange(-half + 1, half + 1, dtype=torch.float64)  # [2 half]
    for start in range(0, n_out, _RESAMPLE_CHUNK):
        pos = torch.arange(start, min(n_out, start + _RESAMPLE_CHUNK), dtype=torch.float64) * ratio
        base = torch.floor(pos)
        taps = base[:, None] + offsets[None, :]  # [M, 2 half] input indices
        dist = pos[:, None] - taps  # in input samples
        window = 0.5 + 0.5 * torch.cos(math.pi * dist / (half + 1))
        kernel = cutoff * torch.sinc(cutoff * dist) * window
        idx = (taps.long() + half).clamp(0, padded.numel() - 1)
        out[start:start + pos.numel()] = (padded[idx] * kernel).sum(dim=1)
    return out.float().numpy()


# --------------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------------


def _frame_count(num_samples: int, num_frames: int | None) -> int:
    if num_frames is None:
        num_frames = int(round(num_samples / SAMPLES_PER_FRAME))
    if num_frames < 1:
        raise ValueError(f"audio of {num_samples} samples is shorter than one frame")
    return num_frames


def _fit_length(wave: torch.Tensor, length: int) -> torch.Tensor:
    """wave [T] -> [length]: zero-padded or cropped at the end."""
    if wave.numel() >= length:
        return wave[:length]
    return torch.nn.functional.pad(wave, (0, length - wave.numel()))


def _as_wave(wave) -> torch.Tensor:
    w = torch.as_tensor(np.asarray(wave, dtype=np.float32)).reshape(-1)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("audio encoder: wave contains NaN or inf")
    return w


class AudioEncoder(ABC):
    """Turns a 16-kHz mono wave into ``FEATURES_PER_FRAME`` D-dim features per video frame.

    Attributes:
        name: identifies the encoder and its settings; stored in dataset manifests, which a model
            trained on one encoder checks before use.
        dim: D.
    """

    name: str
    dim: int

    @abstractmethod
    def encode(self, wave, num_frames: int | None = None) -> np.ndarray:
        """wave [T] float32 at 16 kHz -> [2 N, D] float32, N = num_frames (default T / 640)."""

    def settings(self) -> dict:
        """JSON-able description stored in the manifest next to ``name`` and ``dim``."""
        return {}


def mel_filterbank(num_mels: int, n_fft: int, sample_rate: int, fmin: float, fmax: float):
    """Triangular HTK-mel filters, area-normalised (Slaney style). Returns [num_mels, n_fft//2+1]."""
    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)

    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), num_mels + 2))  # [M + 2]
    freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)  # [F]
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs[None] - lo) / (mid - lo)
    falling = (hi - freqs[None]) / (hi - mid)
    bank = np.clip(np.minimum(rising, falling), 0.0, None)
    # Equal area: wide high-frequency filters would otherwise dominate the log features.
    bank *= 2.0 / (hi - lo)
    return torch.from_numpy(bank.astype(np.float32))


class LogMelEncoder(AudioEncoder):
    """Log-mel spectrogram, one 40-ms Hann window centred on each 20-ms slot. No weights.

    Feature ``k`` = log(mel power + eps) of samples centred at ``320 k + 160``; no per-utterance
    normalisation, so louder audio gives larger features.
    """

    def __init__(self, dim: int = 32, *, n_fft: int = 1024, win_length: int = 640,
                 fmin: float = 55.0, fmax: float = 7600.0, eps: float = 1e-6):
        if dim < 1 or win_length > n_fft or win_length < HOP:
            raise ValueError(f"LogMelEncoder: bad settings dim={dim} n_fft={n_fft} "
                             f"win_length={win_length}")
        self.dim, self.n_fft, self.win_length = int(dim), int(n_fft), int(win_length)
        self.fmin, self.fmax, self.eps = float(fmin), float(fmax), float(eps)
        self.name = f"logmel{self.dim}"
        self._bank = mel_filterbank(self.dim, self.n_fft, SAMPLE_RATE, self.fmin, self.fmax)
        self._window = torch.hann_window(self.win_length, periodic=True, dtype=torch.float32)

    def settings(self) -> dict:
        return dict(n_fft=self.n_fft, win_length=self.win_length, fmin=self.fmin,
                    fmax=self.fmax, eps=self.eps)

    def encode(self, wave, num_frames: int | None = None) -> np.ndarray:
        """wave [T] -> [2 N, dim] float32."""
        w = _as_wave(wave)
        n = _frame_count(w.numel(), num_frames)
        w = _fit_length(w, n * SAMPLES_PER_FRAME)
        # Reflect-pad so that window k (stride HOP) is centred on slot k's centre 320 k + 160.
        left = self.win_length // 2 - HOP // 2
        right = self.win_length - HOP - left
        padded = torch.nn.functional.pad(w[None, None], (left, right), mode="reflect")[0, 0]
        frames = padded.unfold(0, self.win_length, HOP) * self._window  # [2N, win]
        spec = torch.fft.rfft(frames, n=self.n_fft).abs().square()  # [2N, F]
        mel = spec @ self._bank.T  # [2N, dim]
        return torch.log(mel + self.eps).numpy().astype(np.float32)


class Wav2Vec2Encoder(AudioEncoder):
    """Features from a local wav2vec2 checkpoint through ``transformers`` (never downloads).

    With ``use_logits=True`` (Talk3D's choice) the features are the CTC head's logits
    (``Wav2Vec2ForCTC``, D = vocabulary size); otherwise the hidden states of ``layer``
    (``Wav2Vec2Model``; ``layer=None`` = last layer, D = hidden size). wav2vec2's convolutional
    front end has stride 320 and a 400-sample receptive field, so padding the wave by 40 samples
    each side makes its output k cover slot k exactly.

    A wave longer than ``chunk_seconds + 2 context_seconds`` is encoded in pieces: each piece's
    ``chunk_seconds`` of output slots seen with ``context_seconds`` of audio either side, as
    Hugging Face's speech-recognition pipeline chunks wav2vec2 (``chunk_length_s``, ``stride_length_s``).
    One pass over a whole clip grows with its length, its time faster than linearly: 5.4 GB and
    80 s for 5 minutes of speech with a wav2vec2-base model on 2 cores (30 s: 2.8 s; 120 s: 18 s;
    measured 2026-12-07). In pieces, memory stays that of one piece and time grows linearly (1.8 GB
    and 36 s for the same 5 minutes). The pieces see less of the clip than one pass: the
    attention's context and, in wav2vec2-base, the first convolution's group norm over time are a
    piece's, not the clip's.
    """

    _RECEPTIVE_PAD = (400 - HOP) // 2
    #: Output slots a piece of a long wave contributes, and the context it is seen with each side.
    CHUNK_SECONDS = 30.0
    CONTEXT_SECONDS = 5.0

    def __init__(self, path, layer: int | None = None, use_logits: bool = True,
                 device: str = "cpu", chunk_seconds: float = CHUNK_SECONDS,
                 context_seconds: float = CONTEXT_SECONDS):
        if not (chunk_seconds > 0 and context_seconds >= 0):
            raise ValueError(f"Wav2Vec2Encoder: chunk_seconds must be > 0 and context_seconds >= 0, got "
                             f"{chunk_seconds}, {context_seconds}")
        self.chunk_slots = max(1, round(chunk_seconds * SAMPLE_RATE / HOP))  # output slots a piece keeps
        self.context_slots = round(context_seconds * SAMPLE_RATE / HOP)
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"Wav2Vec2Encoder: no wav2vec2 model at {path} (no config.json). Download one on a "
                "machine with internet, e.g. `huggingface-cli download "
                "facebook/wav2vec2-base-960h --local-dir DIR` or, in Python, "
                "`Wav2Vec2ForCTC.from_pretrained('facebook/wav2vec2-base-960h')"
                ".save_pretrained(DIR)`, and pass DIR; talk3d never downloads models."
            )
        try:
            import transformers
        except ImportError:
            raise ImportError("Wav2Vec2Encoder needs `transformers`: pip install transformers "
                              "(with PIP_CONSTRAINT=constraints.txt so torch stays as is)") from None
        if use_logits and layer is not None:
            raise ValueError("Wav2Vec2Encoder: layer is for hidden states; use_logits=False")
        cls = transformers.Wav2Vec2ForCTC if use_logits else transformers.Wav2Vec2Model
        self.model = cls.from_pretrained(str(path), local_files_only=True).eval().to(device)
        self.device, self.layer, self.use_logits, self.path = device, layer, use_logits, path
        config = self.model.config
        self.dim = int(config.vocab_size if use_logits else config.hidden_size)
        what = "logits" if use_logits else f"layer{'last' if layer is None else layer}"
        self.name = f"wav2vec2-{what}-{path.name}"
        # Most CTC checkpoints were trained on zero-mean unit-variance input; follow the saved
        # feature-extractor settings when present.
        self.normalize = True
        pre = path / "preprocessor_config.json"
        if pre.is_file():
            self.normalize = bool(json.loads(pre.read_text()).get("do_normalize", True))

    def settings(self) -> dict:
        return dict(path=str(self.path), layer=self.layer, use_logits=self.use_logits,
                    normalize=self.normalize, chunk_seconds=self.chunk_slots * HOP / SAMPLE_RATE,
                    context_seconds=self.context_slots * HOP / SAMPLE_RATE)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [L] padded, normalised wave -> [~(L - 80) / 320, dim] float32 on the CPU."""
        x = x[None].to(self.device)
        if self.use_logits:
            out = self.model(x).logits[0]
        else:
            hidden = self.model(x, output_hidden_states=True).hidden_states
            out = hidden[-1 if self.layer is None else self.layer][0]
        return out.float().cpu()

    @torch.no_grad()
    def encode(self, wave, num_frames: int | None = None) -> np.ndarray:
        """wave [T] -> [2 N, dim] float32 (one forward pass, or pieces for a long wave: see the class)."""
        w = _as_wave(wave)
        n = _frame_count(w.numel(), num_frames)
        w = _fit_length(w, n * SAMPLES_PER_FRAME)
        if self.normalize:  # over the whole clip, also when it is encoded in pieces
            w = (w - w.mean()) / torch.sqrt(w.var(unbiased=False) + 1e-7)
        pad = self._RECEPTIVE_PAD
        x = torch.nn.functional.pad(w, (pad, pad))  # [T + 80]: slot k's output reads x[320 k : 320 k + 400]
        slots, keep, ctx = 2 * n, self.chunk_slots, self.context_slots
        if slots <= keep + 2 * ctx:
            out = self._forward(x)  # [~2N, dim]
        else:
            pieces = []
            for a in range(0, slots, keep):
                b = min(slots, a + keep)
                s0, s1 = max(0, a - ctx), min(slots, b + ctx)
                # The samples of slots s0 .. s1 - 1 alone: the front end (stride 320) gives their
                # outputs exactly, aligned with the whole clip's.
                piece = self._forward(x[HOP * s0:HOP * (s1 - 1) + 2 * pad + HOP])
                pieces.append(piece[a - s0:b - s0])
            out = torch.cat(pieces)
        # The conv stack gives exactly 2N outputs for this padding; guard off-by-one variants.
        if out.shape[0] < 2 * n:
            out = torch.cat([out, out[-1:].expand(2 * n - out.shape[0], -1)])
        return out[: 2 * n].numpy().astype(np.float32)


def encoder_from_manifest(audio: dict, wav2vec2_path=None) -> AudioEncoder:
    """Rebuild the encoder a dataset was made with from its manifest's ``audio`` entry."""
    name, settings = audio["encoder"], audio.get("encoder_settings", {})
    if name.startswith("logmel"):
        return LogMelEncoder(int(audio["feature_dim"]), **settings)
    if name.startswith("wav2vec2"):
        pieces = {k: settings[k] for k in ("chunk_seconds", "context_seconds") if k in settings}
        return Wav2Vec2Encoder(wav2vec2_path or settings["path"], layer=settings.get("layer"),
                               use_logits=settings.get("use_logits", True), **pieces)
    raise ValueError(f"unknown audio encoder {name!r}")


# --------------------------------------------------------------------------------------------
# Windows for the audio token
# --------------------------------------------------------------------------------------------


def window_reach(size: int = 8, steps: int = FEATURES_PER_FRAME) -> tuple[int, int]:
    """(frames before, frames after) frame n whose features :func:`windows` reads for frame n."""
    return size // 2 + (steps // 2) // 2, size - size // 2 - 1 + (steps - steps // 2) // 2


def windows(features, frame_index: int, size: int = 8, steps: int = FEATURES_PER_FRAME):
    """The audio window of one video frame.

    Args:
        features: [2 N, D] (numpy or torch).
        frame_index: n in [0, N).
        size: frames in the window: ``n - size//2 .. n + size - size//2 - 1`` (for 8: n-4 .. n+3,
            as in AD-NeRF/Talk3D).
        steps: feature rows per window frame f, centred on the frame's middle (the boundary
            between its rows 2f and 2f + 1): rows ``2f + 1 - steps//2 .. 2f + steps - steps//2``.
            2 is the frame's own two rows; 16 (the release's, as AD-NeRF's 16 DeepSpeech steps)
            spans 320 ms. Window frames past either end of the clip are its first or last frame
            (edge padding), and rows past either end its first or last row.

    Returns:
        [size, steps, D], same type as ``features`` (numpy -> numpy, torch -> torch).
    """
    n_feat = features.shape[0]
    if n_feat % FEATURES_PER_FRAME:
        raise ValueError(f"windows: features have {n_feat} rows, not 2 per frame")
    if steps < 1:
        raise ValueError(f"windows: steps must be >= 1, got {steps}")
    n = n_feat // FEATURES_PER_FRAME
    if not 0 <= frame_index < n:
        raise IndexError(f"windows: frame {frame_index} outside [0, {n})")
    frames = np.clip(np.arange(size) + frame_index - size // 2, 0, n - 1)
    rows = frames[:, None] * FEATURES_PER_FRAME + 1 - steps // 2 + np.arange(steps)  # [size, steps]
    rows = np.clip(rows, 0, n_feat - 1).reshape(-1)
    if isinstance(features, torch.Tensor):
        rows = torch.from_numpy(rows).to(features.device)
    return features[rows].reshape(size, steps, features.shape[1])
