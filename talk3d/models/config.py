"""Every size and setting of the triplane generator, in one frozen, JSON-safe dataclass.

:meth:`GeneratorConfig.ffhq` is EG3D's FFHQ 512^2 model (the sizes of its public checkpoints, from
its ``train.py`` defaults: z = w = 512, 2 mapping layers, channel_base 32768, channel_max 512,
256^2 triplanes of 3 x 32 channels, SR 128 -> 512 with 256 and 128 channels). :meth:`tiny` is the
same architecture shrunk so a whole forward runs on the CPU in milliseconds (tests).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

from .config_io import JsonConfig
from ..render import CameraRig, RenderConfig

#: Values accepted by :attr:`GeneratorConfig.fused_modconv`.
FUSED_MODCONV_MODES = ("always", "never", "inference_only")
#: Noise modes of the synthesis layers (StyleGAN2's).
NOISE_MODES = ("random", "const", "none")


def _is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


@dataclass(frozen=True)
class GeneratorConfig(JsonConfig):
    """Sizes and settings of :class:`talk3d.models.TriplaneGenerator` (defaults: EG3D FFHQ 512)."""

    _tuple_fields: ClassVar[tuple[str, ...]] = ("sr_channels", "camera_pivot")  # serialised as JSON lists

    # Mapping network (z, c) -> w.
    z_dim: int = 512
    c_dim: int = 25               # EG3D camera label: 16 cam2world + 9 intrinsics
    w_dim: int = 512
    mapping_layers: int = 2       # EG3D's --map-depth default
    mapping_lr_multiplier: float = 0.01
    w_avg_beta: float = 0.998
    c_scale: float = 1.0          # EG3D's rendering_kwargs['c_scale']
    c_conditioning_zero: bool = False  # True: condition the mapping on zeros (EG3D without --gen_pose_cond)

    # StyleGAN2 backbone emitting the triplanes.
    plane_resolution: int = 256
    plane_channels: int = 32      # per plane; the backbone emits 3 * plane_channels
    channel_base: int = 32768
    channel_max: int = 512
    conv_clamp: float | None = None  # EG3D: None for the fp32 backbone (g_num_fp16_res = 0)
    fused_modconv: str = "inference_only"  # grouped conv at inference, scaled activations in training

    # OSGDecoder.
    decoder_hidden: int = 64
    decoder_features: int = 32    # decoder output = 1 (sigma) + decoder_features; the first 3 are RGB
    decoder_lr_multiplier: float = 1.0

    # Neural rendering (talk3d.render.RenderConfig).
    neural_rendering_resolution: int = 128
    ray_start: float = 2.25
    ray_end: float = 3.3
    box_warp: float = 1.0
    coarse_samples: int = 48
    importance_samples: int = 48
    axes: str = "fixed"           # "fixed" (Talk3D's checkpoint) or "eg3d" (original release)

    # Super-resolution (EG3D's SuperresolutionHybrid8XDC): one upsampling block per entry.
    sr_resolution: int = 512
    sr_channels: tuple[int, ...] = (256, 128)
    sr_conv_clamp: float | None = 256.0  # EG3D runs the SR in fp16 with clamp 256
    sr_antialias: bool = True
    sr_noise_mode: str = "none"   # EG3D's superresolution_noise_mode default
    img_channels: int = 3

    # Camera defaults (EG3D FFHQ's avg_camera_radius / pivot, 18.837 degree FOV).
    camera_radius: float = 2.7
    camera_fov_degrees: float = 18.837
    camera_pivot: tuple[float, float, float] = field(default=(0.0, 0.0, 0.2))

    def __post_init__(self):
        for name in ("sr_channels", "camera_pivot"):  # lists from JSON become tuples
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not _is_pow2(self.plane_resolution) or self.plane_resolution < 4:
            raise ValueError(f"GeneratorConfig: plane_resolution must be a power of 2 >= 4, got {self.plane_resolution}")
        if self.decoder_features < self.img_channels:
            raise ValueError("GeneratorConfig: decoder_features must hold the img_channels low-res RGB channels")
        if not self.sr_channels or self.sr_resolution % (2 ** len(self.sr_channels)):
            raise ValueError(f"GeneratorConfig: sr_resolution {self.sr_resolution} must be divisible by "
                             f"2**len(sr_channels) = {2 ** len(self.sr_channels)}")
        if self.fused_modconv not in FUSED_MODCONV_MODES:
            raise ValueError(f"GeneratorConfig: fused_modconv must be one of {FUSED_MODCONV_MODES}, got {self.fused_modconv!r}")
        if self.sr_noise_mode not in NOISE_MODES:
            raise ValueError(f"GeneratorConfig: sr_noise_mode must be one of {NOISE_MODES}, got {self.sr_noise_mode!r}")
        if len(self.camera_pivot) != 3:
            raise ValueError(f"GeneratorConfig: camera_pivot must be 3 numbers, got {self.camera_pivot!r}")
        if min(self.z_dim, self.w_dim, self.mapping_layers, self.plane_channels, self.decoder_hidden) < 1:
            raise ValueError("GeneratorConfig: z_dim, w_dim, mapping_layers, plane_channels, decoder_hidden must be >= 1")
        self.render_config()  # RenderConfig validates the rendering settings

    # --- derived settings ---------------------------------------------------------------------

    @property
    def backbone_channels(self) -> int:
        """Channels of the backbone's output image: three planes side by side."""
        return 3 * self.plane_channels

    @property
    def sr_input_resolution(self) -> int:
        """Resolution the SR module resizes the rendered features to (EG3D: 128)."""
        return self.sr_resolution // 2 ** len(self.sr_channels)

    def render_config(self, resolution: int | None = None) -> RenderConfig:
        """The :class:`talk3d.render.RenderConfig` of the neural renderer at ``resolution``."""
        return RenderConfig(
            resolution=self.neural_rendering_resolution if resolution is None else int(resolution),
            ray_start=self.ray_start, ray_end=self.ray_end, coarse_samples=self.coarse_samples,
            importance_samples=self.importance_samples, box_warp=self.box_warp, axes=self.axes,
        )

    @property
    def camera_focal(self) -> float:
        """Normalised focal from the FOV, as EG3D's ``FOV_to_intrinsics`` (it uses 1.414 for sqrt 2)."""
        return 1.0 / (math.tan(math.radians(self.camera_fov_degrees) / 2) * 1.414)

    def camera_rig(self) -> CameraRig:
        """A :class:`talk3d.render.CameraRig` with the default radius, pivot and focal."""
        return CameraRig(self.camera_radius, self.camera_pivot, self.camera_focal)

    # --- serialisation --------------------------------------------------------------------------

    # --- presets --------------------------------------------------------------------------------

    @classmethod
    def ffhq(cls, **overrides) -> "GeneratorConfig":
        """EG3D's FFHQ 512^2 generator (rendering at 128^2, as Talk3D does)."""
        return dataclasses.replace(cls(), **overrides)

    @classmethod
    def tiny(cls, **overrides) -> "GeneratorConfig":
        """The same architecture at toy sizes: 32^2 planes of 8 channels, 16^2 render, 64^2 SR."""
        tiny = cls(
            z_dim=32, w_dim=32, plane_resolution=32, plane_channels=8, channel_base=512,
            channel_max=32, decoder_hidden=16, decoder_features=8, neural_rendering_resolution=16,
            coarse_samples=8, importance_samples=8, sr_resolution=64, sr_channels=(16, 8),
        )
        return dataclasses.replace(tiny, **overrides)
