"""The EG3D-compatible generator (talk3d.models) on the CPU with the tiny config."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from talk3d import extension
from talk3d.models import layers
from talk3d.models import (GeneratorConfig, OSGDecoder, TriplaneGenerator, downsample2d, modulated_conv2d,
                           setup_filter, upfirdn2d, upsample2d)
from talk3d.ops import triplane_field
from talk3d.ops.reference.triplane_field import sample_triplane
from talk3d.render import RenderRandoms, look_at_camera

needs_ext = pytest.mark.skipif(not extension.available(), reason="talk3d._C not built")

# Fused CPU kernels vs the PyTorch reference: ~1e-6 field differences through compositing (test_render's
# bound), then through the SR convolutions (measured ~2e-6 on the tiny generator's |image| ~ 3.6).
FUSED_VS_TORCH_ATOL = 2e-5
# bf16 keeps 8 mantissa bits (relative error 2^-9 per rounding); two SR blocks of random weights
# compound it to a few percent of the output's scale (max |image| ~ 2-3).
BF16_SR_ATOL = 0.15
BF16_SR_MEAN_ATOL = 0.03
# fp16 modulated conv (10 mantissa bits, 36-term sums of unit-scale terms): measured ~4e-3.
FP16_MODCONV_ATOL = 1e-2
# float32 re-association (grouped vs looped conv, explicit taps vs conv2d).
FP32_ATOL = 1e-5
# Normalised focal against EG3D's formula: its 3.14159 for pi moves the focal by ~4e-6.
FOCAL_ATOL = 2e-5


def _cameras(batch: int) -> torch.Tensor:
    """[B, 25] FFHQ-rig cameras at a few yaws/pitches."""
    yaw = torch.linspace(-0.3, 0.3, batch)
    return look_at_camera(yaw, -0.5 * yaw, rig=GeneratorConfig.tiny().camera_rig())


def _generator(**overrides) -> TriplaneGenerator:
    torch.manual_seed(0)
    return TriplaneGenerator(GeneratorConfig.tiny(**overrides)).eval()


def _randoms(cfg: GeneratorConfig, batch: int) -> RenderRandoms:
    R = cfg.neural_rendering_resolution ** 2
    return RenderRandoms(torch.rand(batch, R, cfg.coarse_samples), torch.rand(batch, R, cfg.importance_samples))


# --- whole generator -------------------------------------------------------------------------------


def test_output_shapes():
    G = _generator()
    cfg = G.cfg
    z, c = torch.randn(2, cfg.z_dim), _cameras(2)  # [2, z_dim], [2, 25]
    with torch.no_grad():
        out = G(z, c, impl="torch", deterministic=True)
    h, R, S = cfg.neural_rendering_resolution, cfg.plane_resolution, cfg.sr_resolution
    assert out["image"].shape == (2, 3, S, S)
    assert out["image_raw"].shape == (2, 3, h, h)
    assert out["image_depth"].shape == (2, 1, h, h)
    assert out["feature_image"].shape == (2, cfg.decoder_features, h, h)
    assert out["planes"].shape == (2, 3, cfg.plane_channels, R, R)
    assert G.mapping(z, c).shape == (2, G.num_ws, cfg.w_dim)
    assert all(torch.isfinite(v).all() for v in out.values())
    # A render resolution other than the SR's input is resized, as in EG3D.
    with torch.no_grad():
        out8 = G(z, c, impl="torch", deterministic=True, neural_rendering_resolution=8)
    assert out8["image_raw"].shape == (2, 3, 8, 8) and out8["image"].shape == (2, 3, S, S)


def test_raw_image_is_the_first_three_features_and_feeds_the_sr():
    """The decoder's first 3 features are the low-resolution RGB (EG3D): image_raw is channels 0-2
    of the rendered feature image, and the SR reads that RGB and the whole feature image, styled by
    the last latent row."""
    G = _generator()
    z, c = torch.randn(2, G.cfg.z_dim), _cameras(2)
    with torch.no_grad():
        ws = G.mapping(z, c)
        out = G.synthesis(ws, c, impl="torch", deterministic=True)
        feat = out["feature_image"]
        assert torch.equal(out["image_raw"], feat[:, :3])
        sr = G.superresolution(feat[:, :3], feat, ws, noise_mode=G.cfg.sr_noise_mode)
    torch.testing.assert_close(out["image"], sr, atol=0, rtol=0)


def test_camera_focal_is_eg3ds_fov_to_intrinsics():
    """EG3D's FOV_to_intrinsics: focal = 1 / (tan(fov * 3.14159 / 360) * 1.414), with its rounded
    pi and sqrt 2 (4.26339 at FFHQ's 18.837 degrees; the exact sqrt 2 would give 4.26274). The rounded
    pi moves it by ~4e-6, under the tolerance; the exact sqrt 2 by 6e-4, well over it."""
    cfg = GeneratorConfig.ffhq()
    eg3d = 1 / (math.tan(18.837 * 3.14159 / 360) * 1.414)
    assert cfg.camera_fov_degrees == 18.837
    assert abs(cfg.camera_focal - eg3d) < FOCAL_ATOL


def test_deterministic_per_seed():
    G = _generator()
    z, c = torch.randn(2, G.cfg.z_dim), _cameras(2)
    with torch.no_grad():
        a = G(z, c, impl="torch", noise_mode="const", deterministic=True)
        b = G(z, c, impl="torch", noise_mode="const", deterministic=True)
        other = G(torch.randn(2, G.cfg.z_dim), c, impl="torch", noise_mode="const", deterministic=True)
    for key in ("image", "image_raw", "image_depth", "planes"):
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["image"], other["image"])


def test_gradients_reach_every_parameter():
    # SR noise 'const' so the SR noise strengths are in the graph too (EG3D's FFHQ default is 'none').
    G = _generator(sr_noise_mode="const", fused_modconv="never").train()
    z, c = torch.randn(2, G.cfg.z_dim), _cameras(2)
    out = G(z, c, impl="torch", randoms=_randoms(G.cfg, 2))
    (out["image"].sum() + out["image_raw"].sum() + out["image_depth"].sum()).backward()
    for name, p in G.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@needs_ext
def test_fused_render_matches_reference_through_generator():
    G = _generator()
    z, c = torch.randn(2, G.cfg.z_dim), _cameras(2)
    randoms = _randoms(G.cfg, 2)
    with torch.no_grad():
        ws = G.mapping(z, c)
        ref = G.synthesis(ws, c, impl="torch", randoms=randoms)
        fused = G.synthesis(ws, c, impl="cpu", randoms=randoms)
    for key in ("image", "image_raw", "image_depth", "feature_image"):
        torch.testing.assert_close(fused[key], ref[key], atol=FUSED_VS_TORCH_ATOL, rtol=0, msg=key)


def test_bf16_superresolution_close_to_fp32():
    G = _generator()
    z, c = torch.randn(2, G.cfg.z_dim), _cameras(2)
    with torch.no_grad():
        ws = G.mapping(z, c)
        feat = G.synthesis(ws, c, impl="torch", deterministic=True)["feature_image"]  # [2, F, h, h]
        ref = G.superresolution(feat[:, :3], feat, ws)
        sr16 = G.superresolution.to(torch.bfloat16)
        low = sr16(feat[:, :3].bfloat16(), feat.bfloat16(), ws)
    assert low.dtype == torch.float32  # the skip RGB is accumulated in float32, as in EG3D
    err = (low - ref).abs()
    assert err.max() < BF16_SR_ATOL and err.mean() < BF16_SR_MEAN_ATOL, (err.max(), err.mean())


def test_truncation_psi_zero_returns_w_avg():
    G = _generator()
    mapping = G.backbone.mapping
    z, c = torch.randn(4, G.cfg.z_dim), _cameras(4)
    with torch.no_grad():
        w = G.mapping(z, c)[:, 0]  # [4, w_dim]
        G.mapping(z, c, update_emas=True)
    beta = G.cfg.w_avg_beta
    torch.testing.assert_close(mapping.w_avg, (1 - beta) * w.mean(0), atol=FP32_ATOL, rtol=0)
    mapping.w_avg.copy_(torch.randn(G.cfg.w_dim))
    ws = G.mapping(z, c, truncation_psi=0)
    torch.testing.assert_close(ws, mapping.w_avg.expand_as(ws))
    cut = G.mapping(z, c, truncation_psi=0, truncation_cutoff=2)
    torch.testing.assert_close(cut[:, :2], mapping.w_avg.expand(4, 2, -1))
    torch.testing.assert_close(cut[:, 2:], G.mapping(z, c)[:, 2:])


# --- decoder ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["torch", pytest.param("cpu", marks=needs_ext)])
def test_decoder_forward_equals_field_op(impl):
    torch.manual_seed(1)
    dec = OSGDecoder(8, 16, 8)
    with torch.no_grad():
        for p in dec.parameters():
            p.normal_()  # nonzero biases too
    planes = torch.randn(2, 3, 8, 12, 12)  # [B, 3, C, H, W]
    xyz = torch.rand(2, 50, 3) - 0.5       # [B, N, 3]
    sigma_op, feat_op = triplane_field(planes, xyz, *dec.effective_weights(), box_warp=1.0, axes="fixed", impl=impl)
    sigma, feat = dec(sample_triplane(planes, xyz, 1.0, "fixed"))
    torch.testing.assert_close(sigma, sigma_op, atol=FP32_ATOL, rtol=FP32_ATOL)
    torch.testing.assert_close(feat, feat_op, atol=FP32_ATOL, rtol=FP32_ATOL)
    w1 = dec.effective_weights().w1
    torch.testing.assert_close(w1, dec.net[0].weight / 8 ** 0.5)  # EG3D's 1/sqrt(fan_in), lr_mul 1


# --- layers -----------------------------------------------------------------------------------------


def _upfirdn_taps(x, f, up, down, pad, gain):
    """Independent upfirdn2d: explicit zero insertion and a sum over the filter taps (no conv2d)."""
    N, C, H, W = x.shape
    z = x.new_zeros(N, C, H * up, W * up)
    z[:, :, ::up, ::up] = x
    z = F.pad(z, [pad[0], pad[1], pad[0], pad[1]])
    k = f.shape[0]
    fk = f.flip([0, 1]) * gain  # convolution = correlation with the flipped filter
    Ho, Wo = z.shape[2] - k + 1, z.shape[3] - k + 1
    out = x.new_zeros(N, C, Ho, Wo)
    for a in range(k):
        for b in range(k):
            out += fk[a, b] * z[:, :, a:a + Ho, b:b + Wo]
    return out[:, :, ::down, ::down]


def test_upfirdn2d_against_explicit_taps():
    f = setup_filter([1, 3, 3, 1]).double()
    assert torch.allclose(f.sum(), torch.tensor(1.0, dtype=torch.float64))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    up = upsample2d(x, f)
    assert up.shape == (2, 3, 16, 16)
    torch.testing.assert_close(up, _upfirdn_taps(x, f, 2, 1, (2, 1), 4.0))
    down = downsample2d(x, f)
    assert down.shape == (2, 3, 4, 4)
    torch.testing.assert_close(down, _upfirdn_taps(x, f, 1, 2, (1, 1), 1.0))
    # An asymmetric filter checks the flip; negative padding crops.
    g = torch.rand(3, 3, dtype=torch.float64)
    torch.testing.assert_close(upfirdn2d(x, g, up=2, padding=(1, 1, 1, 1)), _upfirdn_taps(x, g, 2, 1, (1, 1), 1.0))
    full = upfirdn2d(x, g, padding=(2, 2, 2, 2))
    torch.testing.assert_close(upfirdn2d(x, g, padding=(1, 0, 1, 0)), full[:, :, 1:-2, 1:-2])
    # Upsampling keeps a constant image constant away from the borders (gain up^2, unit-sum filter).
    ones = upsample2d(torch.ones(1, 1, 6, 6, dtype=torch.float64), f)
    torch.testing.assert_close(ones[..., 2:-2, 2:-2], torch.ones(1, 1, 8, 8, dtype=torch.float64))


def test_binomial_filter_is_recognised_once_per_buffer():
    f = setup_filter()
    assert layers._is_binomial(f) and layers._is_binomial(f.double())
    assert not layers._is_binomial(setup_filter([1, 2, 1]))  # another size
    assert not layers._is_binomial(torch.rand(4, 4))
    g = setup_filter()
    assert layers._is_binomial(g)
    g[0, 0] += 0.01  # an in-place change moves the version: compared again
    assert not layers._is_binomial(g)
    with torch.inference_mode():  # a model built under inference mode: no version counter
        assert layers._is_binomial(setup_filter())


def test_binomial_filter_answer_dies_with_its_tensor():
    """A new 4x4 tensor at the address of a binomial filter that was checked before is compared
    afresh. (The answer was once cached by data pointer and version, and CI caught a torch.rand
    tensor, allocated where a freed filter had lived, taken for the binomial filter.) Here the
    address is reused on purpose: two tensors over one numpy buffer, rewritten in between."""
    buf = setup_filter().numpy().copy()
    first = torch.from_numpy(buf)
    assert layers._is_binomial(first)
    buf[:] = np.random.default_rng(0).random((4, 4))
    second = torch.from_numpy(buf)
    assert second.data_ptr() == first.data_ptr() and second._version == first._version
    assert not layers._is_binomial(second)


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.skipif(not extension.available(), reason="talk3d._C not built")),
                                    pytest.param("cuda", marks=pytest.mark.cuda)])
def test_fir_kernel_path_equals_the_filter(device):
    """upfirdn2d's path for EG3D's filter (binomial_filter2d, the compiled kernel) against the
    explicit taps: up- and downsampling, gains, paddings and crops, forward and input gradient."""
    f = setup_filter().to(device, torch.float64)
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64, device=device, requires_grad=True)
    for up, down, pad, gain in [(2, 1, (2, 1), 4.0), (1, 2, (1, 1), 1.0), (1, 1, (2, 2), 1.5), (2, 1, (0, -1), 4.0)]:
        got = upfirdn2d(x, f, up=up, down=down, padding=(pad[0], pad[1], pad[0], pad[1]), gain=gain)
        want = _upfirdn_taps(x, f, up, down, pad, gain) if min(pad) >= 0 else None
        if want is None:  # a crop: the uncropped result, cut
            full = _upfirdn_taps(x, f, up, down, (pad[0], 0), gain)
            want = full[:, :, :full.shape[2] + pad[1], :full.shape[3] + pad[1]]
        torch.testing.assert_close(got, want)
        gy = torch.randn_like(got)
        torch.testing.assert_close(torch.autograd.grad(got, x, gy)[0], torch.autograd.grad(want, x, gy)[0])


@pytest.mark.parametrize("up", [1, 2])
@pytest.mark.parametrize("demodulate", [True, False])
def test_modulated_conv_equals_per_sample_loop(up, demodulate):
    B, I, O, H = 3, 4, 5, 6
    x = torch.randn(B, I, H, H, dtype=torch.float64)
    weight = torch.randn(O, I, 3, 3, dtype=torch.float64)
    styles = torch.randn(B, I, dtype=torch.float64)
    f = setup_filter().double()
    expected = []
    for b in range(B):
        w = weight * styles[b][None, :, None, None]  # [O, I, 3, 3]
        if demodulate:
            w = w / (w.square().sum(dim=[1, 2, 3], keepdim=True) + 1e-8).sqrt()
        if up == 1:
            expected.append(F.conv2d(x[b:b + 1], w, padding=1))
        else:  # transposed conv = zero insertion + convolution with w; then the FIR with gain 4
            y = F.conv_transpose2d(x[b:b + 1], w.transpose(0, 1), stride=2)  # [1, O, 2H + 1, 2H + 1]
            expected.append(upfirdn2d(y, f, padding=1, gain=4))
    expected = torch.cat(expected)
    for fused in (True, False):
        out = modulated_conv2d(x, weight, styles, up=up, padding=1, resample_filter=f, demodulate=demodulate,
                               fused=fused)
        assert out.shape == (B, O, H * up, H * up)
        torch.testing.assert_close(out, expected, atol=FP32_ATOL, rtol=0)


def test_fp16_modulated_conv_prenormalisation():
    # Styles of 1e4 overflow fp16 activations (x * styles in the unfused path) without the pre-normalisation.
    x = torch.randn(2, 4, 6, 6)
    weight, styles = torch.randn(5, 4, 3, 3), 1e4 * torch.randn(2, 4)
    ref = modulated_conv2d(x.double(), weight.double(), styles.double(), padding=1)
    for fused in (True, False):
        half = modulated_conv2d(x.half(), weight, styles, padding=1, fused=fused)
        assert half.dtype == torch.float16 and torch.isfinite(half).all()
        torch.testing.assert_close(half.double(), ref, atol=FP16_MODCONV_ATOL, rtol=0)


def test_demodulation_epsilon_is_eg3ds():
    """Demodulation divides by sqrt(sum w^2 + 1e-8) (EG3D's epsilon). With small styles the squared
    norm (~36 * 1e-6 here) is within reach of a larger epsilon (1e-4 would shrink the output by ~40 %),
    so the per-sample, fused and shared-style paths are checked there, against the formula written
    out in float64."""
    B, I, O, H = 2, 4, 5, 6
    x = torch.randn(B, I, H, H, dtype=torch.float64)
    weight = torch.randn(O, I, 3, 3, dtype=torch.float64)
    styles = 1e-3 * torch.randn(B, I, dtype=torch.float64)
    for rows in (styles, styles[:1]):
        want = []
        for b in range(B):
            w = weight * rows[b if rows.shape[0] > 1 else 0][None, :, None, None]
            w = w / (w.square().sum(dim=[1, 2, 3], keepdim=True) + 1e-8).sqrt()
            want.append(F.conv2d(x[b:b + 1], w, padding=1))
        for fused in (True, False):
            got = modulated_conv2d(x, weight, rows, padding=1, fused=fused)
            torch.testing.assert_close(got, torch.cat(want), atol=FP32_ATOL, rtol=0)


def test_affine_layers_start_at_unit_styles():
    """StyleGAN2 initialises every affine layer's bias to 1 (bias_init=1), so a layer starts near its
    unmodulated convolution (styles ~1 + a small w-dependent part) when it is trained from scratch;
    the weights are unit normals stored unscaled (scaled by 1 / sqrt(fan_in) at run time)."""
    G = _generator()
    affines = [m.affine for m in G.modules() if isinstance(m, (layers.SynthesisLayer, layers.ToRGBLayer))]
    assert len(affines) > 10
    for fc in affines:
        assert torch.equal(fc.bias, torch.ones_like(fc.bias))
        assert fc.weight_gain == pytest.approx(1 / fc.in_features ** 0.5)


@pytest.mark.parametrize("up", [1, 2])
@pytest.mark.parametrize("demodulate", [True, False])
def test_shared_style_equals_per_sample_styles(up, demodulate):
    # One style row for the batch folds into the weight: same output and gradients as the batch of
    # equal rows, by either per-sample path.
    B, I, O, H = 3, 4, 5, 6
    x = torch.randn(B, I, H, H, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(O, I, 3, 3, dtype=torch.float64, requires_grad=True)
    style = torch.randn(1, I, dtype=torch.float64, requires_grad=True)
    f = setup_filter().double()
    kw = dict(up=up, padding=1, resample_filter=f, demodulate=demodulate)
    shared = modulated_conv2d(x, weight, style, **kw)
    gy = torch.randn_like(shared)
    got = torch.autograd.grad(shared, (x, weight, style), gy)
    for fused in (True, False):
        rows = modulated_conv2d(x, weight, style.expand(B, -1).contiguous(), fused=fused, **kw)
        torch.testing.assert_close(shared, rows, atol=FP32_ATOL, rtol=0)
        for a, b in zip(got, torch.autograd.grad(rows, (x, weight, style), gy)):
            torch.testing.assert_close(a, b, atol=FP32_ATOL, rtol=0)
    with pytest.raises(ValueError, match="styles"):
        modulated_conv2d(x, weight, torch.randn(2, I, dtype=torch.float64), **kw)


@pytest.mark.parametrize("training", [False, True])
def test_super_resolution_with_an_expanded_latent(training):
    # TalkingHead conditions every frame on one latent (w_ID.expand): the layers see stride-0 rows
    # and take the shared-style path. It must agree with a batch of equal but separate latents
    # (fused grouped conv at inference, scaled activations in training), gradient to w_ID included.
    G = _generator().train(training)
    B = 3
    rgb, feat = torch.randn(B, 3, 8, 8), torch.randn(B, G.cfg.decoder_features, 8, 8)
    w_id = torch.randn(1, G.num_ws, G.cfg.w_dim, requires_grad=True)
    calls = []
    hook = layers._shared_rows
    layers._shared_rows = lambda w: calls.append(w.stride(0)) or hook(w)
    try:
        shared = G.superresolution(rgb, feat, w_id.expand(B, -1, -1))
    finally:
        layers._shared_rows = hook
    assert calls and all(stride == 0 for stride in calls)
    separate = G.superresolution(rgb, feat, w_id.repeat(B, 1, 1))
    torch.testing.assert_close(shared, separate, atol=FP32_ATOL, rtol=0)
    gy = torch.randn_like(shared)
    g_shared, = torch.autograd.grad(shared, w_id, gy)
    g_separate, = torch.autograd.grad(separate, w_id, gy)
    # float32 sums over every pixel of both SR blocks, in different orders: relative to the scale.
    scale = g_separate.abs().max().item()
    torch.testing.assert_close(g_shared, g_separate, atol=FP32_ATOL * scale, rtol=0)


def test_super_resolution_reads_the_last_latent_row():
    """EG3D's super-resolution is styled by the last row of ws (ws[:, -1:], for every block). Rows
    differ under W+ inversion (personalisation's latent_space="w+") and truncation cutoffs: changing
    any other row leaves the SR's output alone, changing the last one does not."""
    G = _generator()
    rgb, feat = torch.randn(2, 3, 8, 8), torch.randn(2, G.cfg.decoder_features, 8, 8)
    ws = torch.randn(2, G.num_ws, G.cfg.w_dim)
    with torch.no_grad():
        out = G.superresolution(rgb, feat, ws)
        others = ws.clone()
        others[:, :-1] = torch.randn_like(others[:, :-1])
        assert torch.equal(G.superresolution(rgb, feat, others), out)
        last = ws.clone()
        last[:, -1] = torch.randn_like(last[:, -1])
        assert (G.superresolution(rgb, feat, last) - out).abs().max() > 1e-3


def test_autocast_keeps_the_blocks_half_precision_activations():
    # Under autocast a block's input stays in the previous block's bf16 (no fp32 copy for the
    # convolution to round straight back); the result is bit-identical to widening it first.
    G = _generator().train()
    B = 2
    rgb, feat = torch.randn(B, 3, 8, 8), torch.randn(B, G.cfg.decoder_features, 8, 8, requires_grad=True)
    ws = torch.randn(1, G.num_ws, G.cfg.w_dim).expand(B, -1, -1)
    block1 = G.superresolution.block1
    seen = []
    hook = block1.conv0.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = G.superresolution(rgb, feat, ws)
    hook.remove()
    assert seen == [torch.bfloat16]
    (g_got,) = torch.autograd.grad(got.sum(), feat)
    hook = block1.conv0.register_forward_pre_hook(lambda m, args: (args[0].float(), *args[1:]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = G.superresolution(rgb, feat, ws)
    hook.remove()
    (g_want,) = torch.autograd.grad(want.sum(), feat)
    assert torch.equal(got, want) and torch.equal(g_got, g_want)


# --- config -----------------------------------------------------------------------------------------


def test_config_round_trip_and_unknown_keys():
    for cfg in (GeneratorConfig.ffhq(), GeneratorConfig.tiny(axes="eg3d", conv_clamp=256.0)):
        d = json.loads(json.dumps(cfg.to_dict()))
        assert GeneratorConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="bogus"):
        GeneratorConfig.from_dict({**GeneratorConfig.tiny().to_dict(), "bogus": 1})
    with pytest.raises(ValueError):
        GeneratorConfig.tiny(sr_noise_mode="loud")
    ffhq = GeneratorConfig.ffhq()
    rc = ffhq.render_config()
    assert (rc.resolution, rc.ray_start, rc.ray_end, rc.coarse_samples, rc.importance_samples, rc.box_warp) == (
        128, 2.25, 3.3, 48, 48, 1.0)
    assert ffhq.sr_input_resolution == 128 and abs(ffhq.camera_focal - 4.2647) < 2e-3
    assert dataclasses.is_dataclass(ffhq)


# --- EG3D state_dict layout ---------------------------------------------------------------------------

#: Representative keys and shapes of EG3D's FFHQ 512 TriPlaneGenerator, verified against NVlabs/eg3d
#: eg3d/training/{triplane,networks_stylegan2,superresolution}.py.
EG3D_FFHQ_KEYS = {
    "backbone.mapping.embed.weight": (512, 25),
    "backbone.mapping.fc0.weight": (512, 1024),
    "backbone.mapping.fc1.bias": (512,),
    "backbone.mapping.w_avg": (512,),
    "backbone.synthesis.b4.const": (512, 4, 4),
    "backbone.synthesis.b4.resample_filter": (4, 4),
    "backbone.synthesis.b4.conv1.weight": (512, 512, 3, 3),
    "backbone.synthesis.b4.conv1.affine.weight": (512, 512),
    "backbone.synthesis.b4.conv1.affine.bias": (512,),
    "backbone.synthesis.b4.conv1.noise_strength": (),
    "backbone.synthesis.b4.conv1.noise_const": (4, 4),
    "backbone.synthesis.b4.torgb.weight": (96, 512, 1, 1),
    "backbone.synthesis.b128.conv0.weight": (256, 512, 3, 3),
    "backbone.synthesis.b128.conv0.resample_filter": (4, 4),
    "backbone.synthesis.b256.conv0.weight": (128, 256, 3, 3),
    "backbone.synthesis.b256.conv1.noise_const": (256, 256),
    "backbone.synthesis.b256.torgb.weight": (96, 128, 1, 1),
    "backbone.synthesis.b256.torgb.affine.weight": (128, 512),
    "backbone.synthesis.b256.torgb.bias": (96,),
    "decoder.net.0.weight": (64, 32),
    "decoder.net.0.bias": (64,),
    "decoder.net.2.weight": (33, 64),
    "decoder.net.2.bias": (33,),
    "superresolution.block0.resample_filter": (4, 4),
    "superresolution.block0.conv0.weight": (256, 32, 3, 3),
    "superresolution.block0.conv0.affine.weight": (32, 512),
    "superresolution.block0.conv0.noise_const": (256, 256),
    "superresolution.block0.torgb.weight": (3, 256, 1, 1),
    "superresolution.block1.conv0.weight": (128, 256, 3, 3),
    "superresolution.block1.conv1.noise_const": (512, 512),
    "superresolution.block1.torgb.weight": (3, 128, 1, 1),
}


def test_ffhq_state_dict_has_eg3d_keys():
    with torch.device("meta"):  # no memory, no init cost
        G = TriplaneGenerator(GeneratorConfig.ffhq())
    sd = G.state_dict()
    for key, shape in EG3D_FFHQ_KEYS.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, (key, tuple(sd[key].shape))
    assert G.num_ws == 14  # EG3D FFHQ: 1 (b4) + 2 * 6 (b8..b256) + 1 (last torgb)
    blocks = {k.split(".")[2] for k in sd if k.startswith("backbone.synthesis.")}
    assert blocks == {f"b{2 ** i}" for i in range(2, 9)}
    assert not any(k.startswith("superresolution.resample_filter") for k in sd)  # 8XDC has none
    assert {k.split(".")[1] for k in sd if k.startswith("superresolution.")} == {"block0", "block1"}
