"""Training losses. Networks with pretrained weights (LPIPS, face identity, SyncNet) never run on
random weights: when one is not available its loss is off and :func:`loss_status` says so.

As in the Talk3D release, the objective takes L1 terms as means over pixels and frames and LPIPS
terms summed over the batch's frames (its ``LPIPS(...).sum()``): at batch 2 an LPIPS weight of 1
weighs each frame's LPIPS twice as heavily, relative to L1, as a mean would. The terms reported
are per-frame means either way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import LossWeights

# LPIPS' AlexNet needs 32 pixels a side: smaller renders (the CPU demo's) are scored upsampled.
LPIPS_MIN_SIZE = 32
# Guards the mouth loss against an empty mask (a frame whose mouth is out of view).
MASK_EPS = 1.0
# The face network reads 150-pixel chips covering ~0.7 of an FFHQ crop: below 128 pixels of output
# (the CPU demo's 64) the face is upsampled blur, the loss says nothing and costs most of a step.
IDENTITY_MIN_SIZE = 128
# The lip-sync loss scores the render, as the release does at 128^2 (its gradient reaches the
# deltaplane without passing through the SR); a smaller render's mouth is a few pixels of blur.
SYNC_MIN_RENDER = 128


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean |pred - target| inside mask. pred, target ``[B, 3, H, W]``, mask ``[B, 1, H, W]`` in [0, 1]."""
    diff = (pred - target).abs() * mask
    return diff.sum() / (mask.sum() * pred.shape[1] + MASK_EPS)


def render_targets(batch: dict, size) -> tuple[torch.Tensor, torch.Tensor]:
    """The frame and its mouth mask at the render's size: (``[B, 3, h, h]``, ``[B, 1, h, h]``)."""
    return (F.interpolate(batch["image"], size=size, mode="area"),
            F.interpolate(batch["mouth_mask"], size=size, mode="area"))


def mouth_l1(image_raw: torch.Tensor, batch: dict) -> torch.Tensor:
    """The mouth term alone (validation's wrong-audio check): mean |render - frame| inside the mouth
    mask. image_raw ``[B, 3, h, h]``; batch ``image`` ``[B, 3, S, S]``, ``mouth_mask`` ``[B, 1, S, S]``."""
    return masked_l1(image_raw.float(), *render_targets(batch, image_raw.shape[-2:]))


def _at_least(x: torch.Tensor, size: int) -> torch.Tensor:
    """x ``[B, C, H, W]`` bilinearly upsampled to ``size`` when smaller."""
    return x if min(x.shape[-2:]) >= size else F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def uses_lpips(weights: LossWeights) -> bool:
    """Whether any LPIPS term has a weight."""
    return bool(weights.lpips_raw or weights.lpips_sr or weights.mouth_lpips)


def perceptual_network(weights: LossWeights, lpips_dir: str | None, device):
    """The frozen LPIPS network when its weights are found and an LPIPS loss is on, else None."""
    from ..losses import LPIPS, find_lpips_weights

    if not uses_lpips(weights):
        return None
    found = find_lpips_weights(lpips_dir)
    return None if found is None else LPIPS(found).to(device).eval().requires_grad_(False)


def identity_network(weights: LossWeights, face_id_path: str | None, image_size: int, device):
    """The frozen face-identity loss (dlib's ResNet, real weights) when it is on, its weights are
    found and the output is large enough (``IDENTITY_MIN_SIZE``); else None."""
    from ..losses import IdentityLoss, find_face_id_weights

    if not weights.identity or image_size < IDENTITY_MIN_SIZE:
        return None
    found = find_face_id_weights(face_id_path)
    return None if found is None else IdentityLoss(found).to(device).eval().requires_grad_(False)


def sync_network(weights: LossWeights, syncnet_path: str | None, render_size: int, device):
    """The frozen lip-sync loss (Wav2Lip's expert, the user's weights) when it is on, its weights are
    found and the render it scores is large enough (``SYNC_MIN_RENDER``); else None."""
    from ..losses import SyncLoss, find_syncnet_weights

    if not weights.sync or render_size < SYNC_MIN_RENDER:
        return None
    found = find_syncnet_weights(syncnet_path)
    return None if found is None else SyncLoss.from_file(found, device).eval().requires_grad_(False)


