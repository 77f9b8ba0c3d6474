"""Loading of the compiled extension ``talk3d._C`` (never compiled at import time)."""
from __future__ import annotations

import functools
import importlib

import torch  # noqa: F401  (the extension links against libc10/libtorch: load them first)

BUILD_HINT = (
    "build it from the repository root with `pip install -e . --no-build-isolation` "
    "(torch must already be installed; see README.md, 'Building')"
)


@functools.lru_cache(maxsize=None)
def _load():
    try:
        return importlib.import_module("talk3d._C"), None
    except ImportError as exc:  # missing or built against another torch
        return None, exc


def available() -> bool:
    """Whether the compiled extension (and so ``torch.ops.talk3d``) is loaded."""
    return _load()[0] is not None


def load():
    """Return the extension module, or raise an ``ImportError`` that says how to build it."""
    module, exc = _load()
    if module is None:
        raise ImportError(f"talk3d's compiled kernels (talk3d._C) are not available ({exc}); {BUILD_HINT}")
    return module


def with_cuda() -> bool:
    """Whether the extension was compiled with its CUDA kernels."""
    module, _ = _load()
    return bool(module is not None and module.with_cuda)
