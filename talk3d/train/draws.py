"""The order in which training frames are drawn: one seeded sequence a resumed run continues.

Frames are drawn with replacement from a generator seeded once per run, in fixed blocks, so the
k-th draw is the same whether the run got there in one go or was stopped and resumed: a resumed
run skips the draws its finished steps consumed. Under data parallelism the ranks share the
sequence, rank r taking draws r, r + W, r + 2W, ...: the W ranks' batches of one step are the
draws of one step of a single process with W times the batch, and no rank ever runs out of frames
(a shard smaller than a batch would end an epoch before the first batch).
"""
from __future__ import annotations

import torch
from torch.utils.data import Sampler

__all__ = ["DRAW_BLOCK", "FrameDraws"]

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
