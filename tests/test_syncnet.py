"""Wav2Lip's lip-sync expert in torch (talk3d.losses.syncnet).

No real ``lipsync_expert.pth`` is available, so checkpoints are written here in its format
(``{"state_dict", "optimizer", "global_step", "global_epoch"}``, keys as Wav2Lip's SyncNet_color
names them, optionally with DataParallel's ``module.`` prefix) from this file's own layer table,
and the network's wiring is compared with a functional re-implementation of that table.
The mel front-end is checked against a numpy re-implementation and the Slaney scale's properties
(librosa is not installed here).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from talk3d.losses import syncnet as S
from talk3d.losses.syncnet import (
    ENV_VAR,
    SyncLoss,
    SyncNet,
    faces_from_frames,
    find_syncnet_weights,
    load_syncnet,
    mel_filterbank,
    mel_windows,
    sync_confidence,
    syncnet_status,
    wav2lip_mel,
)

# Float32 convolutions through 17 layers, summed in a different order than our reference: the
# embeddings (unit vectors) agree to ~1e-6; 1e-4 leaves room for other BLAS back ends.
EMB_TOL = 1e-4
# Numpy float64 mel vs torch float64 mel: only FFT rounding differs (values span [-4, 4]).
MEL_TOL = 1e-9
# A bin-sum approximates each triangle's area (exactly 1 over Hz) to within the 20 Hz bin spacing
# relative to the band's width; bands wider than 8 bins stay within this.
AREA_TOL = 0.08

# Wav2Lip SyncNet_color, written from its models/syncnet.py: (cin, cout, kernel, stride, pad, residual).
FACE = [(15, 32, 7, 1, 3, 0), (32, 64, 5, (1, 2), 1, 0), (64, 64, 3, 1, 1, 1), (64, 64, 3, 1, 1, 1),
        (64, 128, 3, 2, 1, 0), (128, 128, 3, 1, 1, 1), (128, 128, 3, 1, 1, 1), (128, 128, 3, 1, 1, 1),
        (128, 256, 3, 2, 1, 0), (256, 256, 3, 1, 1, 1), (256, 256, 3, 1, 1, 1),
        (256, 512, 3, 2, 1, 0), (512, 512, 3, 1, 1, 1), (512, 512, 3, 1, 1, 1),
        (512, 512, 3, 2, 1, 0), (512, 512, 3, 1, 0, 0), (512, 512, 1, 1, 0, 0)]
AUDIO = [(1, 32, 3, 1, 1, 0), (32, 32, 3, 1, 1, 1), (32, 32, 3, 1, 1, 1),
         (32, 64, 3, (3, 1), 1, 0), (64, 64, 3, 1, 1, 1), (64, 64, 3, 1, 1, 1),
         (64, 128, 3, 3, 1, 0), (128, 128, 3, 1, 1, 1), (128, 128, 3, 1, 1, 1),
         (128, 256, 3, (3, 2), 1, 0), (256, 256, 3, 1, 1, 1), (256, 256, 3, 1, 1, 1),
         (256, 512, 3, 1, 0, 0), (512, 512, 1, 1, 0, 0)]


def wav2lip_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under Wav2Lip's key names (He-scaled so activations survive 17 layers)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for enc, layers in (("face_encoder", FACE), ("audio_encoder", AUDIO)):
        for i, (cin, cout, k, *_rest) in enumerate(layers):
            p = f"{enc}.{i}.conv_block."
            sd[p + "0.weight"] = torch.randn(cout, cin, k, k, generator=g) * math.sqrt(2.0 / (cin * k * k))
            sd[p + "0.bias"] = 0.1 * torch.randn(cout, generator=g)
            sd[p + "1.weight"] = 1.0 + 0.1 * torch.randn(cout, generator=g)
            sd[p + "1.bias"] = 0.1 * torch.randn(cout, generator=g)
            sd[p + "1.running_mean"] = 0.1 * torch.randn(cout, generator=g)
            sd[p + "1.running_var"] = 1.0 + 0.1 * torch.rand(cout, generator=g)
            sd[p + "1.num_batches_tracked"] = torch.tensor(1000)
    return sd


def reference_encoder(x, sd, enc, layers):
    """The table above run with F.conv2d / F.batch_norm (eval), straight from the state dict."""
    for i, (_cin, _cout, _k, stride, pad, res) in enumerate(layers):
        p = f"{enc}.{i}.conv_block."
        y = F.conv2d(x, sd[p + "0.weight"], sd[p + "0.bias"], stride, pad)
        y = F.batch_norm(y, sd[p + "1.running_mean"], sd[p + "1.running_var"], sd[p + "1.weight"],
                         sd[p + "1.bias"], training=False, eps=1e-5)
        x = F.relu(y + x if res else y)
    return F.normalize(x.flatten(1), dim=1)


def save_checkpoint(path, sd, prefix=""):
    torch.save({"state_dict": {prefix + k: v for k, v in sd.items()}, "optimizer": None,
                "global_step": 250000, "global_epoch": 12}, path)
    return path


@pytest.fixture(scope="module")
def state():
    return wav2lip_state()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, state):
    return save_checkpoint(tmp_path_factory.mktemp("sync") / "lipsync_expert.pth", state)


@pytest.fixture(scope="module")
def net(ckpt):
    return load_syncnet(ckpt)


# ------------------------------------------------------------------------------------------------
# Network and checkpoints
# ------------------------------------------------------------------------------------------------
def test_checkpoint_loads_and_matches_reference(net, state):
    faces, mels = torch.rand(2, 15, 48, 96), torch.rand(2, 1, 80, 16) * 8 - 4
    a, v = net(faces, mels)
    assert a.shape == v.shape == (2, 512)
    assert torch.allclose(a.norm(dim=1), torch.ones(2), atol=1e-5)
    torch.testing.assert_close(v, reference_encoder(faces, state, "face_encoder", FACE), atol=EMB_TOL, rtol=0)
    torch.testing.assert_close(a, reference_encoder(mels, state, "audio_encoder", AUDIO), atol=EMB_TOL, rtol=0)
    assert not any(p.requires_grad for p in net.parameters())
    net.train()
    assert not net.training, "the critic must stay in eval mode (frozen batch norm)"


def test_module_prefix_and_optimizer_state(tmp_path, state):
    model = SyncNet()
    model.load_state_dict(state)
    params = [p.requires_grad_(True) for p in model.parameters()]
    opt = torch.optim.Adam(params, lr=1e-4)
    for p in params:  # an Adam step fills the optimizer state the real file also carries
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    path = tmp_path / "dp.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()},
                "optimizer": opt.state_dict(), "global_step": 3, "global_epoch": 0}, path)
    loaded = load_syncnet(path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_bare_state_dict_without_step_counters(tmp_path, state):
    sd = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "old.pth")
    loaded = load_syncnet(tmp_path / "old.pth")
    for k, v in sd.items():
        assert torch.equal(loaded.state_dict()[k], v), k
    faces = torch.rand(1, 15, 48, 96)
    torch.testing.assert_close(loaded(faces, torch.rand(1, 1, 80, 16))[1],
                               reference_encoder(faces, state, "face_encoder", FACE), atol=EMB_TOL, rtol=0)


def test_wrong_keys_and_shapes(tmp_path, state):
    sd = dict(state)
    sd["face_encoder.99.conv_block.0.weight"] = sd.pop("face_encoder.16.conv_block.0.weight")
    sd["audio_encoder.0.conv_block.0.weight"] = torch.zeros(32, 2, 3, 3)
    path = save_checkpoint(tmp_path / "bad.pth", sd)
    with pytest.raises(ValueError) as e:
        load_syncnet(path)
    msg = str(e.value)
    assert str(path) in msg
    assert "1 missing: face_encoder.16.conv_block.0.weight" in msg
    assert "1 unexpected: face_encoder.99.conv_block.0.weight" in msg
    assert "1 shape mismatch: audio_encoder.0.conv_block.0.weight: expected (32, 1, 3, 3), got (32, 2, 3, 3)" in msg


def test_corrupt_and_foreign_files(tmp_path, ckpt):
    cut = tmp_path / "cut.pth"
    cut.write_bytes(ckpt.read_bytes()[:5000])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    listy = tmp_path / "list.pth"
    torch.save([1, 2, 3], listy)
    for path in (cut, garbage, listy):
        with pytest.raises(ValueError, match=f"SyncNet weights {path}"):
            load_syncnet(path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_syncnet(tmp_path / "absent.pth")


def test_find_and_status(monkeypatch, tmp_path, ckpt):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert find_syncnet_weights() is None
    line = syncnet_status()
    assert line.startswith("lip-sync loss off: no SyncNet weights") and ENV_VAR in line and "\n" not in line
    assert syncnet_status(ckpt) == f"lip-sync network: Wav2Lip SyncNet from {ckpt}"
    monkeypatch.setenv(ENV_VAR, str(ckpt))
    assert find_syncnet_weights() == ckpt
    assert syncnet_status().startswith("lip-sync network: Wav2Lip SyncNet from")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"xx")
    assert syncnet_status(bad).startswith("lip-sync loss off: the SyncNet weights could not be used")
    with pytest.raises(FileNotFoundError):
        find_syncnet_weights(tmp_path / "typo.pth")


# ------------------------------------------------------------------------------------------------
# Mel front-end
# ------------------------------------------------------------------------------------------------
def numpy_mel(wave: np.ndarray) -> np.ndarray:
    """Wav2Lip's melspectrogram written with numpy loops (librosa stft: centred, reflect padded)."""
    y = np.empty_like(wave)
    y[0] = wave[0]
    for n in range(1, len(wave)):
        y[n] = wave[n] - 0.97 * wave[n - 1]
    y = np.pad(y, 400, mode="reflect")
    win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(800) / 800)  # periodic Hann
    frames = [np.abs(np.fft.rfft(y[i:i + 800] * win)) for i in range(0, len(y) - 800 + 1, 200)]
    mag = np.stack(frames, axis=1)
    db = 20 * np.log10(np.maximum(1e-5, mel_filterbank().numpy() @ mag)) - 20
    return np.clip(8 * (db + 100) / 100 - 4, -4, 4)


