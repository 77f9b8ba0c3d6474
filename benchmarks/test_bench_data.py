"""Reading a training step's frames from a dataset folder: what the training loop pays per step when
the DataLoader has no worker processes (the CPU default; beside a GPU, ``num_workers`` unset starts
workers that read the next steps while the GPU trains on this one: ``talk3d.train.trainer.auto_workers``).

A 512^2 synthetic clip (the release's frame size), read through the trainer's own sampler
(``StepBatches``): a batch of 2 random frames, and a batch with the lip-sync term's window of 5
consecutive frames, which every step carries from ``sync_start_epoch`` on.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from talk3d.data import TalkingHeadDataset, make_synthetic_dataset
from talk3d.losses.syncnet import SYNC_FRAMES
from talk3d.train.draws import FrameDraws, StepBatches

SIZE = 512  # the release's frames
BATCH = 2


@pytest.fixture(scope="module")
def train_set(tmp_path_factory):
    root = make_synthetic_dataset(tmp_path_factory.mktemp("bench_data") / "data", seconds=4, size=SIZE, seed=0)
    return TalkingHeadDataset(root, "train")


@pytest.mark.benchmark(group="train-data")
@pytest.mark.parametrize("window", [False, True], ids=["batch", "batch+sync-window"])
def test_read_a_step(benchmark, train_set, window):
    torch.set_num_threads(1)  # a loader's work runs on one core, in the loop's process or a worker's
    steps = StepBatches(FrameDraws(len(train_set), 0), BATCH, window=SYNC_FRAMES, window_from=0 if window else None)
    batches = iter(DataLoader(train_set, batch_sampler=steps, num_workers=0))
    next(batches)  # the files mapped, the page cache warm
    out = benchmark(lambda: next(batches))
    frames = BATCH + (SYNC_FRAMES if window else 0)
    assert out["image"].shape == (frames, 3, SIZE, SIZE)
    benchmark.extra_info.update(frames_per_step=frames, image_size=SIZE,
                                ms_per_frame=benchmark.stats.stats.median * 1e3 / frames)
