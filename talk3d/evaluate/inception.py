"""Inception-v3 pool features for FID, equal in architecture to pytorch-fid's ``FIDInceptionV3``.

FID numbers are only comparable when computed with the network behind the standard ones: the
TensorFlow 2015-12-05 Inception graph, as ported by pytorch-fid into
``pt_inception-2015-12-05-6726825d.pth``. That port is torchvision's ``Inception3`` with two
FID-specific changes, both reproduced here:

- every average pool inside the Inception blocks excludes the zero padding from its count
  (``count_include_pad=False``), as TensorFlow's average pool does;
- the last block (``Mixed_7c``) pools its pool branch with a 3x3 *max* pool instead of an average
  pool (a quirk of the TensorFlow graph).

The classifier (``fc``, 1008 classes) and the auxiliary head are not part of FID and not built.
The weights are never downloaded here: the user fetches the file once (see :func:`inception_status`).

Images are ``[B, 3, H, W]`` float in [-1, 1] (talk3d's convention, which is also the range
pytorch-fid feeds its network after mapping [0, 1] inputs); features are ``[B, 2048]`` float32.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..prior.checkpoint import check_state_dict, read_weights_file

__all__ = ["INCEPTION_ENV", "INCEPTION_FILE", "INCEPTION_SIZE", "FEATURE_DIM", "BasicConv2d",
           "InceptionA", "InceptionB", "InceptionC", "InceptionD", "InceptionE", "FIDInception",
           "find_inception_weights", "load_fid_inception", "inception_status"]

INCEPTION_ENV = "TALK3D_INCEPTION_WEIGHTS"
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/mseitzer/pytorch-fid/releases"  # where users get the file
INCEPTION_SIZE = 299  # the network's input side; every image is resized to it first
FEATURE_DIM = 2048
# TensorFlow's batch-norm epsilon in the 2015 graph (torchvision's Inception3 uses the same).
BN_EPS = 0.001
# Checkpoint entries that FID does not use: the 1008-way classifier, the auxiliary head and
# BatchNorm's step counters (meaningless in eval; absent in old checkpoints).
_IGNORED_PREFIXES = ("fc.", "AuxLogits.")
_IGNORED_SUFFIX = "num_batches_tracked"


# ------------------------------------------------------------------------------------------------
# Network
# ------------------------------------------------------------------------------------------------
class BasicConv2d(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d(eps=0.001) -> ReLU; ``[B, C_in, H, W] -> [B, C_out, H', W']``."""

    def __init__(self, c_in: int, c_out: int, **conv_kwargs):
        super().__init__()
        # Attribute names "conv" / "bn" are fixed by the checkpoint's keys.
        self.conv = nn.Conv2d(c_in, c_out, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(c_out, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    # count_include_pad=False: border averages divide by the number of real pixels, as in the
    # TensorFlow graph (torchvision's default would divide by 9 and darken the border).
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b/c/d: ``[B, C_in, 35, 35] -> [B, 224 + pool_features, 35, 35]``."""

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([b1, b5, b3, bp], dim=1)


class InceptionB(nn.Module):
    """Mixed_6a (grid reduction): ``[B, C_in, 35, 35] -> [B, 480 + C_in, 17, 17]``."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b3d, bp], dim=1)


class InceptionC(nn.Module):
    """Mixed_6b..6e (factorised 7x7): ``[B, C_in, 17, 17] -> [B, 768, 17, 17]``."""

    def __init__(self, c_in: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = layer(b7d)
        bp = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([b1, b7, b7d, bp], dim=1)


class InceptionD(nn.Module):
    """Mixed_7a (grid reduction): ``[B, C_in, 17, 17] -> [B, 512 + C_in, 8, 8]``."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], dim=1)


class InceptionE(nn.Module):
    """Mixed_7b / 7c (expanded filter banks): ``[B, C_in, 8, 8] -> [B, 2048, 8, 8]``.

    ``pool`` is "avg" for Mixed_7b and "max" for Mixed_7c (the FID graph's quirk, see module doc).
    """

    def __init__(self, c_in: int, pool: str = "avg"):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"InceptionE pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(c_in, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], dim=1)
        if self.pool == "max":
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _avg_pool_3x3(x)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, b3d, bp], dim=1)

    def extra_repr(self) -> str:
        return f"pool={self.pool}"


class FIDInception(nn.Module):
    """pytorch-fid's FID Inception-v3 up to the 2048-d pool features (no classifier).

    Always in eval mode: batch norm uses the checkpoint's running statistics. Parameters are
    frozen (FID never back-propagates through it). Build it with random weights only in tests;
    real use goes through :func:`load_fid_inception`.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FIDInception":
        # A fixed feature extractor: batch statistics of the caller's batch must never be used.
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] float in [-1, 1] (any H, W) -> pool features [B, 2048] float32."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"FIDInception expects [B, 3, H, W] images, got {tuple(images.shape)}")
        param = self.Conv2d_1a_3x3.conv.weight
        x = images.to(device=param.device, dtype=param.dtype)
        # pytorch-fid resizes every input (299 -> 299 is the identity for bilinear, half-pixel centres).
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        x = self.Conv2d_1a_3x3(x)                          # 149 x 149 x 32
        x = self.Conv2d_2a_3x3(x)                          # 147 x 147 x 32
        x = self.Conv2d_2b_3x3(x)                          # 147 x 147 x 64
        x = F.max_pool2d(x, kernel_size=3, stride=2)       # 73 x 73 x 64
        x = self.Conv2d_3b_1x1(x)                          # 73 x 73 x 80
        x = self.Conv2d_4a_3x3(x)                          # 71 x 71 x 192
        x = F.max_pool2d(x, kernel_size=3, stride=2)       # 35 x 35 x 192
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # 35 x 35 x 288
        x = self.Mixed_6a(x)                               # 17 x 17 x 768
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # 17 x 17 x 768
        x = self.Mixed_7a(x)                               # 8 x 8 x 1280
        x = self.Mixed_7c(self.Mixed_7b(x))                # 8 x 8 x 2048
        return F.adaptive_avg_pool2d(x, 1).flatten(1).float()


# ------------------------------------------------------------------------------------------------
# Weights
# ------------------------------------------------------------------------------------------------
def _resolve(location: str | os.PathLike, origin: str) -> Path:
    """A file, or a folder holding INCEPTION_FILE -> that file; FileNotFoundError otherwise."""
    path = Path(location).expanduser()
    if path.is_dir():
        path = path / INCEPTION_FILE
    if not path.is_file():
        # Given but absent: raise, so that a typo does not silently turn FID off.
        raise FileNotFoundError(f"Inception weights {path} ({origin}): no such file")
    return path


def find_inception_weights(explicit: str | os.PathLike | None = None) -> Path | None:
    """The FID Inception weights file, or None when there is none. Never downloads.

    Search order (first hit wins): ``explicit`` (a file, or a folder holding
    :data:`INCEPTION_FILE`), then ``$TALK3D_INCEPTION_WEIGHTS`` (same rules), then the torch hub
    cache ``torch.hub.get_dir()/checkpoints/INCEPTION_FILE`` (where pytorch-fid itself saves it).
    An explicit path or environment value that does not resolve to a file raises FileNotFoundError.
    """
    if explicit is not None:
        return _resolve(explicit, "given explicitly")
    env = os.environ.get(INCEPTION_ENV)
    if env:
        return _resolve(env, f"from ${INCEPTION_ENV}")
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    return cached if cached.is_file() else None


def _read_state(path: Path) -> dict:
    """The file's tensors without the entries FID does not use."""
    state = read_weights_file(path, "Inception weights")
    return {k: v for k, v in state.items()
            if not k.startswith(_IGNORED_PREFIXES) and not k.endswith(_IGNORED_SUFFIX)}


def load_fid_inception(path: str | os.PathLike, device: torch.device | str = "cpu") -> FIDInception:
    """pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (or a file in its format) -> network.

    Raises FileNotFoundError for a missing file and ValueError (naming the file) for a corrupt one
    or one whose keys / shapes differ from the architecture; never returns random weights.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights {path}: no such file")
    net = FIDInception()
    state = _read_state(path)
    expected = {k: v for k, v in net.state_dict().items() if not k.endswith(_IGNORED_SUFFIX)}
    check_state_dict(expected, state).raise_if_bad(f"Inception weights {path} (pytorch-fid's FID Inception-v3)")
    # The step counters were dropped from the file; keep the network's own (unused in eval).
    net.load_state_dict({**net.state_dict(), **state}, strict=True)
    return net.to(device)


def inception_status(explicit: str | os.PathLike | None = None) -> str:
    """One line: where the FID Inception weights come from, or why FID is off and how to enable it."""
    try:
        found = find_inception_weights(explicit)
        if found is not None:
            load_fid_inception(found)  # a file that is found but unusable must not read as "ready"
    except (OSError, ValueError) as e:
        return f"FID off: the Inception weights could not be used: {e}"
    if found is None:
        return (f"FID off: no Inception weights found (looked in ${INCEPTION_ENV} and "
                f"{Path(torch.hub.get_dir()) / 'checkpoints'}); download pytorch-fid's {INCEPTION_FILE} "
                f"from {INCEPTION_URL} yourself, then pass --inception-weights FILE or set "
                f"{INCEPTION_ENV}=FILE (talk3d never downloads it)")
    return f"FID Inception-v3 (pytorch-fid) weights: {found}"