def test_mel_matches_numpy_reference():
    wave = np.random.default_rng(0).normal(0, 0.1, 4321)
    torch.testing.assert_close(wav2lip_mel(torch.from_numpy(wave)), torch.from_numpy(numpy_mel(wave)),
                               atol=MEL_TOL, rtol=0)


@pytest.mark.parametrize("length,frames", [(16000, 81), (3200, 17), (3201, 17), (1234, 7), (640 * 25, 81)])
def test_mel_frame_count(length, frames):
    assert wav2lip_mel(torch.randn(length) * 0.1).shape == (80, frames)


def test_mel_range_and_silence():
    assert torch.equal(wav2lip_mel(torch.zeros(4000)), torch.full((80, 21), -4.0))
    loud = wav2lip_mel(torch.randn(8000).clamp(-1, 1))
    assert loud.min() >= -4 and loud.max() <= 4 and loud.max() > 0


def test_slaney_scale_and_filterbank():
    assert S.hz_to_mel_slaney(torch.tensor(1000.0)).item() == pytest.approx(15.0)
    assert S.hz_to_mel_slaney(torch.tensor(6400.0)).item() == pytest.approx(42.0)   # 27 log steps of 6.4
    assert S.hz_to_mel_slaney(torch.tensor(500.0)).item() == pytest.approx(7.5)     # linear part
    hz = torch.tensor([55.0, 999.0, 1000.0, 3000.0, 7600.0], dtype=torch.float64)
    torch.testing.assert_close(S.mel_to_hz_slaney(S.hz_to_mel_slaney(hz)), hz)
    fb = mel_filterbank()
    assert fb.shape == (80, 401) and (fb >= 0).all()
    fft_hz = torch.linspace(0, 8000, 401, dtype=torch.float64)
    assert fb[:, fft_hz < 55].abs().max() == 0 and fb[:, fft_hz > 7600].abs().max() == 0
    area = fb.sum(1) * 20.0  # bin spacing 20 Hz
    wide = (fb > 0).sum(1) > 8
    assert wide.sum() >= 30  # the upper, log-spaced bands
    assert torch.allclose(area[wide], torch.ones_like(area[wide]), atol=AREA_TOL)


