"""EG3D's super-resolution module (SuperresolutionHybrid8XDC): low-res render -> final image.

The rendered feature image (its first 3 channels are the raw RGB) is resized to
``sr_input_resolution`` (bilinear, antialiased), then each block doubles the resolution: modulated
convs on the features, ToRGB added to the upsampled RGB (skip). Every layer is conditioned on the
last w of the backbone's ws. EG3D FFHQ: 128 -> 256 (256 channels) -> 512 (128 channels).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import GeneratorConfig
from .synthesis import SynthesisBlock


class SuperResolution(nn.Module):
    """Blocks ``block0, block1, ...`` (one per entry of ``cfg.sr_channels``).

    ``channels_last`` (a speed choice, not part of the model): the feature path runs in NHWC memory.
    The convolutions, transposed convolutions and the FIR kernel (``binomial_filter2d``) all keep
    that layout, so no layer converts; the rendered feature image is channels-last already. NCHW
    made the convolutions reorder every activation: on the 2-core CPU VM (release sizes, batch 2)
    NHWC takes inference 3.57 -> 2.44 s and forward + backward 8.7 -> 6.7 s (2026-12-06); on a GPU
    the NCHW profile showed cuDNN's NCHW <-> NHWC conversions (H200, 2026-12-04).
    """

    channels_last = True

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.input_resolution = cfg.sr_input_resolution
        self.antialias = cfg.sr_antialias
        self.num_blocks = len(cfg.sr_channels)
        in_ch = cfg.decoder_features
        for i, out_ch in enumerate(cfg.sr_channels):
            block = SynthesisBlock(in_ch, out_ch, cfg.w_dim, self.input_resolution * 2 ** (i + 1), cfg.img_channels,
                                   is_last=i == self.num_blocks - 1, conv_clamp=cfg.sr_conv_clamp,
                                   fused_modconv=cfg.fused_modconv)
            setattr(self, f"block{i}", block)
            in_ch = out_ch

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == self.input_resolution:
            return x
        size = (self.input_resolution, self.input_resolution)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=self.antialias)

    def forward(self, rgb: torch.Tensor, x: torch.Tensor, ws: torch.Tensor, noise_mode: str = "none") -> torch.Tensor:
        """rgb ``[B, 3, h, h]``, x ``[B, F, h, h]`` (the feature image), ws ``[B, num_ws, w_dim]`` ->
        image ``[B, 3, sr_resolution, sr_resolution]`` float32."""
        rgb, x = self._resize(rgb.float()), self._resize(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for i in range(self.num_blocks):
            block = getattr(self, f"block{i}")
            w = ws[:, -1:].expand(-1, block.num_conv + block.num_torgb, -1)
            x, rgb = block(x, rgb, w, noise_mode)
        return rgb
