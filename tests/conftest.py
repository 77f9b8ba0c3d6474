"""Shared test set-up.

- The one CUDA marker: tests marked ``cuda`` are skipped unless ``torch.cuda.is_available()``.
- Without a GPU, Triton kernels run in its interpreter: TRITON_INTERPRET must be set before any
  ``@triton.jit`` function is defined, so it is set here, before talk3d is imported.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is False")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed():
    # Fresh random inputs in every test, but reproducible from the test's name when one fails.
    import zlib

    torch.manual_seed(zlib.crc32(os.environ.get("PYTEST_CURRENT_TEST", "").encode()))