@pytest.mark.parametrize("freq", [300.0, 1000.0, 4000.0])
def test_pure_tone_lands_in_its_band(freq):
    t = torch.arange(16000, dtype=torch.float64) / 16000
    mel = wav2lip_mel(0.5 * torch.sin(2 * math.pi * freq * t))
    centres = S.mel_to_hz_slaney(torch.linspace(S.hz_to_mel_slaney(torch.tensor(55.0)).item(),
                                                S.hz_to_mel_slaney(torch.tensor(7600.0)).item(), 82))[1:-1]
    band = int(mel[:, 10:-10].mean(1).argmax())
    # The peak band is one of the two whose centres bracket the tone.
    assert abs(band - int((centres - freq).abs().argmin())) <= 1, (band, centres[band].item())


def test_mel_windows_follow_wav2lip_indexing():
    mel = torch.arange(100.0)[None].expand(80, 100)
    w = mel_windows(mel, [0, 1, 2, 7])
    assert w.shape == (4, 1, 80, 16)
    assert w[:, 0, 0, 0].tolist() == [0.0, 3.0, 6.0, 22.0]  # int(80 f / 25) = int(3.2 f)
    with pytest.raises(ValueError):
        mel_windows(mel, [29])



def test_mel_windows_truncate_like_wav2lip():
    """Wav2Lip's crop_audio_window starts at int(80 * f / 25) (truncated, not rounded): frames 0-9
    start at mel frames 0, 3, 6, 9, 12, 16, 19, 22, 25, 28. The frames above all have fractional
    parts below 0.5, where rounding and truncating agree."""
    mel = torch.arange(100.0)[None].expand(80, 100)
    w = mel_windows(mel, list(range(10)))
    assert w[:, 0, 0, 0].tolist() == [0.0, 3.0, 6.0, 9.0, 12.0, 16.0, 19.0, 22.0, 25.0, 28.0]


