"""The audio-guided deltaplane U-Net and its condition tokens (talk3d.models), tiny config on the CPU."""
from __future__ import annotations

import json
import math

import pytest
import torch

from talk3d.models import (ConditionEncoder, DeltaplaneConfig, DeltaplaneModel, DeltaplanePredictor,
                           MultiHeadAttention, RollOut, attention, plane_positional_encoding, plane_positions)
from talk3d.data.synthetic import LANDMARK_NAMES
from talk3d.models.tokens import AUDIO_STD_FLOOR, AUDIO_STEP_ENCODERS
from talk3d.ops.reference.triplane_field import PLANE_AXES

# float32 attention: SDPA vs an explicit softmax over a handful of keys differ by re-association only.
ATTN_ATOL = 1e-6
# A conditioning input "changes the output" when the deltaplane moves by more than this (the perturbed
# last layer makes |ΔP| ~ 0.1-1, so a connected input moves it by orders of magnitude more).
DEPENDENCE_MIN = 1e-4
# Two positional-encoding rows count as distinct when at least this far apart (L2).
PE_MIN_DISTANCE = 1e-3
# The float32 encoding against its float64 oracle: sin / cos of arguments up to 4 pi, rounded to
# float32 (2^-24 relative, ~1e-6 absolute at 4 pi) before and after.
PE_VALUE_ATOL = 1e-5
# The scalar tokens' float32 features against float64 sin / cos of |arguments| <= 4 pi * 1.
SCALAR_FEATURE_ATOL = 1e-5
# After one Adam step (lr 1e-3) from the zero-initialised last layer, ΔP is ~1e-3 and its change
# with the audio measured 7e-5 to 3e-4 (seeds 0-3; 16 or 2 audio rows, per-plane or shared
# attention); an input the graph does not read changes it by exactly 0.
ONE_STEP_DEPENDENCE_MIN = 1e-6
# Std of the random weights put into the zero-initialised last layer to expose the paths behind it.
LAST_LAYER_STD = 0.1


def _batch(cfg: DeltaplaneConfig, B: int = 2) -> dict[str, torch.Tensor]:
    """Random condition inputs of the documented shapes."""
    return {
        "audio": torch.randn(B, cfg.audio_window, cfg.audio_steps, cfg.audio_dim),  # [B, 8, 16, A]
        "blink": torch.rand(B, 1) * cfg.eye_max,  # [B, 1]
        "pose": (torch.rand(B, 3) - 0.5) * 0.6,  # [B, 3] radians
        "landmarks": torch.rand(B, cfg.num_landmarks, 2) * 2 - 1,  # [B, 5, 2]
    }


def _planes(cfg: DeltaplaneConfig, B: int = 2) -> torch.Tensor:
    return torch.randn(B, 3, cfg.plane_channels, cfg.plane_resolution, cfg.plane_resolution)  # [B, 3, C, R, R]


def _perturbed(cfg: DeltaplaneConfig) -> DeltaplaneModel:
    """An eval-mode model whose zero-initialised last layer has been given random weights."""
    model = DeltaplaneModel(cfg).eval()
    with torch.no_grad():
        model.predictor.out_conv.weight.normal_(0.0, LAST_LAYER_STD)
    return model


# --- shapes and initialisation ---------------------------------------------------------------------


@pytest.mark.parametrize("axes", ["fixed", "eg3d"])
def test_output_shape_both_layouts_and_zero_init(axes):
    cfg = DeltaplaneConfig.tiny(axes=axes)
    model = DeltaplaneModel(cfg)
    planes, batch = _planes(cfg), _batch(cfg)
    out5 = model(planes, batch)
    out4 = model(planes.flatten(1, 2), batch)  # [B, 3C, R, R]
    assert out5.shape == planes.shape
    assert out4.shape == planes.flatten(1, 2).shape
    assert torch.equal(out5, torch.zeros_like(out5)) and torch.equal(out4, torch.zeros_like(out4))


def test_gradient_reaches_zero_init_last_layer():
    cfg = DeltaplaneConfig.tiny()
    model = DeltaplaneModel(cfg)
    planes, batch = _planes(cfg), _batch(cfg)
    target = torch.randn_like(planes)
    loss = (model(planes, batch) - target).pow(2).mean()
    loss.backward()
    assert model.predictor.out_conv.weight.grad.abs().max() > 0
    torch.optim.Adam(model.parameters(), lr=1e-3).step()
    with torch.no_grad():
        assert model(planes, batch).abs().max() > 0


