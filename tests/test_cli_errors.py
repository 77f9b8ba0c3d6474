"""What a user gets back for the usual mistakes with a trained run: a damaged checkpoint, a file
where the run folder should be, a back end or device that does not exist, an output that cannot
hold a video, NaN cameras in the training data, audio of the wrong kind. Each is one message that
names the problem (exit 2 for the CLIs), raised before any work, and nothing is written."""
from __future__ import annotations

import io
import json
import os
import shutil
import sys

import numpy as np
import pytest

from talk3d.audio import SAMPLE_RATE, write_wav
from talk3d.data import make_synthetic_dataset
from talk3d.evaluate.__main__ import main as evaluate_main
from talk3d.infer import InferenceError, PoseRangeWarning, Talker, render_speech
from talk3d.infer.__main__ import main as infer_main
from talk3d.train import TrainConfig, Trainer, load_talking_head


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_errors")
    make_synthetic_dataset(root / "data", seconds=2, size=32, seed=0)
    cfg = TrainConfig.from_dict(dict(
        steps=1, batch_size=2, eval_every=100, checkpoint_every=1000, val_frames=2, generator_size="tiny",
        deltaplane_size="tiny", impl="torch",
        generator=dict(plane_resolution=16, plane_channels=4, neural_rendering_resolution=16, sr_resolution=32,
                       sr_channels=[8, 8], coarse_samples=4, importance_samples=4)))
    Trainer(cfg, root / "data", root / "run").fit()
    return root / "run"


@pytest.fixture(scope="module")
def data_dir(run):
    return json.loads((run / "config.json").read_text())["data"]


