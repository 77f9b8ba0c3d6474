"""Read EG3D / Talk3D release pickles without executing the code inside them.

Record format (learned from NVlabs/eg3d ``eg3d/torch_utils/persistence.py`` and torch's
``torch/_tensor.py``, ``torch/_utils.py``, ``torch/storage.py``, ``torch/nn/parameter.py``):

* A release file is ``pickle.dump(dict(training_set_kwargs=..., G=..., D=..., G_ema=...,
  augment_pipe=...))``. Each network is an instance of a class decorated with
  ``persistence.persistent_class``, whose ``__reduce__`` returns
  ``(torch_utils.persistence._reconstruct_persistent_obj, (meta,))`` with
  ``meta = dict(type='class', version=6, module_src=<source of the whole .py module>,
  class_name=<name>, state=<the object's __dict__>)``. The original loader ``exec``\\s
  ``module_src``; we never do: the record keeps only the source's SHA-256 and length.
* ``state`` is an ``nn.Module.__dict__``: ``_parameters``, ``_buffers``, ``_modules`` (dicts or
  OrderedDicts), ``_non_persistent_buffers_set``, ``training``, hook dicts, plus plain
  attributes and ``_init_args`` / ``_init_kwargs`` (the constructor arguments; nested dicts are
  often ``dnnlib.util.EasyDict``). Attributes such as ``weight_gain = lr / np.sqrt(n)`` are numpy
  float64 scalars, so numpy scalars (and, defensively, arrays) must be decodable.
* Sub-modules that are *not* persistent (torch's ``Sequential``/``Softplus``, EG3D's
  ``training.volumetric_rendering.renderer.ImportanceRenderer``, ``training.triplane.OSGDecoder``)
  are pickled by class reference + ``NEWOBJ`` + ``BUILD(__dict__)``: they become
  :class:`ModuleRecord`\\ s here; their class is never imported.
* Tensors: ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
  backward_hooks[, metadata])`` (``_rebuild_tensor_v3`` adds a dtype after an untyped storage);
  parameters: ``torch._utils._rebuild_parameter(data, requires_grad, backward_hooks)`` (or
  ``_rebuild_parameter_with_state``); storages: ``torch.storage._load_from_bytes(b)`` where ``b``
  is a legacy (non-zip) ``torch.save`` of the storage, which we read with
  ``torch.load(..., weights_only=True)``.

Every other global is refused with :class:`UnsafePickleError`.
"""
from __future__ import annotations

