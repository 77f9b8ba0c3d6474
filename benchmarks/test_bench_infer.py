"""One frame end to end at inference: audio token -> U-Net -> render -> SR, no autograd.

GPU: the release's sizes (512^2 output); the fast path is the fused engine in bf16. CPU: the
no-argument demo's sizes, fused fp32 (the CPU kernels are fp32). The reference runs the whole
U-Net per frame; the fast path reuses the U-Net encoder's features of P_ID (they do not depend on
the frame) and also runs with frames batched. Frames/s in ``extra_info``. Occupancy skipping and
CUDA graphs are not in the fast path yet.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from backends import fused_impl
from memory import peak_memory_bytes
from test_bench_train import AUDIO_DIM, _batch

from talk3d.train import TrainConfig, build_model, demo_config

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.mark.benchmark(group="infer-frame")
@pytest.mark.parametrize("path,batch", [("reference", 1), ("fast", 1), ("fast", 8)])
def test_infer_frame(benchmark, path, batch):
    impl = "torch" if path == "reference" else fused_impl()
    cfg = TrainConfig(batch_size=1) if HAS_CUDA else TrainConfig.from_dict({**demo_config("cpu"), "batch_size": 1})
    torch.manual_seed(0)
    model = build_model(cfg, AUDIO_DIM, prior=None, log=lambda m: None).to(DEVICE).eval().requires_grad_(False)
    model.cache_encoder = path == "fast"
    frames = _batch(model, batch)
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if HAS_CUDA and path == "fast" else contextlib.nullcontext())

    def frame():
        with torch.no_grad(), amp:
            out = model(frames, impl=impl, deterministic=True)["image"]
        if HAS_CUDA:
            torch.cuda.synchronize()
        return out

    frame()
    benchmark.extra_info.update(device=str(DEVICE), size=model.generator.cfg.sr_resolution, batch=batch,
                                peak_memory_mb=peak_memory_bytes(frame, DEVICE) / 2**20)
    benchmark(frame)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["frames_per_s"] = batch / benchmark.stats.stats.median