@pytest.fixture
def wav(tmp_path):
    path = tmp_path / "speech.wav"
    write_wav(path, (0.3 * np.sin(np.linspace(0, 200, SAMPLE_RATE // 5))).astype(np.float32))
    return path


def _copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _cli_refuses(main, args, said, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err, err


def test_damaged_checkpoints(run, tmp_path, wav, capsys):
    broken = _copy(run, tmp_path)
    latest = broken / "checkpoints" / "latest.pt"
    latest.write_bytes(os.urandom(1000))
    for main, extra in ((infer_main, ["--audio", str(wav), "--out", str(tmp_path / "a.mp4")]),
                        (evaluate_main, ["--out", str(tmp_path / "eval")])):
        assert main(["--run", str(broken), *extra]) == 2
        err = capsys.readouterr().err
        assert "not a readable talk3d checkpoint" in err and str(latest) in err
        assert "weights_only=False" not in err  # torch's advice would run code from the file
    assert not (tmp_path / "a.mp4").exists() and not (tmp_path / "eval").exists()
    with pytest.raises(ValueError, match="not a readable talk3d checkpoint"):
        Talker(broken)
    latest.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty file \(0 bytes\)"):
        load_talking_head(broken)
    # Another file posing as a checkpoint: named, without a listing of every key.
    _cli_refuses(infer_main, ["--run", str(run), "--checkpoint", "../config.json", "--audio", str(wav),
                              "--out", str(tmp_path / "b.mp4")], "not a readable talk3d checkpoint", capsys)


def test_run_that_is_a_file(wav, tmp_path, capsys):
    _cli_refuses(infer_main, ["--run", str(wav), "--audio", str(wav), "--out", str(tmp_path / "a.mp4")],
                 "is a file", capsys)
    _cli_refuses(evaluate_main, ["--run", str(wav), "--out", str(tmp_path / "eval")], "is a file", capsys)
    with pytest.raises(FileNotFoundError, match="is a file"):
        Talker(wav)


def test_back_end_and_device_are_checked_up_front(run, tmp_path, wav, capsys):
    with pytest.raises(SystemExit):  # argparse: not one of the choices ('cpp' was once in the help)
        infer_main(["--run", str(run), "--audio", str(wav), "--out", str(tmp_path / "a.mp4"), "--impl", "cpp"])
    assert "invalid choice: 'cpp'" in capsys.readouterr().err
    with pytest.raises(InferenceError, match="impl must be one of"):
        Talker(run, impl="bogus")
    with pytest.raises(InferenceError, match="not a device name"):
        Talker(run, device="gpu")
    _cli_refuses(infer_main, ["--run", str(run), "--audio", str(wav), "--out", str(tmp_path / "a.mp4"),
                              "--device", "gpu"], "not a device name", capsys)
    _cli_refuses(evaluate_main, ["--run", str(run), "--out", str(tmp_path / "eval"), "--device", "tpu"],
                 "not a device name", capsys)
    assert not (tmp_path / "a.mp4").exists() and not (tmp_path / "eval").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_back_ends_on_a_cpu_machine(run, data_dir, tmp_path, wav, capsys):
    from talk3d.ops import backends

    # Triton runs on the CPU under TRITON_INTERPRET=1 (which the tests set): only then is it allowed.
    for impl in ("cuda",) if backends.TRITON_INTERPRET else ("cuda", "triton"):
        _cli_refuses(infer_main, ["--run", str(run), "--audio", str(wav), "--out", str(tmp_path / "a.mp4"),
                                  "--impl", impl, "--device", "cpu"], f"'{impl}' cannot run on cpu", capsys)
        _cli_refuses(evaluate_main, ["--run", str(run), "--out", str(tmp_path / "eval"), "--impl", impl,
                                     "--device", "cpu"], f"'{impl}' cannot run on cpu", capsys)
        with pytest.raises(InferenceError, match="pass --device cuda"):
            Talker(run, impl=impl, device="cpu")
    from talk3d.train.__main__ import main as train_main

    with pytest.raises(SystemExit):
        train_main(["--data", str(data_dir), "--out", str(tmp_path / "r"), "--preset", "small", "--set", "impl=\"cuda\"",
                    "--device", "cpu"])
    assert "impl 'cuda' cannot run on cpu" in capsys.readouterr().err
    assert not (tmp_path / "a.mp4").exists() and not (tmp_path / "eval").exists() and not (tmp_path / "r").exists()


@pytest.mark.parametrize("out, said", [("x.txt", "suffixes .mp4"), ("noext", "suffixes .mp4"),
                                       ("folder", "is a folder"), ("file.wav/x.mp4", "is a file, not a folder")])
@pytest.mark.parametrize("stream", [False, True], ids=["offline", "stream"])
def test_outputs_that_cannot_hold_a_video(run, tmp_path, wav, capsys, out, said, stream):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.wav").write_bytes(b"RIFF")
    args = ["--run", str(run), "--audio", str(wav), "--out", str(tmp_path / out), "--overwrite"]
    _cli_refuses(infer_main, args + (["--stream"] if stream else []), said, capsys)


def test_nan_training_cameras_name_the_file(run, tmp_path, wav, capsys):
    broken = _copy(run, tmp_path)
    data = tmp_path / "data"
    shutil.copytree(json.loads((run / "config.json").read_text())["data"], data)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["data"] = str(data)
    (broken / "config.json").write_text(json.dumps(cfg))
    cams = np.load(data / "cameras.npy")
    cams[3] = np.nan
    np.save(data / "cameras.npy", cams)
    _cli_refuses(infer_main, ["--run", str(broken), "--audio", str(wav), "--out", str(tmp_path / "a.mp4")],
                 f"cameras.npy: 1 of {cams.shape[0]} training cameras hold NaN or inf (first: frame 3)", capsys)


def test_arrays_of_the_wrong_kind_of_audio(run):
    talker = Talker(run, impl="torch")
    wave = (0.3 * np.sin(np.linspace(0, 100, 4000))).astype(np.float32)
    for bad, said in [((wave * 32767).astype(np.int16), "divide by 32768"),
                      (np.stack([wave, wave], axis=1), "expected a 1-D array"),
                      (np.full(100, np.nan, np.float32), "NaN or inf")]:
        with pytest.raises(InferenceError, match=said):
            talker.render(bad)
        with pytest.raises(InferenceError, match=said):
            render_speech(talker.model, talker.info, bad, clip=talker.clip, impl="torch")
    with pytest.raises(InferenceError, match=r"for a whole wave pass \[wave\]"):
        list(talker.stream(wave))  # the wave itself instead of chunks of it


def test_a_wav_file_piped_as_raw_pcm(run, wav, tmp_path, monkeypatch, capsys):
    class Stdin:
        buffer = io.BytesIO(wav.read_bytes())

    monkeypatch.setattr(sys, "stdin", Stdin())
    _cli_refuses(infer_main, ["--run", str(run), "--audio", "-", "--out", str(tmp_path / "a.mp4"), "--stream"],
                 "stdin holds a WAV file", capsys)
    assert not (tmp_path / "a.mp4").exists()


def test_prior_cli_errors_are_messages(tmp_path, capsys):
    from talk3d.prior.__main__ import main as prior_main

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(500))
    for args, said in [(["sample", "--ckpt", str(garbage), "--out", str(tmp_path / "s")], "not a readable safetensors"),
                       (["convert", str(tmp_path / "nope.pkl"), str(tmp_path / "o.safetensors")], "not found"),
                       (["sample", "--random-init", "tiny", "--device", "gpu", "--out", str(tmp_path / "s")],
                        "not a device name")]:
        with pytest.raises(SystemExit) as e:
            prior_main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and said in err and "Traceback" not in err, err
    assert not (tmp_path / "s").exists()


def test_fixed_camera_angles_out_of_range(run):
    from talk3d.infer import camera_track
    from talk3d.infer.render import load_training_clip

    clip = load_training_clip(json.loads((run / "config.json").read_text()))
    for spec in ("fixed:720,400", "fixed:1e308,0", "fixed:0,90"):
        with pytest.raises(InferenceError, match="yaw must be within"):
            camera_track(spec, 3, clip)
    with pytest.warns(PoseRangeWarning):  # at the limits: rendered, with the warning
        assert camera_track("fixed:-180,89", 3, clip).shape == (3, 25)


def test_loss_weights_named_but_missing(data_dir, tmp_path):
    cfg = TrainConfig.from_dict(dict(steps=1, generator_size="tiny", deltaplane_size="tiny",
                                     syncnet_weights=str(tmp_path / "lipsync_expert.pth")))
    with pytest.raises(FileNotFoundError, match="syncnet_weights .*lipsync_expert.pth: no such file"):
        Trainer(cfg, data_dir, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_evaluate_with_a_missing_network_file_writes_nothing(run, tmp_path, capsys):
    _cli_refuses(evaluate_main, ["--run", str(run), "--out", str(tmp_path / "eval"), "--impl", "torch",
                                 "--syncnet-weights", str(tmp_path / "lipsync_expert.pth")], "no such file", capsys)
    assert not (tmp_path / "eval").exists()


def test_json_camera_angles_out_of_range(run, tmp_path):
    from talk3d.infer import camera_track
    from talk3d.infer.render import load_training_clip

    clip = load_training_clip(json.loads((run / "config.json").read_text()))
    path = tmp_path / "cams.json"
    for angles, entry in (([[0, 0], [1e9, 0]], "entry 1"), ([[0, 95]], "entry 0"), ([[0, 0], [3.14, 1.2], [0, -90]], "entry 2")):
        path.write_text(json.dumps(angles))
        with pytest.raises(InferenceError, match=f"{entry}: yaw must be within"):
            camera_track(str(path), 3, clip)
    path.write_text(json.dumps([[180, 0], [0, 90]]))  # the first at its limit, the second past it
    with pytest.raises(InferenceError, match="entry 1: yaw must be within"):
        camera_track(str(path), 3, clip)
    path.write_text(json.dumps([[30, 20], [-180, -89]]))
    with pytest.warns(PoseRangeWarning, match=r"1 of 2 camera\(s\) past the paper's novel-view range .* \(-180, -89\)"):
        assert camera_track(str(path), 3, clip).shape == (3, 25)


def test_cameras_past_the_papers_range_warn(run, tmp_path, wav, capsys):
    """Within yaw +-30 / pitch +-20 (the paper's novel views) a camera renders silently; past it (up
    to +-180 / +-90, beyond which it is refused) with a PoseRangeWarning, which the command prints
    as one line."""
    import warnings

    from talk3d.infer import camera_track
    from talk3d.infer.render import load_training_clip

    clip = load_training_clip(json.loads((run / "config.json").read_text()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for spec in ("fixed:30,20", "fixed:-30,-20", "orbit", "gt"):
            camera_track(spec, 4, clip)
    for spec in ("fixed:90,0", "fixed:0,-21", "fixed:30.5,0"):
        with pytest.warns(PoseRangeWarning, match="past the paper's novel-view range"):
            camera_track(spec, 4, clip)
    out = tmp_path / "far.mp4"
    assert infer_main(["--run", str(run), "--audio", str(wav), "--out", str(out), "--impl", "torch",
                       "--camera", "fixed:90,0"]) == 0
    err = capsys.readouterr().err
    assert "warning: --camera 'fixed:90,0': 1 of 1 camera(s) past the paper's novel-view range" in err
    assert out.is_file()


def test_ckpt_size_and_path_messages(run, tmp_path, wav, capsys):
    """--ckpt RUN/checkpoints/NAME.pt is that run's checkpoint; --size takes the pixel sizes too;
    a folder given as audio and a run folder that does not exist are named as such."""
    out = tmp_path / "a.mp4"
    assert infer_main(["--ckpt", str(run / "checkpoints" / "latest.pt"), "--audio", str(wav), "--out", str(out),
                       "--impl", "torch", "--size", "16"]) == 0  # the render: 16 px in this run
    import av

    with av.open(str(out)) as c:
        assert (c.streams.video[0].width, c.streams.video[0].height) == (16, 16)
    _cli_refuses(infer_main, ["--run", str(run), "--audio", str(wav), "--out", str(tmp_path / "b.mp4"),
                              "--impl", "torch", "--size", "512"], "this run outputs 32x32 (sr", capsys)
    lone = tmp_path / "latest.pt"
    shutil.copy(run / "checkpoints" / "latest.pt", lone)
    _cli_refuses(infer_main, ["--ckpt", str(lone), "--audio", str(wav), "--out", str(tmp_path / "c.mp4")],
                 "not inside a run folder", capsys)
    _cli_refuses(infer_main, ["--ckpt", str(run / "checkpoints" / "latest.pt"), "--checkpoint", "x.pt",
                              "--audio", str(wav), "--out", str(tmp_path / "c.mp4")], "--checkpoint goes with --run",
                 capsys)
    _cli_refuses(infer_main, ["--run", str(run), "--audio", str(tmp_path), "--out", str(tmp_path / "d.mp4"),
                              "--impl", "torch"], "a folder, not an audio file", capsys)
    _cli_refuses(infer_main, ["--run", str(tmp_path / "nowhere"), "--audio", str(wav),
                              "--out", str(tmp_path / "e.mp4")], "no such run folder", capsys)
    # the folder above the runs (the no-argument demo writes runs/demo/run-<time>): the runs are named
    _cli_refuses(infer_main, ["--run", str(run.parent), "--audio", str(wav), "--out", str(tmp_path / "f.mp4")],
                 f"it holds the runs {run.name}: pass one, e.g. {run}", capsys)