import collections
import hashlib
import io
import os
import pickle
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "UnsafePickleError",
    "PersistentRecord",
    "ModuleRecord",
    "ReleaseModel",
    "RestrictedUnpickler",
    "load_restricted",
    "read_release_pickle",
    "flatten_state_dict",
]


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle references a global (function/class) outside the allow-list."""


# --------------------------------------------------------------------------------------------
# Records: inert stand-ins for modules. They hold state, never behaviour.


class ModuleRecord:
    """A module pickled by class reference (``module.qualname``) whose class we never import.

    ``state`` is the pickled ``__dict__`` (``_parameters``, ``_buffers``, ``_modules``, ...).
    Subclasses are created per class name by :func:`_record_class`, so ``NEWOBJ``/``REDUCE`` on
    them only ever builds another record.
    """

    class_path = "?"

    def __new__(cls, *args, **kwargs):  # noqa: D102 - args of the real constructor are ignored
        obj = object.__new__(cls)
        obj.state = {}
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        # BUILD may deliver (dict_state, slot_state); modules only use the dict part.
        if isinstance(state, tuple) and len(state) == 2:
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"{self.class_path}: expected a dict state, got {type(state).__name__}")
        self.state = state

    @property
    def class_name(self) -> str:
        return self.class_path.rsplit(".", 1)[-1]

    def __repr__(self):
        return f"ModuleRecord({self.class_path!r}, keys={sorted(self.state)[:8]})"


@dataclass
class PersistentRecord:
    """One ``persistence.persistent_class`` object, decoded without running its source.

    ``module_src_sha256`` / ``module_src_len`` identify the embedded source (never executed).
    """

    class_name: str
    module_src_sha256: str
    module_src_len: int
    version: Any
    state: dict = field(repr=False)

    @property
    def class_path(self) -> str:
        return f"<persistent>.{self.class_name}"


_MODULE_LIKE = (ModuleRecord, PersistentRecord)


class _EasyDict(dict):
    """Stand-in for ``dnnlib.util.EasyDict`` (a dict with attribute access); plain data only."""

    def __setstate__(self, state):
        # EasyDict keeps its content as items; a BUILD state (rare) holds attributes = items.
        if isinstance(state, dict):
            self.update(state)


class _TypeMarker:
    """Non-callable stand-in for a class that a record may *name* but must never call
    (``numpy.ndarray`` in ``_reconstruct``, ``torch.Tensor`` in ``_rebuild_from_type_v2``)."""

    def __init__(self, path):
        self.path = path

    def __repr__(self):
        return f"<class reference {self.path}>"


_NDARRAY = _TypeMarker("numpy.ndarray")
_TENSOR = _TypeMarker("torch.Tensor")
_PARAMETER = _TypeMarker("torch.nn.parameter.Parameter")

_RECORD_CLASSES: dict[str, type] = {}


def _record_class(module: str, name: str) -> type:
    path = f"{module}.{name}"
    cls = _RECORD_CLASSES.get(path)
    if cls is None:
        cls = type(name, (ModuleRecord,), {"class_path": path, "__module__": __name__})
        _RECORD_CLASSES[path] = cls
    return cls


def _reconstruct_persistent(meta):
    """Replacement for ``torch_utils.persistence._reconstruct_persistent_obj``: no ``exec``."""
    if not isinstance(meta, dict):
        raise pickle.UnpicklingError(f"persistent object meta must be a dict, got {type(meta).__name__}")
    if meta.get("type", "class") != "class":
        raise pickle.UnpicklingError(f"unsupported persistent object type {meta.get('type')!r}")
    src = meta.get("module_src") or ""
    if not isinstance(src, str):
        raise pickle.UnpicklingError("persistent object module_src is not a string")
    state = meta.get("state")
    if state is None:
        state = {}
    if not isinstance(state, dict):
        raise pickle.UnpicklingError(f"persistent object state must be a dict, got {type(state).__name__}")
    return PersistentRecord(
        class_name=str(meta.get("class_name", "?")),
        module_src_sha256=hashlib.sha256(src.encode("utf-8", "surrogatepass")).hexdigest(),
        module_src_len=len(src),
        version=meta.get("version"),
        state=state,
    )


# --------------------------------------------------------------------------------------------
# Tensor rebuilders: validated re-implementations of torch._utils' functions.


def _load_storage_from_bytes(b):
    """``torch.storage._load_from_bytes`` with ``weights_only=True`` (torch's own safe loader)."""
    if not isinstance(b, (bytes, bytearray)):
        raise pickle.UnpicklingError("_load_from_bytes expects bytes")
    try:
        storage = torch.load(io.BytesIO(bytes(b)), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        # torch's weights-only unpickler refused a global inside the embedded bytes.
        raise UnsafePickleError(f"embedded torch storage refused by torch.load(weights_only=True): {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - any failure means the embedded bytes are bad
        raise ValueError(f"embedded torch storage could not be read (corrupt?): {exc}") from exc
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise pickle.UnpicklingError(f"_load_from_bytes produced {type(storage).__name__}, not a storage")
    return storage


def _check_geometry(size, stride, offset):
    ok = (
        isinstance(offset, int)
        and isinstance(size, tuple)
        and isinstance(stride, tuple)
        and len(size) == len(stride)
        and all(isinstance(v, int) for v in (*size, *stride))
    )
    if not ok:
        raise pickle.UnpicklingError("tensor record has malformed size/stride/offset")


def _tensor_from_storage(storage, offset, size, stride, dtype):
    _check_geometry(size, stride, offset)
    untyped = storage._untyped_storage if isinstance(storage, torch.TypedStorage) else storage
    if offset < 0 or any(v < 0 for v in (*size, *stride)):
        raise pickle.UnpicklingError(f"tensor record has a negative size/stride/offset: {size}, {stride}, {offset}")
    # set_ would silently *grow* a resizable storage (filling with uninitialised memory), so the
    # record must fit inside what was actually stored.
    itemsize = torch.empty((), dtype=dtype).element_size()
    needed = 0 if 0 in size else offset + 1 + sum((n - 1) * s for n, s in zip(size, stride))
    if needed * itemsize > untyped.nbytes():
        raise pickle.UnpicklingError(
            f"tensor record (size {size}, stride {stride}, offset {offset}) reaches outside its "
            f"{untyped.nbytes()}-byte storage"
        )
    return torch.empty((0,), dtype=dtype).set_(untyped, offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    if not isinstance(storage, torch.TypedStorage):
        raise pickle.UnpicklingError("_rebuild_tensor expects a typed storage")
    return _tensor_from_storage(storage, storage_offset, size, stride, storage.dtype)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    # backward_hooks are never restored (torch itself only keeps them for compatibility).
    t = _rebuild_tensor(storage, storage_offset, size, stride)
    if metadata:
        torch._utils.set_tensor_metadata(t, dict(metadata))
    return t.requires_grad_(bool(requires_grad)) if t.is_floating_point() or t.is_complex() else t


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    if not isinstance(storage, torch.UntypedStorage) or not isinstance(dtype, torch.dtype):
        raise pickle.UnpicklingError("_rebuild_tensor_v3 expects an untyped storage and a dtype")
    t = _tensor_from_storage(storage, storage_offset, size, stride, dtype)
    if metadata:
        torch._utils.set_tensor_metadata(t, dict(metadata))
    return t


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("_rebuild_parameter expects a tensor")
    # Python attributes on a Parameter (``state``) are dropped: weights are what we need.
    return torch.nn.Parameter(data, requires_grad=bool(requires_grad))


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in (_rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_tensor, _rebuild_parameter):
        raise UnsafePickleError("_rebuild_from_type_v2 with a non tensor-rebuild function")
    if new_type is not _TENSOR and new_type is not _PARAMETER:
        raise UnsafePickleError(f"_rebuild_from_type_v2 for tensor subclass {new_type!r}")
    t = func(*args)
    return torch.nn.Parameter(t, t.requires_grad) if new_type is _PARAMETER else t


# --------------------------------------------------------------------------------------------
# numpy: scalars appear as attributes (e.g. FullyConnectedLayer.weight_gain = lr / np.sqrt(n)).


def _np_dtype(*args):
    import numpy as np

    dt = np.dtype(*args)
    if dt.hasobject:
        raise UnsafePickleError("numpy object dtypes are not allowed (they carry arbitrary objects)")
    return dt


def _np_scalar(dtype, data=None):
    import numpy as np

    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError("numpy scalar record must be (non-object dtype, bytes)")
    # Return a plain Python number: downstream code wants plain data, not numpy types.
    return np.frombuffer(bytes(data), dtype=dtype, count=1)[0].item()


def _np_reconstruct(subtype, shape, typecode):
    import numpy as np

    if subtype is not _NDARRAY:
        raise UnsafePickleError(f"numpy _reconstruct of {subtype!r}")
    # BUILD then calls ndarray.__setstate__((version, shape, dtype, fortran, raw bytes)).
    return np.ndarray.__new__(np.ndarray, (0,), np.uint8)


def _np_frombuffer(buf, dtype, shape, order):
    import numpy as np

    # Protocol-5 spelling of an array (numpy's pickle_buffer path).
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(buf, (bytes, bytearray)):
        raise UnsafePickleError("numpy _frombuffer record must be (bytes, non-object dtype, ...)")
    if not isinstance(shape, tuple) or order not in ("C", "F"):
        raise pickle.UnpicklingError("numpy _frombuffer record has a malformed shape/order")
    return np.frombuffer(bytes(buf), dtype=dtype).reshape(shape, order=order).copy()


def _codecs_encode(text, encoding="utf-8"):
    # Protocol-2 pickles encode ``bytes`` as _codecs.encode(latin1-str, 'latin1').
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError("_codecs.encode only allowed as the protocol-2 bytes idiom")
    return text.encode("latin1")


def _bytearray(data=b"", encoding=None):
    # Only the two spellings pickle uses (bytes, or latin-1 text in protocol 2): an int argument
    # would allocate that many bytes.
    if isinstance(data, (bytes, bytearray)) and encoding is None:
        return bytearray(data)
    if isinstance(data, str) and encoding in ("latin1", "latin-1"):
        return bytearray(data, encoding)
    raise UnsafePickleError("bytearray record must be built from bytes")


def _copyreg_reconstructor(cls, base, state):
    # Protocol 0/1 spelling of "make an empty instance"; only our inert classes may be built.
    if not (isinstance(cls, type) and issubclass(cls, (ModuleRecord, _EasyDict, collections.OrderedDict))):
        raise UnsafePickleError(f"copyreg._reconstructor for {cls!r}")
    return cls.__new__(cls)


# --------------------------------------------------------------------------------------------
# The allow-list.

_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}

_EXACT: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("torch", "Tensor"): _TENSOR,
    ("torch.nn.parameter", "Parameter"): _PARAMETER,
    ("numpy", "ndarray"): _NDARRAY,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): _bytearray,
    ("builtins", "complex"): complex,
    ("builtins", "object"): object,  # only reachable as copyreg._reconstructor's base argument
    ("copyreg", "_reconstructor"): _copyreg_reconstructor,
    ("_codecs", "encode"): _codecs_encode,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("dnnlib", "EasyDict"): _EasyDict,
    ("numpy", "dtype"): _np_dtype,
    ("numpy.core.multiarray", "scalar"): _np_scalar,
    ("numpy._core.multiarray", "scalar"): _np_scalar,
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _np_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _np_frombuffer,
}

# Classes under these module prefixes become inert records (EG3D/Talk3D code lives in the
# ``training`` package; torch layers in ``torch.nn.modules``). Nothing is imported.
DEFAULT_RECORD_PREFIXES = ("torch.nn.modules.", "training.")


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only the allow-listed globals above.

    ``record_prefixes``: module prefixes whose classes are turned into :class:`ModuleRecord`.
    """

    def __init__(self, file, *, record_prefixes=DEFAULT_RECORD_PREFIXES):
        super().__init__(file)
        self._record_prefixes = tuple(record_prefixes)

    def find_class(self, module, name):
        module = _PY2_MODULES.get(module, module)
        hit = _EXACT.get((module, name))
        if hit is not None:
            return hit
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if any(module.startswith(p) for p in self._record_prefixes) and name.isidentifier():
            return _record_class(module, name)
        raise UnsafePickleError(f"refusing to load global '{module}.{name}': not on the allow-list of tensor/module records")

    def persistent_load(self, pid):
        raise UnsafePickleError(f"unexpected persistent id {pid!r}: release pickles do not use persistent ids")


# Errors the C unpickler raises on truncated or garbled input.
# RuntimeError: torch's set_ refusing a size/stride that reaches outside its storage.
_CORRUPT_ERRORS = (EOFError, pickle.UnpicklingError, ValueError, KeyError, IndexError, TypeError,
                   AttributeError, OverflowError, UnicodeDecodeError, RecursionError, RuntimeError,
                   MemoryError)


def load_restricted(path, *, record_prefixes=DEFAULT_RECORD_PREFIXES):
    """Unpickle ``path`` with :class:`RestrictedUnpickler`; errors name the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"release pickle not found: {path}")
    with open(path, "rb") as f:
        try:
            return RestrictedUnpickler(f, record_prefixes=record_prefixes).load()
        except UnsafePickleError as exc:
            raise UnsafePickleError(f"{path}: {exc}") from None
        except _CORRUPT_ERRORS as exc:
            raise ValueError(
                f"{path} is not a valid pickle or is truncated/corrupt ({type(exc).__name__}: {exc})"
            ) from exc


