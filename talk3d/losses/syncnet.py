"""Lip sync in plain torch: Wav2Lip's lip-sync expert (``SyncNet_color``), its audio front-end, the
training sync loss and the evaluation's sync score.

Why this network: Wav2Lip's ``lipsync_expert.pth`` is the de-facto standard lip-sync critic for
talking-head training (Talk3D's sync loss follows Wav2Lip's). Its licence is non-commercial, so
the weights are never bundled or downloaded: the user supplies the file
(:func:`find_syncnet_weights`). The code here is our own; it reproduces the architecture and the
state-dict names so the real file loads unchanged.

The network (Wav2Lip ``models/syncnet.py`` + ``models/conv.py``; data layout from
``color_syncnet_train.py``). Every block is ``Conv2d(cin, cout, k, stride, padding, residual)`` =
conv (with bias) -> BatchNorm -> (+ input if residual) -> ReLU; its parameters are named
``<encoder>.<i>.conv_block.0.*`` (conv) and ``<encoder>.<i>.conv_block.1.*`` (batch norm).

    faces [B, 15, 48, 96]: 5 consecutive 96x96 face crops, lower half (rows 48..95), BGR in [0, 1],
        stacked on channels frame by frame (B0 G0 R0 B1 G1 R1 ...)
    face_encoder: 15->32 k7 s1 p3 | 32->64 k5 s(1,2) p1, 2 res 64 | 64->128 s2, 3 res |
        128->256 s2, 2 res | 256->512 s2, 2 res | 512->512 s2 | 512->512 k3 p0 | 512->512 k1
        (spatial 48x96 -> 46x47 -> 23x24 -> 12x12 -> 6x6 -> 3x3 -> 1x1)
    mels [B, 1, 80, 16]: 80 mel bands x 16 mel frames (0.2 s, 80 mel frames per second)
    audio_encoder: 1->32 k3 p1, 2 res | 32->64 s(3,1), 2 res | 64->128 s3, 2 res |
        128->256 s(3,2), 2 res | 256->512 k3 p0 | 512->512 k1
        (80x16 -> 27x16 -> 9x6 -> 3x3 -> 1x1)
    both flattened to 512 and L2-normalised; p(sync) = cosine(audio, face); loss = BCE(p, 1).

Audio (Wav2Lip ``audio.melspectrogram`` with its ``hparams.py``): 16 kHz, pre-emphasis 0.97, STFT
n_fft 800, hop 200, Hann window 800 (librosa: centred, reflect padding), magnitude (not power),
librosa's Slaney mel filterbank (80 bands, 55..7600 Hz, area-normalised), 20 log10(max(1e-5, .))
- 20 dB, then (S + 100) / 100 mapped linearly to [-4, 4] and clipped. Mel frame i of a clip is
centred on sample 200 i; video frame f at 25 fps starts at mel frame ``int(80 f / 25)``.

What was not verified: no real ``lipsync_expert.pth`` is available here, so loading it is tested
only on files written in its format (random weights under its key names); librosa is not
installed, so the mel filterbank is checked against the Slaney formula's properties, not against
librosa's output.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# Wav2Lip's audio and video rates are talk3d's own: 16 kHz, 25 fps, 640 samples a frame.
from ..audio.features import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME
from ..prior.checkpoint import check_state_dict, read_weights_file

__all__ = [
    "ENV_VAR",
    "EMBEDDING_DIM",
    "FACE_BOX",
    "FPS",
    "MEL_FRAMES",
    "MEL_FRAMES_PER_SECOND",
    "NUM_MELS",
    "SAMPLE_RATE",
    "SAMPLES_PER_FRAME",
    "SYNC_FRAMES",
    "SyncLoss",
    "SyncNet",
    "faces_from_frames",
    "find_syncnet_weights",
    "hz_to_mel_slaney",
    "load_syncnet",
    "mel_filterbank",
    "mel_to_hz_slaney",
    "mel_windows",
    "sync_confidence",
    "syncnet_status",
    "wav2lip_mel",
]

ENV_VAR = "TALK3D_SYNCNET_WEIGHTS"
EMBEDDING_DIM = 512
SYNC_FRAMES = 5                 # syncnet_T: video frames per window
FACE_SIZE = 96                  # hparams.img_size: the face crop before taking its lower half
MEL_FRAMES = 16                 # syncnet_mel_step_size: mel frames per window (0.2 s)
NUM_MELS = 80
N_FFT, HOP, WIN = 800, 200, 800
MEL_FMIN, MEL_FMAX = 55.0, 7600.0
PREEMPHASIS = 0.97
REF_LEVEL_DB, MIN_LEVEL_DB = 20.0, -100.0
MAX_ABS_VALUE = 4.0
MEL_FRAMES_PER_SECOND = SAMPLE_RATE / HOP   # 80

# Wav2Lip's face crops are S3FD detector boxes squashed to 96x96. On our FFHQ-aligned crops we use
# the face box of dlib's detector as a stand-in (dlib's mean face, DLIB_TEMPLATE_68, is given in
# units of that box), placed by FFHQ's alignment formula: (x0, y0, x1, y1) as fractions of the crop.
# tests/test_syncnet.py recomputes it from the template. S3FD boxes are similar (eyebrows to chin,
# cheek to cheek); how much the expert's score depends on the difference is not measured here.
FACE_BOX = (0.2685, 0.3713, 0.7408, 0.8437)

# Guards log10 against exact zeros in the differentiable mel (Wav2Lip clamps at 1e-5 anyway).
_LOG_FLOOR = 10.0 ** (MIN_LEVEL_DB / 20.0)


# ------------------------------------------------------------------------------------------------
# Network
# ------------------------------------------------------------------------------------------------
class _ConvBlock(nn.Module):
    """conv -> batch norm (-> + x) -> ReLU; parameter names match Wav2Lip's ``Conv2d``."""

    def __init__(self, cin: int, cout: int, kernel, stride, padding, residual: bool = False):
        super().__init__()
        self.conv_block = nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding), nn.BatchNorm2d(cout))
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_block(x)
        return F.relu(y + x if self.residual else y)


