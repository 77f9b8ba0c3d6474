"""Which back end runs an op: what this installation offers and the ``impl="auto"`` choice."""
from __future__ import annotations

import importlib.util
import os

import torch

from .. import extension

IMPLS = ("auto", "torch", "cpu", "cuda", "triton")
# Preference of impl="auto" among the back ends that take the inputs.
_AUTO_ORDER = ("cuda", "cpu", "triton", "torch")

# Read once: Triton's interpreter mode is fixed when its kernels are first defined anyway.
HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def triton_usable(device: torch.device) -> bool:
    return HAS_TRITON and (device.type == "cuda" or TRITON_INTERPRET)


def available_impls(device: torch.device | str = "cpu", *, triton: bool = True) -> list[str]:
    """Back ends that can run on ``device`` in this installation (``"auto"`` excluded).

    ``triton=False`` for ops that have no Triton kernel.
    """
    device = torch.device(device)
    impls = ["torch"]
    if device.type == "cpu" and extension.available():
        impls.append("cpu")
    if device.type == "cuda" and extension.with_cuda():
        impls.append("cuda")
    if triton and triton_usable(device):
        impls.append("triton")
    return impls


def resolve_impl(op: str, impl: str, like: torch.Tensor, dtypes: dict[str, tuple]) -> str:
    """The back end to run ``op`` with for inputs like ``like``.

    Args:
        op: the op's name, for error messages.
        impl: what the caller asked for (one of :data:`IMPLS`).
        like: a tensor whose device and dtype decide.
        dtypes: back end -> the storage dtypes it takes; back ends missing here do not exist for ``op``.
    """
    allowed = ("auto",) + tuple(dtypes)
    if impl not in allowed:
        raise ValueError(f"{op}: impl must be one of {allowed}, got {impl!r}")
    device = like.device
    here = [i for i in available_impls(device) if i in dtypes]
    if impl == "auto":
        usable = [i for i in here if like.dtype in dtypes[i]]
        return next((c for c in _AUTO_ORDER if c in usable), "torch")
    if impl not in here:
        if impl in ("cpu", "cuda") and not extension.available():
            extension.load()  # raises with the build instructions
        raise ValueError(f"{op}: impl={impl!r} cannot run on {device} tensors here (available: {here})")
    if like.dtype not in dtypes[impl]:
        raise TypeError(f"{op}: impl={impl!r} does not take {like.dtype} inputs (it takes {dtypes[impl]})")
    return impl


def check_impl(impl: str, device: torch.device | str, what: str = "impl") -> None:
    """ValueError unless ``impl`` (a user's choice of back end) can run on ``device`` here; for the
    CLIs and the Talker, which would otherwise fail at the first frame or training step."""
    device = torch.device(device)
    here = available_impls(device)
    if impl != "auto" and impl not in here:
        hint = " (it runs on CUDA tensors: pass --device cuda on a GPU machine)" if impl in ("cuda", "triton") \
            and device.type != "cuda" else ""
        raise ValueError(f"{what} {impl!r} cannot run on {device} here{hint}; available: {['auto', *here]}")
