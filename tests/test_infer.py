"""Inference on a tiny trained run: the mp4 (streams, frame count, size, audio length), camera modes,
determinism, bf16, audio inputs and errors, overwrite refusal."""
from __future__ import annotations

import json
import shutil

import av
import numpy as np
import pytest
import torch

from talk3d.audio import SAMPLE_RATE, write_wav
from talk3d.data import make_synthetic_dataset
from talk3d.audio.features import windows
from talk3d.infer import (InferenceError, load_training_clip, num_frames_for, read_speech, render_speech)
from talk3d.infer.render import audio_context, camera_track
from talk3d.infer.__main__ import main
from talk3d.train import TrainConfig, Trainer, load_talking_head

# The mp4's audio track may differ from the input by AAC's priming/padding: at most this (seconds).
AUDIO_DURATION_TOL_S = 0.1
# bf16 autocast against fp32, on uint8 frames: mean and max absolute difference (0..255 levels);
# measured on the tiny run: mean 0.4, max 3.
BF16_MEAN_TOL = 2.0
BF16_MAX_TOL = 16
# fp16 autocast against fp32, the same way: measured mean 0.09, max 1 on the tiny run (bf16 there:
# mean 0.67, max 3; 2-core AMD EPYC VM).
FP16_MEAN_TOL = 0.5
FP16_MAX_TOL = 4
# The same frames rendered in batches of another size: the CPU's convolution and matrix kernels
# block a batch of another size differently (the demo run's frames, batch 4 against 1 at a time:
# deltaplane 7.6e-6, output 9.2e-7 apart), so a uint8 value on a rounding edge moves by one level
# (measured: 1 value of 39936, at batch 1 against 4). A frame out of order or from the wrong audio
# differs by tens of levels.
BATCH_MAX_TOL = 1
BATCH_MAX_DIFFERING = 1e-3  # fraction of values allowed to differ at all
# Novel views must change the picture: mean absolute uint8 difference from the training cameras.
MIN_VIEW_CHANGE = 0.5
SPEECH_SECONDS = 0.5  # 13 frames (ceil(0.5 * 25) = 13 with the one-sample extra below)
# A 44.1-kHz file read as 16 kHz: the resampler returns round(T * 16000 / 44100) samples, within half
# a 16-kHz sample of the input's length (0.5 s + one 44.1-kHz sample): < 60 us. Measured 0 s (CPU VM).
RESAMPLED_DURATION_TOL_S = 1e-3
SR_SIZE, RAW_SIZE = 32, 16


