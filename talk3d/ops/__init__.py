"""The engine's ops: fused kernels behind autograd, each with a pure-PyTorch twin in
:mod:`talk3d.ops.reference`."""
from . import reference
from .triplane_field import AXES, IMPLS, available_impls, triplane_field

__all__ = ["triplane_field", "available_impls", "AXES", "IMPLS", "reference"]