def test_audio_changes_output_after_one_training_step():
    torch.manual_seed(0)
    cfg = DeltaplaneConfig.tiny(eye_noise=0.0)
    model = DeltaplaneModel(cfg)
    planes, batch = _planes(cfg), _batch(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    (model(planes, batch) - torch.randn_like(planes)).pow(2).mean().backward()
    opt.step()
    other = dict(batch, audio=torch.randn_like(batch["audio"]))
    with torch.no_grad():
        assert (model(planes, batch) - model(planes, other)).abs().max() > ONE_STEP_DEPENDENCE_MIN


# --- conditioning paths ----------------------------------------------------------------------------

_TOKEN_KEYS = {"audio": "audio", "eye": "blink", "pose": "pose", "landmarks": "landmarks"}


@pytest.mark.parametrize("token", list(_TOKEN_KEYS))
def test_output_depends_on_each_enabled_token_only(token):
    key = _TOKEN_KEYS[token]
    torch.manual_seed(1)
    planes, batch = _planes(DeltaplaneConfig.tiny()), _batch(DeltaplaneConfig.tiny())
    changed = dict(batch, **{key: _batch(DeltaplaneConfig.tiny())[key]})
    with torch.no_grad():
        on = _perturbed(DeltaplaneConfig.tiny())
        assert (on(planes, batch) - on(planes, changed)).abs().max() > DEPENDENCE_MIN
        off = _perturbed(DeltaplaneConfig.tiny(**{f"use_{token}": False}))
        assert torch.equal(off(planes, batch), off(planes, changed))
        # A disabled type's input is not even needed.
        assert torch.equal(off(planes, batch), off(planes, {k: v for k, v in batch.items() if k != key}))


def test_token_order_and_count():
    cfg = DeltaplaneConfig.tiny(audio_tokens=2)
    enc = ConditionEncoder(cfg).eval()
    batch = _batch(cfg)
    tokens = enc(batch)
    assert tokens.shape == (2, cfg.num_tokens, cfg.token_dim) and cfg.num_tokens == 6
    # Order audio(2), eye, pose, landmarks, null: changing the pose moves token 3 only.
    moved = (enc(dict(batch, pose=batch["pose"] + 0.3)) - tokens).abs().amax(dim=(0, 2))  # [T]
    assert moved[3] > DEPENDENCE_MIN and torch.equal(moved[[0, 1, 2, 4, 5]], torch.zeros(5))
    assert torch.equal(tokens[0, -1], tokens[1, -1])  # the null token is shared by all frames
    only_null = ConditionEncoder(DeltaplaneConfig.tiny(use_audio=False, use_eye=False, use_pose=False,
                                                      use_landmarks=False))
    assert only_null(batch).shape == (2, 1, cfg.token_dim)


@pytest.mark.parametrize("steps", [1, 2, 6, 16])
@pytest.mark.parametrize("encoder", ["conv", "mlp"])
def test_audio_frame_encoder_reads_every_step_of_its_frame_only(encoder, steps):
    """Each window frame's S audio steps reach its vector, the strided convolutions end at length 1
    for any S, and frames are encoded apart (a frame's audio moves its own vector only)."""
    torch.manual_seed(2)
    cfg = DeltaplaneConfig.tiny(audio_steps=steps, audio_encoder=encoder)
    net = AUDIO_STEP_ENCODERS[encoder](steps, cfg.audio_dim, cfg.token_hidden, cfg.token_dim)
    audio = torch.randn(3, steps, cfg.audio_dim, requires_grad=True)  # [N, S, A]
    out = net(audio)
    assert out.shape == (3, cfg.token_dim)
    if encoder == "conv":  # the strided convolutions end at one step, whatever S
        assert net.convs(audio.transpose(1, 2)).shape[-1] == 1
    out[1].sum().backward()
    per_step = audio.grad.abs().sum(dim=-1)  # [N, S]
    assert (per_step[1] > 0).all() and torch.equal(per_step[[0, 2]], torch.zeros(2, steps))


def test_release_audio_encoder_is_ad_nerfs():
    """At the release's sizes (16 steps of 44 features, 64-d tokens) the convolutions are AD-NeRF's:
    44 -> 32 -> 32 -> 64 -> 64 channels while the steps go 16 -> 8 -> 4 -> 2 -> 1."""
    cfg = DeltaplaneConfig.release()
    net = ConditionEncoder(cfg).audio.frame_encoder
    convs = [m for m in net.convs if isinstance(m, torch.nn.Conv1d)]
    assert [(m.in_channels, m.out_channels) for m in convs] == [(44, 32), (32, 32), (32, 64), (64, 64)]
    assert all(m.kernel_size == (3,) and m.stride == (2,) and m.padding == (1,) for m in convs)
    lengths = [16]
    x = torch.randn(1, 44, 16)
    for m in net.convs:
        x = m(x)
        if isinstance(m, torch.nn.Conv1d):
            lengths.append(x.shape[-1])
    assert lengths == [16, 8, 4, 2, 1]


def test_audio_net_standardises_its_input_with_the_statistics_it_is_given():
    """After set_feature_statistics(X), the net reads (audio - mean X) / std X per channel, a channel
    constant in X is divided by a floor, not by 0, the statistics travel in the state dict, and bad
    statistics are refused."""
    torch.manual_seed(3)
    cfg = DeltaplaneConfig.tiny()
    net = ConditionEncoder(cfg).audio.eval()
    feats = torch.randn(100, cfg.audio_dim, dtype=torch.float64) * 3 - 6  # [N, A], log-mel-like
    feats[:, 1] = 2.0  # a constant channel
    audio = torch.randn(2, cfg.audio_window, cfg.audio_steps, cfg.audio_dim) * 3 - 6
    net.set_feature_statistics(feats)
    floor = AUDIO_STD_FLOOR * float(feats.std(0).mean()) + 1e-6
    assert float(net.feature_std[1]) == pytest.approx(floor) and float(net.feature_mean[1]) == 2.0
    expected = (audio - feats.mean(0)) / feats.std(0).clamp_min(floor)
    fresh = ConditionEncoder(cfg).audio.eval()
    fresh.load_state_dict({k: v for k, v in net.state_dict().items() if "feature_" not in k}, strict=True)
    torch.testing.assert_close(net(audio), fresh(expected.float()), atol=ATTN_ATOL, rtol=0)
    assert not torch.allclose(net(audio), fresh(audio))  # the statistics matter
    copy = ConditionEncoder(cfg).audio.eval()
    copy.load_state_dict(net.state_dict(), strict=True)
    assert torch.equal(copy(audio), net(audio))
    for bad in (feats[:1], feats[:, :3], torch.full_like(feats, float("nan"))):
        with pytest.raises(ValueError, match="set_feature_statistics"):
            net.set_feature_statistics(bad)


def test_eye_noise_only_in_training_and_uniform_within_its_half_width(monkeypatch):
    cfg = DeltaplaneConfig.tiny(use_audio=False, use_pose=False, use_landmarks=False, use_null=False)
    enc = ConditionEncoder(cfg)
    batch = {"blink": torch.full((2, 1), 0.5)}
    assert not torch.equal(enc.train()(batch), enc(batch))
    assert torch.equal(enc.eval()(batch), enc(batch))
    seen = []  # the AU45 values the eye token's MLP receives (divided by eye_max)
    monkeypatch.setattr(enc.eye, "forward", lambda v: seen.append(v) or torch.zeros(v.shape[0], 1, cfg.token_dim))
    enc.train()({"blink": torch.full((20000, 1), 1.0)})
    noise = seen[0] * cfg.eye_max - 1.0
    assert noise.abs().max() <= cfg.eye_noise + 1e-6  # the release's uniform +-0.05, never beyond
    assert abs(float(noise.std()) - cfg.eye_noise / 3 ** 0.5) < 0.002  # a uniform's std, not 0.05


def test_audio_window_frames_are_told_apart_by_position():
    """The audio net's attention over the window reads each frame with its learned position
    (frame_pos): the same frames in another order give another token (attention pooling without
    positions would not see the order)."""
    torch.manual_seed(0)
    cfg = DeltaplaneConfig.tiny(use_eye=False, use_pose=False, use_landmarks=False, use_null=False)
    enc = ConditionEncoder(cfg).eval()
    audio = _batch(cfg)["audio"]  # [B, W, S, A]
    reversed_window = audio.flip(1)
    assert (enc({"audio": reversed_window}) - enc({"audio": audio})).abs().max() > DEPENDENCE_MIN
    with torch.no_grad():
        enc.audio.frame_pos.zero_()  # no positions: the order no longer matters
    torch.testing.assert_close(enc({"audio": reversed_window}), enc({"audio": audio}), rtol=0, atol=1e-5)


def test_blink_is_clamped_to_the_eye_range():
    """OpenFace's AU45 runs 0-5 while the token's range is [0, eye_max] (the release's 2): past it a
    blink reads as eye_max, below 0 as 0 (eval mode: no noise)."""
    cfg = DeltaplaneConfig.tiny(use_audio=False, use_pose=False, use_landmarks=False, use_null=False)
    enc = ConditionEncoder(cfg).eval()
    token = lambda v: enc({"blink": torch.full((1, 1), v)})  # noqa: E731
    assert torch.equal(token(cfg.eye_max + 1.0), token(cfg.eye_max)) and torch.equal(token(-0.5), token(0.0))
    assert not torch.equal(token(cfg.eye_max / 2), token(cfg.eye_max))


def test_scalar_tokens_base_frequencies():
    """The head rotation is in radians, so its first band is the angle's own sin / cos (w0 = 1); the
    eye (blink / eye_max) and the landmarks (in [-1, 1]) start at pi, where the first band is
    injective over their range. Each next band doubles."""
    enc = ConditionEncoder(DeltaplaneConfig.tiny())
    for net, base in ((enc.pose, 1.0), (enc.eye, math.pi), (enc.landmarks, math.pi)):
        expected = base * 2.0 ** torch.arange(net.omega.numel(), dtype=torch.float32)
        torch.testing.assert_close(net.omega, expected, rtol=0, atol=0)


def test_bottleneck_attention_reads_the_positional_encoding():
    """The 3-D positional encoding is added to the bottleneck tokens (it is what tells the
    attention where a cell is, and which plane): another encoding, or none, changes the deltaplane."""
    torch.manual_seed(0)
    cfg = DeltaplaneConfig.tiny()
    model = _perturbed(cfg)
    planes, batch = _planes(cfg), _batch(cfg)
    with torch.no_grad():
        before = model(planes, batch)
        model.predictor.pos_enc.add_(torch.randn_like(model.predictor.pos_enc))
        moved = model(planes, batch)
        model.predictor.pos_enc.zero_()
        without = model(planes, batch)
    assert (moved - before).abs().max() > DEPENDENCE_MIN and (without - before).abs().max() > DEPENDENCE_MIN


def test_landmark_token_reads_its_points_only():
    """The release's nose tip and outer eye corners: the inner corners (rows 2 and 3 of the dataset's
    LANDMARK_NAMES) do not reach the token; a legacy config's token read all five."""
    cfg = DeltaplaneConfig.tiny(use_audio=False, use_eye=False, use_pose=False, use_null=False)
    assert cfg.landmark_points == ("nose_tip", "right_eye_outer", "left_eye_outer") and cfg.landmark_index == (0, 1, 4)
    enc = ConditionEncoder(cfg).eval()
    lm = torch.rand(2, 5, 2) * 2 - 1
    for row, read in ((0, True), (1, True), (2, False), (3, False), (4, True)):
        moved = lm.clone()
        moved[:, row] += 0.3
        assert torch.equal(enc({"landmarks": moved}), enc({"landmarks": lm})) != read, LANDMARK_NAMES[row]
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("landmark_points", "per_plane_attention")}
    legacy = DeltaplaneConfig.from_dict(old)
    assert legacy.landmark_points == LANDMARK_NAMES and legacy.per_plane_attention is False
    with pytest.raises(ValueError, match="landmark_points"):
        DeltaplaneConfig.tiny(landmark_points=("nose_tip", "chin"))


