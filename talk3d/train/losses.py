"""Training losses. Networks with pretrained weights (LPIPS, face identity, SyncNet) never run on
random weights: when one is not available its loss is off and :func:`loss_status` says so."""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from .config import LossWeights

# Guards the mouth loss against an empty mask (a frame whose mouth is out of view).
MASK_EPS = 1.0


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean |pred - target| inside mask. pred, target ``[B, 3, H, W]``, mask ``[B, 1, H, W]`` in [0, 1]."""
    diff = (pred - target).abs() * mask
    return diff.sum() / (mask.sum() * pred.shape[1] + MASK_EPS)


def loss_status(weights: LossWeights) -> list[str]:
    """One line per loss that is off because its network's weights are not available here."""
    lines = []
    if (weights.lpips_raw or weights.lpips_sr) and importlib.util.find_spec("lpips") is None:
        lines.append("LPIPS loss off: the lpips package and its backbone weights are not installed "
                     "(pip install lpips, with AlexNet weights in the torch hub cache)")
    if weights.identity:
        lines.append("identity loss off: no face-embedding network configured (needs user-supplied weights)")
    if weights.sync:
        lines.append("lip-sync loss off: no SyncNet weights configured (needs user-supplied weights)")
    return lines


def reconstruction_losses(out: dict, batch: dict, weights: LossWeights) -> dict[str, torch.Tensor]:
    """L1 on the render and the SR output, L1 in the mouth region on the render.

    out: the model's dict (``image_raw`` ``[B, 3, h, h]``, ``image`` ``[B, 3, S, S]``); batch: the
    dataset's (``image`` ``[B, 3, S', S']`` in [-1, 1], ``mouth_mask`` ``[B, 1, S', S']``).
    """
    raw, sr = out["image_raw"].float(), out["image"].float()
    target = batch["image"]
    tgt_sr = target if target.shape[-1] == sr.shape[-1] else F.interpolate(target, size=sr.shape[-2:], mode="area")
    tgt_raw = F.interpolate(target, size=raw.shape[-2:], mode="area")
    mouth = F.interpolate(batch["mouth_mask"], size=raw.shape[-2:], mode="area")
    terms = {
        "l1_raw": (raw - tgt_raw).abs().mean(),
        "l1_sr": (sr - tgt_sr).abs().mean(),
        "mouth": masked_l1(raw, tgt_raw, mouth),
    }
    terms["total"] = weights.l1_raw * terms["l1_raw"] + weights.l1_sr * terms["l1_sr"] + weights.mouth * terms["mouth"]
    return terms