# --------------------------------------------------------------------------------------------
# Flattening records into a torch-style state dict.


def flatten_state_dict(record, prefix=""):
    """Flat ``OrderedDict[name -> tensor]`` like ``nn.Module.state_dict()``, e.g.
    ``backbone.mapping.fc0.weight``. Non-persistent buffers and ``None`` entries are skipped,
    exactly as torch does, so the names match a re-implementation's ``state_dict()``."""
    out = collections.OrderedDict()
    _flatten_into(record, prefix, out, seen=set())
    return out


def _flatten_into(record, prefix, out, seen):
    if id(record) in seen:  # a shared child is reported under its first name only (as torch does)
        return
    seen.add(id(record))
    state = record.state
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    for name, p in (state.get("_parameters") or {}).items():
        if p is not None:
            out[prefix + name] = _as_plain_tensor(p, prefix + name)
    for name, b in (state.get("_buffers") or {}).items():
        if b is not None and name not in non_persistent:
            out[prefix + name] = _as_plain_tensor(b, prefix + name)
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, _MODULE_LIKE):
            raise ValueError(f"sub-module '{prefix + name}' is a {type(child).__name__}, not a module record")
        _flatten_into(child, f"{prefix}{name}.", out, seen)


def _as_plain_tensor(t, name):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"'{name}' is a {type(t).__name__}, expected a tensor")
    return t.detach()