def test_scalar_token_features_by_hand():
    """What the eye, pose and landmark MLPs read: per scalar v, the value itself, then sin(w_k v) for
    the F bands, then cos(w_k v), w_k = w0 * 2^k (the eye's v is AU45 / eye_max). Both a sine and a
    cosine per band: a sine alone is odd, so a head turned left and right by the same angle would
    differ only in the sign of its features. Computed here from the inputs, scalar by scalar."""
    cfg = DeltaplaneConfig.tiny(scalar_freqs=3)
    enc = ConditionEncoder(cfg).eval()
    batch = _batch(cfg)
    seen = {}
    for name in ("eye", "pose", "landmarks"):
        getattr(enc, name).mlp[0].register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0]))
    with torch.no_grad():
        enc(batch)
    inputs = {"eye": (batch["blink"] / cfg.eye_max, math.pi), "pose": (batch["pose"], 1.0),
              "landmarks": (batch["landmarks"][:, list(cfg.landmark_index)].flatten(1), math.pi)}
    for name, (values, w0) in inputs.items():
        want = torch.tensor([[f for v in row.tolist()
                              for f in [v] + [math.sin(w0 * 2 ** k * v) for k in range(3)]
                              + [math.cos(w0 * 2 ** k * v) for k in range(3)]] for row in values])
        torch.testing.assert_close(seen[name], want, atol=SCALAR_FEATURE_ATOL, rtol=0, msg=name)


def test_audio_net_is_its_query_attending_over_the_window():
    """The audio token composed by hand from the audio net's pieces: the standardised features of
    each window frame through the frame encoder, plus the frame's learned position, layer-normed;
    the learned query attends over those frames and its own value is kept (residual: the token is
    out_norm(q + attention), so it does not start from the frames' average alone)."""
    cfg = DeltaplaneConfig.tiny(audio_tokens=2)
    enc = ConditionEncoder(cfg).eval()
    net = enc.audio
    with torch.no_grad():
        net.feature_mean.normal_(0.0, 1.0), net.feature_std.uniform_(0.5, 2.0)
    audio = _batch(cfg)["audio"]  # [B, W, S, A]
    B, W = audio.shape[:2]
    with torch.no_grad():
        per_frame = torch.stack([net.frame_encoder((audio[:, i] - net.feature_mean) / net.feature_std)
                                 for i in range(W)], dim=1)  # [B, W, D]
        frames = net.norm(per_frame + net.frame_pos)
        q = net.queries.expand(B, -1, -1)
        want = net.out(q + net.pool(q, frames))
        torch.testing.assert_close(net(audio), want, atol=ATTN_ATOL, rtol=0)


# --- split convolution and roll-out ----------------------------------------------------------------


def _changed_cells(axes: str, j: int, k: int, h0: int, w0: int, R: int) -> torch.Tensor:
    """Oracle: cells of plane j that share a world coordinate with cell (h0, w0) of plane k.

    Plane p's width indexes world axis PLANE_AXES[axes][p][0], its height the second. For each world
    axis both planes read, plane j's cells whose coordinate along it equals the perturbed cell's change.
    """
    pj, pk = PLANE_AXES[axes][j], PLANE_AXES[axes][k]
    coord_k = {pk[0]: w0, pk[1]: h0}
    hh, ww = torch.meshgrid(torch.arange(R), torch.arange(R), indexing="ij")
    coord_j = {pj[0]: ww, pj[1]: hh}
    mask = torch.zeros(R, R, dtype=torch.bool)
    for a in set(pj) & set(pk):
        mask |= coord_j[a] == coord_k[a]
    return mask


@pytest.mark.parametrize("axes", ["fixed", "eg3d"])
def test_rollout_reads_other_planes_only_through_the_shared_axis(axes):
    c, R, h0, w0 = 2, 8, 1, 5  # h0 != w0 so a swapped (transposed) axis would be caught
    rollout = RollOut(axes)
    x = torch.randn(1, 3 * c, R, R)
    for k in range(3):
        y = x.clone().view(1, 3, c, R, R)
        y[0, k, :, h0, w0] += 1.0
        diff = (rollout(y.view(1, 3 * c, R, R)) - rollout(x)).view(3, 3, c, R, R).abs().amax(dim=2)  # [j, slot, R, R]
        for j in range(3):
            others = [p for p in range(3) if p != j]
            for slot, src in enumerate([j] + others):
                if src != k:
                    expected = torch.zeros(R, R, dtype=torch.bool)
                elif slot == 0:  # the plane itself, untouched by the roll-out
                    expected = torch.zeros(R, R, dtype=torch.bool)
                    expected[h0, w0] = True
                else:
                    expected = _changed_cells(axes, j, k, h0, w0, R)
                    assert expected.any()
                assert torch.equal(diff[j, slot] > 0, expected), (axes, k, j, slot)


