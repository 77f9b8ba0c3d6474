"""The foreground segmenter (talk3d.preprocess.segment): where its model and runtime come from, the
errors when they are missing or wrong, and the pipeline's choice. The real model's masks on real
faces are checked in test_preprocess_talking.py and test_preprocess_real.py.

The real model is MediaPipe's selfie-segmentation network from the mediapipe 0.10.21 wheel, which
the README's test command fetches at install time into a folder named by TALK3D_SELFIE_SEGMENTER;
its tests skip without it (or without ai-edge-litert).
"""
from __future__ import annotations

import importlib.util
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from talk3d.preprocess import PreprocessError, preprocess_video
from talk3d.preprocess import segment
from talk3d.preprocess.segment import ENV_VAR, MODEL_MEMBER, SelfieSegmenter, load_segmenter

HAS_LITERT = importlib.util.find_spec("ai_edge_litert") is not None
REAL = os.environ.get(ENV_VAR)
needs_real = pytest.mark.skipif(not (REAL and HAS_LITERT), reason=f"{ENV_VAR} or ai-edge-litert missing")


def _wheel(folder: Path) -> Path:
    found = sorted(Path(folder).glob("mediapipe-*.whl"))
    if not found:
        pytest.skip(f"{ENV_VAR} holds no mediapipe wheel")
    return found[-1]


@pytest.mark.parametrize("make,message", [
    (lambda d: d / "missing.tflite", "no such file"),
    (lambda d: d, "holds no .tflite file or mediapipe wheel"),
    (lambda d: _write(d / "x.whl", b"not a zip"), "not a readable wheel"),
    (lambda d: _zip(d / "mediapipe-0.0-py3-none-any.whl", {"other.txt": b"x"}), "holds no " + MODEL_MEMBER),
    # A folder with several candidates: which one is meant is the user's to say (names listed).
    (lambda d: [_write(d / n, b"x") for n in ("a.tflite", "mediapipe-0.10.21-py3-none-any.whl")] and d,
     r"holds 2 candidate models \(a.tflite, mediapipe-0.10.21-py3-none-any.whl\); set TALK3D_SELFIE_SEGMENTER to one"),
    (lambda d: [_write(d / n, b"x") for n in ("mediapipe-0.10.14-py3-none-any.whl", "mediapipe-0.10.21-py3-none-any.whl")]
     and d, "holds 2 candidate models"),
])
def test_a_set_but_unusable_model_path_is_an_error(tmp_path, monkeypatch, make, message):
    """Asked for explicitly, a bad model is refused with its path named, not silently skipped."""
    monkeypatch.setenv(ENV_VAR, str(make(tmp_path)))
    with pytest.raises(PreprocessError, match=message):
        load_segmenter()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _zip(path: Path, members: dict) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def test_missing_model_or_runtime_says_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(segment.importlib.util, "find_spec",
                        lambda name, *a: None if name == "mediapipe" else real_find_spec(name, *a))
    seg, why = load_segmenter()
    assert seg is None and "no selfie-segmentation model" in why and "ai-edge-litert" in why and "mediapipe" in why
    # A model but no runtime.
    monkeypatch.setenv(ENV_VAR, str(_write(tmp_path / "m.tflite", b"model")))
    monkeypatch.setattr(segment.importlib.util, "find_spec",
                        lambda name, *a: None if name == "ai_edge_litert" else real_find_spec(name, *a))
    seg, why = load_segmenter()
    assert seg is None and "LiteRT runtime is not installed" in why and "pip install ai-edge-litert" in why


@pytest.mark.skipif(not HAS_LITERT, reason="ai-edge-litert not installed")
def test_not_a_model_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(_write(tmp_path / "m.tflite", os.urandom(4096))))
    with pytest.raises(PreprocessError, match="not a TensorFlow Lite model"):
        load_segmenter()


@needs_real
def test_another_mediapipe_model_is_refused(tmp_path, monkeypatch):
    """A real TFLite file with other inputs (the face detector's 128 x 128) is named as the wrong model."""
    with zipfile.ZipFile(_wheel(REAL)) as z:
        data = z.read("mediapipe/modules/face_detection/face_detection_short_range.tflite")
    monkeypatch.setenv(ENV_VAR, str(_write(tmp_path / "face.tflite", data)))
    with pytest.raises(PreprocessError, match="not the selfie-segmentation model"):
        load_segmenter()


@needs_real
def test_real_segmenter_from_wheel_file_and_folder(tmp_path, monkeypatch):
    """The wheel, the folder holding it and the extracted .tflite all load the same network; on a
    flat grey image it finds no person, and the output has the crops' size and a probability's range."""
    wheel = _wheel(REAL)
    with zipfile.ZipFile(wheel) as z:
        tflite = _write(tmp_path / "selfie.tflite", z.read(MODEL_MEMBER))
    grey = np.full((2, 96, 96, 3), 128, np.uint8)
    outs = []
    for where in (wheel, wheel.parent, tflite):
        monkeypatch.setenv(ENV_VAR, str(where))
        seg, source = load_segmenter()
        assert isinstance(seg, SelfieSegmenter) and source == str(where)
        outs.append(seg(grey))
    assert outs[0].shape == (2, 96, 96) and outs[0].dtype == np.float32
    assert 0.0 <= outs[0].min() and outs[0].max() <= 1.0 and (outs[0] > 0.5).mean() < 0.05
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])
    with pytest.raises(ValueError, match=r"\[B, S, S, 3\]"):
        seg(grey[0])


def test_pipeline_foreground_modes(tmp_path, monkeypatch):
    """A bad mode, and 'segmentation' without a segmenter, are refused before any work starts."""
    video = tmp_path / "v.mp4"
    video.write_bytes(b"")  # never opened: the checks come first
    with pytest.raises(ValueError, match="--foreground"):
        preprocess_video(video, tmp_path / "a", foreground="paint", progress=False, log=lambda s: None)
    monkeypatch.setattr("talk3d.preprocess.pipeline.load_segmenter", lambda: (None, "no model here"))
    with pytest.raises(PreprocessError, match="--foreground segmentation: no model here"):
        preprocess_video(video, tmp_path / "b", foreground="segmentation", progress=False, log=lambda s: None)
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.work").exists()
