"""Streaming inference (``talk3d.Talker``) on a tiny trained run: streamed frames equal the offline ones
for any chunking, frames come out as the audio arrives (the documented latency), the tail flush, the
cameras of a stream, chunk validation, the streaming audio features (log-mel exact, wav2vec2
approximate) and the lazy ``talk3d.Talker`` export."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import talk3d
from talk3d.audio import SAMPLE_RATE, SAMPLES_PER_FRAME, AudioEncoder, LogMelEncoder
from talk3d.data import make_synthetic_dataset
from talk3d.infer import InferenceError, Talker, camera_track, num_frames_for
from talk3d.infer.talker import STREAM_ORBIT_PERIOD, _StreamingFeatures
from talk3d.render.cameras import look_at_camera, rotation_to_euler, split_camera_label
from talk3d.train import TrainConfig, Trainer

try:
    import transformers  # noqa: F401
    HAS_TRANSFORMERS = True
except ImportError:
    HAS_TRANSFORMERS = False

# Window look-ahead of the default 8-frame window of 16-row (320-ms) frames: 7 frames (frame n + 3's
# rows reach the first of frame n + 7), + the STFT's 10 ms. (3 frames with 2 rows a frame.)
LOGMEL_LATENCY = 7 * SAMPLES_PER_FRAME + 160
LATENCY_FRAMES = LOGMEL_LATENCY / SAMPLES_PER_FRAME  # 7.25
SECONDS = 1.3  # 33 frames (+ 17 samples: the last frame is a partial one)
# Streaming is exact up to fp32 rounding (see talk3d.infer.talker): MKL rounds a row of the log-mel
# filterbank product differently with the row count, and the model with the batch size. Measured on
# the CPU: features at most one ulp apart (9.5e-7), images 1.2e-6 on [-1, 1], at most one uint8 level.
FEATURE_ATOL = 1e-5
IMAGE_ATOL = 1e-5
# The uint8 frames: that rounding flips a value only where it sits on a level boundary, by one level.
# Measured on the CPU VM over the 16 comparisons: one level on 2.0e-5 of the values once, 0 elsewhere.
FRAME_MAX_LEVELS = 1
FRAME_DIFF_FRACTION = 1e-3
# latency_s = 4640 / 16000 in float64 rounds to the double nearest 0.29, as the literal does
# (measured difference 0); the bound only allows a formula that adds an ulp or two (~1e-17).
LATENCY_S_TOL = 1e-12
# wav2vec2 features of a chunked stream against the whole-clip pass (a random tiny model; its
# whole-clip normalisation and attention are not local). Measured on the CPU VM (transformers 5.25):
# correlation 0.950, mean |difference| 0.26x the features' mean magnitude.
W2V_STREAM_MIN_CORR = 0.9
#: Degrees: the orbit's yaw/pitch read back from its cameras. The round trip through a look-at
#: camera is exact up to float32 rounding; 250 samples of a sine come within 0.1 deg of its peaks.
ORBIT_ANGLE_TOL_DEG = 0.2


def _cfg() -> TrainConfig:
    return TrainConfig.from_dict(dict(
        steps=3, batch_size=2, lr=3e-3, eval_every=100, checkpoint_every=1000, log_every=5, val_frames=2,
        generator_size="tiny", deltaplane_size="tiny", impl="torch",
        generator=dict(plane_resolution=16, plane_channels=4, neural_rendering_resolution=16,
                       sr_resolution=32, sr_channels=[8, 8], coarse_samples=6, importance_samples=6)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("talker")
    make_synthetic_dataset(root / "data", seconds=2, size=32, seed=0)
    Trainer(_cfg(), root / "data", root / "run").fit()
    return root / "run"


@pytest.fixture(scope="module")
def talker(run):
    return Talker(run, device="cpu", impl="torch")


def _speech(seconds: float = SECONDS, extra: int = 17) -> np.ndarray:
    """[T] float32: an amplitude-modulated chirp with noise (features that change frame to frame)."""
    t = np.arange(int(seconds * SAMPLE_RATE) + extra) / SAMPLE_RATE
    rng = np.random.default_rng(0)
    wave = 0.3 * np.sin(2 * np.pi * (150 + 900 * t) * t) * (0.55 + 0.45 * np.sin(2 * np.pi * 3 * t))
    return (wave + 0.02 * rng.standard_normal(t.shape)).astype(np.float32)


def _uneven(wave: np.ndarray, seed: int = 1) -> list[np.ndarray]:
    """Random cut points (repeats give empty chunks), plus an empty chunk first and last."""
    cuts = np.sort(np.random.default_rng(seed).integers(0, wave.size, 30))
    cuts = np.concatenate([[0, 0], cuts, [wave.size, wave.size]])
    chunks = [wave[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    assert any(c.size == 0 for c in chunks)
    return chunks


CHUNKINGS = {
    "one": lambda w: [w],
    "frames": lambda w: [w[i:i + SAMPLES_PER_FRAME] for i in range(0, w.size, SAMPLES_PER_FRAME)],
    "uneven": _uneven,
    "one_sample_first": lambda w: [w[:1], w[1:]],
    "odd_sizes": lambda w: [w[i:i + 333] for i in range(0, w.size, 333)],
}


class _Recorder:
    """Forward hooks on the model: the conditions it was given and the float images it made, per frame."""

    def __init__(self, model):
        self.conds, self.images = [], []
        self._hooks = [model.register_forward_pre_hook(self._pre), model.register_forward_hook(self._post)]

    def _pre(self, module, args):
        cond = args[0]
        for i in range(cond["camera"].shape[0]):
            self.conds.append({k: v[i].clone() for k, v in cond.items()})

    def _post(self, module, args, out):
        self.images.extend(out["image"].detach().clone().unbind(0))

    def take(self):
        conds, images = self.conds, torch.stack(self.images)
        self.conds, self.images = [], []
        return conds, images

    def close(self):
        for h in self._hooks:
            h.remove()


def _same_conditions(a, b) -> None:
    """Cameras, blinks, poses, landmarks identical; audio windows to fp32 rounding."""
    assert len(a) == len(b)
    for n, (x, y) in enumerate(zip(a, b)):
        for k in x:
            if k == "audio":
                diff = (x[k] - y[k]).abs().max().item()
                assert diff <= FEATURE_ATOL, f"frame {n}: audio window differs by {diff}"
            else:
                assert torch.equal(x[k], y[k]), f"frame {n}: condition {k!r} differs"


def _same_frames(streamed: np.ndarray, frames: np.ndarray) -> None:
    """uint8 frames equal but for fp32 rounding: at most one level, on a handful of pixels."""
    assert streamed.shape == frames.shape
    diff = np.abs(streamed.astype(np.int16) - frames)
    assert diff.max() <= FRAME_MAX_LEVELS and (diff > 0).mean() < FRAME_DIFF_FRACTION, (diff.max(), (diff > 0).mean())


@pytest.fixture(scope="module")
def offline(talker):
    """The offline render (batch 1) of _speech(): uint8 frames, conditions, float images."""
    rec = _Recorder(talker.model)
    try:
        frames = np.stack(list(talker.render(_speech())))
        conds, images = rec.take()
    finally:
        rec.close()
    return frames, conds, images


def test_talker_is_exported_lazily():
    assert talk3d.Talker is Talker
    code = ("import sys, talk3d; assert 'talk3d.infer' not in sys.modules and 'talk3d.train' not in sys.modules; "
            "from talk3d import Talker; assert Talker.__module__ == 'talk3d.infer.talker'; "
            "assert 'Talker' in dir(talk3d)")
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(AttributeError):
        talk3d.NoSuchThing  # noqa: B018


def test_latency(talker):
    assert talker.exact and talker.window == 8
    assert talker.latency_samples == LOGMEL_LATENCY == 4640
    assert talker.latency_frames == 7.25 and abs(talker.latency_s - 0.29) < LATENCY_S_TOL
    assert "290 ms" in repr(talker)


@pytest.mark.parametrize("chunking", list(CHUNKINGS))
def test_stream_equals_offline(talker, offline, chunking):
    frames, conds, images = offline
    wave = _speech()
    assert frames.shape == (num_frames_for(wave), 32, 32, 3) == (33, 32, 32, 3)
    chunks = CHUNKINGS[chunking](wave)
    assert np.array_equal(np.concatenate(chunks), wave)
    rec = _Recorder(talker.model)
    try:
        streamed = np.stack(list(talker.stream(iter(chunks))))
        s_conds, s_images = rec.take()
    finally:
        rec.close()
    _same_conditions(s_conds, conds)  # audio windows, cameras, blinks, poses, landmarks
    diff = (s_images - images).abs().max().item()
    assert diff <= IMAGE_ATOL, diff
    _same_frames(streamed, frames)


def test_batched_stream_equals_offline(run, offline):
    frames, conds, images = offline
    batched = Talker(run, device="cpu", impl="torch", batch=3)
    rec = _Recorder(batched.model)
    try:
        streamed = np.stack(list(batched.stream(_uneven(_speech(), seed=2))))
        s_conds, s_images = rec.take()
    finally:
        rec.close()
    _same_conditions(s_conds, conds)
    diff = (s_images - images).abs().max().item()
    assert diff <= IMAGE_ATOL, diff
    _same_frames(streamed, frames)


def _consumption(talker, chunks):
    """Per frame, how many chunks the stream had taken when it came out (None: after the source ended)."""
    taken, ended = 0, False

    def source():
        nonlocal taken, ended
        for c in chunks:
            taken += 1
            yield c
        ended = True

    return [None if ended else taken for _ in talker.stream(source())]


def _expected_consumption(chunks, num_frames, latency):
    ends = np.cumsum([c.size for c in chunks])
    out = []
    for n in range(num_frames):
        ready = np.nonzero(ends >= SAMPLES_PER_FRAME * (n + 1) + latency)[0]
        out.append(int(ready[0]) + 1 if ready.size else None)
    return out


def test_frames_come_out_as_the_audio_arrives(talker):
    wave = _speech(2.0, extra=0)  # 50 frames
    tenth = SAMPLE_RATE // 10
    chunks = [wave[i:i + tenth] for i in range(0, wave.size, tenth)]  # 0.1-s chunks
    taken = _consumption(talker, chunks)
    assert len(taken) == 50
    assert taken == _expected_consumption(chunks, 50, LOGMEL_LATENCY)
    # After K seconds of audio, floor(K * 25 - latency_frames) frames are out; the last 8 come when
    # the stream ends.
    for seconds in (0.5, 1, 2):
        out = sum(t is not None and t <= 10 * seconds for t in taken)
        assert out == int(25 * seconds - LATENCY_FRAMES), (seconds, out)
    assert taken[-8:] == [None] * 8 and taken[-9] is not None
    # Uneven chunks, empty ones included: the same rule.
    chunks = _uneven(wave, seed=3)
    assert _consumption(talker, chunks) == _expected_consumption(chunks, 50, LOGMEL_LATENCY)


@pytest.mark.parametrize("length", [1, 639, 640, 641, 2080, 2720, 2721, 10 * 640 + 5])
def test_tail_flush_gives_every_frame(talker, length):
    wave = _speech(1.0)[:length]
    chunks = [wave[i:i + 500] for i in range(0, length, 500)]
    streamed = list(talker.stream(chunks))
    assert len(streamed) == num_frames_for(wave)
    _same_frames(np.stack(streamed), np.stack(list(talker.render(wave))))


def test_empty_streams_yield_nothing(talker):
    assert list(talker.stream([])) == []
    assert list(talker.stream([np.zeros(0, np.float32)] * 3)) == []
    assert list(talker.stream(iter(()))) == []


@pytest.mark.parametrize("bad, match", [
    (np.zeros((2, 320), np.float32), r"chunk 2 has shape \[2, 320\]"),
    (np.array([0.0, np.nan], np.float32), "chunk 2 contains NaN"),
    (np.array([np.inf], np.float64), "chunk 2 contains NaN or inf"),
    (np.array(["a", "b"]), "chunk 2 has dtype"),
    (np.array([1, 2], np.int16), "divide by 32768"),
    (np.array(0.5, np.float32), r"chunk 2 has shape \[\]"),
    ([[0.1], [0.1, 0.2]], "chunk 2 is not an array"),
])
def test_bad_chunks_name_the_chunk(talker, bad, match):
    good = _speech(1.0, extra=0)
    frames = []
    with pytest.raises(InferenceError, match=match):
        for frame in talker.stream([good, np.zeros(0, np.float32), bad, good]):
            frames.append(frame)
    assert len(frames) == (SAMPLE_RATE - LOGMEL_LATENCY) // SAMPLES_PER_FRAME == 17  # those before the chunk


def test_bad_settings(run):
    for kw, match in [(dict(precision="fp64"), "precision"), (dict(size="huge"), "size"), (dict(eye="shut"), "eye"),
                      (dict(batch=0), "batch"), (dict(camera="sideways"), "--camera")]:
        with pytest.raises(InferenceError, match=match):
            Talker(run, device="cpu", **kw)


def test_stream_cameras_and_neutral_sources(run, tmp_path):
    wave = _speech(0.6)  # 16 frames
    n = num_frames_for(wave)
    # fixed views, neutral eye/pose and JSON cameras: the offline conditions exactly.
    path = tmp_path / "cams.json"
    path.write_text(json.dumps([[10, 5], [-10, 0], [0, -8]]))
    for kw in (dict(camera="fixed:15,-5", eye="neutral", pose="neutral"), dict(camera=str(path))):
        t = Talker(run, device="cpu", impl="torch", **kw)
        rec = _Recorder(t.model)
        try:
            offline = np.stack(list(t.render(wave)))
            conds, _ = rec.take()
            streamed = np.stack(list(t.stream(CHUNKINGS["odd_sizes"](wave))))
            s_conds, _ = rec.take()
        finally:
            rec.close()
        _same_conditions(s_conds, conds)
        _same_frames(streamed, offline)
    # orbit: a stream's repeats every STREAM_ORBIT_PERIOD frames (the offline orbit of a clip that long).
    t = Talker(run, device="cpu", impl="torch", camera="orbit")
    rec = _Recorder(t.model)
    try:
        list(t.stream([wave]))
        conds, _ = rec.take()
    finally:
        rec.close()
    want = camera_track("orbit", STREAM_ORBIT_PERIOD, t.clip)
    assert torch.equal(torch.stack([c["camera"] for c in conds]), want[:n])
    rows = torch.arange(300) % STREAM_ORBIT_PERIOD
    assert torch.equal(t._cameras[rows], want[rows])
    # What the orbit is, checked on the cameras themselves: head turns (the rotation taking the
    # rig's frontal camera to each one, about the pivot) that start frontal, stay within the
    # paper's novel views (yaw +-30, pitch +-20 degrees) and reach their ends over one period.
    rot, _ = split_camera_label(t._cameras[:STREAM_ORBIT_PERIOD].double())
    front, _ = split_camera_label(look_at_camera(0.0, 0.0, rig=t.clip.rig).double())
    head = (rot[:, :3, :3] @ front[:, :3, :3].transpose(1, 2)).transpose(1, 2)
    yaw, pitch, roll = (np.degrees(a.numpy()) for a in rotation_to_euler(head))
    assert np.abs(roll).max() < ORBIT_ANGLE_TOL_DEG
    assert abs(yaw[0]) < ORBIT_ANGLE_TOL_DEG and abs(pitch[0]) < ORBIT_ANGLE_TOL_DEG
    assert np.abs(yaw).max() <= 30 + ORBIT_ANGLE_TOL_DEG and np.abs(pitch).max() <= 20 + ORBIT_ANGLE_TOL_DEG
    assert yaw.max() > 30 - ORBIT_ANGLE_TOL_DEG and yaw.min() < -30 + ORBIT_ANGLE_TOL_DEG
    assert pitch.max() > 20 - ORBIT_ANGLE_TOL_DEG and pitch.min() < -20 + ORBIT_ANGLE_TOL_DEG


@pytest.mark.parametrize("encoder", [LogMelEncoder(32), LogMelEncoder(16, n_fft=1024, win_length=1024),
                                     LogMelEncoder(8, n_fft=512, win_length=320)], ids=["640", "1024", "320"])
def test_streaming_logmel_features_are_the_offline_ones(encoder):
    wave = _speech(1.0)
    for length in (1, 300, 640, 1280, 5000, wave.size):
        w = wave[:length]
        want = encoder.encode(w, num_frames_for(w))
        for chunks in ([w], [w[i:i + 1] for i in range(0, min(length, 1500))] + [w[1500:]], _uneven(w, seed=length)):
            feats = _StreamingFeatures(encoder)
            got = np.concatenate([feats.push(np.asarray(c, np.float32)) for c in chunks] + [feats.finish()])
            assert feats.num_frames == num_frames_for(w)
            np.testing.assert_allclose(got, want, rtol=0, atol=FEATURE_ATOL)
            assert feats._buf.size == 0


def test_unsupported_encoder_is_refused():
    class Other(AudioEncoder):
        name, dim = "other", 4

        def encode(self, wave, num_frames=None):
            return np.zeros((2 * num_frames, 4), np.float32)

    with pytest.raises(NotImplementedError, match="Other"):
        _StreamingFeatures(Other())


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed in this venv")
def test_streaming_wav2vec2_features_approximate_the_offline_ones(tmp_path):
    from test_audio import save_tiny_wav2vec2

    from talk3d.audio import Wav2Vec2Encoder

    save_tiny_wav2vec2(tmp_path / "w2v")
    enc = Wav2Vec2Encoder(tmp_path / "w2v")
    wave = _speech(2.0)
    want = enc.encode(wave, num_frames_for(wave))
    # The whole clip in one chunk with a context longer than the clip: the offline pass exactly.
    feats = _StreamingFeatures(enc, context_s=10.0, lookahead_s=0.2)
    np.testing.assert_array_equal(np.concatenate([feats.push(wave), feats.finish()]), want)
    # Chunked: an approximation (see W2V_STREAM_MIN_CORR).
    feats = _StreamingFeatures(enc, context_s=1.0, lookahead_s=0.2)
    got = np.concatenate([feats.push(wave[i:i + 1000]) for i in range(0, wave.size, 1000)] + [feats.finish()])
    assert got.shape == want.shape and np.isfinite(got).all()
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > W2V_STREAM_MIN_CORR
    assert feats.ahead == 3200 and not feats.exact
