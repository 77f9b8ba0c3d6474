"""One frame end to end at inference: audio token -> U-Net -> render -> SR, no autograd.

GPU: the release's sizes (512^2 output); the fast path is the fused engine in bf16. CPU: the
no-argument demo's sizes, fused fp32 (the CPU kernels are fp32). The reference runs the whole
U-Net per frame; the fast path reuses the U-Net encoder's features of P_ID (they do not depend on
the frame) and also runs with frames batched. ``fast-graphs`` (GPU only) is the fast path compiled
as ``python -m talk3d.infer --compile --compile-backend cudagraphs`` compiles it: the whole
per-frame forward captured as CUDA graphs, without inductor's code generation (minutes at these
sizes). Frames/s in ``extra_info``. Occupancy skipping is not in the fast path yet.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from backends import fused_impl
from memory import peak_memory_bytes
from test_bench_train import AUDIO_DIM, _batch

from talk3d.infer.render import compile_for_inference
from talk3d.render import check_cameras
from talk3d.train import TrainConfig, build_model, demo_config

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.mark.benchmark(group="infer-frame")
@pytest.mark.parametrize("path,batch", [("reference", 1), ("fast", 1), ("fast", 8), ("fast-graphs", 1),
                                        ("fast-graphs", 8)])
def test_infer_frame(benchmark, path, batch):
    if path == "fast-graphs" and not HAS_CUDA:
        pytest.skip("CUDA graphs need a GPU")
    impl = "torch" if path == "reference" else fused_impl()
    cfg = TrainConfig(batch_size=1) if HAS_CUDA else TrainConfig.from_dict({**demo_config("cpu"), "batch_size": 1})
    torch.manual_seed(0)
    model = build_model(cfg, AUDIO_DIM, prior=None, log=lambda m: None).to(DEVICE).eval().requires_grad_(False)
    fast = path.startswith("fast")
    model.cache_encoder = fast
    frames = _batch(model, batch)
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if HAS_CUDA and fast else contextlib.nullcontext())
    if path == "fast-graphs":
        compile_for_inference(model, backend="cudagraphs")
        frames = {k: v for k, v in frames.items() if k not in ("image", "mouth_mask")}
        check_cameras(frames["camera"])

    def frame():
        with torch.no_grad(), amp:
            out = model(frames, impl=impl, deterministic=True, check_cameras=path != "fast-graphs")["image"]
        if HAS_CUDA:
            torch.cuda.synchronize()
        return out

    frame()
    if path == "fast-graphs":
        frame()  # cudagraph trees record on the second call and replay from the third
    benchmark.extra_info.update(device=str(DEVICE), size=model.generator.cfg.sr_resolution, batch=batch,
                                peak_memory_mb=peak_memory_bytes(frame, DEVICE) / 2**20)
    benchmark(frame)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["frames_per_s"] = batch / benchmark.stats.stats.median
