"""The engine's ops: fused kernels behind autograd, each with a pure-PyTorch twin in
:mod:`talk3d.ops.reference`."""
from . import reference
from .backends import IMPLS
from .bias_act import bias_act
from .binomial_filter import binomial_filter2d
from .composite import composite, composite_weights
from .layout import channels_last_planes, transpose_inner
from .occupancy import occupied_intervals
from .triplane_field import AXES, available_impls, triplane_field

__all__ = ["triplane_field", "bias_act", "binomial_filter2d", "composite", "composite_weights", "occupied_intervals", "transpose_inner", "channels_last_planes",
           "available_impls", "AXES", "IMPLS", "reference"]
