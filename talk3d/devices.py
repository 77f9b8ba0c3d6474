"""The ``--device`` / ``device=`` argument of the CLIs and the :class:`talk3d.Talker`, checked before
any work: a device name torch knows, on a device this machine has."""
from __future__ import annotations

import torch


def resolve_device(text, what: str = "--device") -> torch.device:
    """``None`` -> cuda when available, else cpu; a name (``cpu``, ``cuda``, ``cuda:1``) or a
    :class:`torch.device` -> that device, or ValueError saying why it cannot be used here."""
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise ValueError(f"{what} {text!r}: not a device name (cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what} {text}: this torch build sees no CUDA device (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{what} {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"{what} {text}: talk3d runs on cpu and cuda devices")
    return device
