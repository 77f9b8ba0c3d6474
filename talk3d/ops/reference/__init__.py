"""Pure-PyTorch references of every op, with the same signatures as :mod:`talk3d.ops`."""
from .composite import composite
from .occupancy import occupied_intervals
from .triplane_field import triplane_field

__all__ = ["composite", "occupied_intervals", "triplane_field"]
