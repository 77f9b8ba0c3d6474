"""dlib's face-recognition ResNet rebuilt in torch from the parsed records."""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import CHIP_SIZE, EMBEDDING_DIM
from .dlib_format import DlibLayer, DlibNet, parse_dlib_net
from .weights import _require_weights


# anet_type's residual blocks, input side first: (filters, down). A down block halves rows/cols.
RESNET_BLOCKS = ((32, False),) * 3 + ((64, True),) + ((64, False),) * 3 + ((128, True),) + \
    ((128, False),) * 2 + ((256, True),) + ((256, False),) * 2 + ((256, True),)


def _expected_kinds() -> list[tuple]:
    """The record sequence of anet_type, input first: (kind, filters or None, kernel, stride)."""
    seq = [("input",), ("con", 32, 7, 2), ("affine",), ("relu",), ("max_pool", None, 3, 2)]
    for filters, down in RESNET_BLOCKS:
        seq += [("tag",), ("con", filters, 3, 2 if down else 1), ("affine",), ("relu",),
                ("con", filters, 3, 1), ("affine",)]
        if down:  # tag2 on the branch, skip1 back to the block's input, then its avg_pool
            seq += [("tag",), ("tag",), ("avg_pool", None, 2, 2)]
        seq += [("add_prev",), ("relu",)]
    return seq + [("avg_pool", None, 0, 1), ("fc", EMBEDDING_DIM, None, None)]


def _check_layer(net: DlibNet, i: int, want: tuple) -> None:
    got = net.layers[i]
    ok = got.kind == want[0]
    if ok and want[0] in ("con", "max_pool", "avg_pool"):
        k, s = want[2], want[3]
        pad = 0 if s != 1 else k // 2  # dlib's default padding, which its own loader insists on
        ok = got.attrs["kernel"] == (k, k) and got.attrs["stride"] == (s, s) and got.attrs["padding"] == (pad, pad)
        ok = ok and (want[1] is None or got.attrs["filters"] == want[1])
    if ok and want[0] == "fc":
        ok = got.attrs["outputs"] == want[1]
    if not ok:
        raise ValueError(f"{net.path}: not dlib's face-recognition ResNet: layer {i} is {got.describe()}, "
                         f"expected {want[0]} {want[1:]}")


def _check_channels(net: DlibNet) -> None:
    """Each con reads the previous con's filters (3 for the first), each affine scales its con's
    output, the fc reads the last con's filters."""
    channels = 3
    for i, layer in enumerate(net.layers):
        got = {"con": lambda: layer.arrays["weight"].shape[1], "affine": lambda: layer.attrs["channels"],
               "fc": lambda: layer.attrs["inputs"]}.get(layer.kind)
        if got is not None and got() != channels:
            raise ValueError(f"{net.path}: not dlib's face-recognition ResNet: layer {i} {layer.describe()} "
                             f"reads {got()} channels, expected {channels}")
        if layer.kind == "con":
            channels = layer.attrs["filters"]


def check_architecture(net: DlibNet) -> None:
    """Raise ValueError unless ``net`` is anet_type with a 150x150 input (kinds, filters, kernels, strides)."""
    want = _expected_kinds()
    if len(net.layers) != len(want):
        raise ValueError(f"{net.path}: not dlib's face-recognition ResNet: {len(net.layers)} layer records, "
                         f"expected {len(want)}")
    for i, w in enumerate(want):
        _check_layer(net, i, w)
    _check_channels(net)
    if net.layers[0].attrs["size"] != (CHIP_SIZE, CHIP_SIZE):
        raise ValueError(f"{net.path}: input size {net.layers[0].attrs['size']}, expected {CHIP_SIZE}x{CHIP_SIZE}")


def _frozen(array: np.ndarray) -> nn.Parameter:
    return nn.Parameter(torch.from_numpy(np.ascontiguousarray(array)), requires_grad=False)


class _ConvAffine(nn.Module):
    """dlib's con followed by affine: conv2d (with bias) then a per-channel scale and shift.

    Kept as two steps, not folded into one conv, so the rounding follows dlib's.
    """

    def __init__(self, con: DlibLayer, affine: DlibLayer):
        super().__init__()
        self.weight, self.bias = _frozen(con.arrays["weight"]), _frozen(con.arrays["bias"])
        self.gamma = _frozen(affine.arrays["gamma"].reshape(-1, 1, 1))
        self.beta = _frozen(affine.arrays["beta"].reshape(-1, 1, 1))
        self.stride, self.padding = con.attrs["stride"], con.attrs["padding"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C_in, H, W] -> [B, C_out, H', W']."""
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding)
        return torch.addcmul(self.beta, y, self.gamma)


def _add_zero_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev: a + b where each is zero-padded at the end of channels, rows and cols to
    the larger of the two shapes. a, b [B, C?, H?, W?] -> [B, max C, max H, max W]."""
    def pad(t, shape):
        c, h, w = (s - n for s, n in zip(shape, t.shape[1:]))
        return F.pad(t, (0, w, 0, h, 0, c)) if (c or h or w) else t
    shape = tuple(max(p, q) for p, q in zip(a.shape[1:], b.shape[1:]))
    return pad(a, shape) + pad(b, shape)


