"""The identity embedder (align + embed) and the identity loss on FFHQ-aligned crops."""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dlib_format import DlibNet
from .network import DlibFaceEmbedder
from .align import align_to_chip


class FaceIdentityEmbedder(nn.Module):
    """FFHQ-aligned crops -> dlib face descriptors: :func:`align_to_chip` then :class:`DlibFaceEmbedder`.

    forward(images [B, 3, S, S] in [-1, 1], landmarks=None) -> [B, 128]. Usable as the evaluation's
    ``identity_embedder`` (IDSIM). Frozen; gradients reach the images.
    """

    def __init__(self, weights: str | os.PathLike | DlibNet | DlibFaceEmbedder | None = None):
        super().__init__()
        self.net = weights if isinstance(weights, DlibFaceEmbedder) else DlibFaceEmbedder(weights)

    def forward(self, images: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
        """images [B, 3, S, S], landmarks [B, K, 2] crop pixels or None -> descriptors [B, 128]."""
        return self.net(align_to_chip(images, landmarks))


class IdentityLoss(nn.Module):
    """1 - cosine similarity of the face descriptors of prediction and target, per image.

    forward(pred, target, landmarks=None) -> ``[B]`` in [0, 2] (0: the same descriptor).
        pred, target: [B, 3, S, S] FFHQ-aligned crops in [-1, 1]; the target's embedding is taken
        without gradient. landmarks: optional [B, K, 2] (the target's, crop pixels), used for both.
    """

    def __init__(self, weights: str | os.PathLike | DlibNet | DlibFaceEmbedder | FaceIdentityEmbedder | None = None):
        super().__init__()
        self.embedder = weights if isinstance(weights, FaceIdentityEmbedder) else FaceIdentityEmbedder(weights)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
        """pred, target [B, 3, S, S] -> [B]."""
        with torch.no_grad():
            ref = self.embedder(target, landmarks)
        return 1.0 - F.cosine_similarity(self.embedder(pred, landmarks), ref, dim=1)
