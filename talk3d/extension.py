"""Loading of the compiled extension ``talk3d._C`` (never compiled at import time).

The import is attempted once, when this module is imported, so the availability checks below are
plain attribute reads (cheap, and traceable by torch.compile).
"""
from __future__ import annotations

import importlib

import torch  # noqa: F401  (the extension links against libc10/libtorch: load them first)

BUILD_HINT = (
    "build it from the repository root with `pip install -e . --no-build-isolation` "
    "(torch must already be installed; see README.md, 'Building')"
)

try:
    _MODULE = importlib.import_module("talk3d._C")
    _ERROR: ImportError | None = None
except ImportError as exc:  # not built, or built against another torch
    _MODULE, _ERROR = None, exc


def available() -> bool:
    """Whether the compiled extension (and so ``torch.ops.talk3d``) is loaded."""
    return _MODULE is not None


def load():
    """Return the extension module, or raise an ``ImportError`` that says how to build it."""
    if _MODULE is None:
        raise ImportError(f"talk3d's compiled kernels (talk3d._C) are not available ({_ERROR}); {BUILD_HINT}")
    return _MODULE


def with_cuda() -> bool:
    """Whether the extension was compiled with its CUDA kernels."""
    return bool(_MODULE is not None and _MODULE.with_cuda)