# (cin, cout, kernel, stride, padding, residual) per block, in state-dict order.
_FACE_LAYERS = (
    (15, 32, 7, 1, 3, False),
    (32, 64, 5, (1, 2), 1, False), (64, 64, 3, 1, 1, True), (64, 64, 3, 1, 1, True),
    (64, 128, 3, 2, 1, False), (128, 128, 3, 1, 1, True), (128, 128, 3, 1, 1, True), (128, 128, 3, 1, 1, True),
    (128, 256, 3, 2, 1, False), (256, 256, 3, 1, 1, True), (256, 256, 3, 1, 1, True),
    (256, 512, 3, 2, 1, False), (512, 512, 3, 1, 1, True), (512, 512, 3, 1, 1, True),
    (512, 512, 3, 2, 1, False), (512, 512, 3, 1, 0, False), (512, 512, 1, 1, 0, False),
)
_AUDIO_LAYERS = (
    (1, 32, 3, 1, 1, False), (32, 32, 3, 1, 1, True), (32, 32, 3, 1, 1, True),
    (32, 64, 3, (3, 1), 1, False), (64, 64, 3, 1, 1, True), (64, 64, 3, 1, 1, True),
    (64, 128, 3, 3, 1, False), (128, 128, 3, 1, 1, True), (128, 128, 3, 1, 1, True),
    (128, 256, 3, (3, 2), 1, False), (256, 256, 3, 1, 1, True), (256, 256, 3, 1, 1, True),
    (256, 512, 3, 1, 0, False), (512, 512, 1, 1, 0, False),
)


def _encoder(layers) -> nn.Sequential:
    return nn.Sequential(*(_ConvBlock(*spec) for spec in layers))