def _plain(obj):
    """EasyDict -> dict, records -> their class path: JSON-like data for ``init_kwargs``."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj) if type(obj) in (list, tuple) else tuple(_plain(v) for v in obj)
    if isinstance(obj, _MODULE_LIKE):
        return f"<module {obj.class_path}>"
    return obj


@dataclass
class ReleaseModel:
    """One network from a release pickle.

    ``state_dict``: flat ``OrderedDict[str, Tensor]`` (parameters + persistent buffers, CPU).
    ``init_kwargs`` / ``init_args``: constructor arguments recorded by ``persistent_class``.
    ``record``: the raw record tree, for attributes such as ``rendering_kwargs``.
    """

    class_name: str
    state_dict: "collections.OrderedDict[str, torch.Tensor]"
    init_kwargs: dict
    init_args: tuple
    keys_available: list
    record: Any = field(repr=False)


def read_release_pickle(path, key="G_ema", *, record_prefixes=DEFAULT_RECORD_PREFIXES) -> ReleaseModel:
    """Read network ``key`` (``'G_ema'``, ``'G'``, ``'D'``, ...) from an EG3D/Talk3D pickle.

    Never imports EG3D code or executes embedded source. Raises ``FileNotFoundError``,
    ``ValueError`` (truncated/corrupt/not a release pickle), ``KeyError`` (key absent; lists the
    available keys) or :class:`UnsafePickleError`.
    """
    data = load_restricted(path, record_prefixes=record_prefixes)
    if not isinstance(data, dict):
        raise ValueError(f"{os.fspath(path)}: top-level object is a {type(data).__name__}, expected the release dict {{'G', 'D', 'G_ema', ...}}")
    keys = sorted(str(k) for k in data)
    if key not in data:
        raise KeyError(f"{os.fspath(path)} has no entry {key!r}; available: {keys}")
    obj = data[key]
    if not isinstance(obj, _MODULE_LIKE):
        raise ValueError(f"{os.fspath(path)}[{key!r}] is a {type(obj).__name__}, not a network; available: {keys}")
    state = obj.state
    kwargs = state.get("_init_kwargs", state.get("init_kwargs")) or {}
    args = state.get("_init_args", state.get("init_args")) or ()
    return ReleaseModel(
        class_name=obj.class_name,
        state_dict=flatten_state_dict(obj),
        init_kwargs=_plain(dict(kwargs)),
        init_args=tuple(_plain(list(args))),
        keys_available=keys,
        record=obj,
    )
