"""The order in which training frames are drawn: one seeded sequence a resumed run continues.

Frames are drawn with replacement from a generator seeded once per run, in fixed blocks, so the
k-th draw is the same whether the run got there in one go or was stopped and resumed: a resumed
run skips the draws its finished steps consumed. Under data parallelism the ranks share the
sequence, rank r taking draws r, r + W, r + 2W, ...: the W ranks' batches of one step are the
draws of one step of a single process with W times the batch, and no rank ever runs out of frames
(a shard smaller than a batch would end an epoch before the first batch).

:class:`StepBatches` groups the draws into one batch per step and, from the step the lip-sync
loss starts, adds the window of consecutive frames that loss scores, its first frame drawn from
the run's seed, the step and the rank alone: the DataLoader's workers then read the window beside
the batch, and a resumed run scores the windows an uninterrupted one would have.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["DRAW_BLOCK", "FrameDraws", "StepBatches", "window_start"]

#: Draws made per generator call (a property of the sequence: changing it changes every run's order).
DRAW_BLOCK = 1024
#: Length reported to the DataLoader: the loop stops at cfg.steps, never at the sampler's end.
ENDLESS = 10 ** 12


class FrameDraws(Sampler[int]):
    """Frame indices in [0, n) drawn uniformly with replacement.

    Args:
        n: number of frames.
        seed: the run's seed (the same for every rank).
        start: draws already consumed by the run (its steps times batch size times ranks).
        rank, world: this process's share of the sequence (draws rank, rank + world, ...).
    """

    def __init__(self, n: int, seed: int, *, start: int = 0, rank: int = 0, world: int = 1):
        if n < 1:
            raise ValueError(f"FrameDraws: no frames to draw from (n = {n})")
        self.n, self.seed, self.start, self.rank, self.world = int(n), int(seed), int(start), int(rank), int(world)

    def __len__(self) -> int:
        return ENDLESS

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        first = self.start + self.rank  # this rank's next draw in the shared sequence
        block = first // DRAW_BLOCK
        for _ in range(block):  # the finished steps' blocks: drawn and dropped (cheap: ints only)
            torch.randint(self.n, (DRAW_BLOCK,), generator=g)
        pos = first
        while True:
            draws = torch.randint(self.n, (DRAW_BLOCK,), generator=g).tolist()
            while pos < (block + 1) * DRAW_BLOCK:
                yield draws[pos - block * DRAW_BLOCK]
                pos += self.world
            block += 1


def window_start(n: int, length: int, seed: int, step: int, rank: int = 0) -> int:
    """First frame of step ``step``'s window of ``length`` consecutive frames among ``n`` (uniform)."""
    return int(np.random.default_rng([int(seed), int(step), int(rank)]).integers(n - length + 1))


class StepBatches(Sampler[list[int]]):
    """Per step, the frames its batch reads: ``batch_size`` draws of :class:`FrameDraws`, then from
    step ``window_from`` on, ``window`` consecutive frames starting at :func:`window_start`.

    Args:
        draws: the run's FrameDraws, started at ``first_step``'s draws.
        batch_size: frames per batch (per rank).
        first_step: the step of the first batch (the trainer's step count when the loader starts).
        window, window_from: the window's length and first step (``window_from`` None: no windows).
        seed, rank: the run's seed and this process's rank.
    """

    def __init__(self, draws: FrameDraws, batch_size: int, *, first_step: int = 0, window: int = 0,
                 window_from: int | None = None, seed: int = 0, rank: int = 0):
        if window_from is not None and not 1 <= window <= draws.n:
            raise ValueError(f"StepBatches: a window of {window} frames among {draws.n}")
        self.draws, self.batch_size, self.first_step = draws, int(batch_size), int(first_step)
        self.window, self.window_from, self.seed, self.rank = int(window), window_from, int(seed), int(rank)

    def __len__(self) -> int:
        return ENDLESS

    def __iter__(self):
        frames, step = iter(self.draws), self.first_step
        while True:
            batch = [next(frames) for _ in range(self.batch_size)]
            if self.window_from is not None and step >= self.window_from:
                start = window_start(self.draws.n, self.window, self.seed, step, self.rank)
                batch += range(start, start + self.window)
            yield batch
            step += 1
