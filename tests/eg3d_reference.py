"""An EG3D generator written apart from talk3d.models, to check the release converter against.

The other release pickles of test_prior_cli.py are talk3d's own ``TriplaneGenerator`` written in
the release format, so they prove a round trip only: a formula talk3d got wrong, or a recorded
setting the converter did not read, would come back just as wrong and pass. This module is the
second opinion. It is written from EG3D's published formulas (numerics, not code): StyleGAN2's
equalised-learning-rate layers, modulated and demodulated convolution, FIR resampling, noise
injection and skip ToRGBs; EG3D's camera-conditioned mapping with truncation, OSG decoder and
``SuperresolutionHybrid8XDC``. Where talk3d takes a fast route (transposed convolution, one grouped
convolution for the batch, fused bias/activation kernels) this module takes the plain definition:
zero insertion then filtering, one convolution per sample, elementwise operations.

What it shares with EG3D is the outside: class and attribute names (so the state-dict keys are
EG3D's), the constructor arguments ``TriPlaneGenerator`` records, and the pickle format of
``torch_utils.persistence`` (the fake modules of test_prior_import, present only while writing).

Not modelled: fp16 execution (the CPU runs float32; the clamps that come with fp16 are modelled),
``'random'`` noise, training-only code (w_avg tracking, style mixing) and the renderer, which holds
no tensors. EG3D fixes the triplane, decoder and SR sizes in code; here they are arguments
(:class:`Sizes`), not recorded, as in a release, so the converter must read them off the tensors.
"""
from __future__ import annotations

import math
import pickle
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from test_prior_import import Persistent, fake_eg3d_code

#: Added to a squared norm or mean square before dividing by its root (EG3D's value).
EPS = 1e-8
#: StyleGAN2's leaky ReLU and the gain that keeps its output variance.
LRELU_SLOPE, LRELU_GAIN = 0.2, math.sqrt(2)
#: The OSG decoder's features: sigmoid widened by this on both sides (MipNeRF's).
SIGMOID_MARGIN = 0.001


# --------------------------------------------------------------------------------------------------
# Formulas


def fir_filter() -> torch.Tensor:
    """EG3D's resampling filter ``[4, 4]``: the outer product of taps 1, 3, 3, 1, summing to 1."""
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
    return torch.outer(taps, taps) / taps.sum() ** 2


