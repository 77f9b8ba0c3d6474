"""The personalisation stage without a prior: a generator trained from random weights on the video.

Without a pretrained 3D prior there is nothing to invert, so the stage fits a randomly initialised
generator (synthesis backbone, decoder, super-resolution) and the identity latent ``w_ID`` to the
training frames at their tracked cameras, by the same reconstruction loss. It produces what the
prior path produces (a generator and ``w_ID`` in one checkpoint) so the rest of the pipeline runs
unchanged, but it takes many more steps and, having seen only the clip's views, extrapolates less
well to novel views than a prior tuned on the person.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..models import TriplaneGenerator
from ..render import look_at_camera
from .core import PersonalizeConfig, _bar, _step, _tunable, reconstruction_loss

__all__ = ["train_from_scratch"]


def train_from_scratch(gen: TriplaneGenerator, load: Callable[[list[int]], dict], n: int, cfg: PersonalizeConfig,
                       *, steps: int, batch: int = 4, lpips: nn.Module | None = None, progress: bool = False,
                       history: list | None = None) -> tuple[TriplaneGenerator, torch.Tensor]:
    """Fit ``gen`` (in place) and a fresh ``w_ID`` to random batches of the ``n`` training frames.

    Args:
        load: ``load(indices)`` -> dict of ``image`` ``[b, 3, S, S]``, ``camera`` ``[b, 25]`` and optional
            ``face_mask`` ``[b, 1, S, S]`` on the generator's device.
        steps: optimisation steps (Adam at ``cfg.lr_tune`` for the generator, ``cfg.lr_invert`` for w_ID).

    Returns:
        (gen in eval mode with gradients off, w_id ``[1, num_ws, w_dim]``).
    """
    if steps < 1 or batch < 1:
        raise ValueError(f"train_from_scratch: steps and batch must be >= 1, got {steps}, {batch}")
    device = next(gen.parameters()).device
    rng = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():  # a fixed random start; its value only matters as the network's input
        z = torch.randn(1, gen.cfg.z_dim, generator=rng).to(device)
        w_id = gen.mapping(z, look_at_camera(torch.zeros(1), torch.zeros(1)).to(device))
    w_id = w_id.clone().requires_grad_(True)
    gen.train()
    opt = torch.optim.Adam([{"params": _tunable(gen), "lr": cfg.lr_tune}, {"params": [w_id], "lr": cfg.lr_invert}])
    history = [] if history is None else history
    bar = _bar(steps, "from scratch", progress)
    for step in range(steps):
        idx = torch.randint(n, (min(batch, n),), generator=rng).tolist()
        frames = load(idx)
        out = gen.synthesis(w_id.expand(len(idx), -1, -1), frames["camera"], impl=cfg.impl,
                            deterministic=cfg.deterministic)
        rec, logs = reconstruction_loss(out, frames["image"], frames.get("face_mask"), cfg, lpips)
        _step(opt, rec.mean(), logs, history, bar, phase="scratch", step=step)
    bar.close()
    return gen.eval().requires_grad_(False), w_id.detach()
