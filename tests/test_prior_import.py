"""talk3d.prior: safe reading of EG3D-style release pickles, and talk3d checkpoints.

The release pickles here are built in the test with the same record format as EG3D's
``torch_utils/persistence.py`` (``_reconstruct_persistent_obj(meta)`` with
type/version/module_src/class_name/state) using fake ``torch_utils`` / ``training`` / ``dnnlib``
modules, which are removed from ``sys.modules`` before reading: the reader must not need them.
"""
import builtins
import collections
import contextlib
import hashlib
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch

from talk3d.prior import (
    FORMAT_VERSION,
    ModuleRecord,
    PersistentRecord,
    UnsafePickleError,
    check_state_dict,
    load_checkpoint,
    load_restricted,
    read_release_pickle,
    save_checkpoint,
)

FAKE_MODULES = ("torch_utils", "torch_utils.persistence", "training", "training.triplane", "dnnlib", "dnnlib.util")


# ---------------------------------------------------------------------------------------------
# Fake EG3D code, only present in sys.modules while a pickle is being written.


def _install_fakes():
    mods = {name: types.ModuleType(name) for name in FAKE_MODULES}

    def _reconstruct_persistent_obj(meta):  # never called by the reader under test
        raise AssertionError("the real reconstruct function must not be called")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mods["torch_utils.persistence"]._reconstruct_persistent_obj = _reconstruct_persistent_obj
    mods["torch_utils"].persistence = mods["torch_utils.persistence"]

    class EasyDict(dict):
        def __getattr__(self, name):
            return self[name]

    EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
    mods["dnnlib.util"].EasyDict = EasyDict

    # Non-persistent modules: pickled by class reference, as EG3D's OSGDecoder/ImportanceRenderer.
    class OSGDecoder(torch.nn.Module):
        def __init__(self, n_features, hidden):
            super().__init__()
            self.net = torch.nn.Sequential(
                FullyConnectedLayer(n_features, hidden), torch.nn.Softplus(), FullyConnectedLayer(hidden, 4)
            )

    class ImportanceRenderer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.plane_axes = torch.eye(3).expand(3, 3, 3).clone()  # plain attribute: not in state_dict

    for cls in (OSGDecoder, ImportanceRenderer):
        cls.__module__, cls.__qualname__ = "training.triplane", cls.__name__
        setattr(mods["training.triplane"], cls.__name__, cls)
    mods["training"].triplane = mods["training.triplane"]
    sys.modules.update(mods)
    return mods


@contextlib.contextmanager
def fake_eg3d_code():
    mods = _install_fakes()
    try:
        yield mods
    finally:
        for name in FAKE_MODULES:
            sys.modules.pop(name, None)


MODULE_SRC = "import torch\n\nclass FullyConnectedLayer(torch.nn.Module):\n    pass\n"


class Persistent(torch.nn.Module):
    """Pickles like a ``persistence.persistent_class`` instance (see EG3D persistence.py)."""

    module_src = MODULE_SRC

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src=self.module_src, class_name=type(self).__name__,
                    state=dict(self.__dict__))
        return (sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (meta,))


class FullyConnectedLayer(Persistent):
    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(out_features, in_features))
        self.bias = torch.nn.Parameter(torch.randn(out_features)) if bias else None
        self.weight_gain = 0.5 / np.sqrt(in_features)  # numpy float64, as in EG3D
        self._init_args = (in_features, out_features)
        self._init_kwargs = dict(bias=bias)


class MappingNetwork(Persistent):
    def __init__(self, dim):
        super().__init__()
        self.fc0 = FullyConnectedLayer(dim, dim)
        self.fc1 = FullyConnectedLayer(dim, dim, bias=False)
        self.register_buffer("w_avg", torch.randn(dim))
        self.lut = np.arange(6, dtype=np.float32).reshape(2, 3)  # numpy array attribute
        self.shape_attr = torch.Size([2, 3])
        self.dtype_attr = torch.float16
        self.device_attr = torch.device("cpu")