def upsample_fir(x: torch.Tensor, f: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """x ``[N, C, H, W]`` -> ``[N, C, 2H + before + after - 3, ...]``: each sample placed at an even
    index of a zero grid twice the size (times 4, so the filter keeps the mean), the grid padded by
    ``before``/``after`` zeros on both axes, then convolved (flipped kernel) with f ``[4, 4]``."""
    N, C, H, W = x.shape
    grid = x.new_zeros(N, C, 2 * H, 2 * W)
    grid[:, :, ::2, ::2] = x * 4
    grid = F.pad(grid, (before, after, before, after))
    kernel = f.flip([0, 1]).to(x.dtype)
    return F.conv2d(grid, kernel.expand(C, 1, 4, 4), groups=C)


def upsample_image(img: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """The skip image ``[N, C, H, W]`` -> ``[N, C, 2H, 2W]``: padding 2 before, 1 after centres the
    4-tap filter on the doubled grid."""
    return upsample_fir(img, f, 2, 1)


def modulated_conv(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, *, demodulate: bool = True,
                   upsample_with: torch.Tensor | None = None) -> torch.Tensor:
    """StyleGAN2's modulated convolution, one sample at a time.

    x ``[B, I, H, W]``, weight ``[O, I, k, k]``, styles ``[B, I]`` -> ``[B, O, H, W]``, or
    ``[B, O, 2H, 2W]`` with ``upsample_with`` (the FIR filter). Sample b convolves with
    ``w_b[o, i] = weight[o, i] * styles[b, i]``, demodulated to
    ``w_b[o] / sqrt(sum over i and taps of w_b[o]^2 + EPS)`` (unit output variance for unit input).
    Same-size convolutions correlate (F.conv2d, padding k // 2). An upsampling one is EG3D's
    "upsample, then convolve": the input is FIR-upsampled with padding 3 before, 2 after (the filter's
    2, 1 plus the kernel's 1 each side) and the kernel applied as a true convolution (flipped), valid.
    """
    out = []
    for b in range(x.shape[0]):
        w = weight * styles[b].reshape(1, -1, 1, 1)
        if demodulate:
            w = w / torch.sqrt(w.square().sum(dim=(1, 2, 3), keepdim=True) + EPS)
        xb = x[b:b + 1]
        if upsample_with is None:
            out.append(F.conv2d(xb, w, padding=w.shape[-1] // 2))
        else:
            out.append(F.conv2d(upsample_fir(xb, upsample_with, 3, 2), w.flip([2, 3])))
    return torch.cat(out)


def add_bias_act(x: torch.Tensor, bias: torch.Tensor, *, lrelu: bool, gain: float = 1.0,
                 clamp: float | None = None) -> torch.Tensor:
    """``clamp(act(x + bias) * gain)``, bias ``[C]`` along dim 1 of x ``[N, C, ...]``."""
    x = x + bias.reshape(1, -1, *[1] * (x.dim() - 2))
    if lrelu:
        x = torch.where(x >= 0, x, x * LRELU_SLOPE)
    x = x * gain
    return x if clamp is None else x.clamp(-clamp, clamp)


def unit_mean_square(x: torch.Tensor) -> torch.Tensor:
    """x ``[B, D]`` divided by the root of its mean square (+ EPS) along D."""
    return x / torch.sqrt(x.square().mean(dim=1, keepdim=True) + EPS)


# --------------------------------------------------------------------------------------------------
# Modules: EG3D's class and attribute names, pickled as persistence records (Persistent)


class FullyConnectedLayer(Persistent):
    """``act(x @ (weight * lr / sqrt(in)).T + bias * lr)``: x ``[N, in]`` -> ``[N, out]``.

    The run-time gains (``weight_gain``, ``bias_gain``) are what make the learning rate per layer;
    the stored tensors are unscaled, so a converter that misread ``lr_multiplier`` is off by its ratio.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "linear",
                 lr_multiplier: float = 1.0, bias_init: float = 0.0):
        super().__init__()
        self.in_features, self.out_features, self.activation = in_features, out_features, activation
        self.weight = torch.nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = torch.nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / np.sqrt(in_features)  # a numpy float64 in the record, as EG3D's
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ (self.weight * float(self.weight_gain)).t()
        if self.bias is not None:
            y = y + self.bias * self.bias_gain
        if self.activation == "lrelu":
            y = torch.where(y >= 0, y, y * LRELU_SLOPE) * LRELU_GAIN
        return y


class MappingNetwork(Persistent):
    """z ``[B, z_dim]``, c ``[B, c_dim]`` -> ws ``[B, num_ws, w_dim]``.

    ``unit_mean_square(z) ++ unit_mean_square(embed(c))`` through ``num_layers`` leaky-ReLU layers
    at ``lr_multiplier``, the same w for every layer. Truncation moves the first ``cutoff`` ws (all
    when None) to ``w_avg + psi (w - w_avg)``; psi 1 leaves ws untouched.
    """

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, num_ws: int, num_layers: int = 2,
                 lr_multiplier: float = 0.01, w_avg_beta: float = 0.998):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.num_ws = z_dim, c_dim, w_dim, num_ws
        self.num_layers, self.w_avg_beta = num_layers, w_avg_beta
        self.embed = FullyConnectedLayer(c_dim, w_dim)
        widths = [z_dim + w_dim] + [w_dim] * num_layers
        for i in range(num_layers):
            setattr(self, f"fc{i}", FullyConnectedLayer(widths[i], widths[i + 1], activation="lrelu",
                                                        lr_multiplier=lr_multiplier))
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z, c, truncation_psi=1, truncation_cutoff=None):
        x = torch.cat([unit_mean_square(z), unit_mean_square(self.embed(c))], dim=1)
        for i in range(self.num_layers):
            x = getattr(self, f"fc{i}")(x)
        ws = x[:, None].repeat(1, self.num_ws, 1)
        if truncation_psi != 1:
            cut = self.num_ws if truncation_cutoff is None else truncation_cutoff
            ws[:, :cut] = self.w_avg + truncation_psi * (ws[:, :cut] - self.w_avg)
        return ws


class SynthesisLayer(Persistent):
    """Modulated 3x3 conv (``up`` 2: upsampling) + noise + bias, leaky ReLU, clamp:
    x ``[B, I, res/up, res/up]``, w ``[B, w_dim]`` -> ``[B, O, res, res]``.

    Noise ``'const'`` adds ``noise_const * noise_strength`` after the convolution, ``'none'`` nothing.
    The clamp (``conv_clamp``, EG3D's guard for fp16 layers) applies after the gain.
    """

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, up: int = 1,
                 conv_clamp: float | None = None):
        super().__init__()
        self.in_channels, self.out_channels, self.resolution, self.up = in_channels, out_channels, resolution, up
        self.conv_clamp, self.padding, self.act_gain = conv_clamp, 1, LRELU_GAIN
        self.register_buffer("resample_filter", fir_filter())
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, 3, 3))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))
        self.noise_strength = torch.nn.Parameter(torch.zeros([]))
        self.bias = torch.nn.Parameter(torch.zeros(out_channels))

    def forward(self, x, w, noise_mode="const"):
        filt = self.resample_filter if self.up == 2 else None
        x = modulated_conv(x, self.weight, self.affine(w), upsample_with=filt)
        if noise_mode == "const":
            x = x + self.noise_const * self.noise_strength
        return add_bias_act(x, self.bias, lrelu=True, gain=self.act_gain, clamp=self.conv_clamp)


class ToRGBLayer(Persistent):
    """Modulated 1x1 conv without demodulation, + bias, clamp: ``[B, I, H, W]`` -> ``[B, O, H, W]``.
    Its equalised-lr gain ``1 / sqrt(I)`` goes on the styles."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, conv_clamp: float | None = None):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, 1, 1))
        self.bias = torch.nn.Parameter(torch.zeros(out_channels))
        self.weight_gain = 1 / np.sqrt(in_channels)

    def forward(self, x, w):
        x = modulated_conv(x, self.weight, self.affine(w) * float(self.weight_gain), demodulate=False)
        return add_bias_act(x, self.bias, lrelu=False, clamp=self.conv_clamp)


class SynthesisBlock(Persistent):
    """One doubling of resolution, "skip" architecture: x ``[B, I, res/2, res/2]`` (None for the first
    block, which starts from ``const`` ``[O, 4, 4]``), img ``[B, C, res/2, res/2]`` or None, ws
    ``[B, num_conv + 1, w_dim]`` -> (x ``[B, O, res, res]``, img ``[B, C, res, res]``): the image is
    upsampled and this block's ToRGB (the last w) added to it."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, img_channels: int,
                 is_last: bool, conv_clamp: float | None = None):
        super().__init__()
        self.in_channels, self.resolution, self.is_last = in_channels, resolution, is_last
        self.register_buffer("resample_filter", fir_filter())
        if in_channels == 0:
            self.const = torch.nn.Parameter(torch.randn(out_channels, resolution, resolution))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=2, conv_clamp=conv_clamp)
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution, conv_clamp=conv_clamp)
        self.torgb = ToRGBLayer(out_channels, img_channels, w_dim, conv_clamp=conv_clamp)
        self.num_conv, self.num_torgb = (1 if in_channels == 0 else 2), 1

    def forward(self, x, img, ws, noise_mode="const"):
        if self.in_channels == 0:
            x = self.const[None].repeat(ws.shape[0], 1, 1, 1)
            x = self.conv1(x, ws[:, 0], noise_mode)
        else:
            x = self.conv0(x, ws[:, 0], noise_mode)
            x = self.conv1(x, ws[:, 1], noise_mode)
        rgb = self.torgb(x, ws[:, self.num_conv])
        return x, rgb if img is None else upsample_image(img, self.resample_filter) + rgb


class SynthesisNetwork(Persistent):
    """ws ``[B, num_ws, w_dim]`` -> image ``[B, img_channels, R, R]`` through blocks ``b4 .. bR`` of
    ``min(channel_base // r, channel_max)`` channels. Block r reads ``num_conv + 1`` ws from where
    the previous one's convolutions stopped: a ToRGB shares its w with the next block's conv0."""

    def __init__(self, w_dim: int, img_resolution: int, img_channels: int, channel_base: int, channel_max: int,
                 conv_clamp: float | None):
        super().__init__()
        self.block_resolutions = [2 ** i for i in range(2, img_resolution.bit_length())]
        width = {r: min(channel_base // r, channel_max) for r in self.block_resolutions}
        self.num_ws = 0
        for r in self.block_resolutions:
            block = SynthesisBlock(width[r // 2] if r > 4 else 0, width[r], w_dim, r, img_channels,
                                   is_last=r == img_resolution, conv_clamp=conv_clamp)
            setattr(self, f"b{r}", block)
            self.num_ws += block.num_conv
        self.num_ws += 1  # the last block's ToRGB

    def forward(self, ws, noise_mode="const"):
        x = img = None
        start = 0
        for r in self.block_resolutions:
            block = getattr(self, f"b{r}")
            x, img = block(x, img, ws[:, start:start + block.num_conv + 1], noise_mode)
            start += block.num_conv
        return img


class Generator(Persistent):
    """EG3D's StyleGAN2 backbone (its triplane.py imports ``Generator as StyleGAN2Backbone``):
    ``synthesis`` emitting the triplane image and its ``mapping``."""

    def __init__(self, z_dim, c_dim, w_dim, img_resolution, img_channels, mapping_kwargs, channel_base, channel_max,
                 conv_clamp):
        super().__init__()
        self.synthesis = SynthesisNetwork(w_dim, img_resolution, img_channels, channel_base, channel_max, conv_clamp)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim, c_dim, w_dim, self.num_ws, **mapping_kwargs)


class SuperresolutionHybrid8XDC(Persistent):
    """rgb ``[B, 3, h, h]``, x ``[B, F, h, h]`` (the rendered feature image), ws -> ``[B, 3, 4 s, 4 s]``.

    Both are resized to ``input_resolution`` s (bilinear, antialiased as recorded) when h differs,
    then two synthesis blocks double it, every layer styled by the backbone's last w. EG3D runs
    them in fp16 when ``sr_num_fp16_res > 0``, and with it clamps at 256; in float32 not at all.
    """

    def __init__(self, channels: int, w_dim: int, input_resolution: int, sr_channels: tuple[int, int],
                 sr_num_fp16_res: int, sr_antialias: bool):
        super().__init__()
        self.input_resolution, self.sr_antialias = input_resolution, sr_antialias
        clamp = 256 if sr_num_fp16_res > 0 else None
        self.block0 = SynthesisBlock(channels, sr_channels[0], w_dim, input_resolution * 2, 3, False, clamp)
        self.block1 = SynthesisBlock(sr_channels[0], sr_channels[1], w_dim, input_resolution * 4, 3, True, clamp)

    def forward(self, rgb, x, ws, noise_mode="none"):
        ws = ws[:, -1:].repeat(1, 3, 1)
        if x.shape[-1] != self.input_resolution:
            size = (self.input_resolution, self.input_resolution)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=self.sr_antialias)
            rgb = F.interpolate(rgb, size=size, mode="bilinear", align_corners=False, antialias=self.sr_antialias)
        x, rgb = self.block0(x, rgb, ws, noise_mode)
        x, rgb = self.block1(x, rgb, ws, noise_mode)
        return rgb


class OSGDecoder(torch.nn.Module):
    """sampled features ``[N, 3, M, C]`` (one row per plane) -> ``{'sigma': [N, M, 1], 'rgb': [N, M, F]}``:
    the planes' mean through FC, softplus, FC at ``decoder_lr_mul``; sigma raw, features
    ``sigmoid * (1 + 2 m) - m``. Not persistent in EG3D: pickled by reference to
    ``training.triplane.OSGDecoder`` (see :func:`write_release`)."""

    def __init__(self, n_features: int, options: dict, hidden_dim: int = 64):  # EG3D fixes 64
        super().__init__()
        self.hidden_dim = hidden_dim
        lr = options["decoder_lr_mul"]
        self.net = torch.nn.Sequential(
            FullyConnectedLayer(n_features, hidden_dim, lr_multiplier=lr), torch.nn.Softplus(),
            FullyConnectedLayer(hidden_dim, 1 + options["decoder_output_dim"], lr_multiplier=lr))

    def forward(self, sampled_features, ray_directions=None):
        y = self.net(sampled_features.mean(1))
        return {"sigma": y[..., :1], "rgb": torch.sigmoid(y[..., 1:]) * (1 + 2 * SIGMOID_MARGIN) - SIGMOID_MARGIN}


OSGDecoder.__module__, OSGDecoder.__qualname__ = "training.triplane", "OSGDecoder"


@dataclass(frozen=True)
class Sizes:
    """The sizes EG3D fixes in code (FFHQ: 256^2 planes of 32 channels, decoder 64 wide with 32
    features, SR 256 and 128 channels); the defaults are ``GeneratorConfig.tiny()``'s."""

    plane_resolution: int = 32
    plane_channels: int = 8
    decoder_hidden: int = 16
    decoder_features: int = 8
    sr_channels: tuple[int, int] = (16, 8)


class TriPlaneGenerator(Persistent):
    """EG3D's generator, the parts with tensors: ``mapping``, ``planes`` (its synthesis up to the
    renderer: ``[B, 3, C, R, R]``), ``decoder`` and ``superresolution``.

    Records EG3D's constructor arguments as ``_init_kwargs`` (what the converter reads), not
    ``sizes``. The mapping is conditioned on ``c * rendering_kwargs.get('c_scale', 0)`` (zeros with
    ``c_gen_conditioning_zero``): a release that records no ``c_scale`` ignores the camera.
    """

    def __init__(self, z_dim, c_dim, w_dim, img_resolution, img_channels, sr_num_fp16_res=0, mapping_kwargs=None,
                 rendering_kwargs=None, sr_kwargs=None, *, sizes: Sizes = Sizes(), **synthesis_kwargs):
        super().__init__()
        mapping_kwargs, rendering_kwargs = dict(mapping_kwargs or {}), dict(rendering_kwargs or {})
        self._init_args = ()
        self._init_kwargs = dict(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, img_resolution=img_resolution,
                                 img_channels=img_channels, sr_num_fp16_res=sr_num_fp16_res,
                                 mapping_kwargs=mapping_kwargs, rendering_kwargs=rendering_kwargs,
                                 sr_kwargs=dict(sr_kwargs or {}), **synthesis_kwargs)
        self.z_dim, self.c_dim, self.w_dim = z_dim, c_dim, w_dim
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.backbone = Generator(z_dim, c_dim, w_dim, sizes.plane_resolution, 3 * sizes.plane_channels,
                                  mapping_kwargs, synthesis_kwargs["channel_base"], synthesis_kwargs["channel_max"],
                                  synthesis_kwargs.get("conv_clamp"))
        self.superresolution = SuperresolutionHybrid8XDC(
            sizes.decoder_features, w_dim, img_resolution // 4, sizes.sr_channels, sr_num_fp16_res,
            rendering_kwargs["sr_antialias"])
        self.decoder = OSGDecoder(sizes.plane_channels, dict(decoder_lr_mul=rendering_kwargs.get("decoder_lr_mul", 1),
                                                             decoder_output_dim=sizes.decoder_features),
                                  hidden_dim=sizes.decoder_hidden)
        self.neural_rendering_resolution = img_resolution // 4
        self.rendering_kwargs = rendering_kwargs
        self._last_planes = None

    def mapping(self, z, c, truncation_psi=1, truncation_cutoff=None):
        if self.rendering_kwargs["c_gen_conditioning_zero"]:
            c = torch.zeros_like(c)
        c = c * self.rendering_kwargs.get("c_scale", 0)
        return self.backbone.mapping(z, c, truncation_psi, truncation_cutoff)

    def planes(self, ws, noise_mode="const"):
        img = self.backbone.synthesis(ws, noise_mode)
        return img.reshape(img.shape[0], 3, -1, *img.shape[-2:])


# --------------------------------------------------------------------------------------------------
# A tiny release


def ffhq_rendering_kwargs(**changes) -> dict:
    """The FFHQ 512^2 release's ``rendering_kwargs`` (8 + 8 samples per ray, as the tiny config)."""
    rk = dict(image_resolution=512, disparity_space_sampling=False, clamp_mode="softplus",
              superresolution_module="training.superresolution.SuperresolutionHybrid8XDC",
              c_gen_conditioning_zero=False, gpc_reg_prob=0.5, c_scale=1.0, superresolution_noise_mode="none",
              density_reg=0.25, density_reg_p_dist=0.004, reg_type="l1", decoder_lr_mul=1.0, sr_antialias=True,
              depth_resolution=8, depth_resolution_importance=8, ray_start=2.25, ray_end=3.3, box_warp=1,
              avg_camera_radius=2.7, avg_camera_pivot=[0, 0, 0.2])
    rk.update(changes)
    return rk


def tiny_generator(*, rendering_kwargs: dict | None = None, conv_clamp: float | None = None,
                   sr_num_fp16_res: int = 4, mapping_lr_multiplier: float = 0.01) -> TriPlaneGenerator:
    """The FFHQ release's settings (fp32 backbone without clamp, fp16 SR) at ``GeneratorConfig.tiny()``'s
    sizes, in eval mode."""
    return TriPlaneGenerator(
        z_dim=32, c_dim=25, w_dim=32, img_resolution=64, img_channels=3, sr_num_fp16_res=sr_num_fp16_res,
        mapping_kwargs=dict(num_layers=2, lr_multiplier=mapping_lr_multiplier),
        rendering_kwargs=ffhq_rendering_kwargs() if rendering_kwargs is None else rendering_kwargs,
        sr_kwargs=dict(channel_base=512, channel_max=32, fused_modconv_default="inference_only"),
        channel_base=512, channel_max=32, fused_modconv_default="inference_only", num_fp16_res=0,
        conv_clamp=conv_clamp).eval().requires_grad_(False)


def perturb_(G: torch.nn.Module, generator: torch.Generator) -> None:
    """Move every parameter off its initial value and give ``w_avg`` one: the zeros and ones a
    layer starts with (biases, noise strengths, affine biases) would hide a tensor the converter
    dropped or re-initialised. Steps are ~10% of a tensor's scale, plus 0.05 for the zeros."""
    with torch.no_grad():
        for p in G.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * (0.1 * p.abs().mean() + 0.05))
        for name, buf in G.named_buffers():
            if name.endswith("w_avg"):
                buf.copy_(torch.randn(buf.shape, generator=generator))


def write_release(path, G: TriPlaneGenerator) -> None:
    """Write ``G`` as a training snapshot pickle (``G``, ``D``, ``G_ema``, ...), in EG3D's format."""
    with fake_eg3d_code() as mods:
        # The fakes' OSGDecoder stands for another test's; the pickle refers to this one by name.
        mods["training.triplane"].OSGDecoder = OSGDecoder
        EasyDict = mods["dnnlib.util"].EasyDict
        data = dict(training_set_kwargs=EasyDict(resolution=G.img_resolution), G=G, D=None, G_ema=G,
                    augment_pipe=None)
        with open(path, "wb") as f:
            pickle.dump(data, f)
