"""talk3d: audio-driven 3D talking portraits on a custom-kernel triplane NeRF engine.

Importing talk3d never compiles anything. The compiled kernels (``talk3d._C``) are built by
``pip install -e . --no-build-isolation``; :func:`talk3d.extension.load` explains how when they
are missing.

``talk3d.Talker`` (streaming inference, :class:`talk3d.infer.Talker`) is imported on first use, so
``import talk3d`` stays light.
"""
__version__ = "0.1.0"

from . import ops  # noqa: E402,F401


def __getattr__(name):
    # Lazy: the inference stack (and its training-code imports) loads only when Talker is asked for.
    if name == "Talker":
        from .infer.talker import Talker

        return Talker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | {"Talker"})