class SynthesisNetwork(Persistent):
    def __init__(self, dim):
        super().__init__()
        self.const = torch.nn.Parameter(torch.randn(dim, 4, 4))
        self.register_buffer("resample_filter", torch.randn(4, 4).half())
        self.register_buffer("scratch", torch.zeros(3), persistent=False)  # excluded, like torch
        self.register_buffer("counter", torch.arange(5))
        self.torgb = torch.nn.Conv2d(dim, 3, 1)


class Backbone(Persistent):
    def __init__(self, dim):
        super().__init__()
        self.mapping = MappingNetwork(dim)
        self.synthesis = SynthesisNetwork(dim)


class TriPlaneGenerator(Persistent):
    def __init__(self, mods, dim=8):
        super().__init__()
        tri = mods["training.triplane"]
        EasyDict = mods["dnnlib.util"].EasyDict
        self.backbone = Backbone(dim)
        self.renderer = tri.ImportanceRenderer()
        self.decoder = tri.OSGDecoder(dim, 16)
        self.rendering_kwargs = {"ray_start": 2.25, "depth_resolution": 48}
        self._init_args = ()
        self._init_kwargs = dict(z_dim=dim, c_dim=25, w_dim=dim, img_resolution=32, img_channels=3,
                                 mapping_kwargs=EasyDict(num_layers=2, lr_multiplier=0.01),
                                 rendering_kwargs=dict(self.rendering_kwargs))


def write_release(path, protocol=pickle.DEFAULT_PROTOCOL, src=MODULE_SRC):
    """Write a small release pickle; returns the expected ``G_ema`` state dict (cloned)."""
    with fake_eg3d_code() as mods:
        Persistent.module_src = src
        try:
            G = TriPlaneGenerator(mods).eval().requires_grad_(False)
            G_ema = TriPlaneGenerator(mods).eval().requires_grad_(False)
            D = Backbone(4).eval().requires_grad_(False)
            data = dict(training_set_kwargs=mods["dnnlib.util"].EasyDict(path="ffhq.zip", resolution=32),
                        G=G, D=D, G_ema=G_ema, augment_pipe=None)
            with open(path, "wb") as f:
                pickle.dump(data, f, protocol=protocol)
        finally:
            Persistent.module_src = MODULE_SRC
        expected = collections.OrderedDict((k, v.clone()) for k, v in G_ema.state_dict().items())
    return expected


# ---------------------------------------------------------------------------------------------
# Release pickles


@pytest.mark.parametrize("protocol", [2, 4, pickle.HIGHEST_PROTOCOL])
def test_reads_every_tensor_without_eg3d_code(tmp_path, protocol):
    path = tmp_path / "release.pkl"
    expected = write_release(path, protocol)
    assert not any(name in sys.modules for name in FAKE_MODULES)
    with open(path, "rb") as f, pytest.raises(ModuleNotFoundError):
        pickle.load(f)  # the plain loader needs EG3D's code; ours must not

    model = read_release_pickle(path)
    assert model.class_name == "TriPlaneGenerator"
    assert model.keys_available == ["D", "G", "G_ema", "augment_pipe", "training_set_kwargs"]
    assert list(model.state_dict) == list(expected)  # same names, same order as nn.Module
    for name, want in expected.items():
        got = model.state_dict[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got, want), name
    # Children from every route: persistent, torch.nn by class, training.* by class, buffers.
    for name in ("backbone.mapping.fc0.weight", "backbone.mapping.fc0.bias", "backbone.mapping.w_avg",
                 "backbone.synthesis.resample_filter", "backbone.synthesis.counter",
                 "backbone.synthesis.torgb.weight", "decoder.net.0.weight", "decoder.net.2.bias"):
        assert name in model.state_dict
    assert "backbone.mapping.fc1.bias" not in model.state_dict  # registered as None
    assert "backbone.synthesis.scratch" not in model.state_dict  # non-persistent buffer

    assert model.init_kwargs == dict(z_dim=8, c_dim=25, w_dim=8, img_resolution=32, img_channels=3,
                                     mapping_kwargs={"num_layers": 2, "lr_multiplier": 0.01},
                                     rendering_kwargs={"ray_start": 2.25, "depth_resolution": 48})
    assert type(model.init_kwargs["mapping_kwargs"]) is dict  # EasyDict became plain data
    assert model.init_args == ()