class SyncNet(nn.Module):
    """Wav2Lip's ``SyncNet_color`` (same state-dict names), frozen in eval mode.

    forward(faces [B, 15, 48, 96] BGR in [0, 1], mels [B, 1, 80, 16] in [-4, 4])
        -> (audio_emb [B, 512], face_emb [B, 512]), both L2-normalised.
    Note the argument order differs from Wav2Lip's ``forward(audio, face)``; the outputs do not.
    """

    def __init__(self):
        super().__init__()
        self.face_encoder = _encoder(_FACE_LAYERS)
        self.audio_encoder = _encoder(_AUDIO_LAYERS)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "SyncNet":
        # A frozen critic: batch norm must keep its running statistics whatever the caller does.
        return super().train(False)

    def forward(self, faces: torch.Tensor, mels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        face = self.face_encoder(faces).flatten(1)
        audio = self.audio_encoder(mels).flatten(1)
        return F.normalize(audio, p=2, dim=1), F.normalize(face, p=2, dim=1)


# ------------------------------------------------------------------------------------------------
# Weights
# ------------------------------------------------------------------------------------------------
def _read_checkpoint(path: Path) -> dict:
    """The file's state dict, ``module.`` prefixes removed."""
    state = read_weights_file(path, "SyncNet weights")
    # Wav2Lip trained under DataParallel in some forks: keys then start with "module.".
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def load_syncnet(path: str | os.PathLike, device: torch.device | str = "cpu") -> SyncNet:
    """Wav2Lip ``lipsync_expert.pth`` (or any checkpoint in its format) -> frozen :class:`SyncNet`.

    Raises FileNotFoundError for a missing file and ValueError (naming the file) for a corrupt
    one or one whose keys / shapes differ from the architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SyncNet weights {path}: no such file")
    net = SyncNet()
    state = _read_checkpoint(path)
    # Checkpoints from torch < 0.4.1 have no BatchNorm step counters; they are unused in eval.
    expected = {k: v for k, v in net.state_dict().items() if k in state or not k.endswith("num_batches_tracked")}
    check_state_dict(expected, state).raise_if_bad(f"SyncNet weights {path} (Wav2Lip's SyncNet_color)")
    net.load_state_dict({**net.state_dict(), **state}, strict=True)
    return net.to(device)


def find_syncnet_weights(path: str | os.PathLike | None = None) -> Path | None:
    """The SyncNet weights file: ``path`` if given, else ``$TALK3D_SYNCNET_WEIGHTS``; None if unset.

    Never downloads. A path that is given but does not exist raises FileNotFoundError, so a typo
    does not silently turn the loss off.
    """
    chosen = path if path is not None else os.environ.get(ENV_VAR) or None
    if chosen is None:
        return None
    chosen = Path(chosen).expanduser()
    if not chosen.is_file():
        raise FileNotFoundError(f"SyncNet weights {chosen}: no such file")
    return chosen


def syncnet_status(path: str | os.PathLike | None = None) -> str:
    """One line: which lip-sync network is used, or why the lip-sync loss is off."""
    try:
        found = find_syncnet_weights(path)
        if found is not None:
            load_syncnet(found)
    except (OSError, ValueError) as e:
        return f"lip-sync loss off: the SyncNet weights could not be used: {e}"
    if found is None:
        return (f"lip-sync loss off: no SyncNet weights; get Wav2Lip's lipsync_expert.pth and set "
                f"{ENV_VAR}=FILE or --set syncnet_weights=FILE")
    return f"lip-sync network: Wav2Lip SyncNet from {found}"


# ------------------------------------------------------------------------------------------------
# Audio front-end
# ------------------------------------------------------------------------------------------------
def hz_to_mel_slaney(hz: torch.Tensor) -> torch.Tensor:
    """Slaney's mel scale (librosa's default): linear 200/3 Hz per mel below 1 kHz, log above."""
    hz = torch.as_tensor(hz, dtype=torch.float64)
    lin = hz / (200.0 / 3.0)
    log = 15.0 + torch.log(hz.clamp_min(1e-10) / 1000.0) / (math.log(6.4) / 27.0)
    return torch.where(hz >= 1000.0, log, lin)


def mel_to_hz_slaney(mel: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`hz_to_mel_slaney`: mels -> Hz."""
    mel = torch.as_tensor(mel, dtype=torch.float64)
    lin = mel * (200.0 / 3.0)
    log = 1000.0 * torch.exp((math.log(6.4) / 27.0) * (mel - 15.0))
    return torch.where(mel >= 15.0, log, lin)


