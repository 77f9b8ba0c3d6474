"""FID Inception-v3: architecture (keys, shapes, FID-specific pooling), loading a file in
pytorch-fid's format, refusal of bad files, and the weight search order. No network access and
no real weights: the weight files are written here with random values in the real file's layout."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from talk3d.evaluate import inception as I
from talk3d.evaluate.inception import (
    INCEPTION_ENV,
    INCEPTION_FILE,
    FIDInception,
    find_inception_weights,
    inception_status,
    load_fid_inception,
)

SEED = 0
# The hand-written references run in float64, as does the block under test (a double copy):
# only summation order differs, so agreement far below float32 resolution is expected.
F64_ATOL = 1e-10
# torchvision's Inception3 has 27,161,264 parameters; without fc (2,049,000) and AuxLogits
# (3,326,696) that leaves exactly this many.
EXPECTED_PARAMS = 21_785_568


# ------------------------------------------------------------------------------------------------
# Fixtures: one seeded network, its features and intermediate shapes, and a pytorch-fid-style file
# ------------------------------------------------------------------------------------------------
def randomize_(net: torch.nn.Module, seed: int = SEED) -> torch.nn.Module:
    """Seeded He-scaled convs and non-trivial BatchNorm statistics, so activations stay O(1)
    through the whole stack (defaults would shrink them and hide mistakes in BN handling)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            elif isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return net


@pytest.fixture(scope="module")
def net() -> FIDInception:
    return randomize_(FIDInception())


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED + 1)
    return torch.rand(2, 3, 299, 299, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def run_299(net, images):
    """(features [2, 2048], {block name: output shape}) of one forward pass at 299 x 299."""
    shapes = {}
    handles = [getattr(net, name).register_forward_hook(
        lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape)))
        for name in ("Conv2d_4a_3x3", "Mixed_5d", "Mixed_6a", "Mixed_6e", "Mixed_7a", "Mixed_7c")]
    try:
        with torch.no_grad():
            feats = net(images)
    finally:
        for h in handles:
            h.remove()
    return feats, shapes


def pytorch_fid_state(net: FIDInception) -> dict:
    """The network's weights in pytorch-fid's file layout: plus classifier, aux head, step counters."""
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    sd["fc.weight"] = torch.zeros(1008, 2048)
    sd["fc.bias"] = torch.zeros(1008)
    sd["AuxLogits.conv0.conv.weight"] = torch.zeros(128, 768, 1, 1)
    sd["AuxLogits.conv0.bn.num_batches_tracked"] = torch.tensor(0)
    sd["Conv2d_1a_3x3.bn.num_batches_tracked"] = torch.tensor(7)
    return sd


