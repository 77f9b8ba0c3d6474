"""Pure-PyTorch references of every op, with the same signatures as :mod:`talk3d.ops`."""
from .composite import composite
from .triplane_field import triplane_field

__all__ = ["composite", "triplane_field"]
