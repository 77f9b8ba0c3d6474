"""One 512^2 image from the FFHQ-size generator: synthesis + render (128^2, 48+48 samples) + SR.

Reference render path vs the fused engine, fp32 vs bf16 (autocast over the convolutional networks).
On the CPU the fused kernels are fp32, so the bf16 case renders fp32 planes there; on CUDA the
planes, the decoder and the render stay bf16. Random weights: timing does not depend on them.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from backends import fused_impl
from memory import peak_memory_bytes

from talk3d.models import GeneratorConfig, TriplaneGenerator
from talk3d.render import look_at_camera

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
# A CPU frame takes seconds: a few rounds are enough for a median.
ROUNDS = dict(rounds=3, iterations=1, warmup_rounds=1) if not HAS_CUDA else None


@pytest.fixture(scope="module")
def generator():
    torch.manual_seed(0)
    return TriplaneGenerator(GeneratorConfig.ffhq()).to(DEVICE).eval().requires_grad_(False)


def _impl(path: str) -> str:
    return "torch" if path == "reference" else fused_impl()


@pytest.mark.benchmark(group="generator-frame")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("path", ["reference", "fused"])
def test_generator_frame(benchmark, generator, path, precision):
    impl = _impl(path)
    gen = generator
    z = torch.randn(1, gen.cfg.z_dim, device=DEVICE)
    cams = look_at_camera(torch.tensor([0.3]), torch.tensor([0.1]), rig=gen.cfg.camera_rig()).to(DEVICE)
    amp = (torch.autocast(DEVICE.type, dtype=torch.bfloat16) if precision == "bf16"
           else contextlib.nullcontext())

    def frame():
        with torch.no_grad(), amp:
            ws = gen.mapping(z, cams, truncation_psi=0.7)
            planes = gen.planes(ws)
            if DEVICE.type == "cpu":
                planes = planes.float()  # the CPU kernels take fp32/fp64
            out = gen.synthesis(ws, cams, impl=impl, deterministic=True, planes=planes)
        if HAS_CUDA:
            torch.cuda.synchronize()
        return out

    out = frame()
    benchmark.extra_info.update(device=str(DEVICE), image=list(out["image"].shape), planes_dtype=str(out["planes"].dtype),
                                peak_memory_mb=peak_memory_bytes(frame, DEVICE) / 2**20)
    if ROUNDS:
        benchmark.pedantic(frame, **ROUNDS)
    else:
        benchmark(frame)