# ------------------------------------------------------------------------------------------------
# Faces, loss, score
# ------------------------------------------------------------------------------------------------
def test_face_box_from_dlib_template_and_ffhq_alignment():
    from talk3d.losses.face_id import DLIB_TEMPLATE_68
    from talk3d.preprocess.align import ffhq_quads, to_crop
    lm = np.zeros((1, 68, 2))
    for k, p in DLIB_TEMPLATE_68.items():
        lm[0, k] = p
    centre, axis = ffhq_quads(lm)
    corners = to_crop(np.array([[[0.0, 0.0], [1.0, 1.0]]]), centre, axis, 1)[0]
    np.testing.assert_allclose(np.array(S.FACE_BOX), corners.reshape(-1), atol=1e-4)


def test_faces_from_frames_layout():
    frames = -torch.ones(1, 5, 3, 64, 64)
    frames[:, 2, 0] = 1.0  # frame 2 pure red
    faces = faces_from_frames(frames)
    assert faces.shape == (1, 15, 48, 96)
    lit = faces.flatten(2).amax(2)[0]
    assert lit.tolist() == [1.0 if c == 3 * 2 + 2 else 0.0 for c in range(15)]  # BGR: red is last



#: Values inside a flat region survive the antialiased resize up to float32 rounding.
FLAT_ATOL = 1e-6


def test_faces_from_frames_crop_the_lower_half_of_the_face_box():
    """The network sees rows from the middle of FACE_BOX to its bottom and columns across it: on a
    64-pixel frame rows round(64 * (y0 + y1) / 2) = 39 to round(64 * y1) = 54 and columns
    round(64 * x0) = 17 to round(64 * x1) = 47. A frame lit exactly there gives an all-lit face, a
    frame lit everywhere else an all-dark one (test_faces_from_frames_layout uses flat frames,
    where any crop looks the same)."""
    x0, y0, x1, y1 = S.FACE_BOX
    assert (round(64 * 0.5 * (y0 + y1)), round(64 * y1), round(64 * x0), round(64 * x1)) == (39, 54, 17, 47)
    inside = -torch.ones(1, 5, 3, 64, 64)
    inside[..., 39:54, 17:47] = 1.0
    torch.testing.assert_close(faces_from_frames(inside), torch.ones(1, 15, 48, 96), rtol=0, atol=FLAT_ATOL)
    torch.testing.assert_close(faces_from_frames(-inside), torch.zeros(1, 15, 48, 96), rtol=0, atol=FLAT_ATOL)


#: -log of a cosine built from embeddings within EMB_TOL of each other: cosines are ~0.5-1 here, so
#: the loss moves by about EMB_TOL / cos.
SYNC_LOSS_TOL = 1e-3


def test_sync_loss_gradients(net, state):
    loss_fn = SyncLoss(net)
    frames = (torch.rand(2, 5, 3, 64, 64) * 2 - 1).requires_grad_(True)
    wave = torch.randn(2, 3200) * 0.1
    loss = loss_fn(frames, wave)
    assert loss.shape == (2,) and (loss >= 0).all() and torch.isfinite(loss).all()
    loss.sum().backward()
    assert frames.grad is not None and frames.grad.abs().sum() > 0
    mels = mel_windows(wav2lip_mel(wave[0]), [0])
    got = loss_fn(frames[:1].detach(), mels)
    assert got.shape == (1,)
    # Wav2Lip's expert loss: BCE against "in sync", -log cos(audio embedding, face embedding).
    v = reference_encoder(faces_from_frames(frames[:1].detach()), state, "face_encoder", FACE)
    a = reference_encoder(mels, state, "audio_encoder", AUDIO)
    torch.testing.assert_close(got, -torch.log(F.cosine_similarity(a, v, dim=1)), atol=SYNC_LOSS_TOL, rtol=0)
    assert all(p.grad is None for p in net.parameters())


def test_sync_confidence(net):
    n = 7  # three 5-frame windows
    frames = torch.rand(n, 3, 64, 64) * 2 - 1
    wave = torch.randn(640 * n) * 0.1
    score = sync_confidence(frames, wave, net)
    assert isinstance(score, float) and 0.0 <= score <= 1.0
    assert SyncLoss(net).sync_confidence(frames, wave, batch=2) == pytest.approx(score, abs=1e-6)
    with pytest.raises(ValueError):
        sync_confidence(frames[:4], wave[:2560], net)