def _cfg() -> TrainConfig:
    return TrainConfig.from_dict(dict(
        steps=3, batch_size=2, lr=3e-3, eval_every=100, checkpoint_every=1000, log_every=5, val_frames=2,
        generator_size="tiny", deltaplane_size="tiny", impl="torch",
        generator=dict(plane_resolution=16, plane_channels=4, neural_rendering_resolution=RAW_SIZE,
                       sr_resolution=SR_SIZE, sr_channels=[8, 8], coarse_samples=6, importance_samples=6)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    data = root / "data"
    make_synthetic_dataset(data, seconds=2, size=32, seed=0)
    Trainer(_cfg(), data, root / "run").fit()
    return root / "run"


@pytest.fixture(scope="module")
def loaded(run):
    model, info = load_talking_head(run)
    return model, info, load_training_clip(info)


def _speech(seconds: float = SPEECH_SECONDS, rate: int = SAMPLE_RATE, channels: int = 1) -> np.ndarray:
    """[T, channels] a chirpy tone with a one-sample tail (so the frame count rounds up)."""
    t = np.arange(int(seconds * rate) + 1) / rate
    mono = 0.3 * np.sin(2 * np.pi * (200 + 400 * t) * t)
    return np.stack([mono * (0.5 + 0.5 * c) for c in range(channels)], axis=1).astype(np.float32)


def _write_wav_any(path, wave, rate: int) -> None:
    """PCM16 WAV with any channel count (write_wav writes mono only)."""
    import wave as _wave

    ints = np.round(np.clip(wave, -1, 1) * 32767).astype("<i2")
    with _wave.open(str(path), "wb") as f:
        f.setnchannels(wave.shape[1])
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(ints.tobytes())


def _render(loaded, wave, **kw) -> np.ndarray:
    model, info, clip = loaded
    kw.setdefault("impl", "torch")
    return np.stack(list(render_speech(model, info, wave, clip=clip, **kw)))


def _probe(path) -> dict:
    with av.open(str(path)) as c:
        assert len(c.streams.video) == 1 and len(c.streams.audio) == 1
        v = c.streams.video[0]
        rate = float(v.average_rate)
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    with av.open(str(path)) as c:
        samples = sum(f.samples for f in c.decode(audio=0))
        audio_rate = c.streams.audio[0].rate
    return dict(fps=rate, frames=frames, audio_seconds=samples / audio_rate)


def test_cli_writes_a_valid_mp4_with_the_speech(run, tmp_path, capsys):
    wav = tmp_path / "speech.wav"
    write_wav(wav, _speech()[:, 0])
    out = tmp_path / "out.mp4"
    assert main(["--run", str(run), "--audio", str(wav), "--out", str(out), "--impl", "torch", "--batch", "3"]) == 0
    n = num_frames_for(read_speech(wav))
    assert n == 13
    p = _probe(out)
    assert p["fps"] == 25 and len(p["frames"]) == n
    assert p["frames"][0].shape == (SR_SIZE, SR_SIZE, 3)
    assert abs(p["audio_seconds"] - len(_speech()) / SAMPLE_RATE) < AUDIO_DURATION_TOL_S, p["audio_seconds"]
    printed = capsys.readouterr().out
    assert f"{n} frames" in printed and "real-time factor" in printed
    assert not list(tmp_path.glob("*.partial.*"))  # the temporary file was moved into place


def test_cli_muxes_the_speech_as_it_sounds(run, tmp_path):
    """A 44.1-kHz stereo speech file keeps its rate and both channels in the video (the model hears
    it at 16 kHz mono); the left channel loud, the right one quiet, as given."""
    rate = 44100
    speech = _speech(rate=rate, channels=2)
    speech[:, 1] *= 0.1  # the right channel 14 dB below the left (_speech made it twice as loud)
    wav = tmp_path / "stereo.wav"
    _write_wav_any(wav, speech, rate)
    out = tmp_path / "out.mp4"
    assert main(["--run", str(run), "--audio", str(wav), "--out", str(out), "--impl", "torch"]) == 0
    with av.open(str(out)) as c:
        a = c.streams.audio[0]
        assert a.rate == rate and a.codec_context.channels == 2
        decoded = np.concatenate([f.to_ndarray().reshape(2, -1) if f.format.is_planar else
                                  f.to_ndarray().reshape(-1, 2).T for f in c.decode(audio=0)], axis=1)  # [2, T]
    assert abs(decoded.shape[1] / rate - len(speech) / rate) < AUDIO_DURATION_TOL_S
    left, right = (np.sqrt((decoded[ch] ** 2).mean()) for ch in (0, 1))
    want_left, want_right = (np.sqrt((speech[:, ch] ** 2).mean()) for ch in (0, 1))  # 0.106, 0.021
    assert left == pytest.approx(want_left, rel=AAC_LEVEL_RTOL)
    assert right / left == pytest.approx(want_right / want_left, rel=AAC_LEVEL_RTOL)


def test_cli_muxes_speech_at_a_rate_aac_does_not_take(run, tmp_path):
    """192-kHz speech: the sound track is resampled to 96 kHz, the highest rate AAC encodes."""
    wav = tmp_path / "hi.wav"
    _write_wav_any(wav, _speech(rate=192000), 192000)
    out = tmp_path / "out.mp4"
    assert main(["--run", str(run), "--audio", str(wav), "--out", str(out), "--impl", "torch"]) == 0
    with av.open(str(out)) as c:
        assert c.streams.audio[0].rate == 96000
    assert abs(_probe(out)["audio_seconds"] - SPEECH_SECONDS) < AUDIO_DURATION_TOL_S


#: AAC at its default bit rate keeps a tone's RMS level within a few per cent (measured: left -0.7 %, the
#: right/left ratio -0.3 %, CPU VM).
AAC_LEVEL_RTOL = 0.05
#: Compiled and eager frames differ by float32 re-association at most (a uint8 level on a rare
#: pixel), which H.264 then spreads a little. Measured on the CPU VM: identical videos (0.0).
COMPILED_VIDEO_MEAN_TOL = 0.05
#: aot_eager runs the same float32 operations the eager model runs (measured: identical frames, CPU
#: VM); inductor would fuse and re-associate them (2.9e-6 measured on the demo's model).
COMPILED_FORWARD_ATOL = 1e-5


def test_cli_compiled_unet_renders_the_same_video(run, tmp_path):
    wav = tmp_path / "speech.wav"
    write_wav(wav, _speech()[:, 0])
    base = ["--run", str(run), "--audio", str(wav), "--impl", "torch", "--batch", "3"]
    assert main(base + ["--out", str(tmp_path / "eager.mp4")]) == 0
    # aot_eager traces like inductor does, without inductor's minute of CPU code generation.
    # Dense: the whole per-frame forward compiled; --skip-empty: the U-Net alone.
    for name, extra in (("compiled", []), ("compiled_skip", ["--skip-empty"])):
        assert main(base + ["--out", str(tmp_path / f"{name}.mp4"), "--compile", "--compile-backend", "aot_eager",
                            *extra]) == 0
    eager, compiled = (np.stack(_probe(tmp_path / f)["frames"]).astype(np.float64) for f in ("eager.mp4", "compiled.mp4"))
    assert eager.shape == compiled.shape
    print(f"compiled vs eager video: mean |diff| {np.abs(eager - compiled).mean():.4f} uint8 levels")
    assert np.abs(eager - compiled).mean() < COMPILED_VIDEO_MEAN_TOL
    assert len(_probe(tmp_path / "compiled_skip.mp4")["frames"]) == len(eager)


def test_whole_model_compiles_into_one_graph(loaded):
    """The per-frame forward is one graph: the cameras' check and the cache lookup run before it
    (the prologue, outside the graph), the SR's filter test reads a flag refreshed there, and the
    dense render reads nothing back. A graph break would split the CUDA graphs of reduce-overhead
    mode and put a host sync between them. The compiled model renders what the eager one does."""
    model, info, clip = loaded
    wave = _speech()[:16000 // 2, 0]
    features = clip.encoder().encode(wave, 4)
    window, steps = audio_context(info)
    cond = dict(camera=camera_track("orbit", 4, clip), audio=torch.from_numpy(np.stack([windows(features, i, window, steps)
                for i in range(4)])), blink=torch.zeros(4, 1), pose=torch.zeros(4, 3),
                landmarks=torch.from_numpy(np.repeat(clip.landmarks[:1], 4, axis=0)))
    cond = {k: v.float() for k, v in cond.items()}
    kw = dict(impl="torch", deterministic=True, resolution=int(info["model"]["render_resolution"]))
    with torch.inference_mode():
        explained = torch._dynamo.explain(model)(cond, **kw)
        assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
        eager = model(cond, **kw)["image"]
        compiled = torch.compile(model, backend="aot_eager")(cond, **kw)["image"]
    torch.testing.assert_close(compiled, eager, rtol=0, atol=COMPILED_FORWARD_ATOL)


def test_cli_refuses_to_overwrite(run, tmp_path, capsys):
    wav = tmp_path / "speech.wav"
    write_wav(wav, _speech()[:, 0])
    out = tmp_path / "out.mp4"
    out.write_bytes(b"keep me")
    assert main(["--run", str(run), "--audio", str(wav), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    capsys.readouterr()
    assert main(["--run", str(run), "--audio", str(wav), "--out", str(out), "--overwrite", "--size", "raw",
                 "--impl", "torch", "--camera", "fixed:10,5", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "render:" not in captured.err and "real-time factor" in captured.out  # no bar; the summary stays
    p = _probe(out)
    assert len(p["frames"]) == 13 and p["frames"][0].shape == (RAW_SIZE, RAW_SIZE, 3)


def test_camera_modes(loaded, tmp_path):
    wave = _speech()[:, 0]
    gt = _render(loaded, wave, camera="gt")
    assert gt.shape == (13, SR_SIZE, SR_SIZE, 3) and gt.dtype == np.uint8
    orbit = _render(loaded, wave, camera="orbit")
    fixed = _render(loaded, wave, camera="fixed:20,-10")
    assert np.abs(orbit.astype(float) - gt).mean() > MIN_VIEW_CHANGE
    assert np.abs(fixed.astype(float) - gt).mean() > MIN_VIEW_CHANGE
    # A JSON of [yaw, pitch] per frame gives the same cameras as fixed:YAW,PITCH.
    path = tmp_path / "cams.json"
    path.write_text(json.dumps([[20, -10]] * 4))  # shorter than the clip: cycled
    np.testing.assert_array_equal(_render(loaded, wave, camera=str(path)), fixed)
    # 25-number labels: the training clip's own cameras reproduce the gt render.
    _, _, clip = loaded
    path.write_text(json.dumps(clip.cameras.tolist()))
    np.testing.assert_array_equal(_render(loaded, wave, camera=str(path)), gt)
    for bad in ("sideways", "fixed:1", "fixed:a,b"):
        with pytest.raises(InferenceError, match="--camera"):
            render_speech(*loaded[:2], wave, camera=bad, clip=clip)
    path.write_text(json.dumps([[1, 2, 3]]))
    with pytest.raises(InferenceError, match=r"\[yaw, pitch\]"):
        render_speech(*loaded[:2], wave, camera=str(path), clip=clip)


def test_camera_track_turns_the_head_on_the_clips_rig(loaded, tmp_path):
    """``fixed``, ``orbit`` and [yaw, pitch] JSON cameras are the clip rig's cameras of the head turned
    to those angles (degrees -> radians, no roll), written out here from the modes' definitions: a
    clip filmed with FFHQ's rig (not the default, Talk3D's) gets FFHQ-rig cameras."""
    import dataclasses
    import math

    from talk3d.data.synthetic import head_cameras
    from talk3d.render.cameras import FFHQ_RIG, TALK3D_RIG

    clip = dataclasses.replace(loaded[2], rig=FFHQ_RIG)

    def want(yaw_pitch_deg, rig=FFHQ_RIG):
        rad = [[math.radians(y), math.radians(p), 0.0] for y, p in yaw_pitch_deg]
        return head_cameras(np.array(rad), rig)  # [F, 25]

    torch.testing.assert_close(camera_track("fixed:20,-10", 3, clip), want([(20, -10)] * 3), rtol=0, atol=0)
    assert not torch.allclose(want([(20, -10)]), want([(20, -10)], TALK3D_RIG))  # the rigs' cameras differ
    # orbit over 8 frames: yaw 30 sin(2 pi f / 8), pitch 20 sin(4 pi f / 8), frontal at frame 0.
    orbit = [(30 * math.sin(2 * math.pi * f / 8), 20 * math.sin(4 * math.pi * f / 8)) for f in range(8)]
    torch.testing.assert_close(camera_track("orbit", 8, clip), want(orbit), rtol=0, atol=1e-6)
    path = tmp_path / "cams.json"
    path.write_text(json.dumps([[-15, 5], [25, 0]]))
    torch.testing.assert_close(camera_track(str(path), 3, clip), want([(-15, 5), (25, 0), (-15, 5)]),
                               rtol=0, atol=0)


def test_neutral_sources_change_the_conditions(loaded):
    wave = _speech()[:, 0]
    train = _render(loaded, wave)
    neutral = _render(loaded, wave, eye="neutral", pose="neutral")
    assert neutral.shape == train.shape
    assert not np.array_equal(neutral, train)


def test_fp32_is_deterministic_and_bf16_is_close(loaded):
    wave = _speech()[:, 0]
    a = _render(loaded, wave, batch=4)
    b = _render(loaded, wave, batch=4)
    np.testing.assert_array_equal(a, b)
    # Batches are handed out one behind (the next is queued first): every frame, in order, at any
    # batch size, the last partial batch included. Each frame is rendered on its own numbers, so
    # the frames agree whatever the batch, up to the kernels' rounding (BATCH_MAX_TOL).
    for batch in (1, 3, len(a) + 5):
        diff = np.abs(_render(loaded, wave, batch=batch).astype(np.int16) - a.astype(np.int16))
        assert diff.max() <= BATCH_MAX_TOL and (diff > 0).mean() <= BATCH_MAX_DIFFERING, (batch, diff.max(),
                                                                                           (diff > 0).mean())
    bf = _render(loaded, wave, precision="bf16")
    diff = np.abs(bf.astype(np.int16) - a.astype(np.int16))
    assert diff.mean() < BF16_MEAN_TOL and diff.max() <= BF16_MAX_TOL, (diff.mean(), diff.max())
    half = _render(loaded, wave, precision="fp16")  # 3 more mantissa bits than bf16: closer
    diff = np.abs(half.astype(np.int16) - a.astype(np.int16))
    assert diff.mean() < FP16_MEAN_TOL and diff.max() <= FP16_MAX_TOL, (diff.mean(), diff.max())


def test_audio_inputs(loaded, tmp_path):
    # 44.1-kHz stereo: resampled to 16 kHz mono, same number of frames as the 16-kHz version.
    stereo = tmp_path / "stereo.wav"
    _write_wav_any(stereo, _speech(rate=44100, channels=2), 44100)
    wave = read_speech(stereo)
    assert wave.ndim == 1 and abs(wave.shape[0] / SAMPLE_RATE - SPEECH_SECONDS) < RESAMPLED_DURATION_TOL_S
    frames = _render(loaded, wave)
    assert frames.shape[0] == num_frames_for(wave) == 13
    # The same speech as AAC in an M4A (FFmpeg through PyAV): the same frame count, within the
    # codec's padding (tests/test_audio_files.py checks the decoded wave itself).
    m4a = tmp_path / "speech.m4a"
    with av.open(str(m4a), "w") as c:
        a = c.add_stream("aac", rate=44100)
        a.layout = "stereo"
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(_speech(rate=44100, channels=2).T), format="fltp",
                                           layout="stereo")
        frame.sample_rate, frame.pts = 44100, 0
        for packet in [*a.encode(frame), *a.encode(None)]:
            c.mux(packet)
    from_m4a = read_speech(m4a)
    assert abs(from_m4a.shape[0] - wave.shape[0]) / SAMPLE_RATE < AUDIO_DURATION_TOL_S
    # Empty WAV, not a WAV, missing file: errors that say what is wrong.
    empty = tmp_path / "empty.wav"
    write_wav(empty, np.zeros(0))
    with pytest.raises(InferenceError, match="no samples"):
        read_speech(empty)
    text = tmp_path / "notes.txt"
    text.write_text("not audio")
    with pytest.raises(InferenceError, match="notes.txt: not a readable audio or video file"):
        read_speech(text)
    with pytest.raises(InferenceError, match="no such file"):
        read_speech(tmp_path / "missing.wav")
    with pytest.raises(InferenceError, match="empty"):
        render_speech(loaded[0], loaded[1], np.zeros(0), clip=loaded[2])


def test_cli_bad_audio_and_missing_training_data(run, tmp_path, capsys):
    text = tmp_path / "speech.mp3"
    text.write_bytes(b"\x00garbage")
    assert main(["--run", str(run), "--audio", str(text), "--out", str(tmp_path / "o.mp4")]) == 2
    assert "speech.mp3: not a readable audio or video file" in capsys.readouterr().err
    assert not (tmp_path / "o.mp4").exists()
    # A copy of the run whose data folder is gone: the error names the folder and why it is needed.
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    cfg = json.loads((moved / "config.json").read_text())
    cfg["data"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(cfg))
    wav = tmp_path / "speech.wav"
    write_wav(wav, _speech()[:, 0])
    assert main(["--run", str(moved), "--audio", str(wav), "--out", str(tmp_path / "o.mp4")]) == 2
    err = capsys.readouterr().err
    assert "gone" in err and "audio encoder" in err


#: Empty-space skipping drops intervals the dilated grid calls empty (their weight is small, not
#: zero) and stops rays at transmittance 1e-3. On the test run's (full) grid the video is unchanged
#: (measured 0.0 uint8 levels on the CPU VM); the bound leaves room for a rare rounding flip.
SKIP_MEAN_TOL = 0.05
#: On the undilated, 25 %-occupied grid of a mostly empty field: measured mean 1.9e-6, max 2.3e-5
#: (images in [-1, 1], CPU VM). The dropped intervals carry ~1e-6 of weight each.
SKIP_SPARSE_MEAN_TOL = 2e-5
SKIP_SPARSE_MAX_TOL = 2e-4
#: Raw density shift that turns the untrained field's noise into mostly empty space.
SPARSE_SIGMA_SHIFT = 10.0


def test_empty_space_skipping_stays_close_to_the_dense_render(loaded):
    wave = _speech()[:, 0]
    # The fused C++ marcher: the pure-PyTorch one is for small grids only (dense per-ray tables).
    dense = _render(loaded, wave, camera="orbit", impl="auto").astype(np.float64)
    skipped = _render(loaded, wave, camera="orbit", impl="auto", skip_empty=True).astype(np.float64)
    print(f"skip-empty video vs dense: mean |diff| {np.abs(dense - skipped).mean():.4f} uint8 levels")
    assert np.abs(dense - skipped).mean() < SKIP_MEAN_TOL
    # A 3-step run's density is noise well above nerfacc's 0.01 opacity threshold everywhere, so
    # its grid is full. Lower the decoder's density bias (a copy) so most space is nearly empty, as
    # in a trained head, and check the skipping itself on the undilated grid.
    import copy

    model, info, clip = loaded
    model = copy.deepcopy(model)
    fc = model.generator.decoder.net[2]
    with torch.no_grad():
        fc.bias[0] -= SPARSE_SIGMA_SHIFT / fc.bias_gain
    d = model.deltaplane.cfg
    cond = {"audio": torch.randn(2, d.audio_window, d.audio_steps, d.audio_dim), "blink": torch.zeros(2, 1), "pose": torch.zeros(2, 3),
            "landmarks": torch.zeros(2, d.num_landmarks, 2), "camera": torch.from_numpy(clip.cameras[:2])}
    with torch.inference_mode():
        grid = model.occupancy_grid([cond], dilation=0)
        # Its cells are probed at points drawn from a seeded generator: the same grid whatever
        # torch's random state (drawn from the global one, the demo run's grids for two seeds
        # differed in 773 of 13824 cells).
        torch.manual_seed(123)
        again = model.occupancy_grid([cond], dilation=0)
        assert torch.equal(grid.bits, again.bits)
        kw = dict(impl="auto", deterministic=True, resolution=info["model"]["render_resolution"])
        full = model(cond, **kw)["image"]
        sparse = model(cond, grid=grid, early_stop=1e-3, **kw)["image"]
    diff = (full - sparse).abs()
    print(f"undilated grid {grid.occupied_fraction():.3f} occupied; |diff| mean {float(diff.mean()):.2e}, "
          f"max {float(diff.max()):.2e} (images in [-1, 1])")
    assert 0 < grid.occupied_fraction() < 0.9
    assert float(diff.mean()) < SKIP_SPARSE_MEAN_TOL and float(diff.max()) < SKIP_SPARSE_MAX_TOL


# ------------------------------------------------------------------------- live (--stream)

#: Live and offline videos of the same speech: the frames agree to fp32 rounding (see
#: talk3d.infer.talker), then pass through the same H.264 encoder. Measured: 0.0 uint8 levels.
LIVE_VIDEO_MEAN_TOL = 0.05
#: Their audio: the same samples through the same AAC encoder, which emits whole 1024-sample frames
#: (64 ms at 16 kHz), so any difference is a whole frame and this asks for equal lengths. Measured:
#: both 0.512 s (CPU VM).
LIVE_AUDIO_DURATION_TOL_S = 1e-3
#: Raw RGB24 frames of a stream against the offline render: equal but for fp32 rounding (see
#: talk3d.infer.talker), which flips a pixel by one uint8 level at most, when it sits on a rounding
#: boundary. Measured: 0 levels (CPU VM).
RAW_STREAM_MAX_LEVELS = 1


class _Stdin:
    """Stands in for sys.stdin: .buffer is a binary stream that returns at most `step` bytes a read."""

    def __init__(self, data: bytes, step: int = 1 << 20):
        import io

        raw = io.BytesIO(data)
        self.buffer = type("Trickle", (), {"read": lambda self_, n=-1: raw.read(min(step, n) if n >= 0 else step)})()


def _pcm(wave) -> bytes:
    return np.round(np.clip(wave, -1, 1) * 32767).astype("<i2").tobytes()


def test_cli_stream_writes_the_offline_video(run, tmp_path, capsys):
    wav = tmp_path / "speech.wav"
    write_wav(wav, _speech()[:, 0])
    base = ["--run", str(run), "--audio", str(wav), "--impl", "torch", "--batch", "3"]
    assert main(base + ["--out", str(tmp_path / "offline.mp4")]) == 0
    assert main(base + ["--out", str(tmp_path / "live.mp4"), "--stream", "--chunk-ms", "25"]) == 0
    err = capsys.readouterr().err
    assert "13 frames" in err and "audio look-ahead 290 ms" in err and "render delay" in err
    off, live = _probe(tmp_path / "offline.mp4"), _probe(tmp_path / "live.mp4")
    assert len(live["frames"]) == len(off["frames"]) == 13
    assert abs(live["audio_seconds"] - off["audio_seconds"]) < LIVE_AUDIO_DURATION_TOL_S
    diff = np.abs(np.stack(live["frames"]).astype(float) - np.stack(off["frames"]).astype(float)).mean()
    print(f"live vs offline video: mean |diff| {diff:.4f} uint8 levels")
    assert diff < LIVE_VIDEO_MEAN_TOL
    assert not list(tmp_path.glob("*.partial.*"))


def test_cli_stream_pcm_stdin_to_raw_stdout(run, tmp_path, monkeypatch, capsys):
    """Raw PCM in (read a few bytes at a time, odd splits included), raw RGB24 frames out: the
    frames equal the offline render of the same samples."""
    import io
    import sys

    wave = _speech()[:, 0]
    pcm = _pcm(wave)
    quantised = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
    out = io.BytesIO()
    monkeypatch.setattr(sys, "stdin", _Stdin(pcm, step=777))
    monkeypatch.setattr(sys, "stdout", type("Out", (), {"buffer": out})())
    assert main(["--run", str(run), "--audio", "-", "--out", "-", "--stream", "--impl", "torch"]) == 0
    raw = np.frombuffer(out.getvalue(), dtype=np.uint8).reshape(-1, SR_SIZE, SR_SIZE, 3)
    model, info, clip = _loaded_for(run)
    offline = np.stack(list(render_speech(model, info, quantised, impl="torch", clip=clip)))
    assert raw.shape == offline.shape == (13, SR_SIZE, SR_SIZE, 3)
    assert np.abs(raw.astype(int) - offline.astype(int)).max() <= RAW_STREAM_MAX_LEVELS
    assert f"rgb24 {SR_SIZE}x{SR_SIZE}" in capsys.readouterr().err


def _loaded_for(run):
    model, info = load_talking_head(run)
    return model, info, load_training_clip(info)


def test_cli_stream_errors(run, tmp_path, monkeypatch, capsys):
    import sys

    wav = tmp_path / "speech.wav"
    write_wav(wav, _speech()[:, 0])
    base = ["--run", str(run)]
    assert main(base + ["--audio", "-", "--out", str(tmp_path / "a.mp4")]) == 2  # stdin needs --stream
    assert "need --stream" in capsys.readouterr().err
    assert main(base + ["--audio", "-", "--out", "-", "--stream", "--realtime"]) == 2
    assert "--realtime" in capsys.readouterr().err
    assert main(base + ["--audio", str(wav), "--out", "-", "--stream", "--skip-empty"]) == 2
    assert main(base + ["--audio", str(wav), "--out", "-", "--stream", "--chunk-ms", "0"]) == 2
    monkeypatch.setattr(sys, "stdin", _Stdin(b""))
    assert main(base + ["--audio", "-", "--out", str(tmp_path / "b.mp4"), "--stream"]) == 2
    assert "no audio arrived" in capsys.readouterr().err and not (tmp_path / "b.mp4").exists()
    monkeypatch.setattr(sys, "stdin", _Stdin(_pcm(_speech()[:, 0]) + b"\x01"))  # a dangling byte
    assert main(base + ["--audio", "-", "--out", str(tmp_path / "c.mp4"), "--stream"]) == 2
    assert "odd number of bytes" in capsys.readouterr().err
    assert not (tmp_path / "c.mp4").exists() and not list(tmp_path.glob("*.partial.*"))


def test_live_chunk_sources_and_delays():
    """Chunks cover the audio; real-time pacing logs when each chunk existed, not when it was taken;
    a frame's delay is measured from the chunk that completed the audio it waits for."""
    import io

    from talk3d.infer.live import ArrivalLog, frame_delays, pcm_chunks, wave_chunks

    wave = np.arange(3000, dtype=np.float32) / 3000
    now = [10.0]
    slept = []

    def sleep(dt):
        slept.append(dt)
        now[0] += dt

    log = ArrivalLog()
    chunks = list(wave_chunks(wave, 1000, log, realtime=True, clock=lambda: now[0], sleep=sleep))
    assert np.array_equal(np.concatenate(chunks), wave)
    assert log.samples == [1000, 2000, 3000]
    assert log.times == pytest.approx([10.0 + 1000 / SAMPLE_RATE, 10.0 + 2000 / SAMPLE_RATE, 10.0 + 3000 / SAMPLE_RATE])
    assert sum(slept) == pytest.approx(3000 / SAMPLE_RATE)
    assert log.time_for(1) == log.times[0] and log.time_for(1001) == log.times[1]
    assert log.time_for(10**9) == log.times[-1]  # past the end: the last chunk
    # Frame n waits for 640 (n + 1) + latency samples.
    # Frame 0 waits for 940 samples (the first chunk), frame 1 for 1580 (the second).
    delays = frame_delays([log.times[1] + 0.5, log.times[2] + 0.25], log, latency_samples=300)
    assert delays == pytest.approx([log.times[1] + 0.5 - log.times[0], log.times[2] + 0.25 - log.times[1]])
    ints = (np.arange(-5, 6) * 1000).astype("<i2")
    got = np.concatenate(list(pcm_chunks(io.BytesIO(ints.tobytes()), 4, ArrivalLog())))
    assert np.array_equal(got, ints.astype(np.float32) / 32768.0)


# ------------------------------------------------------------------------- mutation audit (2026-12-07)


def test_clip_cycle_runs_back_and_forth_by_hand():
    """The training clip's frames are reused back and forth (0 1 2 3 2 1 0 1 ...), never jumping
    from the last frame to the first nor repeating the turning frame."""
    from talk3d.infer.render import _cycle

    assert _cycle(10, 4).tolist() == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3]
    assert _cycle(5, 2).tolist() == [0, 1, 0, 1, 0]
    assert _cycle(3, 1).tolist() == [0, 0, 0]
    idx = _cycle(200, 7)
    assert idx.min() == 0 and idx.max() == 6 and np.abs(np.diff(idx)).tolist() == [1] * 199


def test_uint8_frames_round_to_the_nearest_level_by_hand():
    """[-1, 1] -> 0..255 is ``round((x + 1) * 127.5)`` (clamped), channels last: a value 0.4 level
    under a level rounds up to it, not down (truncation would darken every frame by half a level)."""
    from talk3d.infer.render import to_uint8_frames

    levels = [-1.0, -2.0, 1.0, 3.0, 0.0, 100.6 / 127.5 - 1, 100.4 / 127.5 - 1, 2 / 127.5 - 1]
    red = torch.tensor(levels).view(2, 4)
    images = torch.stack([red, torch.full_like(red, -1.0), torch.full_like(red, 1.0)])[None]  # [1, 3, 2, 4]
    got = to_uint8_frames(images)
    assert got.shape == (1, 2, 4, 3) and got.dtype == np.uint8
    # 0 -> 127.5 -> 128 (round half to even); 2 / 127.5 - 1 -> 2.0 (or a hair under) -> 2.
    assert got[0, :, :, 0].reshape(-1).tolist() == [0, 0, 255, 255, 128, 101, 100, 2]
    assert (got[..., 1] == 0).all() and (got[..., 2] == 255).all()


def test_pitch_of_90_degrees_is_refused():
    """A fixed camera's pitch must lie strictly within +-90 degrees (the head would face straight up
    or down, where the look-at camera has no right axis); 89.9 is accepted, with the range warning."""
    import types
    import warnings

    from talk3d.infer.render import PoseRangeWarning
    from talk3d.render.cameras import TALK3D_RIG

    clip = types.SimpleNamespace(rig=TALK3D_RIG)
    for spec in ("fixed:0,90", "fixed:10,-90"):
        with pytest.raises(InferenceError, match=r"pitch\s+within \+-90"):
            camera_track(spec, 2, clip)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PoseRangeWarning)
        assert camera_track("fixed:0,89.9", 2, clip).shape == (2, 25)


class _Spy(torch.nn.Module):
    """A TalkingHead that records the conditions of every frame it renders and of every batch its
    occupancy grid is built from."""

    def __init__(self, model):
        super().__init__()
        self.model, self.frames, self.grid_batches = model, [], []

    def forward(self, cond, **kw):
        self.frames.append(cond)
        return self.model(cond, **kw)

    def occupancy_grid(self, batches, **kw):
        batches = list(batches)
        self.grid_batches.extend(batches)
        return self.model.occupancy_grid(batches, **kw)


def test_neutral_sources_are_zeros_and_the_clips_mean_landmarks(loaded):
    """eye='neutral': blink 0; pose='neutral': pose 0 and, for every frame, the training clip's mean
    landmarks; 'train': frame i takes the clip's frame i (the clip is longer than the speech)."""
    model, info, clip = loaded
    wave = _speech()[:, 0]
    for source in ("neutral", "train"):
        spy = _Spy(model)
        list(render_speech(spy, info, wave, clip=clip, impl="torch", size="raw", eye=source, pose=source))
        cond = {k: torch.cat([c[k] for c in spy.frames]) for k in ("blink", "pose", "landmarks")}
        n = cond["pose"].shape[0]
        assert n == 13 < clip.num_frames
        if source == "neutral":
            assert not cond["blink"].any() and not cond["pose"].any()
            mean = torch.from_numpy(clip.landmarks.mean(axis=0))
            assert torch.equal(cond["landmarks"], mean.expand(n, -1, -1))
        else:
            assert torch.equal(cond["landmarks"], torch.from_numpy(clip.landmarks[:n]))
            assert torch.equal(cond["pose"], torch.from_numpy(clip.pose[:n]))


def test_skip_empty_grid_covers_every_frame_of_a_short_speech(loaded):
    """skip_empty builds the grid from up to GRID_FRAMES (16) of the render's own frames, evenly
    spaced: a 13-frame speech gives them all, so the grid's batches hold exactly the conditions of
    the 13 frames rendered (audio windows compared)."""
    model, info, clip = loaded
    spy = _Spy(model)
    frames = list(render_speech(spy, info, _speech()[:, 0], clip=clip, impl="auto", size="raw", skip_empty=True))
    assert len(frames) == 13
    rendered = torch.cat([c["audio"] for c in spy.frames])
    assert torch.equal(torch.cat([b["audio"] for b in spy.grid_batches]), rendered)


def test_paper_range_warning_starts_past_its_edge():
    """PoseRangeWarning is for cameras PAST the paper's range: yaw 30 and pitch 20 degrees exactly
    are inside it (no warning); 30.5 or -20.5 warn."""
    import types
    import warnings

    from talk3d.infer.render import PoseRangeWarning
    from talk3d.render.cameras import TALK3D_RIG

    clip = types.SimpleNamespace(rig=TALK3D_RIG)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PoseRangeWarning)
        camera_track("fixed:30,20", 1, clip)
        camera_track("fixed:-30,-20", 1, clip)
    for spec in ("fixed:30.5,0", "fixed:0,-20.5"):
        with pytest.warns(PoseRangeWarning):
            camera_track(spec, 1, clip)


def test_batch_of_zero_is_refused_at_the_call(loaded):
    """batch < 1 is an InferenceError raised by render_speech itself, before any frame is asked for
    (not a ValueError from the frame loop's range() at the first frame)."""
    model, info, clip = loaded
    with pytest.raises(InferenceError, match="batch must be >= 1"):
        render_speech(model, info, _speech()[:, 0], clip=clip, batch=0)
