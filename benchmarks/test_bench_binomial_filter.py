"""EG3D's 4x4 FIR (binomial_filter2d): the fused kernel against PyTorch's depthwise convolution.

The size is the super-resolution's largest filtering: after the 512^2 block's stride-2 transposed
convolution, [B, 64, 513, 513] padded by 1 (GPU: batch 8 in bf16, as the fast inference path; CPU:
batch 1 in fp32). Forward, and forward + backward (training); NCHW, and NHWC (channels-last, the
layout the super-resolution runs in; on a GPU in bf16 the kernel filters eight channels a thread).
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


LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


@pytest.mark.benchmark(group="binomial-filter")
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("path", ["reference", "fused"])
def test_binomial_filter_forward(benchmark, path, layout):
    impl = _impl(path)
    x = torch.randn(SHAPE, device=DEVICE, dtype=DTYPE).to(memory_format=LAYOUTS[layout])

    def run():
        y = binomial_filter2d(x, PAD, 4.0, impl=impl)
        _sync()
        return y

    run()
    benchmark.extra_info.update(device=str(DEVICE), shape=list(SHAPE), dtype=str(DTYPE), layout=layout)
    benchmark(run)


@pytest.mark.benchmark(group="binomial-filter")
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("path", ["reference", "fused"])
def test_binomial_filter_forward_backward(benchmark, path, layout):
    impl = _impl(path)
    fmt = LAYOUTS[layout]
    x = torch.randn(SHAPE, device=DEVICE, dtype=DTYPE).to(memory_format=fmt).requires_grad_()
    gy = torch.randn(*SHAPE[:2], SHAPE[2] - 1, SHAPE[3] - 1, device=DEVICE, dtype=DTYPE).to(memory_format=fmt)

    def run():
        (gx,) = torch.autograd.grad(binomial_filter2d(x, PAD, 4.0, impl=impl), x, gy)
        _sync()
        return gx

    run()
    benchmark.extra_info.update(device=str(DEVICE), shape=list(SHAPE), dtype=str(DTYPE), layout=layout)
    benchmark(run)
