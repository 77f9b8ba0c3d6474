"""EG3D's 4x4 FIR (binomial_filter2d): the fused kernel against PyTorch's depthwise convolution.

The size is the super-resolution's largest filtering: after the 512^2 block's stride-2 transposed
convolution, [B, 64, 513, 513] padded by 1 (GPU: batch 8 in bf16, as the fast inference path; CPU:
batch 1 in fp32). Forward, and forward + backward (training).
"""
from __future__ import annotations

import pytest
import torch
from backends import fused_impl

from talk3d.ops import binomial_filter2d

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
SHAPE = (8, 64, 513, 513) if HAS_CUDA else (1, 64, 513, 513)
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
PAD = (1, 1, 1, 1)


def _impl(path: str) -> str:
    return "torch" if path == "reference" else fused_impl()


def _sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


@pytest.mark.benchmark(group="binomial-filter")
@pytest.mark.parametrize("path", ["reference", "fused"])
def test_binomial_filter_forward(benchmark, path):
    impl = _impl(path)
    x = torch.randn(SHAPE, device=DEVICE, dtype=DTYPE)

    def run():
        y = binomial_filter2d(x, PAD, 4.0, impl=impl)
        _sync()
        return y

    run()
    benchmark.extra_info.update(device=str(DEVICE), shape=list(SHAPE), dtype=str(DTYPE))
    benchmark(run)


@pytest.mark.benchmark(group="binomial-filter")
@pytest.mark.parametrize("path", ["reference", "fused"])
def test_binomial_filter_forward_backward(benchmark, path):
    impl = _impl(path)
    x = torch.randn(SHAPE, device=DEVICE, dtype=DTYPE, requires_grad=True)
    gy = torch.randn(*SHAPE[:2], SHAPE[2] - 1, SHAPE[3] - 1, device=DEVICE, dtype=DTYPE)  # the output's

    def run():
        (gx,) = torch.autograd.grad(binomial_filter2d(x, PAD, 4.0, impl=impl), x, gy)
        _sync()
        return gx

    run()
    benchmark.extra_info.update(device=str(DEVICE), shape=list(SHAPE), dtype=str(DTYPE))
    benchmark(run)
