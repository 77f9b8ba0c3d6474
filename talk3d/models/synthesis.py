"""StyleGAN2 synthesis ("skip" architecture) that paints the three feature planes as one image.

A learned 4x4 constant goes through blocks ``b4, b8, ..., b{R}``; each doubles the resolution
(``conv0``, upsampling), refines it (``conv1``) and adds its ``torgb`` output to the upsampled
running image. The final image is the ``3 * plane_channels``-channel triplane.
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import SynthesisLayer, ToRGBLayer, setup_filter, upsample2d


class SynthesisBlock(nn.Module):
    """One resolution of the synthesis network.

    ``in_channels == 0``: the first block (a ``const`` ``[C, res, res]`` input, ``conv1`` only).
    ``up``: 2 doubles the resolution in ``conv0`` and upsamples the incoming image (EG3D's
    SynthesisBlock); 1 keeps it (EG3D's SynthesisBlockNoUp). Consumes ``num_conv + num_torgb`` ws.
    """

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, img_channels: int,
                 *, is_last: bool, up: int = 2, conv_clamp: float | None = None,
                 fused_modconv: str = "inference_only"):
        super().__init__()
        self.in_channels, self.out_channels, self.resolution, self.up = in_channels, out_channels, resolution, up
        self.img_channels, self.is_last = img_channels, is_last
        self.register_buffer("resample_filter", setup_filter())
        kw = dict(conv_clamp=conv_clamp, fused_modconv=fused_modconv)
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn(out_channels, resolution, resolution))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=up, **kw)
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution, **kw)
        self.torgb = ToRGBLayer(out_channels, img_channels, w_dim, **kw)  # skip architecture: every block
        self.num_conv = 1 if in_channels == 0 else 2
        self.num_torgb = 1

    def forward(self, x: torch.Tensor | None, img: torch.Tensor | None, ws: torch.Tensor,
                noise_mode: str = "random") -> tuple[torch.Tensor, torch.Tensor]:
        """x ``[B, I, res/up, res/up]`` (None for the first block), img ``[B, img_channels, res/up, res/up]``
        (float32, or None), ws ``[B, num_conv + num_torgb, w_dim]`` ->
        (x ``[B, O, res, res]`` in the block's weight dtype, img ``[B, img_channels, res, res]`` float32)."""
        w = ws.unbind(dim=1)
        dtype = self.conv1.weight.dtype  # a block cast to bf16/fp16 computes in that dtype
        if self.in_channels == 0:
            x = self.const.to(dtype)[None].expand(ws.shape[0], -1, -1, -1)
            x = self.conv1(x, w[0], noise_mode)
        else:
            # Under autocast the convolutions pick their dtype themselves: widening the previous
            # block's bf16 output to the fp32 weights' dtype would only make a copy (twice the
            # activation's size) that the convolution rounds straight back, and its gradient twice.
            if not torch.is_autocast_enabled(x.device.type):
                x = x.to(dtype)
            x = self.conv0(x, w[0], noise_mode)
            x = self.conv1(x, w[1], noise_mode)
        if img is not None and self.up > 1:
            img = upsample2d(img, self.resample_filter, self.up)
        y = self.torgb(x, w[self.num_conv]).float()  # the skip image stays float32, as in EG3D
        img = y if img is None else img + y
        return x, img

    def extra_repr(self) -> str:
        return f"resolution={self.resolution}, up={self.up}"


class SynthesisNetwork(nn.Module):
    """ws ``[B, num_ws, w_dim]`` -> image ``[B, img_channels, R, R]`` through blocks ``b4 .. bR``.

    Channels at resolution r: ``min(channel_base // r, channel_max)``. Block ``b{r}`` reads ws
    ``[i, i + num_conv + num_torgb)`` and advances ``i`` by ``num_conv`` (its torgb shares its w
    with the next block's conv0), so ``num_ws = 1 + 2 * (log2(R) - 2) + 1``.
    """

    def __init__(self, w_dim: int, img_resolution: int, img_channels: int, *, channel_base: int = 32768,
                 channel_max: int = 512, conv_clamp: float | None = None, fused_modconv: str = "inference_only"):
        super().__init__()
        self.w_dim, self.img_resolution, self.img_channels = w_dim, img_resolution, img_channels
        log2 = img_resolution.bit_length() - 1
        self.block_resolutions = [2 ** i for i in range(2, log2 + 1)]
        channels = {r: min(channel_base // r, channel_max) for r in self.block_resolutions}
        self.num_ws = 0
        for r in self.block_resolutions:
            block = SynthesisBlock(channels[r // 2] if r > 4 else 0, channels[r], w_dim, r, img_channels,
                                   is_last=r == img_resolution, conv_clamp=conv_clamp, fused_modconv=fused_modconv)
            self.num_ws += block.num_conv + (block.num_torgb if block.is_last else 0)
            setattr(self, f"b{r}", block)

    def forward(self, ws: torch.Tensor, noise_mode: str = "random") -> torch.Tensor:
        """ws ``[B, num_ws, w_dim]`` -> ``[B, img_channels, R, R]`` float32."""
        if ws.dim() != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"SynthesisNetwork: ws must be [B, {self.num_ws}, {self.w_dim}], got {tuple(ws.shape)}")
        ws = ws.float()
        x = img = None
        i = 0
        for r in self.block_resolutions:
            block = getattr(self, f"b{r}")
            x, img = block(x, img, ws.narrow(1, i, block.num_conv + block.num_torgb), noise_mode)
            i += block.num_conv
        return img
