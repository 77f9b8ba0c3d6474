"""A run's life: the frame order a resume continues, scalars files a CSV reader reads, configs
checked to the nested keys, runs that start over, change schedule, finish, or stop on Ctrl-C."""
from __future__ import annotations

import csv
import json
import os
import signal
import warnings

import pytest
import torch

from talk3d.train import Trainer
from talk3d.train.__main__ import main
from talk3d.train.config import load_config
from talk3d.train.draws import DRAW_BLOCK, FrameDraws, StepBatches, window_start
from talk3d.train.scalars import append_row, read_rows

from test_train import _cfg, data  # noqa: F401  (the synthetic dataset fixture)

TINY = ["--set", "generator_size=\"tiny\"", "--set", "deltaplane_size=\"tiny\"", "--set", "impl=\"torch\"",
        "--set", "generator.plane_resolution=16", "--set", "generator.plane_channels=4",
        "--set", "generator.neural_rendering_resolution=16", "--set", "generator.sr_resolution=32",
        "--set", "generator.sr_channels=[8,8]", "--set", "generator.coarse_samples=6",
        "--set", "generator.importance_samples=6", "--set", "eval_every=3", "--set", "log_every=1"]


def _take(it, k):
    return [next(it) for _ in range(k)]


def test_frame_draws_continue_across_a_resume_and_interleave_over_ranks():
    n, seed = 37, 5
    whole = _take(iter(FrameDraws(n, seed)), 3 * DRAW_BLOCK)
    assert min(whole) >= 0 and max(whole) < n and len(set(whole)) == n  # uniform over all frames
    for start in (0, 7, DRAW_BLOCK - 1, DRAW_BLOCK, 2 * DRAW_BLOCK + 3):  # resumed inside or at a block's edge
        assert _take(iter(FrameDraws(n, seed, start=start)), 50) == whole[start:start + 50]
    # Two ranks, batch 2 each: step k's four frames are the single process's draws 4k..4k+3.
    ranks = [_take(iter(FrameDraws(n, seed, start=8, rank=r, world=2)), 6) for r in range(2)]
    assert ranks[0] == whole[8:20:2] and ranks[1] == whole[9:20:2]
    assert _take(iter(FrameDraws(n, seed + 1)), 20) != whole[:20]
    with pytest.raises(ValueError, match="no frames"):
        FrameDraws(0, seed)


def test_a_scalars_file_of_the_old_writer_is_widened(tmp_path):
    """Before val_scalars.csv, validation rows went under the training header, longer than it."""
    path = tmp_path / "scalars.csv"
    path.write_text("step,lr,total\n1,0.1,9\n2,0.2,8,7.5,6.5\n")
    append_row(path, {"step": 3, "total": 7, "sync": 0.5})
    rows = read_rows(path)
    assert [r["step"] for r in rows] == ["1", "2", "3"] and rows[2]["sync"] == "0.5" and rows[0]["sync"] == ""


def test_dataloader_workers_ignore_ctrl_c_and_sigterm(data, tmp_path):  # noqa: F811
    from talk3d.train.trainer import _worker_ignores_stop_signals

    t = Trainer(_cfg(steps=1, num_workers=1), data, tmp_path / "run")
    assert t._loader().worker_init_fn is _worker_ignores_stop_signals
    outer = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        _worker_ignores_stop_signals(0)
        assert all(signal.getsignal(sig) is signal.SIG_IGN for sig in outer)
    finally:
        for sig, handler in outer.items():
            signal.signal(sig, handler)


def test_scalars_files_keep_one_header_when_columns_appear(tmp_path):
    path = tmp_path / "scalars.csv"
    append_row(path, {"step": 1, "total": 0.5})
    append_row(path, {"step": 2, "total": 0.4})
    append_row(path, {"step": 3, "total": 0.3, "sync": 0.9})  # the lip-sync term switches on
    append_row(path, {"step": 4, "sync": 0.8, "total": 0.2})
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]
    assert [r["total"] for r in rows] == ["0.5", "0.4", "0.3", "0.2"] and [r["sync"] for r in rows] == ["", "", "0.9", "0.8"]
    assert read_rows(tmp_path / "none.csv") == []