class _ResBlock(nn.Module):
    """relu(add_prev(con-affine-relu-con-affine(x), skip(x))); skip = avg_pool in a down block."""

    def __init__(self, records: list[DlibLayer], down: bool):
        super().__init__()
        convs = [r for r in records if r.kind == "con"]
        affines = [r for r in records if r.kind == "affine"]
        self.first, self.second = _ConvAffine(convs[0], affines[0]), _ConvAffine(convs[1], affines[1])
        pool = [r for r in records if r.kind == "avg_pool"]
        self.skip_pool = None
        if down:
            self.skip_pool = (pool[0].attrs["kernel"], pool[0].attrs["stride"], pool[0].attrs["padding"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] -> [B, C', H', W'] (C' = this block's filters; H' = H or ~H/2)."""
        y = self.second(F.relu(self.first(x)))
        skip = x
        if self.skip_pool is not None:
            k, s, p = self.skip_pool
            skip = F.avg_pool2d(x, k, s, p, count_include_pad=False)
        return F.relu(_add_zero_padded(y, skip))


def _split_blocks(layers: list[DlibLayer]) -> list[list[DlibLayer]]:
    """The records of each residual block: from its tag up to its closing relu."""
    blocks, start = [], 5  # after input, con, affine, relu, max_pool
    for _, down in RESNET_BLOCKS:
        end = start + (11 if down else 8)
        blocks.append(layers[start:end])
        start = end
    return blocks


class DlibFaceEmbedder(nn.Module):
    """dlib's face-recognition ResNet in torch. Frozen (no parameter trains), eval mode, but
    differentiable w.r.t. its input.

    forward(chips) -> ``[B, 128]`` descriptors on dlib's scale (same person: Euclidean distance
    < 0.6; they are not unit vectors).
        chips: ``[B, 3, 150, 150]`` RGB in [-1, 1], aligned as dlib's ``get_face_chip`` does
        (see :func:`align_to_chip`); pixel value p in [0, 255] is ``p / 127.5 - 1``.

    Build with ``DlibFaceEmbedder()`` (weights found by :func:`find_face_id_weights`, else
    :class:`FaceIDWeightsNotFound`), a file path, or a parsed :class:`DlibNet`.
    """

    def __init__(self, weights: str | os.PathLike | DlibNet | None = None):
        super().__init__()
        net = weights if isinstance(weights, DlibNet) else parse_dlib_net(_require_weights(weights))
        check_architecture(net)
        layers = net.layers
        self.source = net.path
        mean = torch.tensor(layers[0].attrs["mean_rgb"], dtype=torch.float32)
        self.register_buffer("mean_rgb", mean.view(1, 3, 1, 1))
        self.stem = _ConvAffine(layers[1], layers[2])
        pool = layers[4].attrs
        self.stem_pool = (pool["kernel"], pool["stride"], pool["padding"])
        records = _split_blocks(layers)
        self.blocks = nn.ModuleList(_ResBlock(rec, down) for rec, (_, down) in zip(records, RESNET_BLOCKS))
        self.fc = _frozen(layers[-1].arrays["weight"])  # [256 inputs, 128 outputs], dlib's layout
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        """Always stays in eval mode (the network has no train-time behaviour to switch on)."""
        return super().train(False)

    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        """chips [B, 3, 150, 150] in [-1, 1] -> descriptors [B, 128]."""
        if chips.shape[1:] != (3, CHIP_SIZE, CHIP_SIZE):
            raise ValueError(f"DlibFaceEmbedder: chips must be [B, 3, {CHIP_SIZE}, {CHIP_SIZE}], "
                             f"got {tuple(chips.shape)}")
        # dlib's input layer: (pixel - mean) / 256 with pixels in [0, 255].
        x = ((chips.float() + 1.0) * 127.5 - self.mean_rgb) / 256.0
        k, s, p = self.stem_pool
        x = F.max_pool2d(F.relu(self.stem(x)), k, s, p)
        for block in self.blocks:
            x = block(x)
        return x.mean(dim=(2, 3)) @ self.fc


def uint8_to_unit(chips: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images [B, H, W, 3] (or [H, W, 3]) -> float [B, 3, H, W] in [-1, 1] (p / 127.5 - 1)."""
    t = torch.as_tensor(np.asarray(chips))
    if t.dim() == 3:
        t = t[None]
    return t.permute(0, 3, 1, 2).float() / 127.5 - 1.0
