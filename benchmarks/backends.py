"""The fused back end a benchmark measures on this machine (CUDA on a GPU, the C++ CPU kernels else)."""
from __future__ import annotations

import pytest
import torch

from talk3d import extension


def fused_impl() -> str:
    """``"cuda"`` or ``"cpu"``; skips the benchmark when that back end was not built."""
    if torch.cuda.is_available():
        if not extension.with_cuda():
            pytest.skip("needs the CUDA extension")
        return "cuda"
    if not extension.available():
        pytest.skip("talk3d._C not built")
    return "cpu"