@pytest.mark.parametrize("axes", ["fixed", "eg3d"])
@pytest.mark.parametrize("R", [1, 2, 5])
def test_rolled_conv_equals_conv_of_rollout(axes, R):
    # The factored convolution (own channels + 1-D convolutions of the broadcast parts, padding
    # rows/columns corrected) against building the roll-out and convolving it: float64, forward
    # and every gradient. R = 1 and 2: the first and last rows/columns coincide or touch.
    from talk3d.models.deltaplane import RolledConv, plane_conv

    torch.manual_seed(R)
    cin, cout = 3, 4
    conv = plane_conv(3 * cin, cout).double()
    x = torch.randn(2, 3 * cin, R, R, dtype=torch.float64, requires_grad=True)
    got = RolledConv(axes)(x, conv.weight, conv.bias)
    want = conv(RollOut(axes)(x))
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    gy = torch.randn_like(want)
    params = (x, conv.weight, conv.bias)
    for a, b in zip(torch.autograd.grad(got, params, gy), torch.autograd.grad(want, params, gy)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("rollout", [True, False])
@pytest.mark.parametrize("skip_batch", [2, 1])
def test_plane_block_with_a_skip_equals_the_block_of_the_concatenation(rollout, skip_batch, few_ops):
    # A decoder block convolves the upsampled features and the encoder's skip separately (the skip
    # of batch 1 at inference, broadcast) instead of concatenating them: same output and gradients.
    from talk3d.models.deltaplane import PlaneBlock, cat_planes

    torch.manual_seed(skip_batch)
    block = PlaneBlock(2 * 3, 3, 1, "eg3d", rollout).double()
    x = torch.randn(2, 9, 5, 5, dtype=torch.float64, requires_grad=True)
    skip = torch.randn(skip_batch, 9, 5, 5, dtype=torch.float64, requires_grad=True)
    got = block(x, skip)
    want = block(cat_planes(x, skip.expand(2, -1, -1, -1)))
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    gy = torch.randn_like(want)
    params = (x, skip, *block.parameters())
    for a, b in zip(torch.autograd.grad(got, params, gy), torch.autograd.grad(want, params, gy)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="add up"):
        block(x, skip[:, :6])


@pytest.mark.parametrize("rollout", [True, False])
def test_plane_block_adds_its_residual(rollout):
    """A PlaneBlock is residual: with its second convolution at zero (weights and bias) its output is
    SiLU of the residual alone: the input itself when the widths match, else the 1x1 skip
    convolution of the input (for a decoder block, of the concatenation with the encoder's skip)."""
    from talk3d.models.deltaplane import PlaneBlock, cat_planes

    torch.manual_seed(0)
    same = PlaneBlock(4, 4, 2, "fixed", rollout).double()
    wide = PlaneBlock(4 + 2, 4, 2, "fixed", rollout).double()
    for block in (same, wide):
        with torch.no_grad():
            block.conv2.weight.zero_()
            block.conv2.bias.zero_()
    x = torch.randn(2, 3 * 4, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(same(x), torch.nn.functional.silu(x), rtol=0, atol=1e-12)
    up, skip = torch.randn(2, 3 * 4, 6, 6, dtype=torch.float64), torch.randn(2, 3 * 2, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(wide(up, skip), torch.nn.functional.silu(wide.skip(cat_planes(up, skip))),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("rollout", [True, False])
def test_plane_block_by_hand(rollout):
    """A PlaneBlock composed by hand from its own layers, with the roll-out built explicitly
    (RollOut, then the block's first convolution of it): conv1 -> GN -> SiLU -> conv2 -> GN, plus
    the 1x1 skip convolution of the input, -> SiLU. Non-trivial GroupNorm affines so that a norm
    or activation left out shows."""
    from talk3d.models.deltaplane import PlaneBlock

    block = PlaneBlock(4, 6, 2, "fixed", rollout).double()
    with torch.no_grad():
        for norm in (block.norm1, block.norm2):
            norm.weight.normal_(1.0, 0.3), norm.bias.normal_(0.0, 0.3)
    x = torch.randn(2, 3 * 4, 6, 6, dtype=torch.float64)
    silu = torch.nn.functional.silu
    with torch.no_grad():
        h = silu(block.norm1(block.conv1(RollOut("fixed")(x) if rollout else x)))
        want = silu(block.norm2(block.conv2(h)) + block.skip(x))
        torch.testing.assert_close(block(x), want, atol=1e-12, rtol=0)


@pytest.fixture(params=[False, True], ids=["cpu-form", "gpu-form"])
def few_ops(request, monkeypatch):
    """Run a test with each of the U-Net's two exact forms: fewer multiply-adds (the CPU's) and fewer
    operations (a GPU's, :func:`talk3d.models.deltaplane.few_ops`)."""
    from talk3d.models import deltaplane

    monkeypatch.setattr(deltaplane, "few_ops", lambda x: request.param)
    return request.param


@pytest.mark.parametrize("H, W", [(1, 1), (2, 3), (5, 4)])
def test_upsample_conv_equals_conv_of_nearest_upsampling(H, W, few_ops):
    # Four 2x2 phase convolutions of the low-resolution input against the 3x3 convolution of the
    # 2x nearest upsampling, forward and every gradient, in float64.
    import torch.nn.functional as F

    from talk3d.models.deltaplane import plane_conv, upsample_conv

    torch.manual_seed(H * W)
    conv = plane_conv(3, 4).double()
    x = torch.randn(2, 9, H, W, dtype=torch.float64, requires_grad=True)
    got = upsample_conv(x, conv)
    want = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    gy = torch.randn_like(want)
    params = (x, conv.weight, conv.bias)
    for a, b in zip(torch.autograd.grad(got, params, gy), torch.autograd.grad(want, params, gy)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_expanded_identity_planes_are_encoded_once(few_ops):
    # One P_ID expanded along the batch (as TalkingHead trains) is encoded at batch 1 and broadcast:
    # same deltaplane and the same gradients (P_ID's and every parameter's) as B separate copies.
    # float64, so that summing the frames' weight gradients in another order shows as nothing.
    cfg = DeltaplaneConfig.tiny()
    model = _perturbed(cfg).train().double()
    torch.manual_seed(0)
    p_id = _planes(cfg, 1).double().requires_grad_()
    batch = {k: v.double() for k, v in _batch(cfg, 3).items()}
    seen = []
    encode = model.predictor.encode
    model.predictor.encode = lambda x: seen.append(x.shape[0]) or encode(x)
    torch.manual_seed(1)  # the same training-mode eye noise in both calls
    shared = model(p_id.expand(3, -1, -1, -1, -1), batch)
    torch.manual_seed(1)
    copies = model(p_id.repeat(3, 1, 1, 1, 1), batch)
    assert seen == [1, 3]
    torch.testing.assert_close(shared, copies, atol=1e-12, rtol=0)
    gy = torch.randn_like(shared)
    params = (p_id, *model.parameters())
    for a, b in zip(torch.autograd.grad(shared, params, gy), torch.autograd.grad(copies, params, gy)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("axes", ["fixed", "eg3d"])
def test_decode_with_precomputed_skip_shares(axes):
    # Inference computes each decoder block's share of its (fixed) encoder skip once: decoding with
    # the shares equals decoding with the skips, in float64.
    cfg = DeltaplaneConfig.tiny(axes=axes)
    model = _perturbed(cfg).double()
    pred = model.predictor
    with torch.no_grad():
        x, skips = pred.encode(_planes(cfg, 1).double().reshape(1, -1, cfg.plane_resolution, cfg.plane_resolution))
        tokens = model.condition({k: v.double() for k, v in _batch(cfg, 3).items()})
        want = pred.decode(x, skips, tokens)
        got = pred.decode(x, skips, tokens, shares=pred.skip_shares(skips))
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_rolled_conv_keeps_the_checkpoint_keys():
    # The factored roll-out holds no state: a block's keys are those of RollOut + conv1.
    from talk3d.models.deltaplane import PlaneBlock

    keys = set(PlaneBlock(4, 8, 2, "fixed", rollout=True).state_dict())
    assert keys == {f"{m}.{p}" for m in ("conv1", "norm1", "conv2", "norm2", "skip") for p in ("weight", "bias")}


@pytest.mark.parametrize("axes", ["fixed", "eg3d"])
def test_planes_meet_only_through_rollout(axes):
    planes, batch = _planes(DeltaplaneConfig.tiny(), 1), _batch(DeltaplaneConfig.tiny(), 1)
    bumped = planes.clone()
    bumped[:, 1, :, 3, 9] += 1.0  # a local change in plane 1
    with torch.no_grad():
        for rollout in (True, False):
            model = _perturbed(DeltaplaneConfig.tiny(axes=axes, rollout=rollout))
            diff = (model(bumped, batch) - model(planes, batch)).abs().amax(dim=(0, 2, 3, 4))  # [3]
            assert diff[1] > DEPENDENCE_MIN
            if rollout:
                assert diff[0] > DEPENDENCE_MIN and diff[2] > DEPENDENCE_MIN
            else:  # split convolution, in-plane self-attention, cross-attention to tokens only
                assert diff[0] == 0 and diff[2] == 0


def test_three_level_unet_decodes_each_skip_at_its_level():
    """With three levels (the release has four; the tiny config two, so one skip) the decoder's
    first block, at the middle resolution, reads the middle encoder level's skip and the last block
    the top level's, deepest first: the encoder's skips are consumed from the end. Each decoder
    block's skip must match its input's resolution and width."""
    cfg = DeltaplaneConfig.tiny(channels=(8, 12, 16))
    model = _perturbed(cfg)
    pred = model.predictor
    seen = []
    for block in pred.dec:
        block.register_forward_pre_hook(lambda m, args: seen.append((args[0].shape, args[1].shape)))
    planes = _planes(cfg, 1)
    with torch.no_grad():
        _, skips = pred.encode(planes.reshape(1, -1, cfg.plane_resolution, cfg.plane_resolution))
        out = model(planes, _batch(cfg, 1))
    assert out.shape == planes.shape
    R = cfg.plane_resolution
    assert [tuple(s.shape[1:]) for s in skips] == [(3 * 8, R, R), (3 * 12, R // 2, R // 2)]
    assert [tuple(x[1:]) for x, _ in seen] == [(3 * 12, R // 2, R // 2), (3 * 8, R, R)]
    assert [tuple(s[1:]) for _, s in seen] == [(3 * 12, R // 2, R // 2), (3 * 8, R, R)]


# --- attention and positional encoding -------------------------------------------------------------


def _naive_attention(q, k, v, pad):
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # [B, H, L, S]
    if pad is not None:
        scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1) @ v


def test_per_plane_block_is_three_shared_blocks_with_each_planes_weights():
    """The release's block: plane p goes through its own layer norms, self-attention and
    feed-forward (slice p of each PlaneLinear / PlaneLayerNorm), and the shared cross-attention."""
    from talk3d.models.attention import TransformerBlock

    torch.manual_seed(0)
    d, hd, t = 16, 8, 12
    block = TransformerBlock(d, hd, t, ff_mult=2, per_plane=True)
    with torch.no_grad():  # non-trivial norms: ones/zeros would hide a plane mix-up
        for m in (block.norm_sa, block.norm_ca, block.norm_ff):
            m.weight.normal_(1.0, 0.3), m.bias.normal_(0.0, 0.3)
    x, ctx = torch.randn(2, 3, 10, d), torch.randn(2, 4, t)
    out = block(x, ctx)
    for p in range(3):
        ref = TransformerBlock(d, hd, t, ff_mult=2, per_plane=False)
        with torch.no_grad():
            for name, param in ref.named_parameters():
                src = dict(block.named_parameters())[name]
                param.copy_(src if name.startswith("cross_attn") else src[p])
        torch.testing.assert_close(out[:, p], ref(x, ctx)[:, p], atol=ATTN_ATOL, rtol=0)


def test_legacy_config_builds_the_shared_block_model_its_checkpoint_holds():
    """A deltaplane config saved before per-plane attention, the landmark points, the audio net's
    strided convolutions and the rename of eye_noise_std loads as it was trained: its state dict (with
    the audio MLP's old key names) loads strictly, and the model runs."""
    shared = DeltaplaneConfig.tiny(per_plane_attention=False, landmark_points=LANDMARK_NAMES, audio_steps=2,
                                   audio_encoder="mlp")
    state = {k.replace("audio.frame_encoder.mlp.", "audio.frame_mlp."): v
             for k, v in DeltaplaneModel(shared).state_dict().items() if not k.endswith(("_mean", "_std"))}
    assert any(".frame_mlp." in k for k in state) and not any("feature_" in k for k in state)
    old = shared.to_dict()
    del old["per_plane_attention"], old["landmark_points"], old["audio_encoder"]
    old["eye_noise_std"] = old.pop("eye_noise")
    cfg = DeltaplaneConfig.from_dict(json.loads(json.dumps(old)))
    assert cfg == shared
    model = DeltaplaneModel(cfg).eval()
    model.load_state_dict(state, strict=True)
    assert model(_planes(cfg), _batch(cfg)).shape == _planes(cfg).shape
    audio = model.condition.audio  # fed unstandardised features: the identity statistics
    assert torch.equal(audio.feature_mean, torch.zeros(cfg.audio_dim)) and torch.equal(audio.feature_std,
                                                                                       torch.ones(cfg.audio_dim))


def test_attention_matches_naive_softmax():
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 6)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 4:] = True
    torch.testing.assert_close(attention(q, k, v), _naive_attention(q, k, v, None), atol=ATTN_ATOL, rtol=0)
    torch.testing.assert_close(attention(q, k, v, pad), _naive_attention(q, k, v, pad), atol=ATTN_ATOL, rtol=0)
    # The module: heads split from the projections, merged, projected out.
    mha = MultiHeadAttention(8, heads=2, head_dim=3, context_dim=5)
    x, ctx = torch.randn(2, 4, 8), torch.randn(2, 7, 5)
    split = lambda t: t.view(2, -1, 2, 3).transpose(1, 2)  # noqa: E731  [B, L, 6] -> [B, 2, L, 3]
    heads = _naive_attention(split(mha.to_q(x)), split(mha.to_k(ctx)), split(mha.to_v(ctx)), pad)
    expected = mha.to_out(heads.transpose(1, 2).reshape(2, 4, 6))
    torch.testing.assert_close(mha(x, ctx, pad), expected, atol=ATTN_ATOL, rtol=0)


@pytest.mark.parametrize("axes", ["fixed", "eg3d"])
def test_plane_positions_and_encoding(axes):
    r = 4
    pos = plane_positions(axes, r)  # [3, r*r, 3]
    centres = (2 * torch.arange(r) + 1) / r - 1
    for j, (a_w, a_h) in enumerate(PLANE_AXES[axes]):
        grid = pos[j].view(r, r, 3)
        assert torch.equal(grid[..., a_w], centres.expand(r, r))  # width -> a_w
        assert torch.equal(grid[..., a_h], centres[:, None].expand(r, r))  # height -> a_h
        assert torch.equal(grid[..., 3 - a_w - a_h], torch.zeros(r, r))  # the unread axis is 0
    pe = plane_positional_encoding(axes, r, 16)  # [3, r*r, 16]
    assert pe.shape == (3, r * r, 16)
    for j in range(3):
        dist = torch.cdist(pe[j], pe[j]) + torch.eye(r * r) * 1e9
        assert dist.min() > PE_MIN_DISTANCE


def _hand_positional_encoding(axes: str, r: int, dim: int) -> torch.Tensor:
    """Oracle for plane_positional_encoding, cell by cell in float64: cell (h, w) of plane j sits at
    (2w + 1) / r - 1 along the world axis its width reads and (2h + 1) / r - 1 along its height's
    (0 along the third); per world axis x, y, z come F = dim // 6 sines then F cosines, at angular
    frequencies log-spaced from pi to pi * r / 2; zeros pad the rest."""
    n = dim // 6
    omegas = [math.pi * (r / 2) ** (k / (n - 1)) for k in range(n)]
    out = torch.zeros(3, r * r, dim, dtype=torch.float64)
    for j, (a_w, a_h) in enumerate(PLANE_AXES[axes]):
        for h in range(r):
            for w in range(r):
                xyz = [0.0, 0.0, 0.0]
                xyz[a_w], xyz[a_h] = (2 * w + 1) / r - 1, (2 * h + 1) / r - 1
                feats = [f(o * v) for v in xyz for f in (math.sin, math.cos) for o in omegas]
                out[j, h * r + w, :len(feats)] = torch.tensor(feats, dtype=torch.float64)
    return out


@pytest.mark.parametrize("axes", ["fixed", "eg3d"])
def test_positional_encoding_values_by_hand(axes):
    """The 3-D sinusoidal encoding carries both a sine and a cosine of every band (a sine alone is
    odd, so cells mirrored about the centre would differ only in sign, and its lowest band is not
    injective on (-1, 1)), and its top band sits at the grid's Nyquist frequency, pi * r / 2: one
    half period per cell. A top band at twice that has a whole period per cell, so it reads the same
    at every cell (aliased to a constant) and carries no position."""
    r, dim = 8, 20  # F = 3 bands per axis (pi, 2 pi, 4 pi), 18 features, 2 of padding
    got = plane_positional_encoding(axes, r, dim)
    # float32 sin / cos of arguments up to 4 pi: a few ulps of the argument.
    torch.testing.assert_close(got.double(), _hand_positional_encoding(axes, r, dim), atol=PE_VALUE_ATOL, rtol=0)


def test_transformer_block_is_pre_norm_residual():
    """One of the paper's N_A attention layers, composed by hand from its own pieces: self-attention
    within each plane, cross-attention of all 3L plane tokens to the condition tokens, GEGLU
    feed-forward, each reading its own layer norm of the running tokens and added to them (pre-norm
    residuals). The norms get random affine parameters so that one read in place of another shows."""
    from talk3d.models.attention import TransformerBlock

    d, hd, t, L = 16, 8, 12, 10
    for per_plane in (True, False):
        block = TransformerBlock(d, hd, t, ff_mult=2, per_plane=per_plane)
        with torch.no_grad():
            for m in (block.norm_sa, block.norm_ca, block.norm_ff):
                m.weight.normal_(1.0, 0.3), m.bias.normal_(0.0, 0.3)
        x, ctx = torch.randn(2, 3, L, d), torch.randn(2, 4, t)
        pad = torch.tensor([[False, False, True, False], [False, True, False, False]])
        with torch.no_grad():
            h = x + block.self_attn(block.norm_sa(x))
            h = h + block.cross_attn(block.norm_ca(h).reshape(2, 3 * L, d), ctx, pad).view(2, 3, L, d)
            want = h + block.ff(block.norm_ff(h))
            got = block(x, ctx, pad)
        torch.testing.assert_close(got, want, atol=ATTN_ATOL, rtol=0)


def test_geglu_feed_forward_by_hand():
    """Shazeer's GEGLU as the release's (latent-diffusion) blocks lay it out: the first half of the
    input projection is the value, the second half the gate, and the value is multiplied by the
    exact (erf) GELU of the gate, then projected out. Computed here from the weight slices."""
    from talk3d.models.attention import GEGLUFeedForward

    dim, mult = 6, 2
    ff = GEGLUFeedForward(dim, mult).double()
    x = torch.randn(5, dim, dtype=torch.float64)
    w1, b1, w2, b2 = ff.proj_in.weight, ff.proj_in.bias, ff.proj_out.weight, ff.proj_out.bias
    hidden = mult * dim
    value = x @ w1[:hidden].T + b1[:hidden]
    gate = x @ w1[hidden:].T + b1[hidden:]
    gelu = 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2.0)))
    with torch.no_grad():
        torch.testing.assert_close(ff(x), (value * gelu) @ w2.T + b2, atol=1e-12, rtol=0)


def test_bottleneck_tokens_are_the_cells_features_plus_positions_once(monkeypatch):
    """Eq. 4 at the bottleneck, with two attention blocks (the release's N_A): the first block reads
    one token per cell of each plane, its D channels at that cell plus the cell's positional
    encoding (added once, before the first block); the second block reads the first one's output
    as it is; the decoder reads the last block's tokens laid back on the cells. Layouts built here
    by explicit permutes of [B, 3, D, r, r]."""
    from talk3d.models import deltaplane

    cfg = DeltaplaneConfig.tiny(attention_blocks=2)
    model = _perturbed(cfg)
    pred, B, D, r = model.predictor, 2, cfg.channels[-1], cfg.bottleneck_resolution
    seen = {}
    for n, block in enumerate(pred.attn):
        block.register_forward_pre_hook(lambda m, args, n=n: seen.__setitem__(f"in{n}", args[0].clone()))
        block.register_forward_hook(lambda m, args, out, n=n: seen.__setitem__(f"out{n}", out.clone()))
    upsample = deltaplane.upsample_conv  # the decoder's first use of the bottleneck's features
    monkeypatch.setattr(deltaplane, "upsample_conv",
                        lambda t, conv: (seen.setdefault("decoder_in", t.clone()), upsample(t, conv))[1])
    with torch.no_grad():
        x, skips = pred.encode(_planes(cfg, 1).reshape(1, -1, cfg.plane_resolution, cfg.plane_resolution))
        pred.decode(x, skips, model.condition(_batch(cfg, B)))
    cells = x.expand(B, -1, -1, -1).reshape(B, 3, D, r, r).permute(0, 1, 3, 4, 2).reshape(B, 3, r * r, D)
    assert torch.equal(seen["in0"], cells + plane_positional_encoding(cfg.axes, r, D))
    assert torch.equal(seen["in1"], seen["out0"])
    laid_back = seen["out1"].reshape(B, 3, r, r, D).permute(0, 1, 4, 2, 3).reshape(B, 3 * D, r, r)
    assert torch.equal(seen["decoder_in"], laid_back)


def test_deltaplane_is_the_zero_initialised_conv_of_the_activated_output_norm():
    """The U-Net's head: the last decoder block's features go through the output GroupNorm and a
    SiLU before the (zero-initialised) per-plane convolution, as a latent-diffusion U-Net's output
    (GN, SiLU, conv): the convolution reads SiLU of the norm's output, not the norm's output."""
    cfg = DeltaplaneConfig.tiny()
    model = _perturbed(cfg)
    seen = {}
    model.predictor.out_norm.register_forward_hook(lambda m, args, out: seen.__setitem__("norm", out.clone()))
    model.predictor.out_conv.register_forward_pre_hook(lambda m, args: seen.__setitem__("conv_in", args[0].clone()))
    with torch.no_grad():
        model(_planes(cfg), _batch(cfg))
    assert (seen["norm"] < 0).any()  # else SiLU and identity could not be told apart by sign
    torch.testing.assert_close(seen["conv_in"], torch.nn.functional.silu(seen["norm"]), atol=0, rtol=0)


# --- configuration and input checks ----------------------------------------------------------------


def test_config_round_trip_and_unknown_key():
    for cfg in (DeltaplaneConfig.release(), DeltaplaneConfig.tiny(axes="eg3d", use_null=False)):
        assert DeltaplaneConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        DeltaplaneConfig.from_dict({"channels": [8, 16], "no_audio": True})
    with pytest.raises(ValueError, match="axes"):
        DeltaplaneConfig.tiny(axes="yz")
    with pytest.raises(ValueError, match="token type"):
        DeltaplaneConfig.tiny(use_audio=False, use_eye=False, use_pose=False, use_landmarks=False, use_null=False)
    with pytest.raises(ValueError, match="plane_resolution"):
        DeltaplaneConfig.tiny(plane_resolution=10, channels=(8, 8, 16))
    release = DeltaplaneConfig.release()
    assert release.bottleneck_resolution == 32 and release.channels == (32, 64, 128, 256)
    assert release.num_tokens == 5 and release.token_dim == 64


def test_release_config_is_the_public_releases():
    """DeltaplaneConfig.release() against the release's facts (reference/numerics.md, "Talk3D (public
    release) training facts"), written out here rather than read from the class: the U-Net's
    sizes, two attention blocks of head dim 64, 64-d tokens, a window of 8 frames of 16 steps of the
    44 CTC logits, AU45 clipped to [0, 2] with +-0.05 uniform noise in training, and all five token
    types on."""
    cfg = DeltaplaneConfig.release()
    assert (cfg.plane_channels, cfg.plane_resolution, cfg.channels) == (32, 256, (32, 64, 128, 256))
    assert (cfg.attention_blocks, cfg.head_dim, cfg.bottleneck_resolution) == (2, 64, 32)
    assert (cfg.token_dim, cfg.audio_window, cfg.audio_steps, cfg.audio_dim) == (64, 8, 16, 44)
    assert (cfg.eye_max, cfg.eye_noise) == (2.0, 0.05)
    assert cfg.rollout and cfg.per_plane_attention and cfg.audio_encoder == "conv" and cfg.axes == "fixed"
    assert cfg.token_counts() == {"audio": 1, "eye": 1, "pose": 1, "landmarks": 1, "null": 1}


def test_bad_inputs_raise_value_error_naming_the_argument():
    cfg = DeltaplaneConfig.tiny()
    model = DeltaplaneModel(cfg)
    planes, batch = _planes(cfg), _batch(cfg)
    tokens = model.condition(batch)
    C, R = cfg.plane_channels, cfg.plane_resolution
    for bad in (torch.randn(2, 3, C + 1, R, R), torch.randn(2, 3, C, R, 2 * R), torch.randn(2, 3 * C, R),
                torch.zeros(2, 3, C, R, R, dtype=torch.long)):
        with pytest.raises(ValueError, match="planes"):
            model.predictor(bad, tokens)
    with pytest.raises(ValueError, match="tokens"):
        model.predictor(planes, tokens[..., :-1])
    with pytest.raises(ValueError, match="tokens"):
        model.predictor(planes, tokens[:1])
    with pytest.raises(ValueError, match="key_padding_mask"):
        model.predictor(planes, tokens, torch.zeros(2, tokens.shape[1] + 1, dtype=torch.bool))
    for key, value in [("audio", batch["audio"][:, :, :1]), ("blink", batch["blink"][:, 0]),
                       ("pose", batch["pose"][:1]), ("landmarks", batch["landmarks"][:, :3])]:
        with pytest.raises(ValueError, match=f"batch\\['{key}'\\]"):
            model(planes, dict(batch, **{key: value}))
    with pytest.raises(ValueError, match="batch\\['audio'\\]: missing"):
        model(planes, {k: v for k, v in batch.items() if k != "audio"})


# --- training ---------------------------------------------------------------------------------------


def test_training_steps_reduce_loss():
    cfg = DeltaplaneConfig.tiny(eye_noise=0.0)
    model = DeltaplaneModel(cfg)
    planes, batch = _planes(cfg), _batch(cfg)
    # Toy target: a deltaplane that is a smooth function of the identity planes.
    target = 0.5 * torch.tanh(planes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = (model(planes, batch) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[1] < losses[0]
    assert losses[-1] < 0.95 * losses[0]


def _expected_parameter_counts(cfg: DeltaplaneConfig) -> tuple[int, int]:
    """(U-Net, condition encoder) parameter counts worked out from the architecture the issue and the
    paper describe, independently of the modules: every plane has its own weights (grouped
    convolutions, 3 groups); a block's first convolution sees its input rolled out (the plane's own
    channels plus the two other planes' pooled ones: 3x the input channels)."""
    P, c_in, (c0, c1, c2, c3) = 3, cfg.plane_channels, cfg.channels

    def conv(cin, cout, k=3, rollout=False):  # per-plane weights and biases
        return P * (cout * cin * (3 if rollout else 1) * k * k + cout)

    def norm(c):
        return 2 * P * c

    def block(cin, cout):  # roll-out conv, norm, conv, norm, 1x1 skip when the width changes
        return (conv(cin, cout, rollout=True) + norm(cout) + conv(cout, cout) + norm(cout)
                + (conv(cin, cout, k=1) if cin != cout else 0))

    d, t, ff = c3, cfg.token_dim, cfg.ff_mult * c3
    copies = P if cfg.per_plane_attention else 1     # the release: one set per plane but the cross-attention
    attention = (copies * (3 * 2 * d                 # three layer norms
                           + 4 * d * d + d           # self-attention q, k, v, out (+ out bias)
                           + d * 2 * ff + 2 * ff + ff * d + d)  # GEGLU: in to 2 x ff (gate), out
                 + 2 * d * d + 2 * d * t + d)        # cross-attention q, out over d; k, v from tokens
    unet = (block(c_in, c0) + block(c0, c1) + block(c1, c2) + block(c2, c3)     # encoder
            + conv(c0, c0) + conv(c1, c1) + conv(c2, c2)                     # strided downsampling
            + cfg.attention_blocks * attention
            + conv(c3, c2) + conv(c2, c1) + conv(c1, c0)                     # upsampling convolutions
            + block(2 * c2, c2) + block(2 * c1, c1) + block(2 * c0, c0)      # decoder (with skips)
            + norm(c0) + conv(c0, c_in))                                     # output
    D, H, nf = cfg.token_dim, cfg.token_hidden, cfg.scalar_freqs

    def mlp(n_in):  # sinusoidal encoding (x, sin, cos at nf frequencies) -> H -> D, layer norm
        return n_in * (1 + 2 * nf) * H + H + H * D + D + 2 * D

    if cfg.audio_encoder == "mlp":
        per_frame = cfg.audio_dim * cfg.audio_steps * H + H + H * D + D          # one MLP over all steps
    else:  # ceil(log2 S) kernel-3 convolutions (D / 2 wide for the first half, then D), then the MLP
        n = max(1, math.ceil(math.log2(cfg.audio_steps)))
        widths = [D // 2] * (n // 2) + [D] * (n - n // 2)
        per_frame = sum(3 * c * w + w for c, w in zip([cfg.audio_dim] + widths, widths)) + D * H + H + H * D + D
    audio = (cfg.audio_window * D + cfg.audio_tokens * D                     # positions, queries
             + per_frame + 2 * D                                             # per-frame encoder, norm
             + 4 * D * D + D + 2 * D)                                        # attention pool, norm
    tokens = D + audio + mlp(1) + mlp(3) + mlp(2 * len(cfg.landmark_points))  # null, audio, eye, pose, landmarks
    return unet, tokens


def test_release_size_parameter_count():
    cfg = DeltaplaneConfig.release()
    with torch.device("meta"):
        predictor = DeltaplanePredictor(cfg)
        encoder = ConditionEncoder(cfg)
    n_pred = sum(p.numel() for p in predictor.parameters())
    n_enc = sum(p.numel() for p in encoder.parameters())
    assert (n_pred, n_enc) == _expected_parameter_counts(cfg)
    assert (n_pred, n_enc) == (18_668_992, 96_896)  # 18.7 M + 97 k at the release sizes
    shared = DeltaplaneConfig.release(per_plane_attention=False, audio_steps=2, landmark_points=LANDMARK_NAMES,
                                      audio_encoder="mlp")
    with torch.device("meta"):
        counts = (sum(p.numel() for p in DeltaplanePredictor(shared).parameters()),
                  sum(p.numel() for p in ConditionEncoder(shared).parameters()))
    assert counts == _expected_parameter_counts(shared) == (14_458_304, 78_656)  # the sizes before 2026-12-07


# --- the encoder cache of inference ------------------------------------------------------------------

#: Cached and uncached inference run the same float32 ops on the same values except for the batch
#: broadcast of the encoder features (B = 1 instead of B copies), which can change the blocking of
#: the convolutions: a few ulps at most (measured on the CPU VM: identical, 0.0).
CACHE_ATOL = 1e-5


def _talking_head(**deltaplane):
    import dataclasses

    from talk3d.models import GeneratorConfig, TalkingHead, TriplaneGenerator

    g = dataclasses.replace(GeneratorConfig.tiny(), plane_resolution=16, plane_channels=4,
                            neural_rendering_resolution=8, sr_resolution=16, sr_channels=(4,),
                            coarse_samples=4, importance_samples=4)
    dcfg = dataclasses.replace(DeltaplaneConfig.tiny(**deltaplane), plane_channels=4, plane_resolution=16, axes=g.axes)
    torch.manual_seed(0)
    gen = TriplaneGenerator(g)
    head = TalkingHead(gen, dcfg, torch.randn(1, 3, 4, 16, 16), torch.randn(1, gen.num_ws, g.w_dim),
                       learn_identity=False).eval()
    with torch.no_grad():
        head.deltaplane.predictor.out_conv.weight.normal_(0.0, LAST_LAYER_STD)
    return head


def test_a_model_without_the_audio_token_needs_no_audio_in_its_batch():
    """An ablation with the audio token off (``use_audio=False``) renders frames from a batch that
    holds no audio: the batch size comes from the cameras."""
    from talk3d.render import look_at_camera

    head = _talking_head(use_audio=False)
    batch = {**_batch(head.deltaplane.cfg, 3), "camera": look_at_camera(torch.tensor([0.1, 0.0, -0.2]), torch.zeros(3))}
    del batch["audio"]
    with torch.inference_mode():
        out = head(batch, impl="torch", deterministic=True)
    assert out["delta"].shape[0] == 3 and bool(torch.isfinite(out["delta"]).all())


def test_inference_caches_the_encoder_of_the_identity_planes():
    from talk3d.render import look_at_camera

    head = _talking_head()
    cfg = head.deltaplane.cfg
    batch = {**_batch(cfg, 3), "camera": look_at_camera(torch.tensor([0.1, 0.0, -0.2]), torch.zeros(3))}
    calls = []
    head.deltaplane.predictor.enc[0].register_forward_hook(lambda *a: calls.append(1))
    kw = dict(impl="torch", deterministic=True)
    with torch.enable_grad():
        ref = head(batch, **kw)["delta"].detach()  # gradients on: no cache
    assert head._encoding is None and len(calls) == 1
    with torch.inference_mode():
        a = head(batch, **kw)["delta"]
        b = head(batch, **kw)["delta"]
    assert len(calls) == 2  # the encoder ran once for both frames' batches
    print(f"cached vs uncached deltaplane: max |diff| {float((a - ref).abs().max()):.2e}")
    torch.testing.assert_close(a, ref, atol=CACHE_ATOL, rtol=0)
    assert torch.equal(a, b)
    # An optimiser step on the encoder (or a new P_ID) invalidates the cache.
    with torch.no_grad():
        next(head.deltaplane.predictor.enc[0].parameters()).add_(0.01)
        c = head(batch, **kw)["delta"]
        head.identity_planes.mul_(1.5)
        d = head(batch, **kw)["delta"]
    assert len(calls) == 4 and not torch.equal(c, b) and not torch.equal(d, c)
    # So does one on a decoder block: the cache holds its share of the encoder's skip.
    with torch.no_grad():
        head.deltaplane.predictor.dec[0].conv1.weight.add_(0.01)
        e = head(batch, **kw)["delta"]
    assert len(calls) == 5 and not torch.equal(e, d)
    # Training mode never uses (and drops) the cache.
    head.train()
    assert head._encoding is None


def test_encoder_cache_is_not_shared_between_autocast_and_full_precision():
    """The cached encoding of P_ID is computed under whatever autocast is on: features encoded in
    bfloat16 must not be reused by a full-precision call (nor the other way), so the cache key holds
    the autocast dtype. A float32 call after a bf16-autocast one encodes again and matches the
    uncached float32 deltaplane."""
    from talk3d.render import look_at_camera

    head = _talking_head()
    batch = {**_batch(head.deltaplane.cfg, 2), "camera": look_at_camera(torch.tensor([0.1, -0.1]), torch.zeros(2))}
    calls = []
    head.deltaplane.predictor.enc[0].register_forward_hook(lambda *a: calls.append(1))
    kw = dict(impl="torch", deterministic=True)
    with torch.enable_grad():
        ref = head(batch, **kw)["delta"].detach()  # float32, gradients on: no cache
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            head(batch, **kw)
        full = head(batch, **kw)["delta"]
    assert len(calls) == 3  # the reference, the bf16 encoding, the float32 one
    torch.testing.assert_close(full, ref, atol=CACHE_ATOL, rtol=0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_inference_under_autocast_renders_half_precision_planes_on_a_gpu(device):
    # The fast path's render reads bf16 planes under autocast at inference on a GPU; with gradients
    # on (training), and on the CPU (whose kernels take fp32), the planes stay fp32.
    from talk3d.render import look_at_camera

    head = _talking_head().to(device)
    batch = {**_batch(head.deltaplane.cfg, 2), "camera": look_at_camera(torch.tensor([0.1, -0.1]), torch.zeros(2))}
    batch = {k: v.to(device) for k, v in batch.items()}
    seen = []
    synthesis = head.generator.synthesis
    head.generator.synthesis = lambda ws, c, planes, **kw: seen.append(planes.dtype) or synthesis(ws, c, planes=planes, **kw)
    with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16):
        out = head(batch, impl="auto" if device == "cuda" else "torch", deterministic=True)
    with torch.enable_grad(), torch.autocast(device, dtype=torch.bfloat16):
        head(batch, impl="torch", deterministic=True)
    half = torch.bfloat16 if device == "cuda" else torch.float32
    assert seen == [half, torch.float32]
    assert out["image"].dtype == torch.float32 and torch.isfinite(out["image"]).all()


def test_few_ops_follows_the_device_unless_forced(monkeypatch):
    from talk3d.models import deltaplane

    x = torch.zeros(1)
    monkeypatch.setattr(deltaplane, "FEW_OPS_ENV", "")
    assert deltaplane.few_ops(x) is False  # the CPU: fewer multiply-adds
    monkeypatch.setattr(deltaplane, "FEW_OPS_ENV", "1")
    assert deltaplane.few_ops(x) is True
    monkeypatch.setattr(deltaplane, "FEW_OPS_ENV", "0")
    assert deltaplane.few_ops(x) is False