@pytest.fixture(scope="module")
def weights_file(net, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / INCEPTION_FILE
    torch.save(pytorch_fid_state(net), path)
    return path


@pytest.fixture(scope="module")
def loaded(weights_file) -> FIDInception:
    return load_fid_inception(weights_file)


# ------------------------------------------------------------------------------------------------
# Architecture
# ------------------------------------------------------------------------------------------------
def test_keys_and_shapes_match_pytorch_fid_layout(net):
    sd = net.state_dict()
    assert sum(p.numel() for p in net.parameters()) == EXPECTED_PARAMS
    # A few of the real file's keys and shapes (torchvision Inception3 naming).
    spot = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_4a_3x3.bn.running_var": (192,),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6b.branch7x7dbl_5.conv.weight": (192, 128, 1, 7),
        "Mixed_6e.branch7x7_3.conv.weight": (192, 192, 7, 1),
        "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
        "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
        "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    }
    for k, shape in spot.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any(k.startswith(("fc.", "AuxLogits.")) for k in sd)
    assert all(k.split(".")[-2] in ("conv", "bn") for k in sd)  # every layer is a BasicConv2d


def test_load_pytorch_fid_file_is_bit_exact(net, loaded, images, run_299):
    assert loaded.state_dict().keys() == net.state_dict().keys()
    for k, v in net.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(loaded.state_dict()[k], v), k
    assert not loaded.training
    with torch.no_grad():
        feats = loaded(images)
    ref = run_299[0]
    assert ref.std() > 0  # the comparison means something only if the features vary
    assert torch.equal(feats, ref)


def test_state_dict_nested_under_state_dict(net, tmp_path):
    path = tmp_path / "nested.pth"
    torch.save({"state_dict": pytorch_fid_state(net)}, path)
    other = load_fid_inception(path)
    w = "Mixed_7c.branch3x3dbl_3b.conv.weight"
    assert torch.equal(other.state_dict()[w], net.state_dict()[w])


def test_intermediate_shapes_at_299(run_299):
    feats, shapes = run_299
    assert shapes["Conv2d_4a_3x3"] == (2, 192, 71, 71)
    assert shapes["Mixed_5d"] == (2, 288, 35, 35)
    assert shapes["Mixed_6a"] == (2, 768, 17, 17)
    assert shapes["Mixed_6e"] == (2, 768, 17, 17)
    assert shapes["Mixed_7a"] == (2, 1280, 8, 8)
    assert shapes["Mixed_7c"] == (2, 2048, 8, 8)
    assert feats.shape == (2, 2048) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all() and (feats >= 0).all()  # ReLU, then an average


def test_other_size_is_resized(net):
    seen = {}
    h = net.Conv2d_1a_3x3.register_forward_pre_hook(lambda _m, args: seen.__setitem__("in", args[0].shape))
    try:
        with torch.no_grad():
            feats = net(torch.rand(1, 3, 64, 64) * 2 - 1)
    finally:
        h.remove()
    assert tuple(seen["in"]) == (1, 3, 299, 299)
    assert feats.shape == (1, 2048) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all() and (feats >= 0).all()


def test_always_eval(net):
    net.train()
    assert not net.training and not any(m.training for m in net.modules())
    assert not any(p.requires_grad for p in net.parameters())


# ------------------------------------------------------------------------------------------------
# Hand-checked pieces: BasicConv2d and the FID-specific pooling
# ------------------------------------------------------------------------------------------------
def ref_basic_conv(x: torch.Tensor, layer: I.BasicConv2d) -> torch.Tensor:
    """Conv (no bias) as an explicit patch product, inference BN from its formula, ReLU."""
    conv, bn = layer.conv, layer.bn
    w = conv.weight  # [C_out, C_in, kh, kw]
    kh, kw = w.shape[-2:]
    patches = F.unfold(x, (kh, kw), padding=conv.padding, stride=conv.stride)  # [B, C_in kh kw, L]
    h_out = (x.shape[2] + 2 * conv.padding[0] - kh) // conv.stride[0] + 1
    w_out = (x.shape[3] + 2 * conv.padding[1] - kw) // conv.stride[1] + 1
    y = torch.einsum("ok,bkl->bol", w.flatten(1), patches).reshape(x.shape[0], -1, h_out, w_out)
    scale = bn.weight / torch.sqrt(bn.running_var + 0.001)
    y = (y - bn.running_mean[:, None, None]) * scale[:, None, None] + bn.bias[:, None, None]
    return y.clamp_min(0)


def ref_avg_pool_exclude_pad(x: torch.Tensor) -> torch.Tensor:
    """3x3 / stride 1 / pad 1 average over real pixels only: padded window sum / padded window count."""
    ones = torch.ones_like(x[:, :1])
    window_sum = lambda t: F.unfold(F.pad(t, (1, 1, 1, 1)), 3).unflatten(1, (t.shape[1], 9)).sum(2)  # noqa: E731
    total = window_sum(x).reshape(x.shape)
    count = window_sum(ones).reshape(ones.shape)
    return total / count


def ref_max_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    padded = F.pad(x, (1, 1, 1, 1), value=float("-inf"))
    return F.unfold(padded, 3).unflatten(1, (x.shape[1], 9)).amax(2).reshape(x.shape)


def test_basic_conv_matches_formula(net):
    layer = copy.deepcopy(net.Mixed_6b.branch7x7dbl_2).double()  # a (7, 1) kernel with (3, 0) padding
    x = torch.randn(2, 128, 9, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), ref_basic_conv(x, layer), atol=F64_ATOL, rtol=0)
    layer = copy.deepcopy(net.Conv2d_1a_3x3).double()  # stride 2, no padding
    x = torch.randn(1, 3, 11, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(x), ref_basic_conv(x, layer), atol=F64_ATOL, rtol=0)


def test_pool_branch_excludes_padding_from_average(net):
    block = copy.deepcopy(net.Mixed_5b).double()
    x = torch.rand(1, 192, 7, 7, dtype=torch.float64) + 0.5  # positive, so padding zeros would show
    pool_out = block(x)[:, -32:]  # the pool branch is last: 64 + 64 + 96 + 32 channels
    expected = ref_basic_conv(ref_avg_pool_exclude_pad(x), block.branch_pool)
    torch.testing.assert_close(pool_out, expected, atol=F64_ATOL, rtol=0)
    # The check is sensitive: torchvision's default (zeros counted) gives other border values.
    including = ref_basic_conv(F.avg_pool2d(x, 3, 1, 1, count_include_pad=True), block.branch_pool)
    assert (including - pool_out).abs().max() > 1e-3


