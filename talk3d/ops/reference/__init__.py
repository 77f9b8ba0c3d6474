"""Pure-PyTorch references of every op, with the same signatures as :mod:`talk3d.ops`."""
from .bias_act import bias_act
from .binomial_filter import binomial_filter2d
from .composite import composite, composite_weights
from .layout import transpose_inner
from .occupancy import occupied_intervals
from .triplane_field import triplane_field

__all__ = ["bias_act", "binomial_filter2d", "composite", "composite_weights", "occupied_intervals", "transpose_inner", "triplane_field"]
