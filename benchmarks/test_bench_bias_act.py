"""StyleGAN2's bias + leaky ReLU + gain + clamp (bias_act): the fused kernel against PyTorch's four
operations.

The size is the super-resolution's largest activation, the 512^2 block's output [B, 128, 512, 512]
channels-last (GPU: batch 8 in bf16, as the fast inference path; CPU: batch 1 in fp32), with EG3D's
synthesis-layer activation (leaky ReLU 0.2, gain sqrt 2, clamp 256). Forward, and forward + backward
(training); peak memory in ``extra_info``.
"""
from __future__ import annotations

import pytest
import torch
from backends import fused_impl
from memory import peak_memory_bytes

from talk3d.ops import bias_act

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
SHAPE = (8, 128, 512, 512) if HAS_CUDA else (1, 128, 512, 512)
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
ACT = dict(slope=0.2, gain=2**0.5, clamp=256.0)


def _impl(path: str) -> str:
    return "torch" if path == "reference" else fused_impl()


def _sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


def _inputs(requires_grad: bool):
    x = torch.randn(SHAPE, device=DEVICE, dtype=DTYPE).to(memory_format=torch.channels_last)
    b = torch.randn(SHAPE[1], device=DEVICE)
    return x.requires_grad_(requires_grad), b.requires_grad_(requires_grad)


@pytest.mark.benchmark(group="bias-act")
@pytest.mark.parametrize("path", ["reference", "fused"])
def test_bias_act_forward(benchmark, path):
    impl = _impl(path)
    x, b = _inputs(False)

    def run():
        y = bias_act(x, b, impl=impl, **ACT)
        _sync()
        return y

    _measure(benchmark, run)


@pytest.mark.benchmark(group="bias-act")
@pytest.mark.parametrize("path", ["reference", "fused"])
def test_bias_act_forward_backward(benchmark, path):
    impl = _impl(path)
    x, b = _inputs(True)
    gy = torch.randn_like(x)

    def run():
        grads = torch.autograd.grad(bias_act(x, b, impl=impl, **ACT), (x, b), gy)
        _sync()
        return grads

    _measure(benchmark, run)


def _measure(benchmark, run):
    run()  # warm-up (kernel selection, allocator)
    benchmark.extra_info.update(device=str(DEVICE), shape=list(SHAPE), dtype=str(DTYPE),
                                peak_memory_mb=round(peak_memory_bytes(run, DEVICE) / 2**20, 1))
    benchmark(run)
