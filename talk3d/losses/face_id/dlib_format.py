"""dlib's portable serialization: the face network file read into :class:`DlibNet` records."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np


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
