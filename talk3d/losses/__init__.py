"""Losses with pretrained networks, written in plain torch so they run without torchvision.

- :mod:`talk3d.losses.lpips`: LPIPS v0.1 (AlexNet, optionally VGG16) on real ImageNet + lpips weights,
  found by :func:`find_lpips_weights`; :func:`lpips_status` says what is missing when they are not.
"""
from .lpips import (
    ENV_VAR as LPIPS_WEIGHTS_ENV,
    LPIPS,
    LPIPSWeights,
    LPIPSWeightsNotFound,
    UnsafeWeightsError,
    find_lpips_weights,
    lpips_status,
)

__all__ = [
    "LPIPS",
    "LPIPS_WEIGHTS_ENV",
    "LPIPSWeights",
    "LPIPSWeightsNotFound",
    "UnsafeWeightsError",
    "find_lpips_weights",
    "lpips_status",
]
