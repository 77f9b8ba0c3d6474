"""The EG3D-compatible triplane generator: mapping -> StyleGAN2 triplanes -> neural render -> SR.

Module names follow EG3D's ``TriPlaneGenerator`` so that its ``state_dict`` keys load unchanged.
Keys verified against NVlabs/eg3d ``eg3d/training/triplane.py``, ``eg3d/training/networks_stylegan2.py``
and ``eg3d/training/superresolution.py`` (FFHQ 512 shapes; ``r`` a backbone resolution 4..256,
``L`` a synthesis layer ``conv0`` / ``conv1``):

- ``backbone.mapping.embed.weight`` [512, 25], ``.bias`` [512]
- ``backbone.mapping.fc{0,1}.weight`` [512, 1024] / [512, 512], ``.bias`` [512]
- ``backbone.mapping.w_avg`` [512] (buffer)
- ``backbone.synthesis.b{r}.resample_filter`` [4, 4] (buffer)
- ``backbone.synthesis.b4.const`` [512, 4, 4]
- ``backbone.synthesis.b{r}.{L}.weight`` [O, I, 3, 3], ``.bias`` [O], ``.noise_strength`` [],
  ``.affine.weight`` [I, 512], ``.affine.bias`` [I]; buffers ``.noise_const`` [r, r],
  ``.resample_filter`` [4, 4] (``b4`` has ``conv1`` only)
- ``backbone.synthesis.b{r}.torgb.weight`` [96, C, 1, 1], ``.bias`` [96], ``.affine.weight`` [C, 512],
  ``.affine.bias`` [C] (every block: the "skip" architecture)
- ``decoder.net.0.weight`` [64, 32], ``.bias`` [64]; ``decoder.net.2.weight`` [33, 64], ``.bias`` [33]
- ``superresolution.block0`` (32 -> 256 channels, 256^2) and ``superresolution.block1``
  (256 -> 128, 512^2), each with ``conv0``, ``conv1``, ``torgb`` as above and a
  ``resample_filter`` buffer (SuperresolutionHybrid8XDC has no top-level buffer).

EG3D's ``renderer`` and ``ray_sampler`` submodules hold no state, so they have no keys; here the
rendering is :func:`talk3d.render.render` with the fused kernels.
"""
from __future__ import annotations

import torch
from torch import nn

from ..render import RenderRandoms, render
from .config import GeneratorConfig
from .decoder import OSGDecoder
from .mapping import MappingNetwork
from .superres import SuperResolution
from .synthesis import SynthesisNetwork


