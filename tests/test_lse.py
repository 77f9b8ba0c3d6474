"""SyncNet's LSE-C / LSE-D (the paper's Sync): the weight file's layout, the MFCCs' 16-bit scale,
the offset search on hand-made embeddings, and the scorer on frames and speech."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from talk3d.evaluate.lse import (LSE_FILE, LSE_WEIGHTS_ENV, LSEScorer, SyncNetV2, find_lse_weights, load_syncnet_v2,
                                 speech_mfcc, sync_confidence)

pytest.importorskip("python_speech_features")

# pairwise_distance adds eps = 1e-6 to each difference before the norm: hand-computed distances
# agree to a few times that.
PAIRWISE_EPS_ATOL = 1e-5
# float32 embeddings 1024 wide, noise 1e-3: the true shift's distance is ~3e-2 (sqrt(1024) * 1e-3).
NOISE = 1e-3

# syncnet_python's syncnet_v2.model: (key prefix, weight shape) of every convolution and linear
# layer, written out from the file's layout (batch norms follow each convolution at index + 1).
EXPECTED_LAYERS = {
    "netcnnaud.0": (64, 1, 3, 3), "netcnnaud.4": (192, 64, 3, 3), "netcnnaud.8": (384, 192, 3, 3),
    "netcnnaud.11": (256, 384, 3, 3), "netcnnaud.14": (256, 256, 3, 3), "netcnnaud.18": (512, 256, 5, 4),
    "netcnnlip.0": (96, 3, 5, 7, 7), "netcnnlip.4": (256, 96, 1, 5, 5), "netcnnlip.8": (256, 256, 1, 3, 3),
    "netcnnlip.11": (256, 256, 1, 3, 3), "netcnnlip.14": (256, 256, 1, 3, 3), "netcnnlip.18": (512, 256, 1, 6, 6),
    "netfcaud.0": (512, 512), "netfcaud.3": (1024, 512), "netfclip.0": (512, 512), "netfclip.3": (1024, 512),
}


def _weight_file(path, seed=0):
    torch.manual_seed(seed)
    net = SyncNetV2()
    for m in net.modules():  # batch-norm statistics other than the defaults, so loading them is checked
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    torch.save(net.state_dict(), path)
    return net


def test_the_network_has_the_weight_files_layout():
    state = SyncNetV2().state_dict()
    for prefix, shape in EXPECTED_LAYERS.items():
        assert tuple(state[f"{prefix}.weight"].shape) == shape, prefix
        if not prefix.endswith("fcaud.3") and not prefix.endswith("fclip.3"):  # the embedding layers: no norm after
            seq, idx = prefix.rsplit(".", 1)
            assert tuple(state[f"{seq}.{int(idx) + 1}.running_var"].shape) == (shape[0],), prefix
    weights = {k.rsplit(".", 1)[0] for k in state if k.endswith(".weight") and state[k].dim() > 1}
    assert weights == set(EXPECTED_LAYERS)
    net = SyncNetV2().eval()
    with torch.no_grad():
        assert net.embed_audio(torch.zeros(2, 1, 13, 20)).shape == (2, 1024)
        assert net.embed_video(torch.zeros(1, 3, 5, 224, 224)).shape == (1, 1024)


def test_weight_file_loads_and_other_files_are_refused(tmp_path, monkeypatch):
    path = tmp_path / LSE_FILE
    net = _weight_file(path)
    loaded = load_syncnet_v2(path)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0, msg=k)
    assert not loaded.training
    state = net.state_dict()
    del state["netfclip.3.bias"]
    torch.save(state, tmp_path / "partial.model")
    with pytest.raises(ValueError, match="missing"):
        load_syncnet_v2(tmp_path / "partial.model")
    (tmp_path / "junk.model").write_bytes(b"not a model" * 10)
    with pytest.raises(ValueError, match="not a readable SyncNet weight file"):
        load_syncnet_v2(tmp_path / "junk.model")
    # A file from a PyTorch before 0.4.1: no batch-norm step counters (unused in eval mode).
    old_state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(old_state, tmp_path / "old.model")
    torch.testing.assert_close(load_syncnet_v2(tmp_path / "old.model").state_dict()["netfcaud.0.weight"],
                               net.state_dict()["netfcaud.0.weight"], rtol=0, atol=0)
    monkeypatch.delenv(LSE_WEIGHTS_ENV, raising=False)
    assert find_lse_weights() is None
    assert find_lse_weights(tmp_path) == path  # the folder holding it
    monkeypatch.setenv(LSE_WEIGHTS_ENV, str(path))
    assert find_lse_weights() == path
    with pytest.raises(FileNotFoundError, match="no such file"):
        find_lse_weights(tmp_path / "nowhere.model")


def test_mfccs_are_taken_on_16_bit_values():
    """13 coefficients at 100 Hz (25-ms frames every 10 ms); the first is the log energy of the
    pre-emphasised 16-bit frame, the scale syncnet_python's WAV gives (computed here by hand)."""
    t = np.arange(16000) / 16000
    wave = (0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    cc = speech_mfcc(wave)
    assert cc.shape == (13, 1 + math.ceil((16000 - 400) / 160))
    ints = np.clip(np.round(wave.astype(np.float64) * 32768), -32768, 32767)
    emph = np.append(ints[0], ints[1:] - 0.97 * ints[:-1])
    power = np.abs(np.fft.rfft(emph[:400], 512)) ** 2 / 512
    assert cc[0, 0] == pytest.approx(math.log(power.sum()), rel=1e-9)
    assert cc[0, 0] > 10  # 19.2 here; on the [-1, 1] scale it would be 2 ln(32768) = 20.8 lower


def test_offset_search_on_hand_made_embeddings():
    # One-dimensional case by hand (vshift 1): mean distances per shift (2/3, 0, 4/3).
    v = torch.tensor([[0.0], [1.0], [2.0]])
    r = sync_confidence(v, v.clone(), vshift=1)
    assert r["mean_distance"] == pytest.approx([2 / 3, 0, 4 / 3], abs=PAIRWISE_EPS_ATOL)
    assert r["offset"] == 0 and r["lse_d"] == pytest.approx(0, abs=PAIRWISE_EPS_ATOL)
    assert r["lse_c"] == pytest.approx(2 / 3, abs=PAIRWISE_EPS_ATOL)
    # Audio embeddings that are the video's 3 windows later: found at offset -3.
    g = torch.Generator().manual_seed(0)
    video = torch.randn(40, 1024, generator=g)
    audio = torch.roll(video, 3, dims=0) + NOISE * torch.randn(40, 1024, generator=g)  # audio[j] = video[j - 3]
    r = sync_confidence(video, audio)
    # lse_d: 37 windows at the noise's distance (~0.03), the last 3 against the zero padding (~32).
    assert r["offset"] == -3 and r["lse_d"] == pytest.approx(3 * 32 / 40, rel=0.05) and r["lse_c"] > 10


def test_scorer_on_frames_and_speech(tmp_path):
    path = tmp_path / LSE_FILE
    _weight_file(path)
    scorer = LSEScorer(path, batch=2)
    g = torch.Generator().manual_seed(1)
    frames = torch.rand(8, 3, 32, 32, generator=g) * 2 - 1
    wave = (0.3 * torch.randn(8 * 640, generator=g)).numpy()
    r = scorer(frames, wave)
    assert r["windows"] == 3 and -15 <= r["offset"] <= 15  # syncnet_python scores frames 0..N-6
    assert math.isfinite(r["lse_d"]) and r["lse_c"] >= 0 and len(r["mean_distance"]) == 31
    assert scorer(frames, wave) == r  # deterministic
    with pytest.raises(ValueError, match="more than 5 frames"):
        scorer(frames[:5], wave)


def test_scorer_without_python_speech_features_says_so_up_front(tmp_path, monkeypatch):
    import sys

    path = tmp_path / LSE_FILE
    _weight_file(path)
    monkeypatch.setitem(sys.modules, "python_speech_features", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install python_speech_features"):
        LSEScorer(path)


def test_lse_c_is_the_median_distance_minus_the_smallest():
    """LSE-C = median over shifts of the mean distance, minus the smallest (syncnet_python's
    confidence), not the mean over shifts. By hand, vshift 1, video (0, 1, 2), audio (0, 1, 5), zeros
    past the ends: shift -1 (audio one window earlier) |0-0|, |1-0|, |2-1| -> 2/3; shift 0 0, 0, 3 -> 1;
    shift +1 |0-1|, |1-5|, |2-0| -> 7/3. Smallest 2/3 (the audio leads by one: offset 1), median 1,
    so LSE-C = 1/3 (the mean over shifts, 4/3, would give 2/3)."""
    video, audio = torch.tensor([[0.0], [1.0], [2.0]]), torch.tensor([[0.0], [1.0], [5.0]])
    r = sync_confidence(video, audio, vshift=1)
    assert r["mean_distance"] == pytest.approx([2 / 3, 1, 7 / 3], abs=PAIRWISE_EPS_ATOL)
    assert r["offset"] == 1 and r["lse_d"] == pytest.approx(2 / 3, abs=PAIRWISE_EPS_ATOL)
    assert r["lse_c"] == pytest.approx(1 / 3, abs=PAIRWISE_EPS_ATOL)


def test_scorer_feeds_syncnet_bgr_8_bit_frames_and_their_mfcc_windows(tmp_path):
    """As syncnet_python reads a decoded video: 224 x 224, BGR, 0-255. A red frame ([-1, 1] RGB
    (1, -1, -1)) reaches the video tower as B = 0, R = 255 (an RGB order would swap them, which no
    score on random frames shows); window i holds frames i..i+4 and
    MFCC columns 4i..4i+19 (100 Hz MFCCs, 25 fps)."""
    path = tmp_path / LSE_FILE
    _weight_file(path)
    scorer = LSEScorer(path, batch=4)
    seen = {"video": [], "audio": []}

    class Recorder:  # stands in for the network: records its inputs, returns zero embeddings
        def embed_video(self, clips):
            seen["video"].append(clips.clone())
            return torch.zeros(clips.shape[0], 1024)

        def embed_audio(self, mfcc):
            seen["audio"].append(mfcc.clone())
            return torch.zeros(mfcc.shape[0], 1024)

    scorer.net = Recorder()
    frames = torch.full((7, 3, 16, 16), -1.0)
    frames[:, 0] = 1.0  # red
    # The top half's green marks which frame is which (8-bit levels 19.1, 57.4, ...: none near a .5)
    shade = -0.85 + 0.3 * torch.arange(7.0)
    frames[:, 1, :8] = shade.view(7, 1, 1)
    g = torch.Generator().manual_seed(5)
    wave = (0.3 * torch.randn(7 * 640, generator=g)).numpy()
    r = scorer(frames, wave)
    clips, mf = torch.cat(seen["video"]), torch.cat(seen["audio"])  # [2, 3, 5, 224, 224], [2, 1, 13, 20]
    assert r["windows"] == 2 and clips.shape == (2, 3, 5, 224, 224)
    assert float(clips[:, 0].abs().max()) == 0 and float(clips[:, 2].min()) == 255  # B, R
    green = ((shade + 1) * 127.5).round()  # the top half's G of each frame
    for i in range(2):
        assert clips[i, 1, :, 0, 0].tolist() == green[i:i + 5].tolist()
    cc = torch.from_numpy(speech_mfcc(wave)).float()
    for i in range(2):
        assert torch.equal(mf[i, 0], cc[:, 4 * i:4 * i + 20])
