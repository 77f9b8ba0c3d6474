"""The paper's Sync metric: SyncNet's lip-sync confidence (LSE-C) and distance (LSE-D).

Talking-head papers score lip sync with Chung and Zisserman's SyncNet ("Out of time", ACCV 2016
workshops; the paper's [8]) as its public evaluation code (joonson/syncnet_python) computes it:

- the video side: windows of 5 frames, BGR, 0-255, 224 x 224 face crops, through a 3-D CNN;
- the audio side: 13 MFCCs at 100 Hz of the 16-kHz speech (python_speech_features' ``mfcc`` with
  its defaults, on 16-bit sample values), windows of 20 (0.2 s), through a 2-D CNN;
- for each frame, the distances between its video embedding and the audio embeddings of the
  frames ``-vshift .. +vshift`` around it (zero embeddings past the ends), averaged over frames:
  LSE-D = the smallest mean distance, LSE-C = the median minus it, offset = its shift.

The weights (``syncnet_v2.model``, from the syncnet_python authors) are the user's to supply:
never bundled or downloaded. The network below is written for that file's layout (the same module
names and shapes), and is checked against it key by key.

Our frames are already face crops (EG3D's FFHQ framing); they are resized whole to 224 x 224.
syncnet_python's full pipeline would first detect the face (S3FD) and crop it with a 40 % margin:
the framing differs a little, so compare LSE numbers made one way.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LSE_WEIGHTS_ENV", "LSE_FILE", "VSHIFT", "SyncNetV2", "find_lse_weights", "load_syncnet_v2",
           "speech_mfcc", "sync_confidence", "LSEScorer"]

LSE_WEIGHTS_ENV = "TALK3D_SYNCNET_V2_WEIGHTS"
LSE_FILE = "syncnet_v2.model"
#: Shifts searched on each side, in frames (syncnet_python's run_syncnet default).
VSHIFT = 15
#: Frames per video window and MFCC steps per frame (100 Hz MFCCs, 25 fps video).
WINDOW_FRAMES, MFCC_PER_FRAME = 5, 4
MFCC_WINDOW = WINDOW_FRAMES * MFCC_PER_FRAME
CROP = 224
SAMPLES_PER_FRAME = 640  # 16 kHz / 25 fps
EMBEDDING = 1024


# Module indices follow these lists (convolution, norm, ReLU, sometimes a pool), and the weight
# file's key names depend on them.
def _audio_tower() -> nn.Sequential:
    """[B, 1, 13, 20] MFCC windows -> [B, 512, 1, 1]."""
    def block(cin, cout, **conv):
        return [nn.Conv2d(cin, cout, **conv), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(1, 64, kernel_size=3, padding=1), nn.MaxPool2d(1, 1),
                         *block(64, 192, kernel_size=3, padding=1), nn.MaxPool2d(3, (1, 2)),
                         *block(192, 384, kernel_size=3, padding=1), *block(384, 256, kernel_size=3, padding=1),
                         *block(256, 256, kernel_size=3, padding=1), nn.MaxPool2d(3, 2),
                         *block(256, 512, kernel_size=(5, 4)))


def _video_tower() -> nn.Sequential:
    """[B, 3, 5, 224, 224] frame windows -> [B, 512, 1, 1, 1]."""
    def block(cin, cout, **conv):
        return [nn.Conv3d(cin, cout, **conv), nn.BatchNorm3d(cout), nn.ReLU()]

    return nn.Sequential(*block(3, 96, kernel_size=(5, 7, 7), stride=(1, 2, 2)), nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
                         *block(96, 256, kernel_size=(1, 5, 5), stride=(1, 2, 2), padding=(0, 1, 1)),
                         nn.MaxPool3d((1, 3, 3), (1, 2, 2), padding=(0, 1, 1)),
                         *block(256, 256, kernel_size=(1, 3, 3), padding=(0, 1, 1)),
                         *block(256, 256, kernel_size=(1, 3, 3), padding=(0, 1, 1)),
                         *block(256, 256, kernel_size=(1, 3, 3), padding=(0, 1, 1)), nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
                         *block(256, 512, kernel_size=(1, 6, 6)))


def _head() -> nn.Sequential:
    """[B, 512] -> [B, 1024] embedding."""
    return nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, EMBEDDING))


class SyncNetV2(nn.Module):
    """SyncNet's two towers in the module layout of ``syncnet_v2.model`` (eval mode only)."""

    def __init__(self):
        super().__init__()
        self.netcnnaud, self.netfcaud = _audio_tower(), _head()
        self.netcnnlip, self.netfclip = _video_tower(), _head()

    def embed_audio(self, mfcc: torch.Tensor) -> torch.Tensor:
        """mfcc [B, 1, 13, 20] -> [B, 1024]."""
        return self.netfcaud(self.netcnnaud(mfcc).flatten(1))

    def embed_video(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [B, 3, 5, 224, 224] BGR in 0..255 -> [B, 1024]."""
        return self.netfclip(self.netcnnlip(frames).flatten(1))


def find_lse_weights(explicit: str | os.PathLike | None = None) -> Path | None:
    """``syncnet_v2.model``: ``explicit`` (the file or its folder), else $TALK3D_SYNCNET_V2_WEIGHTS;
    None when neither is set. A path given that is not a file raises FileNotFoundError."""
    given, origin = (explicit, "given explicitly") if explicit is not None else (os.environ.get(LSE_WEIGHTS_ENV),
                                                                                f"from ${LSE_WEIGHTS_ENV}")
    if not given:
        return None
    path = Path(given).expanduser()
    if path.is_dir():
        path = path / LSE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"SyncNet weights {origin}: {path}: no such file (syncnet_python's "
                                f"{LSE_FILE}, from its download_model.sh)")
    return path


def load_syncnet_v2(path, device="cpu") -> SyncNetV2:
    """syncnet_python's weight file -> :class:`SyncNetV2` in eval mode. A file that is not a
    readable state dict, or whose keys or shapes differ, raises ValueError naming it."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged or foreign file
        raise ValueError(f"{path}: not a readable SyncNet weight file ({type(e).__name__})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a SyncNet state dict")
    net = SyncNetV2()
    own = net.state_dict()
    # Files saved by a PyTorch before 0.4.1 have no batch-norm step counters (unused in eval mode).
    missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(f"{path}: not syncnet_python's {LSE_FILE} layout (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}, other shapes {shapes[:3]})")
    net.load_state_dict({k: state[k].float() if k in state else own[k] for k in own})
    return net.to(device).eval().requires_grad_(False)


def _require_mfcc():
    """python_speech_features' ``mfcc``, or ImportError saying how to install it."""
    try:
        from python_speech_features import mfcc
    except ImportError:
        raise ImportError("LSE needs python_speech_features (and scipy): pip install python_speech_features "
                          "scipy, or pip install talk3d[evaluate]") from None
    return mfcc


def speech_mfcc(wave16k: np.ndarray) -> np.ndarray:
    """[T] float speech at 16 kHz in [-1, 1] -> [13, M] MFCCs at 100 Hz, exactly as syncnet_python
    computes them: python_speech_features' ``mfcc`` with its defaults on the 16-bit sample values
    (FFmpeg's pcm_s16le of the speech; the scale sets the log-energy coefficient)."""
    mfcc = _require_mfcc()
    ints = np.clip(np.round(np.asarray(wave16k, np.float64) * 32768), -32768, 32767).astype(np.int16)
    return np.asarray(mfcc(ints, 16000), np.float64).T


def sync_confidence(video: torch.Tensor, audio: torch.Tensor, vshift: int = VSHIFT) -> dict:
    """SyncNet's offset search. video, audio: [N, E] embeddings of the same N windows.

    For window i the distances to audio windows i - vshift .. i + vshift (zeros past the ends),
    averaged over i: returns ``lse_d`` (the smallest mean distance), ``lse_c`` (median minus
    smallest), ``offset`` (vshift minus the argmin: frames the audio leads) and ``mean_distance``
    per shift.
    """
    n, win = video.shape[0], 2 * vshift + 1
    padded = F.pad(audio, (0, 0, vshift, vshift))  # [N + 2 vshift, E]
    shifted = torch.stack([padded[s:s + n] for s in range(win)], dim=1)  # [N, win, E]
    dist = F.pairwise_distance(video[:, None, :].expand(-1, win, -1).reshape(-1, video.shape[1]),
                               shifted.reshape(-1, video.shape[1])).view(n, win)  # [N, win]
    mean = dist.mean(dim=0)  # [win]
    low, at = torch.min(mean, 0)
    return {"lse_d": float(low), "lse_c": float(torch.median(mean) - low), "offset": vshift - int(at),
            "mean_distance": mean.tolist()}


class LSEScorer:
    """frames [N, 3, S, S] RGB in [-1, 1] + their speech [640 N] at 16 kHz -> LSE-C, LSE-D, offset."""

    def __init__(self, path, device="cpu", batch: int = 16):
        _require_mfcc()  # said before the frames are rendered, not after
        self.net = load_syncnet_v2(path, device)
        self.device, self.batch = torch.device(device), int(batch)
        self.name = f"SyncNet v2 ({Path(path).name}), syncnet_python's LSE-C / LSE-D"

    @torch.no_grad()
    def __call__(self, frames: torch.Tensor, wave16k) -> dict:
        n = min(frames.shape[0], len(wave16k) // SAMPLES_PER_FRAME)
        windows = n - WINDOW_FRAMES  # as syncnet_python: the last full window is left out
        if windows < 1:
            raise ValueError(f"LSE needs more than {WINDOW_FRAMES} frames with their speech, got {n}")
        # As a decoded video: 8-bit, BGR, 0-255, 224 x 224.
        img = F.interpolate(frames[:n].float().clamp(-1, 1), size=(CROP, CROP), mode="bilinear", antialias=True,
                            align_corners=False)
        img = ((img + 1) * 127.5).round().flip(1)  # [n, 3, 224, 224] BGR
        cc = torch.from_numpy(speech_mfcc(np.asarray(wave16k)[:n * SAMPLES_PER_FRAME])).float()  # [13, M]
        vid, aud = [], []
        for s in range(0, windows, self.batch):
            ids = range(s, min(windows, s + self.batch))
            clips = torch.stack([img[i:i + WINDOW_FRAMES].transpose(0, 1) for i in ids])  # [b, 3, 5, 224, 224]
            mf = torch.stack([cc[:, MFCC_PER_FRAME * i:MFCC_PER_FRAME * i + MFCC_WINDOW] for i in ids])[:, None]
            vid.append(self.net.embed_video(clips.to(self.device)).cpu())
            aud.append(self.net.embed_audio(mf.to(self.device)).cpu())
        return {**sync_confidence(torch.cat(vid), torch.cat(aud)), "windows": windows}