class StyleGAN2Backbone(nn.Module):
    """``mapping`` + ``synthesis`` emitting the ``[B, 3 * plane_channels, R, R]`` triplane image."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.synthesis = SynthesisNetwork(cfg.w_dim, cfg.plane_resolution, cfg.backbone_channels,
                                          channel_base=cfg.channel_base, channel_max=cfg.channel_max,
                                          conv_clamp=cfg.conv_clamp, fused_modconv=cfg.fused_modconv)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(cfg.z_dim, cfg.c_dim, cfg.w_dim, self.num_ws, num_layers=cfg.mapping_layers,
                                      lr_multiplier=cfg.mapping_lr_multiplier, w_avg_beta=cfg.w_avg_beta)


class TriplaneGenerator(nn.Module):
    """EG3D's generator. ``forward(z, c)`` = ``synthesis(mapping(z, c), c)``."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = StyleGAN2Backbone(cfg)
        self.superresolution = SuperResolution(cfg)
        self.decoder = OSGDecoder(cfg.plane_channels, cfg.decoder_hidden, cfg.decoder_features,
                                  cfg.decoder_lr_multiplier)
        self.num_ws = self.backbone.num_ws
        self.neural_rendering_resolution = cfg.neural_rendering_resolution

    def mapping(self, z: torch.Tensor, c: torch.Tensor, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None, update_emas: bool = False) -> torch.Tensor:
        """z ``[B, z_dim]``, c ``[B, >=25]`` camera labels -> ws ``[B, num_ws, w_dim]``.

        Like EG3D, the label is cut to its 25 camera numbers, zeroed when ``c_conditioning_zero``
        (a generator without pose conditioning) and scaled by ``c_scale``.
        """
        c = c[:, :self.cfg.c_dim]
        if self.cfg.c_conditioning_zero:
            c = torch.zeros_like(c)
        return self.backbone.mapping(z, c * self.cfg.c_scale, truncation_psi, truncation_cutoff, update_emas)

    def planes(self, ws: torch.Tensor, noise_mode: str = "const") -> torch.Tensor:
        """ws ``[B, num_ws, w_dim]`` -> triplanes ``[B, 3, plane_channels, R, R]`` float32."""
        img = self.backbone.synthesis(ws, noise_mode=noise_mode)  # [B, 3 * C, R, R]
        return img.view(img.shape[0], 3, self.cfg.plane_channels, *img.shape[-2:])

    def synthesis(self, ws: torch.Tensor, c: torch.Tensor, *, impl: str = "auto",
                  neural_rendering_resolution: int | None = None, noise_mode: str = "const",
                  randoms: RenderRandoms | None = None, deterministic: bool = False,
                  planes: torch.Tensor | None = None, grid=None, early_stop: float = 0.0,
                  check_cameras: bool = True) -> dict[str, torch.Tensor]:
        """Render ws ``[B, num_ws, w_dim]`` from cameras c ``[B, 25]``.

        Args:
            impl: the render's back end (``"torch"`` is the pure-PyTorch reference).
            neural_rendering_resolution: render resolution (default the config's); the SR resizes
                to its input resolution whatever this is.
            noise_mode: the backbone's ``'random' | 'const' | 'none'``; the SR uses ``cfg.sr_noise_mode``.
            randoms, deterministic: the render's random numbers, see :func:`talk3d.render.render`.
            planes: precomputed ``[B, 3, C, R, R]`` triplanes (skips the backbone, e.g. Talk3D's
                identity planes plus a predicted delta).
            grid, early_stop: inference only: an :class:`talk3d.render.OccupancyGrid` whose empty
                cells the render skips, and the transmittance under which a ray stops.
            check_cameras: False when the caller has checked ``c`` (see :func:`talk3d.render.render`).

        Returns:
            dict with ``image`` ``[B, 3, S, S]`` (S = sr_resolution, roughly in [-1, 1]),
            ``image_raw`` ``[B, 3, h, h]``, ``image_depth`` ``[B, 1, h, h]``, ``feature_image``
            ``[B, F, h, h]``, ``weight_sum`` ``[B, 1, h, h]``, ``planes`` ``[B, 3, C, R, R]``.
        """
        if planes is None:
            planes = self.planes(ws, noise_mode)
        res = neural_rendering_resolution or self.neural_rendering_resolution
        out = render(planes, self.decoder.effective_weights(planes.dtype), c[:, :25], self.cfg.render_config(res),
                     impl=impl, randoms=randoms, deterministic=deterministic, grid=grid, early_stop=early_stop,
                     check_cameras=check_cameras)
        feature_image = out.feature_image
        rgb = feature_image[:, :3]
        image = self.superresolution(rgb, feature_image, ws, noise_mode=self.cfg.sr_noise_mode)
        return {"image": image, "image_raw": rgb, "image_depth": out.depth, "feature_image": feature_image,
                "weight_sum": out.weight_sum, "planes": planes}

    def forward(self, z: torch.Tensor, c: torch.Tensor, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None, update_emas: bool = False, **synthesis_kwargs):
        """z ``[B, z_dim]``, c ``[B, 25]`` -> the dict of :meth:`synthesis`."""
        ws = self.mapping(z, c, truncation_psi, truncation_cutoff, update_emas)
        return self.synthesis(ws, c, **synthesis_kwargs)