def test_resume_continues_the_run_bitwise(data, tmp_path):  # noqa: F811
    """6 steps in one go against 3 steps, a new process-like Trainer, 3 more: the same frames, the
    same random streams, the same weights to the bit."""
    cfg = dict(eval_every=3, checkpoint_every=100, log_every=1)
    torch.manual_seed(123)  # whatever ran before: the trainer seeds itself
    a = Trainer(_cfg(steps=6, **cfg), data, tmp_path / "a")
    a.fit()
    torch.manual_seed(456)
    b = Trainer(_cfg(steps=3, **cfg), data, tmp_path / "b")
    b.fit()
    b = Trainer(_cfg(steps=6, **cfg), data, tmp_path / "b", resume=True)
    assert b.step == 3
    b.fit()
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)
    ra, rb = read_rows(tmp_path / "a" / "scalars.csv"), read_rows(tmp_path / "b" / "scalars.csv")
    assert [r["total"] for r in ra] == [r["total"] for r in rb] and len(ra) == 6


def test_run_files_are_read_by_a_csv_reader_and_the_config_follows_the_resume(data, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run"
    assert main(["--data", str(data), "--out", str(run), "--set", "steps=3", *TINY]) == 0
    train, val = read_rows(run / "scalars.csv"), read_rows(run / "val_scalars.csv")
    assert [r["step"] for r in train] == ["1", "2", "3"] and all(float(r["lr"]) > 0 for r in train)
    assert [r["step"] for r in val] == ["0", "3"] and all(float(r["val_l1_raw"]) > 0 for r in val)
    assert "lr" not in val[0]
    # A finished run resumed as it is: said, nothing trained.
    assert main(["--resume", str(run)]) == 0
    assert "run already finished: step 3 of steps = 3" in (run / "log.txt").read_text()
    # Resumed with a new length and learning rate: both apply, and config.json says so.
    assert main(["--resume", str(run), "--set", "steps=5", "--set", "lr=0.01"]) == 0
    saved = json.loads((run / "config.json").read_text())["train"]
    assert saved["steps"] == 5 and saved["lr"] == 0.01
    state = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    assert state["step"] == 5 and state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.01)
    assert "schedule changed on resume: lr" in (run / "log.txt").read_text()
    # A model setting changed on resume: named, no traceback.
    with pytest.raises(SystemExit):
        main(["--resume", str(run), "--set", "steps=6", "--set", "deltaplane.token_dim=24"])
    assert "do not fit the model this config builds" in capsys.readouterr().err


def test_nested_config_values_are_typed_and_bad_values_refused():
    assert load_config(None, ["deltaplane.use_audio=false"]).deltaplane["use_audio"] is False
    assert load_config(None, ["deltaplane.channels=[8, 32.0]"]).deltaplane["channels"] == [8, 32]
    bad = {"deltaplane.use_audio=False": "use_audio must be true or false, got 'False'",  # a string: would be true
           "deltaplane.use_audio=no": "use_audio must be true or false",
           'deltaplane.channels="ab"': "channels must be a list of whole numbers",
           "generator.ray_start=[1]": "must be a number",
           "val_frames=0": "val_frames must be >= 1", "lr_decay_epochs=0": "lr_decay_epochs must be >= 1",
           "render_resolution=-4": "render_resolution must be >= 1", "num_workers=-1": "num_workers must be >= 0",
           "loss.l1_raw=-5": "loss.l1_raw must be a finite number >= 0", "loss.mouth=NaN": "loss.mouth must be"}
    for override, message in bad.items():
        with pytest.raises(ValueError, match=message.replace("[", "\\[")):
            load_config(None, [override])


def test_only_a_run_of_our_own_may_start_over(data, tmp_path, capsys):  # noqa: F811
    """A folder whose files only look like a run's is never written into; a failed attempt's own
    scalars and previews go when the run starts over."""
    from PIL import Image

    def folder(name, **files):
        d = tmp_path / name
        (d / "checkpoints").mkdir(parents=True)
        (d / "previews").mkdir()
        for f, text in files.items():
            (d / f.replace("__", ".")).write_text(text)
        return d

    run_cfg = json.dumps({"train": {}})
    ours = folder("ours", config__json=run_cfg, log__txt="[10:00:00] run ...\n", scalars__csv="step,total\n1,9\n2,8\n")
    Image.new("RGB", (4, 4)).save(ours / "previews" / "val_step0000000.png")
    theirs = {"csv": folder("csv", scalars__csv="step,total\n1,9\n"),  # scalars without a run's config
              "log": folder("log", log__txt="my notes\n"),
              "config": folder("config", config__json='{"lr": 1}')}
    theirs["image"] = folder("image")
    Image.new("RGB", (4, 4)).save(theirs["image"] / "previews" / "holiday.png")
    theirs["file"] = tmp_path / "file"
    theirs["file"].mkdir()
    (theirs["file"] / "checkpoints").write_text("not a folder")
    for what, d in theirs.items():
        with pytest.raises(SystemExit):
            main(["--data", str(data), "--out", str(d), "--set", "steps=1", *TINY])
        assert "choose another --out" in capsys.readouterr().err, what
    assert main(["--data", str(data), "--out", str(ours), "--set", "steps=2", *TINY]) == 0
    assert [r["step"] for r in read_rows(ours / "scalars.csv")] == ["1", "2"]  # the new run's rows only
    assert (ours / "log.txt").read_text().startswith("[10:00:00] run ...")  # its log continued