def test_mixed_7b_averages_and_mixed_7c_max_pools(net):
    g = torch.Generator().manual_seed(SEED + 2)
    for name, c_in, ref_pool, other_pool in (
            ("Mixed_7b", 1280, ref_avg_pool_exclude_pad, ref_max_pool_3x3),
            ("Mixed_7c", 2048, ref_max_pool_3x3, ref_avg_pool_exclude_pad)):
        block = copy.deepcopy(getattr(net, name)).double()
        x = torch.rand(1, c_in, 5, 5, generator=g, dtype=torch.float64)
        out = block(x)
        assert out.shape == (1, 2048, 5, 5)
        expected = ref_basic_conv(ref_pool(x), block.branch_pool)
        torch.testing.assert_close(out[:, -192:], expected, atol=F64_ATOL, rtol=0, msg=name)
        # Max and average pooling of this input give clearly different branch outputs.
        wrong = ref_basic_conv(other_pool(x), block.branch_pool)
        assert (wrong - out[:, -192:]).abs().max() > 1e-3, name


# ------------------------------------------------------------------------------------------------
# Bad files
# ------------------------------------------------------------------------------------------------
def _drop(sd, key):
    del sd[key]


@pytest.mark.parametrize("change,message,key", [
    (lambda sd: _drop(sd, "Mixed_6c.branch7x7_2.bn.running_mean"), "1 missing", "Mixed_6c.branch7x7_2.bn.running_mean"),
    # Mixed_5c's pool width in Mixed_5b
    (lambda sd: sd.__setitem__("Mixed_5b.branch_pool.conv.weight", torch.zeros(64, 192, 1, 1)), "1 shape mismatch",
     "Mixed_5b.branch_pool.conv.weight"),
    (lambda sd: sd.__setitem__("Mixed_8a.conv.weight", torch.zeros(1)), "1 unexpected", "Mixed_8a.conv.weight"),
])
def test_mismatched_file_is_named(net, tmp_path, change, message, key):
    """A missing, misshaped or unexpected entry: refused, naming the file and the entry."""
    sd = pytorch_fid_state(net)
    change(sd)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=message) as e:
        load_fid_inception(path)
    assert str(path) in str(e.value) and key in str(e.value)


def test_corrupt_file_is_named(tmp_path):
    path = tmp_path / INCEPTION_FILE
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(SEED),
                                   dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(ValueError, match="not a readable torch checkpoint") as e:
        load_fid_inception(path)
    assert str(path) in str(e.value)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="dict of tensors"):
        load_fid_inception(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_fid_inception(path)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        find_inception_weights(path)


# ------------------------------------------------------------------------------------------------
# Search order and status
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def no_weights(monkeypatch, tmp_path):
    """Nothing set and an empty hub cache; returns the hub dir (its checkpoints/ not yet made)."""
    hub = tmp_path / "hub"
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    return hub


def test_find_explicit_file_and_folder(no_weights, tmp_path):
    f = tmp_path / "any_name.pth"
    f.write_bytes(b"x")  # finding does not read the file
    assert find_inception_weights(f) == f
    assert find_inception_weights(str(f)) == f
    folder = tmp_path / "dir"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match=INCEPTION_FILE):  # a folder without the file
        find_inception_weights(folder)
    (folder / INCEPTION_FILE).write_bytes(b"x")
    assert find_inception_weights(folder) == folder / INCEPTION_FILE


def test_find_env_var(no_weights, monkeypatch, tmp_path):
    (tmp_path / INCEPTION_FILE).write_bytes(b"x")
    monkeypatch.setenv(INCEPTION_ENV, str(tmp_path))
    assert find_inception_weights() == tmp_path / INCEPTION_FILE
    monkeypatch.setenv(INCEPTION_ENV, str(tmp_path / INCEPTION_FILE))
    assert find_inception_weights() == tmp_path / INCEPTION_FILE
    # The explicit path wins over the environment.
    other = tmp_path / "other.pth"
    other.write_bytes(b"x")
    assert find_inception_weights(other) == other
    monkeypatch.setenv(INCEPTION_ENV, str(tmp_path / "typo.pth"))
    with pytest.raises(FileNotFoundError, match="typo.pth"):
        find_inception_weights()


def test_find_torch_hub_cache(no_weights):
    assert find_inception_weights() is None
    cached = no_weights / "checkpoints" / INCEPTION_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert find_inception_weights() == cached


def test_status_off_says_how_to_enable(no_weights):
    line = inception_status()
    assert "\n" not in line
    assert "off" in line and INCEPTION_ENV in line and INCEPTION_FILE in line
    assert "--inception-weights" in line and "pytorch-fid" in line


def test_status_found_and_broken(no_weights, weights_file, tmp_path):
    assert str(weights_file) in inception_status(weights_file)
    assert "off" not in inception_status(weights_file)
    bad = tmp_path / INCEPTION_FILE
    bad.write_bytes(b"not a checkpoint")
    line = inception_status(bad)
    assert "off" in line and str(bad) in line
    assert "off" in inception_status(tmp_path / "typo.pth")
