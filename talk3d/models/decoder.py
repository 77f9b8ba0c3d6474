"""EG3D's OSGDecoder: the small MLP turning averaged triplane features into density and features."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.reference.triplane_field import FEATURE_EPS
from ..render import DecoderWeights
from .layers import FullyConnected


class OSGDecoder(nn.Module):
    """``net = [FC(C -> hidden), Softplus, FC(hidden -> 1 + F)]`` (keys ``net.0.*``, ``net.2.*``)."""

    def __init__(self, in_features: int = 32, hidden: int = 64, out_features: int = 32, lr_multiplier: float = 1.0):
        super().__init__()
        self.net = nn.Sequential(
            FullyConnected(in_features, hidden, lr_multiplier=lr_multiplier),
            nn.Softplus(),
            FullyConnected(hidden, 1 + out_features, lr_multiplier=lr_multiplier),
        )

    def effective_weights(self, dtype: torch.dtype | None = None) -> DecoderWeights:
        """The weights as applied (EG3D's run-time scaling folded in), differentiable, for the fused op.

        Returns :class:`talk3d.render.DecoderWeights`: w1 ``[hidden, C]``, b1 ``[hidden]``,
        w2 ``[1 + F, hidden]``, b2 ``[1 + F]`` (cast to ``dtype`` when given).
        """
        fc1, fc2 = self.net[0], self.net[2]
        out = (fc1.effective_weight(), fc1.effective_bias(), fc2.effective_weight(), fc2.effective_bias())
        return DecoderWeights(*(t if dtype is None else t.to(dtype) for t in out))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features ``[..., C]`` (already averaged over the planes) -> sigma ``[..., 1]`` (raw),
        feat ``[..., F]`` (``sigmoid * (1 + 2 eps) - eps``)."""
        out = self.net(features)
        return out[..., :1], torch.sigmoid(out[..., 1:]) * (1 + 2 * FEATURE_EPS) - FEATURE_EPS

