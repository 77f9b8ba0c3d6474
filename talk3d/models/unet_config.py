"""Every size of Talk3D's audio-guided attention U-Net and its condition tokens, in one frozen dataclass.

:meth:`DeltaplaneConfig.release` follows the public Talk3D release (reference/numerics.md): 256^2
triplanes of 3 x 32 channels, an encoder 32 -> 64 -> 128 -> 256 channels per plane while the
resolution goes 256 -> 32, two attention blocks at the 32^2 bottleneck with head dim 64, and 64-d
condition tokens from 44-d wav2vec2 CTC logits (16 audio steps, 320 ms, centred on each of a window of
8 frames, read by stride-2 convolutions over the steps), the nose tip and the two outer eye corners
for the landmark token, and per-plane weights in the bottleneck's self-attention, layer norms and
feed-forward.
:meth:`DeltaplaneConfig.tiny` is the same architecture shrunk for CPU tests.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from .config_io import JsonConfig
from ..data.synthetic import LANDMARK_NAMES
from ..ops.reference.triplane_field import PLANE_AXES

#: The condition token types, in the order their tokens are concatenated (the paper's eq. 5).
TOKEN_TYPES = ("audio", "eye", "pose", "landmarks", "null")


@dataclass(frozen=True)
class DeltaplaneConfig(JsonConfig):
    """Sizes of :class:`talk3d.models.DeltaplanePredictor` and :class:`talk3d.models.ConditionEncoder`."""

    _tuple_fields: ClassVar[tuple[str, ...]] = ("channels", "landmark_points")  # serialised as JSON lists
    #: What a config saved before a field existed meant: a checkpoint of an earlier version loads and
    #: runs as it was trained (the field's default is the release's choice, which it did not make).
    #: (and landmark_points: all the batch's landmarks, filled in by from_dict)
    _legacy: ClassVar[dict] = {"per_plane_attention": False, "audio_encoder": "mlp"}
    _renamed: ClassVar[dict] = {"eye_noise_std": "eye_noise"}

    # Triplane in / deltaplane out.
    plane_channels: int = 32      # C: channels per plane
    plane_resolution: int = 256   # R: planes are R x R
    axes: str = "fixed"           # plane convention, as GeneratorConfig.axes ("fixed" or "eg3d")

    # U-Net. Level i runs at R / 2**i with channels[i] channels per plane; the last level is the bottleneck.
    channels: tuple[int, ...] = (32, 64, 128, 256)
    norm_groups: int = 8          # GroupNorm groups per plane (groups never straddle two planes)
    rollout: bool = True          # roll-out blending of the other planes' axis-pooled features in every block

    # Bottleneck transformer (N_A blocks of self-attention, cross-attention, GEGLU feed-forward).
    attention_blocks: int = 2
    head_dim: int = 64
    ff_mult: int = 4
    # The release's blocks give each plane its own self-attention, layer norms and feed-forward
    # (the cross-attention to the tokens is shared); False shares them all between the planes.
    per_plane_attention: bool = True

    # Condition tokens.
    token_dim: int = 64           # D of every condition token
    token_heads: int = 4          # heads of the audio net's attention over the window
    token_hidden: int = 128       # hidden width of the token MLPs
    audio_dim: int = 44           # A: audio feature size (44 wav2vec2 CTC logits; 32 for a log-mel net)
    # Each of the window's frames reads audio_steps feature vectors (50 a second) centred on it:
    # 16 (320 ms, the release's and AD-NeRF's) or 2 (the frame's own 40 ms). More context, more
    # look-ahead: a stream waits 290 ms for a frame's audio with 16, 130 ms with 2 (log-mel).
    audio_steps: int = 16
    # How a frame's audio steps become one vector: "conv" (stride-2 convolutions over the steps, then
    # an MLP: AD-NeRF's audio net, as the release) or "mlp" (one MLP over all steps x features).
    audio_encoder: str = "conv"
    audio_window: int = 8         # video frames in the audio window
    audio_tokens: int = 1         # tokens the audio net emits (learned queries of its window attention)
    num_landmarks: int = 5        # landmarks a batch carries: the dataset's LANDMARK_NAMES
    # The landmark token's points, by name: the nose tip and the two outer eye corners, as the
    # release (lip landmarks hurt lip sync; the inner corners move with blinks).
    landmark_points: tuple[str, ...] = ("nose_tip", "right_eye_outer", "left_eye_outer")
    scalar_freqs: int = 4         # sinusoidal frequencies of the eye / pose / landmark encodings
    eye_max: float = 2.0          # AU45 is clipped to [0, eye_max]
    eye_noise: float = 0.05       # half-width of the uniform noise added to AU45 in training (0 disables)
    use_audio: bool = True
    use_eye: bool = True
    use_pose: bool = True
    use_landmarks: bool = True
    use_null: bool = True

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))  # lists from JSON
        object.__setattr__(self, "landmark_points", tuple(str(p) for p in self.landmark_points))
        name = "DeltaplaneConfig"
        if self.axes not in PLANE_AXES:
            raise ValueError(f"{name}: axes must be one of {sorted(PLANE_AXES)}, got {self.axes!r}")
        if not self.channels or min(self.channels) < 1:
            raise ValueError(f"{name}: channels must be a non-empty list of positive ints, got {self.channels}")
        scale = 2 ** (len(self.channels) - 1)
        if self.plane_resolution < scale or self.plane_resolution % scale:
            raise ValueError(f"{name}: plane_resolution {self.plane_resolution} must be divisible by "
                             f"2**(len(channels) - 1) = {scale}")
        bad = [c for c in self.channels if c % self.norm_groups]
        if self.norm_groups < 1 or bad:
            raise ValueError(f"{name}: every channels entry must be divisible by norm_groups={self.norm_groups}")
        if self.head_dim < 1 or self.channels[-1] % self.head_dim:
            raise ValueError(f"{name}: bottleneck channels {self.channels[-1]} must be divisible by head_dim "
                             f"{self.head_dim}")
        if self.channels[-1] < 6:
            raise ValueError(f"{name}: the 3-D positional encoding needs bottleneck channels >= 6")
        if self.token_heads < 1 or self.token_dim % self.token_heads:
            raise ValueError(f"{name}: token_dim {self.token_dim} must be divisible by token_heads {self.token_heads}")
        positive = ("plane_channels", "attention_blocks", "ff_mult", "token_dim", "token_hidden", "audio_dim",
                    "audio_steps", "audio_window", "audio_tokens", "num_landmarks", "scalar_freqs")
        small = [n for n in positive if getattr(self, n) < (0 if n == "attention_blocks" else 1)]
        if small:
            raise ValueError(f"{name}: {small} must be >= 1 (attention_blocks >= 0)")
        if self.audio_encoder not in ("conv", "mlp"):
            raise ValueError(f"{name}: audio_encoder must be 'conv' or 'mlp', got {self.audio_encoder!r}")
        if self.eye_max <= 0 or self.eye_noise < 0:
            raise ValueError(f"{name}: eye_max must be > 0 and eye_noise >= 0")
        names = LANDMARK_NAMES[:self.num_landmarks]
        bad = [p for p in self.landmark_points if p not in names]
        if not self.landmark_points or bad or len(set(self.landmark_points)) != len(self.landmark_points):
            raise ValueError(f"{name}: landmark_points must be distinct names among the batch's landmarks "
                             f"{list(names)}, got {list(self.landmark_points)}")
        if self.num_tokens == 0:
            raise ValueError(f"{name}: at least one condition token type must be enabled (cross-attention needs keys)")

    # --- derived -------------------------------------------------------------------------------

    @property
    def bottleneck_resolution(self) -> int:
        """Side of the planes at the bottleneck (release: 256 / 8 = 32)."""
        return self.plane_resolution // 2 ** (len(self.channels) - 1)

    def token_counts(self) -> dict[str, int]:
        """Tokens per type, in concatenation order (:data:`TOKEN_TYPES`); disabled types count 0."""
        per_type = {"audio": self.audio_tokens, "eye": 1, "pose": 1, "landmarks": 1, "null": 1}
        return {t: per_type[t] if getattr(self, f"use_{t}") else 0 for t in TOKEN_TYPES}

    @property
    def num_tokens(self) -> int:
        """T: condition tokens per sample."""
        return sum(self.token_counts().values())

    @property
    def landmark_index(self) -> tuple[int, ...]:
        """Rows of a batch's ``landmarks`` ``[B, num_landmarks, 2]`` that the landmark token reads."""
        return tuple(LANDMARK_NAMES.index(p) for p in self.landmark_points)

    # --- serialisation --------------------------------------------------------------------------

    @classmethod
    def upgrade(cls, data: dict) -> dict:
        """A saved or user-given dict with renamed keys under their new names."""
        data = dict(data)
        for old, new in cls._renamed.items():
            if old in data:
                if new in data and data[new] != data[old]:
                    raise ValueError(f"{cls.__name__}: {old!r} (the old name of {new!r}) and {new!r} disagree")
                data[new] = data.pop(old)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "DeltaplaneConfig":
        """A saved config; fields it predates take the value they had before they existed."""
        data = cls.upgrade(data)
        n = int(data.get("num_landmarks", cls.num_landmarks))
        return super().from_dict({**cls._legacy, "landmark_points": LANDMARK_NAMES[:n], **data})

    # --- presets --------------------------------------------------------------------------------

    @classmethod
    def release(cls, **overrides) -> "DeltaplaneConfig":
        """The public Talk3D release's sizes (the defaults)."""
        return dataclasses.replace(cls(), **overrides)

    @classmethod
    def tiny(cls, **overrides) -> "DeltaplaneConfig":
        """Toy sizes for CPU tests: 16^2 planes of 4 channels, channels (8, 16), one attention block, D = 16."""
        tiny = cls(plane_channels=4, plane_resolution=16, channels=(8, 16), norm_groups=4, attention_blocks=1,
                   head_dim=8, ff_mult=2, token_dim=16, token_heads=2, token_hidden=16, audio_dim=8,
                   scalar_freqs=2)
        return dataclasses.replace(tiny, **overrides)