def loss_status(weights: LossWeights, lpips_dir: str | None = None, face_id_path: str | None = None,
                image_size: int | None = None, syncnet_path: str | None = None,
                render_size: int | None = None) -> list[str]:
    """One line per loss whose network is used or is off for want of weights (never random weights)."""
    from ..losses import face_id_status, lpips_status, syncnet_status

    lines = []
    if uses_lpips(weights):
        lines.append(lpips_status(lpips_dir))
    if weights.identity:
        line = face_id_status(face_id_path)
        if image_size is not None and image_size < IDENTITY_MIN_SIZE and not line.startswith("identity loss off"):
            line = (f"identity loss off: the {image_size}px output is below the {IDENTITY_MIN_SIZE}px the face "
                    "network needs")
        lines.append(line)
    if weights.sync:
        line = syncnet_status(syncnet_path)
        if render_size is not None and render_size < SYNC_MIN_RENDER and not line.startswith("lip-sync loss off"):
            line = f"lip-sync loss off: the {render_size}px render is below the {SYNC_MIN_RENDER}px it scores"
        elif not line.startswith("lip-sync loss off"):
            line += f" (used from epoch {weights.sync_start_epoch}, x{weights.sync})"
        lines.append(line)
    return lines


def reconstruction_losses(out: dict, batch: dict, weights: LossWeights, lpips=None,
                          identity=None, *, sr_only: bool = False,
                          lpips_frames: int | None = None) -> dict[str, torch.Tensor]:
    """L1 (and LPIPS, given the network) on the render and the SR output, L1 (and LPIPS) of the
    mouth region on the render, and the identity loss on the SR output (given the network).
    ``sr_only`` (stage sr): L1 and LPIPS on the SR output alone. LPIPS enters ``total`` summed over
    ``lpips_frames`` frames (default: the batch's, the release's sum; validation passes the
    training batch size, so that its total is the objective of a training batch); the terms are
    per-frame means.

    out: the model's dict (``image_raw`` ``[B, 3, h, h]``, ``image`` ``[B, 3, S, S]``); batch: the
    dataset's (``image`` ``[B, 3, S', S']`` in [-1, 1], ``mouth_mask`` and ``face_mask``
    ``[B, 1, S', S']``; the identity loss compares the images inside ``face_mask`` only).
    """
    raw, sr = out["image_raw"].float(), out["image"].float()
    target = batch["image"]
    frames = sr.shape[0] if lpips_frames is None else lpips_frames
    tgt_sr = target if target.shape[-1] == sr.shape[-1] else F.interpolate(target, size=sr.shape[-2:], mode="area")
    if sr_only:
        terms = {"l1_sr": (sr - tgt_sr).abs().mean()}
        total = weights.l1_sr * terms["l1_sr"]
        if lpips is not None:
            terms["lpips_sr"] = lpips(sr, tgt_sr).mean()
            total = total + weights.lpips_sr * frames * terms["lpips_sr"]
        terms["total"] = total
        return terms
    tgt_raw, mouth = render_targets(batch, raw.shape[-2:])
    terms = {
        "l1_raw": (raw - tgt_raw).abs().mean(),
        "l1_sr": (sr - tgt_sr).abs().mean(),
        "mouth": masked_l1(raw, tgt_raw, mouth),
    }
    total = weights.l1_raw * terms["l1_raw"] + weights.l1_sr * terms["l1_sr"] + weights.mouth * terms["mouth"]
    if lpips is not None:
        terms["lpips_raw"] = lpips(_at_least(raw, LPIPS_MIN_SIZE), _at_least(tgt_raw, LPIPS_MIN_SIZE)).mean()
        terms["lpips_sr"] = lpips(sr, tgt_sr).mean()
        total = total + frames * (weights.lpips_raw * terms["lpips_raw"] + weights.lpips_sr * terms["lpips_sr"])
        if weights.mouth_lpips:  # the release's perceptual loss on the lips: both images outside the mask black
            terms["mouth_lpips"] = lpips(_at_least(raw * mouth, LPIPS_MIN_SIZE),
                                         _at_least(tgt_raw * mouth, LPIPS_MIN_SIZE)).mean()
            total = total + weights.mouth_lpips * frames * terms["mouth_lpips"]
    if identity is not None:  # on the head alone, as the release: the background says nothing of who it is
        head = F.interpolate(batch["face_mask"], size=sr.shape[-2:], mode="area")  # [B, 1, S, S]
        terms["identity"] = identity(sr * head, tgt_sr * head).mean()
        total = total + weights.identity * terms["identity"]
    terms["total"] = total
    return terms