def mel_filterbank(sr: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = NUM_MELS,
                   fmin: float = MEL_FMIN, fmax: float = MEL_FMAX) -> torch.Tensor:
    """librosa.filters.mel (Slaney scale, Slaney area norm) written out: [n_mels, n_fft // 2 + 1] float64.

    Band i is a triangle over Hz from edge i to edge i + 2 (peak 1 at edge i + 1, edges equally
    spaced in mels), scaled by 2 / (width in Hz) so each triangle's area over Hz is 1.
    """
    fft_hz = torch.linspace(0.0, sr / 2.0, n_fft // 2 + 1, dtype=torch.float64)
    edges = mel_to_hz_slaney(torch.linspace(hz_to_mel_slaney(fmin).item(), hz_to_mel_slaney(fmax).item(),
                                                    n_mels + 2, dtype=torch.float64))
    widths = edges.diff()
    ramps = edges[:, None] - fft_hz[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = torch.clamp(torch.minimum(rising, falling), min=0.0)
    return weights * (2.0 / (edges[2:] - edges[:-2]))[:, None]


_MEL_BASIS: dict = {}


def _basis(device, dtype) -> torch.Tensor:
    key = (str(device), dtype)
    if key not in _MEL_BASIS:
        _MEL_BASIS[key] = mel_filterbank().to(device=device, dtype=dtype)
    return _MEL_BASIS[key]


def wav2lip_mel(wave: torch.Tensor) -> torch.Tensor:
    """Wav2Lip's ``audio.melspectrogram``: wave [T] (or [B, T]) at 16 kHz -> mel [80, M] ([B, 80, M]).

    M = 1 + T // 200 (centred frames; needs T > 400 for the reflect padding). Values in [-4, 4].
    Differentiable; float64 input gives float64 output.
    """
    wave = torch.as_tensor(wave)
    if not wave.is_floating_point():
        wave = wave.float()
    y = torch.cat([wave[..., :1], wave[..., 1:] - PREEMPHASIS * wave[..., :-1]], dim=-1)
    window = torch.hann_window(WIN, periodic=True, dtype=y.dtype, device=y.device)  # scipy 'hann', fftbins
    spec = torch.stft(y, N_FFT, HOP, WIN, window, center=True, pad_mode="reflect", return_complex=True).abs()
    mel = _basis(y.device, y.dtype) @ spec
    db = 20.0 * torch.log10(mel.clamp_min(_LOG_FLOOR)) - REF_LEVEL_DB
    norm = 2.0 * MAX_ABS_VALUE * (db - MIN_LEVEL_DB) / (-MIN_LEVEL_DB) - MAX_ABS_VALUE
    return norm.clamp(-MAX_ABS_VALUE, MAX_ABS_VALUE)


def mel_windows(mel: torch.Tensor, start_frames) -> torch.Tensor:
    """mel [80, M] of a whole clip, video start frames (25 fps) -> network input [K, 1, 80, 16].

    As Wav2Lip's ``crop_audio_window``: mel frames ``int(80 f / 25)`` .. + 16.
    """
    out = []
    for f in start_frames:
        i = int(MEL_FRAMES_PER_SECOND * (int(f) / FPS))
        if i + MEL_FRAMES > mel.shape[-1]:
            raise ValueError(f"mel_windows: frame {f} needs mel frames {i}..{i + MEL_FRAMES}, clip has {mel.shape[-1]}")
        out.append(mel[..., i:i + MEL_FRAMES])
    return torch.stack(out)[:, None]


# ------------------------------------------------------------------------------------------------
# Faces, loss, score
# ------------------------------------------------------------------------------------------------
def faces_from_frames(frames: torch.Tensor, box=FACE_BOX) -> torch.Tensor:
    """FFHQ-aligned frames [B, T=5, 3, S, S] RGB in [-1, 1] -> network faces [B, 15, 48, 96].

    Crop: the lower half of :data:`FACE_BOX` (Wav2Lip squashes the face box to 96x96 and keeps rows
    48..95), resized to 48x96 with antialiased bilinear (Wav2Lip used cv2 INTER_LINEAR, which
    aliases on downscaling; antialiasing also spreads the gradient to every pixel). Then RGB ->
    BGR (Wav2Lip read frames with cv2) and [-1, 1] -> [0, 1]. Differentiable.
    """
    b, t, c, h, w = frames.shape
    x0, y0, x1, y1 = box
    top, bottom = round(h * 0.5 * (y0 + y1)), round(h * y1)
    left, right = round(w * x0), round(w * x1)
    crop = frames.reshape(b * t, c, h, w)[:, :, top:bottom, left:right]
    crop = F.interpolate(crop, size=(FACE_SIZE // 2, FACE_SIZE), mode="bilinear", align_corners=False,
                         antialias=True)
    crop = (crop.flip(1) + 1.0) * 0.5
    return crop.reshape(b, t * c, FACE_SIZE // 2, FACE_SIZE)


def _segment_mels(wave: torch.Tensor) -> torch.Tensor:
    """wave [B, >= 3200] starting at the window's first frame -> mels [B, 1, 80, 16].

    The mel is computed on the segment alone, so its first frame sees reflect padding rather than
    the preceding audio, and its frames are aligned to the segment start rather than to Wav2Lip's
    ``int(3.2 f)`` grid (< 0.8 hop = 10 ms apart). Pass mels from :func:`mel_windows` to avoid both.
    """
    return wav2lip_mel(wave)[:, None, :, :MEL_FRAMES]


class SyncLoss(nn.Module):
    """Wav2Lip's expert sync loss on generated frames: BCE(cosine(audio, face), 1) per sample.

    forward(frames [B, 5, 3, S, S] RGB in [-1, 1] (FFHQ-aligned, 25 fps), audio) -> loss [B], where
    audio is either the matching wave [B, 3200] at 16 kHz or mels [B, 1, 80, 16] from
    :func:`mel_windows`. Gradients flow to the frames; the network stays frozen.
    """

    def __init__(self, net: SyncNet):
        super().__init__()
        self.net = net

    @classmethod
    def from_file(cls, path: str | os.PathLike, device="cpu") -> "SyncLoss":
        return cls(load_syncnet(path, device))

    def probability(self, frames: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of the two embeddings, [B] (Wav2Lip's p(sync), in [0, 1])."""
        if frames.shape[1] != SYNC_FRAMES:
            raise ValueError(f"SyncLoss: {SYNC_FRAMES} frames per window needed, got {frames.shape[1]}")
        mels = audio if audio.dim() == 4 else _segment_mels(audio)
        a, v = self.net(faces_from_frames(frames), mels.to(frames.dtype))
        return F.cosine_similarity(a, v, dim=1)

    def forward(self, frames: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        p = self.probability(frames, audio)
        # Both embeddings come out of a ReLU, so the cosine lies in [0, 1] (the clamp only absorbs
        # rounding). BCE with target 1 is -log p; like torch's BCELoss, log is clamped at -100.
        return -torch.log(p.clamp(0.0, 1.0)).clamp_max(100.0)

    @torch.no_grad()
    def sync_confidence(self, frames: torch.Tensor, wave: torch.Tensor, batch: int = 64) -> float:
        """See :func:`sync_confidence`."""
        return sync_confidence(frames, wave, self.net, batch)


@torch.no_grad()
def sync_confidence(frames: torch.Tensor, wave: torch.Tensor, net: SyncNet, batch: int = 64) -> float:
    """Evaluation sync score: frames [N, 3, S, S] RGB in [-1, 1] at 25 fps, wave [640 N] 16 kHz -> float.

    The mean, over every 5-frame window (start 0 .. N - 5), of the Wav2Lip expert's cosine
    similarity between the window's face and its 0.2 s of mel (cut from the whole clip's mel as
    Wav2Lip does). Higher is better, at most 1. This is *not* the LSE-C / LSE-D protocol of the
    original SyncNet (Chung & Zisserman), which searches audio offsets of +-15 frames with another
    network; numbers are not comparable with papers that report those.
    """
    n = frames.shape[0]
    if n < SYNC_FRAMES:
        raise ValueError(f"sync_confidence: at least {SYNC_FRAMES} frames needed, got {n}")
    mel = wav2lip_mel(wave.float().to(frames.device))
    sims = []
    for s in range(0, n - SYNC_FRAMES + 1, batch):
        starts = list(range(s, min(s + batch, n - SYNC_FRAMES + 1)))
        windows = torch.stack([frames[i:i + SYNC_FRAMES] for i in starts]).float()
        a, v = net(faces_from_frames(windows), mel_windows(mel, starts))
        sims.append(F.cosine_similarity(a, v, dim=1))
    return float(torch.cat(sims).mean())
