"""``python -m talk3d.data``: writing the synthetic clip and validating a dataset folder."""
from __future__ import annotations

import json

import numpy as np
import pytest

from talk3d.data.__main__ import main

# A clip small enough to write in about a second: 1 s at 25 fps, 32^2 frames.
ARGS = ["--seconds", "1", "--size", "32", "--feature-dim", "8"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    out = tmp_path_factory.mktemp("data_cli") / "clip"
    assert main(["synth", "--out", str(out), *ARGS]) == 0
    return out


def test_synth_writes_a_dataset_that_validates(clip, capsys):
    assert main(["validate", str(clip)]) == 0
    said = capsys.readouterr().out
    assert "valid, 25 frames of 32^2" in said and "D=8" in said, said


def test_synth_is_deterministic_per_seed(clip, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    assert main(["synth", "--out", str(again), *ARGS]) == 0
    assert main(["synth", "--out", str(other), *ARGS, "--seed", "1"]) == 0
    first = np.load(clip / "mouth_opening.npy")
    assert np.array_equal(first, np.load(again / "mouth_opening.npy"))
    assert not np.array_equal(first, np.load(other / "mouth_opening.npy"))


def test_synth_refuses_to_overwrite_without_being_asked(clip, tmp_path, capsys):
    out = tmp_path / "mine"
    assert main(["synth", "--out", str(out), *ARGS]) == 0
    manifest = (out / "manifest.json").read_text()
    (out / "notes.txt").write_text("the user's own file")
    capsys.readouterr()
    assert main(["synth", "--out", str(out), *ARGS, "--seed", "3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(out) in err, err
    assert (out / "manifest.json").read_text() == manifest
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert main(["synth", "--out", str(out), *ARGS, "--seed", "3", "--overwrite"]) == 0
    assert json.loads((out / "manifest.json").read_text())["settings"]["seed"] == 3


@pytest.mark.parametrize("damage", ["missing file", "wrong frame count", "not a dataset"])
def test_validate_names_what_is_wrong(clip, tmp_path, capsys, damage):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(clip, bad)
    if damage == "missing file":
        (bad / "cameras.npy").unlink()
        expect = "cameras.npy"
    elif damage == "wrong frame count":
        np.save(bad / "blink.npy", np.load(bad / "blink.npy")[:-1])
        expect = "blink.npy"
    else:
        (bad / "manifest.json").unlink()
        expect = "manifest.json"
    assert main(["validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expect in err, err


def test_synth_rejects_a_clip_too_short(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "short"), "--seconds", "0.01"]) == 1
    assert "at least 2 frames" in capsys.readouterr().err
