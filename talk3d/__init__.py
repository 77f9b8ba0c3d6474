"""talk3d: audio-driven 3D talking portraits on a custom-kernel triplane NeRF engine.

Importing talk3d never compiles anything. The compiled kernels (``talk3d._C``) are built by
``pip install -e . --no-build-isolation``; :func:`talk3d.extension.load` explains how when they
are missing.
"""
__version__ = "0.1.0"

from . import ops  # noqa: E402,F401