def test_a_refused_run_can_start_over_in_its_folder(data, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run"
    with pytest.raises(SystemExit):  # refused by the model's own checks, after the folder was made
        main(["--data", str(data), "--out", str(run), "--set", "steps=2", *TINY,
              "--set", "generator.plane_resolution=-16"])
    assert "plane_resolution" in capsys.readouterr().err
    assert main(["--data", str(data), "--out", str(run), "--set", "steps=2", *TINY]) == 0
    assert "starting over in" in (run / "log.txt").read_text()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "log.txt").write_text("my notes")
    (tmp_path / "mine" / "notes.md").write_text("keep")
    with pytest.raises(SystemExit):  # not only a run's files: never touched
        main(["--data", str(data), "--out", str(tmp_path / "mine"), "--set", "steps=2", *TINY])
    assert "is not empty" in capsys.readouterr().err


def test_ctrl_c_stops_after_the_step_and_saves(data, tmp_path):  # noqa: F811
    t = Trainer(_cfg(steps=50, eval_every=100, checkpoint_every=100), data, tmp_path / "run")
    step = t.train_step

    def step_then_ctrl_c(batch, window=None):
        out = step(batch, window)
        if t.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # handled between steps: the step completes first
        return out

    t.train_step = step_then_ctrl_c
    # A background job (nohup, `&`) starts with SIGINT ignored, which the trainer leaves alone:
    # here Ctrl-C has Python's usual handler, as in a terminal.
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            t.fit()
        restored = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, outer)
    state = torch.load(tmp_path / "run" / "checkpoints" / "latest.pt", weights_only=True)
    assert state["step"] == 2 and state["scheduler"]["last_epoch"] == 2  # a whole step, counted once
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "Ctrl-C: stopping after this step" in log and "stopped (Ctrl-C) at step 2" in log
    assert restored is signal.default_int_handler


def _lr_column(run) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r["lr"])) for r in read_rows(run / "scalars.csv")]


