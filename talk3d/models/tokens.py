"""Talk3D's condition tokens t_n = {a_n, t_eye, t_rot, t_ldm, t_null} (the paper's eq. 5).

Every token is ``token_dim`` (D; release 64) wide. :meth:`ConditionEncoder.forward` returns them
concatenated in this fixed order, each type present only when its ``use_*`` flag is True:

====================  ==============================  ===========================================
type (flag)           tokens                          input (batch key, shape)
====================  ==============================  ===========================================
audio (use_audio)     ``audio_tokens`` (release 1)    ``audio`` ``[B, audio_window, audio_steps, audio_dim]``
eye (use_eye)         1                               ``blink`` ``[B, 1]`` AU45
pose (use_pose)       1                               ``pose`` ``[B, 3]`` yaw, pitch, roll (radians)
landmarks (use_...)   1                               ``landmarks`` ``[B, num_landmarks, 2]`` in [-1, 1]
                                                      (the token reads the ``landmark_points`` rows)
null (use_null)       1                               none: one learned vector shared by all frames
====================  ==============================  ===========================================

so ``T = cfg.num_tokens`` is fixed by the config (release: 5) and no padding mask is needed.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn

from .attention import MultiHeadAttention
from .unet_config import DeltaplaneConfig

#: Negative slope of the audio net's LeakyReLU (AD-NeRF's audio net uses 0.02).
AUDIO_LEAKY_SLOPE = 0.02
#: Floor of a feature channel's standard deviation, as a fraction of the mean one: a channel (nearly)
#: constant in the training audio is not blown up when new audio moves it.
AUDIO_STD_FLOOR = 0.01


def _mlp(cin: int, hidden: int, cout: int) -> nn.Sequential:
    """Two-layer MLP ending in a LayerNorm, so every token type reaches the cross-attention at unit scale."""
    return nn.Sequential(nn.Linear(cin, hidden), nn.SiLU(), nn.Linear(hidden, cout), nn.LayerNorm(cout))


def conv_widths(steps: int, dim: int) -> list[int]:
    """Output channels of :class:`AudioStepsConv`'s layers: ceil(log2(steps)) halvings (at least one),
    ``dim // 2`` for the first half of them and ``dim`` after (AD-NeRF's 32, 32, 64, 64 for 16 steps)."""
    n = max(1, math.ceil(math.log2(steps)))
    return [dim // 2 if i < n // 2 else dim for i in range(n)]


class AudioStepsConv(nn.Module):
    """A frame's ``S`` audio steps -> one vector: stride-2 1-D convolutions over the steps until one is
    left, then an MLP (the design of AD-NeRF's audio net, which the release's ``AudioNet(44, 64)`` is).

    The convolutions share their weights along time, so a feature that matters at one step is read
    the same way at the next: with 16 steps a flat MLP over the 16 x A inputs must learn each step
    apart, and on the CPU demo it had not learned the lip sync by step 2000 (docs/log.md, 2026-12-07).
    """

    def __init__(self, steps: int, dim_in: int, hidden: int, dim_out: int):
        super().__init__()
        layers, c = [], dim_in
        for w in conv_widths(steps, dim_out):
            # kernel 3, stride 2, padding 1: length L -> ceil(L / 2), so ceil(log2 S) layers reach 1
            layers += [nn.Conv1d(c, w, 3, stride=2, padding=1), nn.LeakyReLU(AUDIO_LEAKY_SLOPE)]
            c = w
        self.convs = nn.Sequential(*layers)
        self.mlp = nn.Sequential(nn.Linear(c, hidden), nn.LeakyReLU(AUDIO_LEAKY_SLOPE), nn.Linear(hidden, dim_out))

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """audio ``[N, S, A]`` -> ``[N, dim_out]``."""
        return self.mlp(self.convs(audio.transpose(1, 2)).squeeze(-1))  # [N, A, S] -> [N, C, 1] -> [N, D]


class AudioStepsMLP(nn.Module):
    """A frame's ``S`` audio steps -> one vector through one MLP over all ``S x A`` inputs (talk3d's
    audio net before 2026-12-07; configs saved before then build it)."""

    def __init__(self, steps: int, dim_in: int, hidden: int, dim_out: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(steps * dim_in, hidden), nn.LeakyReLU(AUDIO_LEAKY_SLOPE),
                                 nn.Linear(hidden, dim_out))

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """audio ``[N, S, A]`` -> ``[N, dim_out]``."""
        return self.mlp(audio.flatten(1))


#: ``DeltaplaneConfig.audio_encoder`` -> the module that reads one frame's audio steps.
AUDIO_STEP_ENCODERS = {"conv": AudioStepsConv, "mlp": AudioStepsMLP}


class AudioNet(nn.Module):
    """Window of audio features -> ``audio_tokens`` tokens.

    Per frame, the ``audio_steps x audio_dim`` features go to D through ``cfg.audio_encoder``
    (:data:`AUDIO_STEP_ENCODERS`: strided convolutions over the steps, or one MLP over them all); a
    learned embedding marks each frame's place in the window; then learned queries attend over the
    window (AD-NeRF's attention over neighbouring frames, generalised to several heads and tokens).
    """

    def __init__(self, cfg: DeltaplaneConfig):
        super().__init__()
        D = cfg.token_dim
        # The features are standardised per channel with the training audio's statistics
        # (set_feature_statistics; saved in checkpoints). Raw log-mel or CTC logits sit far from 0
        # (the demo's: mean -6.5, std 3.7) and vary little between frames, so without it the frame
        # vectors were a large constant plus a small audio-dependent part, and in one demo run the
        # U-Net's cross-attention turned away from that near-constant token for good (docs/log.md,
        # 2026-12-07, eighth session). Identity until set.
        self.register_buffer("feature_mean", torch.zeros(cfg.audio_dim))  # [A]
        self.register_buffer("feature_std", torch.ones(cfg.audio_dim))  # [A]
        self.frame_encoder = AUDIO_STEP_ENCODERS[cfg.audio_encoder](cfg.audio_steps, cfg.audio_dim,
                                                                    cfg.token_hidden, D)
        self.frame_pos = nn.Parameter(torch.randn(cfg.audio_window, D) * D ** -0.5)  # [W, D]
        # Unit variance: its dot products with the window's frames peak the attention from the first
        # step. (Scaled to the pooled audio's size instead, the attention starts uniform; on the CPU
        # demo that learned no faster, 2026-12-07.)
        self.queries = nn.Parameter(torch.randn(cfg.audio_tokens, D))  # [Na, D]
        self.norm = nn.LayerNorm(D)
        self.pool = MultiHeadAttention(D, cfg.token_heads, D // cfg.token_heads)
        self.out = nn.LayerNorm(D)

    @torch.no_grad()
    def set_feature_statistics(self, features) -> None:
        """Standardise inputs with these features' per-channel mean and std (``[N, A]``, N >= 2; a
        tensor or a numpy array)."""
        features = torch.as_tensor(features, dtype=torch.float64)
        if features.ndim != 2 or features.shape[1] != self.feature_mean.numel() or features.shape[0] < 2:
            raise ValueError(f"AudioNet.set_feature_statistics: features must be [N >= 2, "
                             f"{self.feature_mean.numel()}], got {list(features.shape)}")
        if not torch.isfinite(features).all():
            raise ValueError("AudioNet.set_feature_statistics: the features hold NaN or inf")
        std = features.std(dim=0)
        self.feature_mean.copy_(features.mean(dim=0))
        self.feature_std.copy_(std.clamp_min(AUDIO_STD_FLOOR * float(std.mean()) + 1e-6))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before 2026-12-07 name the MLP encoder's layers ``frame_mlp.{0,2}``
        # and fed the features unstandardised (the identity statistics).
        for key in [k for k in state_dict if k.startswith(prefix + "frame_mlp.")]:
            state_dict[prefix + "frame_encoder.mlp." + key[len(prefix + "frame_mlp."):]] = state_dict.pop(key)
        if prefix + "feature_mean" not in state_dict:
            state_dict[prefix + "feature_mean"] = torch.zeros_like(self.feature_mean)
            state_dict[prefix + "feature_std"] = torch.ones_like(self.feature_std)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """audio ``[B, W, S, A]`` -> ``[B, audio_tokens, D]``."""
        B, W = audio.shape[:2]
        audio = (audio - self.feature_mean.to(audio.dtype)) / self.feature_std.to(audio.dtype)
        per_frame = self.frame_encoder(audio.flatten(0, 1)).unflatten(0, (B, W))  # [B, W, D]
        frames = self.norm(per_frame + self.frame_pos)  # [B, W, D]
        q = self.queries.expand(B, -1, -1)  # [B, Na, D]
        return self.out(q + self.pool(q, frames))


class SinusoidalMLP(nn.Module):
    """``n`` scalars -> one token: ``[v, sin(2^k w0 v), cos(2^k w0 v)]_{k < F}`` then an MLP.

    ``w0`` is the base angular frequency: 1 for angles in radians (the first band is the angle's own
    sin / cos), pi for values normalised to [-1, 1] (the first band is then injective there).
    """

    def __init__(self, n_in: int, freqs: int, base: float, hidden: int, dim: int):
        super().__init__()
        self.register_buffer("omega", base * 2.0 ** torch.arange(freqs, dtype=torch.float32), persistent=False)
        self.mlp = _mlp(n_in * (1 + 2 * freqs), hidden, dim)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """v ``[B, n]`` -> ``[B, 1, dim]``."""
        angles = v[..., None] * self.omega.to(v.dtype)  # [B, n, F]
        feats = torch.cat([v[..., None], angles.sin(), angles.cos()], dim=-1).flatten(1)  # [B, n (1 + 2F)]
        return self.mlp(feats)[:, None]


class ConditionEncoder(nn.Module):
    """Batch dict -> condition tokens ``[B, T, D]`` (order and shapes in the module docstring)."""

    def __init__(self, cfg: DeltaplaneConfig):
        super().__init__()
        self.cfg = cfg
        D, H, nf = cfg.token_dim, cfg.token_hidden, cfg.scalar_freqs
        self.audio = AudioNet(cfg) if cfg.use_audio else None
        self.eye = SinusoidalMLP(1, nf, math.pi, H, D) if cfg.use_eye else None
        self.pose = SinusoidalMLP(3, nf, 1.0, H, D) if cfg.use_pose else None
        self.landmarks = SinusoidalMLP(2 * len(cfg.landmark_points), nf, math.pi, H, D) if cfg.use_landmarks else None
        self.register_buffer("landmark_index", torch.tensor(cfg.landmark_index), persistent=False)  # [K']
        self.null = nn.Parameter(torch.randn(D)) if cfg.use_null else None  # [D]

    @property
    def num_tokens(self) -> int:
        """T, fixed by the config."""
        return self.cfg.num_tokens

    def _expected(self) -> dict[str, tuple[int, ...]]:
        """Per-sample shape of each enabled input, by batch key."""
        cfg = self.cfg
        shapes = {"audio": (cfg.audio_window, cfg.audio_steps, cfg.audio_dim), "blink": (1,), "pose": (3,),
                  "landmarks": (cfg.num_landmarks, 2)}
        flags = {"audio": cfg.use_audio, "blink": cfg.use_eye, "pose": cfg.use_pose, "landmarks": cfg.use_landmarks}
        return {k: s for k, s in shapes.items() if flags[k]}

    def _check(self, batch: Mapping[str, torch.Tensor]) -> int:
        """Validate the enabled inputs; return the batch size."""
        B = None
        for key, shape in self._expected().items():
            if key not in batch:
                raise ValueError(f"batch[{key!r}]: missing, but its token type is enabled in the config")
            x = batch[key]
            if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() != 1 + len(shape) \
                    or tuple(x.shape[1:]) != shape or (B is not None and x.shape[0] != B):
                got = f"{x.dtype} {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__
                raise ValueError(f"batch[{key!r}]: expected a float [B{'' if B is None else '=' + str(B)}, "
                                 f"{', '.join(map(str, shape))}] tensor, got {got}")
            B = x.shape[0]
        if B is None:  # only the null token: take the batch size from whatever the batch holds
            sizes = [v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.dim() > 0]
            if not sizes:
                raise ValueError("batch: no tensor to take the batch size from (only the null token is enabled)")
            B = sizes[0]
        return B

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Encode one batch.

        Args:
            batch: ``audio`` ``[B, audio_window, audio_steps, audio_dim]``, ``blink`` ``[B, 1]``, ``pose``
                ``[B, 3]`` (radians), ``landmarks`` ``[B, num_landmarks, 2]`` (the dataset's
                ``LANDMARK_NAMES``; the token reads ``landmark_points``); only the enabled types'
                keys are read (other keys are ignored).
        Returns:
            tokens ``[B, T, token_dim]``, in the order audio, eye, pose, landmarks, null.
        """
        B = self._check(batch)
        cfg, tokens = self.cfg, []
        if self.audio is not None:
            tokens.append(self.audio(batch["audio"]))
        if self.eye is not None:
            blink = batch["blink"].clamp(0.0, cfg.eye_max)
            if self.training and cfg.eye_noise > 0:
                # Blinks are noisy detector output: jitter them so the token cannot memorise exact
                # values (uniform in +-eye_noise, as the release).
                blink = blink + (torch.rand_like(blink) * 2 - 1) * cfg.eye_noise
            tokens.append(self.eye(blink / cfg.eye_max))
        if self.pose is not None:
            tokens.append(self.pose(batch["pose"]))
        if self.landmarks is not None:
            tokens.append(self.landmarks(batch["landmarks"][:, self.landmark_index].flatten(1)))
        if self.null is not None:
            dtype = tokens[0].dtype if tokens else self.null.dtype
            tokens.append(self.null.to(dtype).expand(B, 1, -1))
        return torch.cat(tokens, dim=1)
