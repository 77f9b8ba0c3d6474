"""A synthetic head-like triplane scene: an opaque textured ellipsoid in empty space.

Used by the tests and benchmarks (occupancy skipping needs empty space around an object, as a real
head has) and as the renderer's self-contained demo. Channel 0 of every plane holds a quadratic
whose three-plane mean is the ellipsoid's squared radius; the decoder's first hidden unit turns it
into density, the other channels carry smooth random texture into the colour features.
"""
from __future__ import annotations

import math

import torch

from ..ops.reference.triplane_field import PLANE_AXES
from .renderer import DecoderWeights

# Density far from the object: softplus(-10 - 1) ~ 1.7e-5, so empty space is ~transparent.
EMPTY_SIGMA = -10.0


def head_scene(
    plane_res: int = 64,
    channels: int = 32,
    hidden: int = 64,
    features: int = 32,
    *,
    center=(0.0, 0.05, 0.1),
    radii=(0.22, 0.28, 0.24),
    sharpness: float = 60.0,
    box_warp: float = 1.0,
    axes: str = "fixed",
    generator: torch.Generator | None = None,
    dtype=torch.float32,
) -> tuple[torch.Tensor, DecoderWeights]:
    """Triplanes ``[1, 3, channels, plane_res, plane_res]`` and decoder weights of an ellipsoid.

    Inside the ellipsoid ``sigma`` rises to ~``sharpness``; outside it is :data:`EMPTY_SIGMA`.
    """
    g = generator
    coords = (torch.arange(plane_res, dtype=torch.float64) + 0.5) / plane_res * 2 - 1  # align_corners=False
    world = coords * box_warp / 2
    planes = torch.zeros(1, 3, channels, plane_res, plane_res, dtype=torch.float64)
    for p, (a, b) in enumerate(PLANE_AXES[axes]):
        u = (world[None, :] - center[a]) / radii[a]  # along the width: axis a
        v = (world[:, None] - center[b]) / radii[b]  # along the height: axis b
        # Each axis appears in exactly two planes, so halves of the squares sum to the radius, and
        # the three means to (1 - r^2) / 3: zero features (outside the cube) read as empty space.
        planes[0, p, 0] = 1 / 3 - 0.5 * (u**2 + v**2)
    # Smooth texture: a few random low-frequency waves per channel.
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    for c in range(1, channels):
        k = torch.randn(3, 2, generator=g, dtype=torch.float64) * 3
        phase = torch.rand(3, generator=g, dtype=torch.float64) * 2 * math.pi
        for p in range(3):
            wave = torch.sin(k[p, 0] * xx + k[p, 1] * yy + phase[p])
            planes[0, p, c] = wave
    w1 = torch.randn(hidden, channels, generator=g, dtype=torch.float64) * 0.3
    w1[:, 0] = 0
    b1 = torch.zeros(hidden, dtype=torch.float64)
    w1[0] = 0
    w1[0, 0] = 3.0 * sharpness  # unit 0 = softplus(sharpness * (1 - r^2))
    w2 = torch.randn(1 + features, hidden, generator=g, dtype=torch.float64) / math.sqrt(hidden)
    w2[0] = 0
    w2[0, 0] = 1.0
    w2[1:, 0] = 0  # colours from the texture units only
    b2 = torch.zeros(1 + features, dtype=torch.float64)
    b2[0] = EMPTY_SIGMA
    dec = DecoderWeights(*(x.to(dtype) for x in (w1, b1, w2, b2)))
    return planes.to(dtype), dec