def test_learning_rate_schedule_and_its_resume(data, tmp_path):  # noqa: F811
    """StepLR as the release: lr * lr_decay ^ (step // (lr_decay_epochs * steps_per_epoch)), in
    epochs, not steps; a resume restores the scheduler (its step count equals the run's), so the
    decay boundaries fall where an uninterrupted run's do."""
    kw = dict(lr=0.01, lr_decay=0.5, lr_decay_epochs=1, log_every=1, eval_every=1000)
    spe = Trainer(_cfg(steps=1, **kw), data, tmp_path / "probe").steps_per_epoch
    assert spe > 2  # so that a step-based period (every lr_decay_epochs steps) would differ
    steps = 2 * spe + 3
    a = Trainer(_cfg(steps=steps, **kw), data, tmp_path / "a")
    a.fit()
    lrs = _lr_column(tmp_path / "a")
    assert [s for s, _ in lrs] == list(range(1, steps + 1))
    for s, lr in lrs:  # the lr the next step uses, after s steps
        assert lr == pytest.approx(0.01 * 0.5 ** (s // spe), rel=1e-6), s
    b = Trainer(_cfg(steps=spe - 1, **kw), data, tmp_path / "b")
    b.fit()
    b = Trainer(_cfg(steps=steps, **kw), data, tmp_path / "b", resume=True)
    assert b.scheduler.last_epoch == b.step == spe - 1
    b.fit()
    resumed = _lr_column(tmp_path / "b")
    assert [s for s, _ in resumed] == [s for s, _ in lrs]
    assert [lr for _, lr in resumed] == pytest.approx([lr for _, lr in lrs], rel=1e-6)


def test_gradients_are_clipped_to_grad_clip(data, tmp_path):  # noqa: F811
    """clip_grad_norm_ at grad_clip: the optimizer steps with gradients whose global norm is at
    most grad_clip, while the logged grad_norm is the norm before clipping."""
    clip = 1e-4
    t = Trainer(_cfg(steps=2, grad_clip=clip, log_every=1, eval_every=1000), data, tmp_path / "run")
    seen = []
    step = t.optimizer.step

    def watched(*args, **kwargs):
        grads = [p.grad for g in t.optimizer.param_groups for p in g["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return step(*args, **kwargs)

    t.optimizer.step = watched
    with warnings.catch_warnings():  # torch's notice that optimizer.step was replaced after the scheduler
        warnings.simplefilter("ignore", UserWarning)
        t.fit()
    assert len(seen) == 2 and all(n <= clip * (1 + 1e-4) for n in seen), seen
    logged = [float(r["grad_norm"]) for r in read_rows(tmp_path / "run" / "scalars.csv")]
    assert all(n > 10 * clip for n in logged), logged



def test_an_epoch_counts_its_last_partial_batch(data, tmp_path):  # noqa: F811
    """An epoch is one pass over the training frames, ceil(N / batch) batches with the last one
    partial (a DataLoader's length without drop_last): the 46 training frames of the 2-s clip (50 -
    50 // 11) at batch 4 are 12 steps, not 11, so the lr decay and the lip-sync loss's start fall
    on multiples of 12 steps."""
    t = Trainer(_cfg(steps=1, batch_size=4, lr_decay_epochs=1), data, tmp_path / "run")
    assert len(t.train_set) == 46 and t.steps_per_epoch == 12
    assert t.scheduler.step_size == 12



def test_step_batches_add_the_sync_window_from_its_step_and_resume_with_it():
    """StepBatches: each step's batch is the next batch_size draws of FrameDraws; from window_from
    on, the step's 5 consecutive frames follow, starting where window_start puts them for that
    step (uniform over every start, from the seed, step and rank alone). Started at a later step
    it gives what a run from step 0 gives there."""
    n, seed, b = 40, 3, 2
    whole = _take(iter(StepBatches(FrameDraws(n, seed), b, window=5, window_from=3, seed=seed)), 8)
    draws = _take(iter(FrameDraws(n, seed)), 8 * b)
    for step, batch in enumerate(whole):
        assert batch[:b] == draws[step * b:(step + 1) * b]
        if step < 3:
            assert len(batch) == b
        else:
            start = window_start(n, 5, seed, step)
            assert batch[b:] == list(range(start, start + 5)) and 0 <= start <= n - 5
    resumed = _take(iter(StepBatches(FrameDraws(n, seed, start=5 * b), b, first_step=5, window=5, window_from=3,
                                     seed=seed)), 3)
    assert resumed == whole[5:]
    assert len({window_start(n, 5, seed, k) for k in range(200)}) > 30  # spread over the clip
    assert window_start(n, 5, seed, 7, rank=1) != window_start(n, 5, seed, 7) or \
        window_start(n, 5, seed, 8, rank=1) != window_start(n, 5, seed, 8)  # ranks draw their own
    assert {window_start(5, 5, seed, k) for k in range(5)} == {0}  # a clip of one window
    assert _take(iter(StepBatches(FrameDraws(n, seed), b)), 3) == [draws[0:2], draws[2:4], draws[4:6]]  # no windows
    with pytest.raises(ValueError, match="a window of 5 frames among 4"):
        StepBatches(FrameDraws(4, seed), b, window=5, window_from=0)

def test_a_data_parallel_resume_continues_the_shared_draws(data, tmp_path):  # noqa: F811
    """Resumed at step s with W ranks of batch B, the run has consumed s B W draws of the shared
    sequence: rank r's loader goes on at draw s B W + r, taking every W-th, so its next batches are
    those an uninterrupted rank would have drawn. Checked on the trainer's own loader with W = 2,
    r = 1, s = 3 set by hand (building the loader needs no process group)."""
    t = Trainer(_cfg(steps=10), data, tmp_path / "run")
    t.rank, t.world, t.step = 1, 2, 3
    b = t.cfg.batch_size
    got = [batch["index"].tolist() for batch in _take(iter(t._loader()), 2)]  # training frames: index = draw
    whole = _take(iter(FrameDraws(len(t.train_set), t.cfg.seed)), 3 * b * 2 + 4 * b)
    mine = whole[3 * b * 2 + 1::2]  # rank 1's share after 3 steps of 2 ranks
    assert got == [mine[:b], mine[b:2 * b]]


def test_the_last_step_is_validated_when_eval_every_does_not_divide_steps(data, tmp_path):  # noqa: F811
    """A run of 3 steps with eval_every 1000 still scores the model it ends with: validation rows at
    steps 0 and 3, and fit's "last" scores (the log's summary) are step 3's, not the untrained ones."""
    t = Trainer(_cfg(steps=3, eval_every=1000, log_every=1), data, tmp_path / "run")
    result = t.fit()
    assert [int(r["step"]) for r in read_rows(tmp_path / "run" / "val_scalars.csv")] == [0, 3]
    assert result["first"]["step"] == 0 and result["last"]["step"] == 3