def test_record_tree_exposes_attributes(tmp_path):
    path = tmp_path / "release.pkl"
    write_release(path)
    rec = read_release_pickle(path).record
    assert isinstance(rec, PersistentRecord)
    assert rec.module_src_len == len(MODULE_SRC)
    assert rec.module_src_sha256 == hashlib.sha256(MODULE_SRC.encode()).hexdigest()
    assert rec.state["rendering_kwargs"]["ray_start"] == 2.25
    decoder = rec.state["_modules"]["decoder"]
    assert isinstance(decoder, ModuleRecord) and decoder.class_path == "training.triplane.OSGDecoder"
    assert decoder.state["_modules"]["net"].class_path == "torch.nn.modules.container.Sequential"
    assert torch.equal(rec.state["_modules"]["renderer"].state["plane_axes"], torch.eye(3).expand(3, 3, 3))
    mapping = rec.state["_modules"]["backbone"].state["_modules"]["mapping"]
    fc0 = mapping.state["_modules"]["fc0"]
    assert type(fc0.state["weight_gain"]) is float and fc0.state["weight_gain"] == pytest.approx(0.5 / np.sqrt(8))
    np.testing.assert_array_equal(mapping.state["lut"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert mapping.state["shape_attr"] == torch.Size([2, 3])
    assert mapping.state["dtype_attr"] is torch.float16
    assert mapping.state["device_attr"] == torch.device("cpu")


def test_numpy_1x_module_names(tmp_path):
    # Release pickles predate numpy 2, which renamed numpy.core -> numpy._core. Protocol 2 spells
    # globals as text lines, so the older name can be substituted byte-for-byte.
    path = tmp_path / "release.pkl"
    expected = write_release(path, protocol=2)
    blob = path.read_bytes()
    assert b"cnumpy._core.multiarray\nscalar\n" in blob
    path.write_bytes(blob.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    model = read_release_pickle(path)
    assert list(model.state_dict) == list(expected)
    fc0 = model.record.state["_modules"]["backbone"].state["_modules"]["mapping"].state["_modules"]["fc0"]
    assert fc0.state["weight_gain"] == pytest.approx(0.5 / np.sqrt(8))


def test_out_of_bounds_tensor_record(tmp_path):
    # A record whose size/stride/offset reach past the stored bytes must not be "fixed" by
    # torch's set_, which would grow the storage with uninitialised memory.
    storage = torch.storage.TypedStorage(wrap_storage=torch.arange(4.0).untyped_storage(), dtype=torch.float32,
                                         _internal=True)
    hooks = collections.OrderedDict()
    for size, stride, offset in [((1000,), (1,), 0), ((2, 2), (2, 1), 1), ((4,), (1,), 1)]:
        path = tmp_path / "oob.pkl"
        _write(path, {"G_ema": _Reduce(torch._utils._rebuild_tensor_v2, (storage, offset, size, stride, False, hooks))})
        with pytest.raises(ValueError, match="reaches outside its 16-byte storage"):
            read_release_pickle(path)
    # ... while an in-bounds view with an offset is fine.
    _write(path, {"w": _Reduce(torch._utils._rebuild_tensor_v2, (storage, 1, (3,), (1,), False, hooks))})
    assert torch.equal(load_restricted(path)["w"], torch.tensor([1.0, 2.0, 3.0]))


def test_other_keys(tmp_path):
    path = tmp_path / "release.pkl"
    write_release(path)
    d = read_release_pickle(path, key="D")
    assert d.class_name == "Backbone" and "mapping.fc0.weight" in d.state_dict
    with pytest.raises(KeyError, match=r"'nope'.*available: \['D', 'G', 'G_ema', 'augment_pipe', 'training_set_kwargs'\]"):
        read_release_pickle(path, key="nope")
    with pytest.raises(ValueError, match="not a network"):
        read_release_pickle(path, key="training_set_kwargs")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="release pickle not found"):
        read_release_pickle(tmp_path / "absent.pkl")


def test_truncated_and_garbage_pickles(tmp_path):
    path = tmp_path / "release.pkl"
    write_release(path)
    blob = path.read_bytes()
    for cut in (1, 40, len(blob) // 3, len(blob) // 2, len(blob) - 1):
        bad = tmp_path / f"cut{cut}.pkl"
        bad.write_bytes(blob[:cut])
        with pytest.raises(ValueError, match="not a valid pickle or is truncated") as info:
            read_release_pickle(bad)
        assert str(bad) in str(info.value)
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    with pytest.raises(ValueError, match="not a valid pickle"):
        read_release_pickle(junk)


# ---------------------------------------------------------------------------------------------
# Malicious pickles: refused, and nothing runs.


class _Reduce:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def _write(path, obj, protocol=pickle.DEFAULT_PROTOCOL):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


@pytest.mark.parametrize(
    "make, global_name",
    [
        (lambda m: _Reduce(os.system, (f"touch {m}",)), f"{os.system.__module__}.system"),
        (lambda m: _Reduce(builtins.eval, (f"open({str(m)!r}, 'w').close()",)), "builtins.eval"),
        (lambda m: _Reduce(builtins.exec, (f"open({str(m)!r}, 'w').close()",)), "builtins.exec"),
        (lambda m: _Reduce(getattr, ("text", "upper")), "builtins.getattr"),
        (lambda m: _Reduce(np.load, (str(m),)), "numpy.load"),
        (lambda m: _Reduce(torch.load, (str(m),)), "torch.serialization.load"),
    ],
)
def test_malicious_globals_are_refused(tmp_path, make, global_name):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    # Hide the payload inside an otherwise normal-looking module state.
    _write(path, {"G_ema": {"_parameters": collections.OrderedDict(w=torch.ones(2)), "hook": make(marker)}})
    with pytest.raises(UnsafePickleError, match=f"'{global_name}'"):
        read_release_pickle(path)
    assert not marker.exists()


def test_malicious_payload_inside_storage_bytes(tmp_path):
    marker = tmp_path / "pwned"
    inner = pickle.dumps(_Reduce(os.system, (f"touch {marker}",)), protocol=2)
    _write(tmp_path / "evil.pkl", {"G_ema": _Reduce(torch.storage._load_from_bytes, (inner,))})
    with pytest.raises(UnsafePickleError, match="weights_only"):
        read_release_pickle(tmp_path / "evil.pkl")
    assert not marker.exists()


def test_unknown_class_is_refused(tmp_path):
    _write(tmp_path / "odd.pkl", {"G_ema": collections.Counter(a=1)})
    with pytest.raises(UnsafePickleError, match="'collections.Counter'"):
        read_release_pickle(tmp_path / "odd.pkl")


def test_module_src_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    src = f"open({str(marker)!r}, 'w').write('executed')\n" + MODULE_SRC
    path = tmp_path / "release.pkl"
    expected = write_release(path, src=src)
    model = read_release_pickle(path)
    assert not marker.exists()
    assert model.record.module_src_len == len(src)
    assert list(model.state_dict) == list(expected)


# ---------------------------------------------------------------------------------------------
# talk3d checkpoints

CONFIG = {
    "architecture": {"z_dim": 8, "w_dim": 8, "plane_channels": 32, "plane_resolution": 256},
    "plane_convention": "fixed",
    "rendering": {"ray_start": 2.25, "ray_end": 3.3, "depth_resolution": 48},
    "camera": {"radius": 2.7, "fov_deg": 18.837},
}


def _state():
    base = torch.randn(4, 6)
    return collections.OrderedDict(
        [("a.weight", base), ("a.bias", torch.randn(4)), ("tied", base), ("view", base[1:3]),
         ("half", torch.randn(2, 3).half()), ("steps", torch.arange(7)), ("empty", torch.zeros(0))]
    )


@pytest.mark.parametrize("ext", [".safetensors", ".pt"])
def test_checkpoint_round_trip(tmp_path, ext):
    path = tmp_path / f"model{ext}"
    sd = _state()
    stored = save_checkpoint(path, sd, CONFIG)
    loaded, config = load_checkpoint(path)
    assert sorted(loaded) == sorted(sd)  # safetensors lists names sorted; .pt keeps the order
    for k, v in sd.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    assert config == stored
    assert {k: config[k] for k in CONFIG} == CONFIG
    assert config["format_version"] == FORMAT_VERSION
    assert config["torch_version"] == torch.__version__
    assert isinstance(config["talk3d_version"], str)


@pytest.mark.parametrize("ext", [".safetensors", ".pt"])
def test_checkpoint_refuses_overwrite(tmp_path, ext):
    path = tmp_path / f"model{ext}"
    save_checkpoint(path, _state(), CONFIG)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        save_checkpoint(path, {"x": torch.ones(1)}, CONFIG)
    assert path.read_bytes() == before
    save_checkpoint(path, {"x": torch.ones(1)}, CONFIG, overwrite=True)
    assert list(load_checkpoint(path)[0]) == ["x"]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left behind


@pytest.mark.parametrize("ext", [".safetensors", ".pt"])
def test_checkpoint_corrupt_files(tmp_path, ext):
    good = tmp_path / f"good{ext}"
    save_checkpoint(good, _state(), CONFIG)
    blob = good.read_bytes()
    rng = np.random.default_rng(1)
    cases = {
        "random": bytes(rng.integers(0, 256, 2048, dtype=np.uint8)),
        "truncated": blob[: len(blob) // 2],
        "tiny": blob[:5],
        "empty": b"",
    }
    for name, data in cases.items():
        bad = tmp_path / f"{name}{ext}"
        bad.write_bytes(data)
        with pytest.raises(ValueError, match="corrupt") as info:
            load_checkpoint(bad)
        assert str(bad) in str(info.value), name


def test_checkpoint_missing_file_config_and_version(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    bare = tmp_path / "bare.safetensors"
    save_file({"x": torch.ones(2)}, bare)
    with pytest.raises(ValueError, match="no talk3d config"):
        load_checkpoint(bare)
    bare_pt = tmp_path / "bare.pt"
    torch.save({"state_dict": {"x": torch.ones(2)}}, bare_pt)
    with pytest.raises(ValueError, match="no talk3d config"):
        load_checkpoint(bare_pt)
    future = tmp_path / "future.pt"
    torch.save({"state_dict": {"x": torch.ones(2)}, "config": dict(CONFIG, format_version=99)}, future)
    with pytest.raises(ValueError, match="format_version is 99"):
        load_checkpoint(future)
    with pytest.raises(ValueError, match="plane_convention"):
        save_checkpoint(tmp_path / "bad.safetensors", {"x": torch.ones(1)}, dict(CONFIG, plane_convention="yz"))
    with pytest.raises(ValueError, match="missing required key 'architecture'"):
        save_checkpoint(tmp_path / "bad.safetensors", {"x": torch.ones(1)}, {"plane_convention": "eg3d"})
    with pytest.raises(ValueError, match="unknown checkpoint extension"):
        save_checkpoint(tmp_path / "bad.bin", {"x": torch.ones(1)}, CONFIG)


def test_pt_checkpoint_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "config": _Reduce(os.system, (f"touch {marker}",))}, path)
    with pytest.raises(ValueError, match="weights-only"):
        load_checkpoint(path)
    assert not marker.exists()


def test_check_state_dict_report():
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    sd = dict(module.state_dict())
    assert check_state_dict(module, sd).ok

    sd.pop("0.bias")
    sd["1.weight"] = torch.zeros(5)
    sd["extra"] = torch.zeros(1)
    report = check_state_dict(module, sd)
    assert report.missing == ["0.bias"]
    assert report.unexpected == ["extra"]
    assert report.mismatched == [("1.weight", torch.Size([4]), (5,))]
    with pytest.raises(ValueError, match=r"1 missing: 0\.bias; 1 unexpected: extra; 1 shape mismatch: "
                                         r"1\.weight: expected \(4,\), got \(5,\)"):
        check_state_dict(module, sd, strict=True)

    expected = {f"w{i}": (2, 2) for i in range(30)}
    report = check_state_dict(expected, {"w0": torch.zeros(2, 2)})
    assert len(report.missing) == 29
    with pytest.raises(ValueError, match=r"29 missing: w1, .*w20 \.\.\. and 9 more"):
        report.raise_if_bad()
