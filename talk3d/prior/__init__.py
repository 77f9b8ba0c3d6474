"""Pretrained priors: safe reading of EG3D/Talk3D release pickles, and talk3d's own checkpoints.

- :func:`read_release_pickle` decodes a release ``.pkl`` into a flat state dict without importing
  EG3D code or executing the source embedded in the pickle.
- :func:`save_checkpoint` / :func:`load_checkpoint` handle talk3d's safetensors (or ``.pt``)
  checkpoints with a JSON config; :func:`check_state_dict` compares names and shapes.
"""
from .checkpoint import (
    FORMAT_VERSION,
    PLANE_CONVENTIONS,
    StateDictReport,
    check_state_dict,
    read_weights_file,
    load_checkpoint,
    save_checkpoint,
)
from .convert import checkpoint_config, config_from_release, convert_release, load_generator
from .persistent_pickle import (
    ModuleRecord,
    PersistentRecord,
    ReleaseModel,
    RestrictedUnpickler,
    UnsafePickleError,
    flatten_state_dict,
    load_restricted,
    read_release_pickle,
)

__all__ = [
    "checkpoint_config",
    "config_from_release",
    "convert_release",
    "load_generator",
    "FORMAT_VERSION",
    "PLANE_CONVENTIONS",
    "StateDictReport",
    "check_state_dict",
    "read_weights_file",
    "load_checkpoint",
    "save_checkpoint",
    "ModuleRecord",
    "PersistentRecord",
    "ReleaseModel",
    "RestrictedUnpickler",
    "UnsafePickleError",
    "flatten_state_dict",
    "load_restricted",
    "read_release_pickle",
]
