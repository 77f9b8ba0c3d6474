"""Counting the reads of a tensor's value on the host (``bool()``, ``int()``, ``float()``,
``.item()``): on a GPU each one waits for the device to finish all the work queued before it, so the
hot paths (a rendered frame, a training step) must make none. Every such read dispatches
``aten._local_scalar_dense``, which a dispatch mode sees on any device, the CPU included."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class ScalarReads(TorchDispatchMode):
    """``with ScalarReads() as reads: ...`` then ``reads.count``."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))
