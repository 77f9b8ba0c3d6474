"""talk3d's own checkpoint format: plain tensors + a JSON config, no pickled code.

Two containers, chosen by extension:

* ``.safetensors`` (preferred): weights via safetensors; the config is JSON stored in the file's
  string->string metadata under ``"talk3d_config"``.
* ``.pt`` / ``.pth``: ``torch.save({'state_dict': ..., 'config': ...})``, read back with
  ``torch.load(weights_only=True)`` so a tampered file cannot run code.

The config is a JSON-able dict. Required: ``architecture`` (dict of sizes) and
``plane_convention`` (``'eg3d'`` or ``'fixed'``: which triplane axis layout the weights assume).
Usual extras: ``rendering`` and ``camera`` dicts. ``save_checkpoint`` stamps ``format_version``,
``talk3d_version`` and ``torch_version``.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Mapping

import torch

__all__ = [
    "FORMAT_VERSION",
    "PLANE_CONVENTIONS",
    "save_checkpoint",
    "load_checkpoint",
    "StateDictReport",
    "check_state_dict",
]

FORMAT_VERSION = 1
PLANE_CONVENTIONS = ("eg3d", "fixed")
_META_KEY = "talk3d_config"
_SAFETENSORS_EXT = (".safetensors",)
_TORCH_EXT = (".pt", ".pth")


def _talk3d_version() -> str:
    try:
        from talk3d import __version__
    except ImportError:  # the package import failed part-way (e.g. missing extension); not fatal
        return "unknown"
    return __version__


def _container(path: str) -> str:
    low = path.lower()
    if low.endswith(_SAFETENSORS_EXT):
        return "safetensors"
    if low.endswith(_TORCH_EXT):
        return "torch"
    raise ValueError(f"{path}: unknown checkpoint extension; use .safetensors (preferred) or .pt/.pth")


def _validate_config(config, path: str, *, loading: bool) -> None:
    where = f"{path}: " if path else ""
    if not isinstance(config, dict):
        raise ValueError(f"{where}config must be a dict, got {type(config).__name__}")
    for key in ("architecture", "plane_convention"):
        if key not in config:
            raise ValueError(f"{where}config is missing required key {key!r}")
    if not isinstance(config["architecture"], dict):
        raise ValueError(f"{where}config['architecture'] must be a dict of sizes")
    if config["plane_convention"] not in PLANE_CONVENTIONS:
        raise ValueError(f"{where}config['plane_convention'] is {config['plane_convention']!r}, expected one of {PLANE_CONVENTIONS}")
    if loading:
        version = config.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"{where}checkpoint format_version is {version!r}; this talk3d reads version {FORMAT_VERSION}")


def _plain_tensors(state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """Detached, contiguous CPU tensors; aliases are cloned because safetensors refuses shared
    storage (tied weights are stored twice, which is fine at our sizes)."""
    out, seen = OrderedDict(), set()
    for name, t in state_dict.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise TypeError(f"state_dict entries must be str -> Tensor; got {name!r} -> {type(t).__name__}")
        t = t.detach().to("cpu").contiguous()
        ptr = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        out[name] = t
    return out


def save_checkpoint(path, state_dict: Mapping[str, torch.Tensor], config: dict, *, overwrite: bool = False) -> dict:
    """Write ``state_dict`` (name -> tensor) and ``config`` to ``path``; returns the stored config.

    Refuses to replace an existing file unless ``overwrite=True`` (``FileExistsError``). The
    file is written to a temporary sibling then renamed, so a crash never leaves half a file.
    """
    path = os.fspath(path)
    kind = _container(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    _validate_config(config, path, loading=False)
    stored = dict(config, format_version=FORMAT_VERSION, talk3d_version=_talk3d_version(), torch_version=torch.__version__)
    try:
        config_json = json.dumps(stored, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: config is not JSON-serialisable: {exc}") from exc
    tensors = _plain_tensors(state_dict)

    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=directory)
    os.close(fd)
    try:
        if kind == "safetensors":
            from safetensors.torch import save_file

            save_file(dict(tensors), tmp, metadata={_META_KEY: config_json})
        else:
            torch.save({"state_dict": tensors, "config": json.loads(config_json)}, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return stored


def load_checkpoint(path):
    """Read a checkpoint written by :func:`save_checkpoint`.

    Returns ``(state_dict, config)`` with CPU tensors. Raises ``FileNotFoundError``, or
    ``ValueError`` naming the file when it is corrupt/truncated, lacks a config, or has another
    format version.
    """
    path = os.fspath(path)
    kind = _container(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if kind == "safetensors":
        state_dict, config = _load_safetensors(path)
    else:
        state_dict, config = _load_torch(path)
    _validate_config(config, path, loading=True)
    return state_dict, config


def _load_safetensors(path):
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state_dict = OrderedDict((name, f.get_tensor(name)) for name in f.keys())
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file (corrupt or truncated): {exc}") from exc
    if _META_KEY not in metadata:
        raise ValueError(f"{path} has no talk3d config (metadata key {_META_KEY!r} missing); was it written by save_checkpoint?")
    try:
        config = json.loads(metadata[_META_KEY])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: talk3d config metadata is not valid JSON: {exc}") from exc
    return state_dict, config


def _load_torch(path):
    import pickle

    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # Either garbage bytes or a pickle that references code: both are unusable here.
        raise ValueError(f"{path} is corrupt, truncated or not a weights-only torch file: {exc}") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable torch checkpoint (corrupt or truncated): {exc}") from exc
    if not isinstance(blob, dict) or "state_dict" not in blob:
        raise ValueError(f"{path} is not a talk3d checkpoint (expected a dict with 'state_dict' and 'config')")
    if "config" not in blob:
        raise ValueError(f"{path} has no talk3d config; was it written by save_checkpoint?")
    return OrderedDict(blob["state_dict"]), blob["config"]


# --------------------------------------------------------------------------------------------


@dataclass
class StateDictReport:
    """Differences between expected names/shapes and a state dict.

    ``mismatched`` holds ``(name, expected_shape, found_shape)`` tuples.
    """

    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    mismatched: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 20) -> str:
        parts = []
        for title, items, fmt in (
            ("missing", self.missing, str),
            ("unexpected", self.unexpected, str),
            ("shape mismatch", self.mismatched, lambda m: f"{m[0]}: expected {tuple(m[1])}, got {tuple(m[2])}"),
        ):
            if items:
                shown = ", ".join(fmt(x) for x in items[:limit])
                more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
                parts.append(f"{len(items)} {title}: {shown}{more}")
        return "; ".join(parts) if parts else "state dict matches"

    def raise_if_bad(self, what: str = "state dict") -> None:
        """Raise ``ValueError`` listing (first 20 of each kind + counts) when anything differs."""
        if not self.ok:
            raise ValueError(f"{what} does not match the expected parameters: {self.describe()}")


def read_weights_file(path, what: str) -> dict:
    """A third-party weight file (a bare state dict or ``{"state_dict": ...}``, as Wav2Lip's and
    pytorch-fid's files are) -> ``{name: tensor}``, read with ``torch.load(weights_only=True)``.

    ``what`` names the file's kind in errors ("SyncNet weights", ...). Raises ValueError naming
    the file when it is corrupt, truncated, holds code, or is not a dict of tensors.
    """
    import pickle
    import zipfile

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise ValueError(f"{what} {path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from exc
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{what} {path}: expected a dict of tensors or {{'state_dict': ...}}, got {type(obj).__name__}")
    return dict(state)


def check_state_dict(module_or_expected, state_dict: Mapping[str, torch.Tensor], *, strict: bool = False) -> StateDictReport:
    """Compare ``state_dict`` with an ``nn.Module`` or a ``{name: shape}`` mapping.

    Shapes may be ``torch.Size``, tuples or tensors. With ``strict=True`` any difference raises
    ``ValueError`` (see :meth:`StateDictReport.raise_if_bad`).
    """
    if isinstance(module_or_expected, torch.nn.Module):
        expected = {k: v.shape for k, v in module_or_expected.state_dict().items()}
    else:
        expected = {k: (v.shape if isinstance(v, torch.Tensor) else torch.Size(v)) for k, v in module_or_expected.items()}
    report = StateDictReport(
        missing=[k for k in expected if k not in state_dict],
        unexpected=[k for k in state_dict if k not in expected],
        mismatched=[
            (k, torch.Size(expected[k]), tuple(state_dict[k].shape))
            for k in expected
            if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k])
        ],
    )
    if strict:
        report.raise_if_bad()
    return report
