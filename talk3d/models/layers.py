"""StyleGAN2 building blocks in plain PyTorch: equalised-lr layers, FIR resampling, modulated conv.

Parameter and buffer names match EG3D's ``networks_stylegan2.py`` so its checkpoints load with
``load_state_dict``. Conventions worth knowing:

- Weights are stored unscaled (``randn``) and scaled at run time by ``1 / sqrt(fan_in)`` (times the
  lr multiplier for fully connected layers): the "equalised learning rate".
- ``resample_filter`` buffers hold the normalised 2-D outer product of ``[1, 3, 3, 1]`` (``[4, 4]``).
- Paddings are ``(left, right, top, bottom)`` like :func:`torch.nn.functional.pad`.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.bias_act import bias_act as fused_bias_act
from ..ops.binomial_filter import binomial_filter2d

#: StyleGAN2's default activation: leaky ReLU, slope 0.2, output gain sqrt(2) (variance-preserving).
LRELU_SLOPE = 0.2
ACT_GAINS = {"linear": 1.0, "lrelu": math.sqrt(2.0), "relu": math.sqrt(2.0)}
#: Added to the squared weight norm before demodulating (EG3D's value).
DEMOD_EPS = 1e-8


def setup_filter(taps: Sequence[float] = (1, 3, 3, 1), device=None) -> torch.Tensor:
    """Separable FIR taps -> normalised 2-D filter ``[K, K]`` (sums to 1)."""
    f = torch.as_tensor(list(taps), dtype=torch.float32, device=device)
    f = f[:, None] * f[None, :]
    return f / f.sum()


def _pads(padding) -> tuple[int, int, int, int]:
    if isinstance(padding, int):
        return padding, padding, padding, padding
    if len(padding) == 2:  # (x, y)
        return padding[0], padding[0], padding[1], padding[1]
    return tuple(int(p) for p in padding)  # type: ignore[return-value]


def _is_binomial(f: torch.Tensor) -> bool:
    """Whether ``f`` is EG3D's resampling filter, ``setup_filter()`` (the outer product of [1, 3, 3, 1]).

    The answer is kept on the tensor object itself with its version counter, so a GPU filter is
    read back to the host once, not on every call, and an in-place change is compared again. (It
    was kept in a table keyed by the data pointer: a new 4x4 tensor allocated where a freed
    binomial filter had lived was then taken for the binomial filter.)
    """
    if f.shape != (4, 4):
        return False
    known = getattr(f, "_talk3d_binomial", None)
    if known is not None and torch.compiler.is_compiling():
        # A graph cannot read the version counter; the answer was refreshed before the graph ran
        # (refresh_binomial_flags, from TalkingHead's prologue).
        return known[1]
    version = -1 if f.is_inference() else f._version  # inference tensors have no version counter
    if known is not None and known[0] == version:
        return known[1]
    result = bool(torch.allclose(f.detach().float().cpu(), setup_filter(), rtol=0, atol=1e-7))
    f._talk3d_binomial = (version, result)
    return result


def refresh_binomial_flags(module: nn.Module) -> None:
    """Bring :func:`_is_binomial`'s answer up to date on every ``resample_filter`` buffer of
    ``module``, eagerly (a version comparison each, once computed), so that a compiled graph, which
    reads the answer but cannot check it, finds it current. The modules holding a filter are found
    once (a model's structure does not change); the buffers are looked up on every call, as
    ``.to()`` and ``load_state_dict`` may have replaced them."""
    holders = module.__dict__.get("_talk3d_filter_holders")
    if holders is None:
        holders = [m for m in module.modules() if "resample_filter" in m._buffers]
        module.__dict__["_talk3d_filter_holders"] = holders
    for m in holders:
        f = m._buffers.get("resample_filter")
        if f is not None:
            _is_binomial(f)


def upfirdn2d(x: torch.Tensor, f: torch.Tensor, up: int = 1, down: int = 1, padding=0,
              gain: float = 1.0, flip_filter: bool = False) -> torch.Tensor:
    """Upsample by zero insertion, pad, FIR-filter, downsample by decimation.

    Args:
        x: ``[N, C, H, W]``.
        f: ``[K, K]`` filter (convolved, i.e. flipped, unless ``flip_filter``).
        up, down: integer factors. padding: int, ``(x, y)`` or ``(left, right, top, bottom)``;
            negative values crop.
        gain: overall gain (``up**2`` keeps the mean when upsampling).

    Returns:
        ``[N, C, (H*up + top + bottom - K) // down + 1, ...]``.
    """
    N, C, H, W = x.shape
    if up > 1:  # each sample followed by up-1 zeros, along both axes
        x = x.reshape(N, C, H, 1, W, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(N, C, H * up, W * up)
    left, right, top, bottom = _pads(padding)
    if _is_binomial(f):
        # EG3D's filter (symmetric: flip_filter changes nothing) in one fused pass where the kernels
        # are built. On a GPU a depthwise 4x4 convolution falls to slow kernels: PyTorch's own at
        # inference (1.7 ms a call at batch 8), cuDNN's grouped direct kernel in training (4.4 ms a
        # call, two a step; H200, 2026-12-04); three 2x2 average pools, tried first, were slower
        # still (2.2 ms a pool).
        x = binomial_filter2d(x, (left, right, top, bottom), gain)
        return x[:, :, ::down, ::down] if down > 1 else x
    x = F.pad(x, [max(left, 0), max(right, 0), max(top, 0), max(bottom, 0)])
    x = x[..., max(-top, 0): x.shape[2] - max(-bottom, 0), max(-left, 0): x.shape[3] - max(-right, 0)]
    f = f.to(x.dtype) * gain
    if not flip_filter:
        f = f.flip([0, 1])  # conv2d correlates; flipping makes it a true convolution
    weight = f[None, None].expand(C, 1, *f.shape)
    x = F.conv2d(x, weight, groups=C)
    return x[:, :, ::down, ::down] if down > 1 else x


def upsample2d(x: torch.Tensor, f: torch.Tensor, up: int = 2) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, C, H*up, W*up]`` with the FIR filter ``f`` ``[K, K]``."""
    k = f.shape[-1]
    p0, p1 = (k + up - 1) // 2, (k - up) // 2
    return upfirdn2d(x, f, up=up, padding=(p0, p1, p0, p1), gain=up * up)


def downsample2d(x: torch.Tensor, f: torch.Tensor, down: int = 2) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, C, H/down, W/down]`` with the FIR filter ``f`` ``[K, K]``."""
    k = f.shape[-1]
    p0, p1 = (k - down + 1) // 2, (k - down) // 2
    return upfirdn2d(x, f, down=down, padding=(p0, p1, p0, p1))


#: Slope below zero of each activation, as :func:`talk3d.ops.bias_act` takes it.
ACT_SLOPES = {"linear": 1.0, "lrelu": LRELU_SLOPE, "relu": 0.0}


def bias_act(x: torch.Tensor, b: torch.Tensor | None, act: str = "linear", gain: float = 1.0,
             clamp: float | None = None) -> torch.Tensor:
    """``clamp(act(x + b) * gain)`` with ``b`` ``[C]`` along dim 1 of ``x`` ``[N, C, ...]``: StyleGAN2's
    activation by name, run by :func:`talk3d.ops.bias_act` (one pass each way with the compiled
    kernels, PyTorch's four operations where there are none)."""
    if act not in ACT_SLOPES:
        raise ValueError(f"bias_act: unknown activation {act!r}")
    return fused_bias_act(x, b, slope=ACT_SLOPES[act], gain=gain, clamp=clamp)


class FullyConnected(nn.Module):
    """Equalised-lr linear layer: ``act(x @ (W * lr / sqrt(in)).T + b * lr) * act_gain``.

    Stores ``weight`` ``[out, in]`` (initialised ``randn / lr_multiplier``) and ``bias`` ``[out]``.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, activation: str = "linear",
                 lr_multiplier: float = 1.0, bias_init: float = 0.0):
        super().__init__()
        self.in_features, self.out_features, self.activation = in_features, out_features, activation
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def effective_weight(self) -> torch.Tensor:
        """``[out, in]`` the weight as applied."""
        return self.weight * self.weight_gain

    def effective_bias(self) -> torch.Tensor | None:
        """``[out]`` the bias as applied."""
        return None if self.bias is None else self.bias * self.bias_gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[..., in]`` -> ``[..., out]`` (computed in x's dtype)."""
        w = self.effective_weight().to(x.dtype)
        b = self.effective_bias()
        x = F.linear(x, w, None if b is None else b.to(x.dtype))
        if self.activation == "linear":
            return x
        return bias_act(x, None, self.activation, ACT_GAINS[self.activation])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, activation={self.activation}"


def _conv(x: torch.Tensor, w: torch.Tensor, up: int, padding: int, f: torch.Tensor | None, groups: int) -> torch.Tensor:
    """Convolution (correlation, like F.conv2d) with optional FIR upsampling.

    x ``[N, groups*I, H, W]``, w ``[groups*O, I, k, k]``. With ``up = 2`` the result equals
    "zero-insert upsample, convolve with w, filter with f", done as a transposed convolution of stride
    2 followed by the FIR (gain up^2), with paddings chosen so the output is ``[N, groups*O, 2H, 2W]``.
    """
    if up == 1:
        return F.conv2d(x, w, padding=padding, groups=groups)
    O, I, kh, kw = w.shape
    fk = f.shape[-1]
    # Padding of the upsampled signal, minus what the transposed conv already adds (k - 1, k - up).
    p0 = padding + (fk + up - 1) // 2 - (kw - 1)
    p1 = padding + (fk - up) // 2 - (kw - up)
    pt = max(min(-p0, -p1), 0)
    # conv_transpose2d wants [groups*I, O, k, k]: swap in/out within each group.
    wt = w.reshape(groups, O // groups, I, kh, kw).transpose(1, 2).reshape(groups * I, O // groups, kh, kw)
    x = F.conv_transpose2d(x, wt, stride=up, padding=pt, groups=groups)
    return upfirdn2d(x, f, padding=(p0 + pt, p1 + pt, p0 + pt, p1 + pt), gain=up * up)


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, *,
                     noise: torch.Tensor | None = None, up: int = 1, padding: int = 0,
                     resample_filter: torch.Tensor | None = None, demodulate: bool = True,
                     fused: bool = True) -> torch.Tensor:
    """StyleGAN2's modulated convolution.

    Args:
        x: ``[B, I, H, W]``. weight: ``[O, I, k, k]`` (already scaled as wanted).
        styles: ``[B, I]``, or ``[1, I]``: one style for every sample (see below).
        noise: optional, broadcastable to the output ``[B, O, H*up, W*up]``.
        up: 1 or 2 (then ``resample_filter`` ``[K, K]`` is needed).
        demodulate: rescale each output channel's per-sample weights to unit norm.
        fused: one grouped convolution with per-sample weights (fast at inference); else the
            activations are scaled before and after a shared-weight convolution (fast in training).
            Ignored for a shared style: then styles and demodulation fold into the one weight, and a
            plain convolution over the batch does the rest (Talk3D conditions the super-resolution
            on one identity latent for every frame).

    Returns:
        ``[B, O, H*up, W*up]`` in x's dtype.
    """
    B, I = x.shape[:2]
    O, _, kh, kw = weight.shape
    if styles.dim() != 2 or styles.shape[0] not in (1, B) or styles.shape[1] != I:
        raise ValueError(f"modulated_conv2d: styles must be [{B}, {I}] or [1, {I}], got {list(styles.shape)}")
    if x.dtype == torch.float16 and demodulate:
        # fp16 activations overflow past 65504; demodulation cancels any per-(sample, output channel)
        # scale, so shrinking weights and styles to unit max norm first changes nothing else.
        weight = weight * (1 / math.sqrt(I * kh * kw) / weight.norm(float("inf"), dim=[1, 2, 3], keepdim=True))
        styles = styles / styles.norm(float("inf"), dim=1, keepdim=True)
    if styles.shape[0] == 1:
        # One modulated weight for the whole batch: no grouped convolution (slow kernels on a GPU)
        # and no activation-sized scaling passes (nor the copies autograd saves of them).
        w = weight * styles.reshape(1, I, 1, 1)  # [O, I, k, k]
        if demodulate:
            w = w * (w.square().sum(dim=[1, 2, 3], keepdim=True) + DEMOD_EPS).rsqrt()
        y = _conv(x, w.to(x.dtype), up, padding, resample_filter, groups=1)
        return y if noise is None else y + noise.to(y.dtype)
    w = weight[None] * styles.reshape(B, 1, I, 1, 1)  # [B, O, I, k, k]
    dcoefs = (w.square().sum(dim=[2, 3, 4]) + DEMOD_EPS).rsqrt() if demodulate else None  # [B, O]
    if fused:
        if dcoefs is not None:
            w = w * dcoefs.reshape(B, O, 1, 1, 1)
        y = _conv(x.reshape(1, B * I, *x.shape[2:]), w.reshape(B * O, I, kh, kw).to(x.dtype), up, padding,
                  resample_filter, groups=B)
        y = y.reshape(B, O, *y.shape[2:])
    else:
        y = _conv(x * styles.to(x.dtype).reshape(B, I, 1, 1), weight.to(x.dtype), up, padding, resample_filter, 1)
        if dcoefs is not None:
            y = y * dcoefs.to(y.dtype).reshape(B, O, 1, 1)
    if noise is not None:
        y = y + noise.to(y.dtype)
    return y


def _shared_rows(w: torch.Tensor) -> torch.Tensor:
    """w ``[B, w_dim]`` -> ``[1, w_dim]`` when every sample holds the same latent, else w unchanged.

    "The same" is read off the layout, not the values: a batch expanded from one latent (stride 0
    along the batch, as :class:`talk3d.models.TalkingHead` conditions every frame on ``w_ID``), or
    a batch of one. Comparing values would cost a device-to-host sync per layer.
    """
    return w[:1] if w.shape[0] == 1 or w.stride(0) == 0 else w


def _use_fused(mode: str, training: bool) -> bool:
    return mode == "always" or (mode == "inference_only" and not training)


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv (optionally upsampling by 2) + noise injection + bias + leaky ReLU.

    Parameters: ``affine`` (w -> styles, bias_init 1), ``weight`` ``[O, I, 3, 3]``, ``bias`` ``[O]``,
    ``noise_strength`` ``[]``; buffers ``resample_filter`` ``[4, 4]`` and ``noise_const``
    ``[res, res]`` (the fixed noise image of ``noise_mode='const'``).
    """

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, *, up: int = 1,
                 kernel_size: int = 3, use_noise: bool = True, activation: str = "lrelu",
                 conv_clamp: float | None = None, fused_modconv: str = "inference_only"):
        super().__init__()
        self.in_channels, self.out_channels, self.resolution, self.up = in_channels, out_channels, resolution, up
        self.use_noise, self.activation, self.conv_clamp = use_noise, activation, conv_clamp
        self.fused_modconv = fused_modconv
        self.padding = kernel_size // 2
        self.register_buffer("resample_filter", setup_filter())
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        if use_noise:
            self.register_buffer("noise_const", torch.randn(resolution, resolution))
            self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "random", gain: float = 1.0) -> torch.Tensor:
        """x ``[B, I, res/up, res/up]``, w ``[B, w_dim]`` -> ``[B, O, res, res]``."""
        if noise_mode not in ("random", "const", "none"):
            raise ValueError(f"SynthesisLayer: noise_mode must be 'random', 'const' or 'none', got {noise_mode!r}")
        styles = self.affine(_shared_rows(w))  # [B, I] or [1, I]
        noise = None
        if self.use_noise and noise_mode == "random":
            noise = torch.randn(x.shape[0], 1, self.resolution, self.resolution, device=x.device,
                                dtype=x.dtype) * self.noise_strength
        elif self.use_noise and noise_mode == "const":
            noise = self.noise_const * self.noise_strength
        x = modulated_conv2d(x, self.weight, styles, noise=noise, up=self.up, padding=self.padding,
                             resample_filter=self.resample_filter,
                             fused=_use_fused(self.fused_modconv, self.training))
        clamp = None if self.conv_clamp is None else self.conv_clamp * gain
        return bias_act(x, self.bias, self.activation, ACT_GAINS[self.activation] * gain, clamp)

    def extra_repr(self) -> str:
        return f"in={self.in_channels}, out={self.out_channels}, resolution={self.resolution}, up={self.up}"


class ToRGBLayer(nn.Module):
    """Modulated 1x1 conv without demodulation (+ bias): features -> image channels.

    Parameters: ``affine``, ``weight`` ``[O, I, 1, 1]``, ``bias`` ``[O]``.
    """

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, *, kernel_size: int = 1,
                 conv_clamp: float | None = None, fused_modconv: str = "inference_only"):
        super().__init__()
        self.conv_clamp, self.fused_modconv = conv_clamp, fused_modconv
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size ** 2)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x ``[B, I, H, W]``, w ``[B, w_dim]`` -> ``[B, O, H, W]``."""
        styles = self.affine(_shared_rows(w)) * self.weight_gain  # no demodulation: the gain goes on the styles
        x = modulated_conv2d(x, self.weight, styles, demodulate=False,
                             fused=_use_fused(self.fused_modconv, self.training))
        return bias_act(x, self.bias, clamp=self.conv_clamp)
