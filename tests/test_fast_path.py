"""Issue 8's quality target and the model on every device: a tiny run trained on the device, then
its held-out frames rendered by the fp32 reference path (torch renderer, whole U-Net per frame)
and by the fast path (fused engine, U-Net encoder features of P_ID cached, frames batched,
occupancy skipping with early ray termination, bf16 on a GPU): both scored against the ground
truth, the fast path within 0.5 dB PSNR of the reference. On CUDA this also trains with the fused
CUDA kernels under bf16 autocast and streams through ``talk3d.Talker``."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from talk3d.data import TalkingHeadDataset, make_synthetic_dataset
from talk3d.evaluate.metrics import psnr
from talk3d.infer import Talker
from talk3d.infer.render import EARLY_STOP, GRID_FRAMES
from talk3d.train import TrainConfig, Trainer, load_talking_head

# The target: the fast path's PSNR (against the ground-truth frames) within 0.5 dB of the
# fp32 reference path's on the same frames.
FAST_PATH_PSNR_TOL_DB = 0.5
# Streamed and offline frames on CUDA: the same kernels on the same inputs, batched differently
# (bf16 autocast rounds with the batch's layout): mean |diff| in uint8 levels. Not a measured
# figure: the one H200 run passed it without keeping the printed difference (on the CPU, in fp32,
# streaming equals offline to 1e-5; see test_talker). It bounds only the mean: nearly every value one
# level off, or a few pixels far off, would both pass; nothing bounds the max. Tighten it from the
# printout of a GPU run.
STREAM_MEAN_TOL = 1.0
# Training on the device must cut the held-out render L1 to this share of step 0's in 60 steps.
# Measured on the CPU VM: 1.224 -> 0.184 (0.15); the CUDA run (bf16 autocast) is not measured here.
VAL_L1_MAX_RATIO = 0.7
STEPS = 60
KEYS = ("camera", "audio", "blink", "pose", "landmarks")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _cfg(device: str) -> TrainConfig:
    # 16 x 4-channel planes, a 16^2 render with 8 + 8 samples, SR to 32^2: trains in seconds on a CPU.
    return TrainConfig.from_dict(dict(
        steps=STEPS, batch_size=4, lr=3e-3, eval_every=STEPS, checkpoint_every=1000, log_every=10,
        val_frames=4, generator_size="tiny", deltaplane_size="tiny", impl="auto" if device == "cuda" else "torch",
        generator=dict(plane_resolution=16, plane_channels=4, neural_rendering_resolution=16, sr_resolution=32,
                       sr_channels=[8, 8], coarse_samples=8, importance_samples=8)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast_path_data")
    make_synthetic_dataset(root / "data", seconds=3, size=32, seed=1)
    return root / "data"


@pytest.fixture(scope="module", params=DEVICES)
def trained(request, data, tmp_path_factory):
    device = request.param
    run = tmp_path_factory.mktemp(f"fast_path_{device}") / "run"
    result = Trainer(_cfg(device), data, run, device=device).fit()
    return device, run, result


def test_training_on_the_device_learns(trained):
    device, _, result = trained
    first, last = result["first"], result["last"]
    print(f"{device}: val L1 (render) {first['val_l1_raw']:.3f} -> {last['val_l1_raw']:.3f}")
    assert last["val_l1_raw"] < VAL_L1_MAX_RATIO * first["val_l1_raw"]


def _held_out(data, device, window: int):
    ds = TalkingHeadDataset(data, "val", audio_window=window)
    items = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
    cond = {k: items[k].to(device=device, dtype=torch.float32) for k in KEYS}
    return cond, items["image"]


def _render(model, cond, *, impl, batch, grid=None, early_stop=0.0, dtype=None, resolution):
    amp = torch.autocast(cond["camera"].device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    n, out = cond["camera"].shape[0], []
    for s in range(0, n, batch):
        part = {k: v[s:s + batch] for k, v in cond.items()}
        with torch.inference_mode(), amp:
            out.append(model(part, impl=impl, deterministic=True, resolution=resolution, grid=grid,
                             early_stop=early_stop)["image"].float().cpu())
    return torch.cat(out)


def test_fast_path_within_half_a_db_of_the_reference(trained, data):
    device, run, _ = trained
    model, info = load_talking_head(run, device=device)
    window = int(info["model"]["deltaplane"]["audio_window"])
    res = int(info["model"]["render_resolution"])
    cond, target = _held_out(data, device, window)
    size = model.generator.cfg.sr_resolution
    target = torch.nn.functional.interpolate(target, size=(size, size), mode="area")

    model.cache_encoder = False
    ref = _render(model, cond, impl="torch", batch=1, resolution=res)
    model.cache_encoder = True
    sample = np.unique(np.linspace(0, cond["camera"].shape[0] - 1, GRID_FRAMES).round().astype(np.int64))
    with torch.inference_mode():
        grid = model.occupancy_grid([{k: v[sample] for k, v in cond.items()}])
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    # A head learned from scratch in 60 steps fills its box: the grid came out fully occupied on the
    # CPU (1.00), so skipping is wired in here but culls nothing. Skipping's own accuracy on a
    # mostly empty field is tested in test_infer (test_empty_space_skipping_...).
    fast = {name: _render(model, cond, impl="auto", batch=4, grid=grid, early_stop=EARLY_STOP, dtype=dt,
                          resolution=res) for name, dt in dtypes.items()}
    p_ref = float(psnr(ref, target).mean())
    lines = [f"{device}: reference fp32 {p_ref:.2f} dB; grid {grid.occupied_fraction():.2f} occupied"]
    for name, img in fast.items():
        p = float(psnr(img, target).mean())
        lines.append(f"fast {name} {p:.2f} dB ({p - p_ref:+.3f}), vs reference {float(psnr(img, ref).mean()):.1f} dB")
        assert abs(p - p_ref) <= FAST_PATH_PSNR_TOL_DB, lines
    print("; ".join(lines))


@pytest.mark.cuda
def test_streaming_on_cuda_matches_the_offline_render(data, tmp_path):
    run = tmp_path / "run"
    Trainer(TrainConfig.from_dict({**_cfg("cuda").to_dict(), "steps": 2}), data, run, device="cuda").fit()
    talker = Talker(run, device="cuda", precision="bf16", batch=4)
    t = np.arange(16000) / 16000
    wave = (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t)).astype(np.float32)
    offline = np.stack(list(talker.render(wave)))
    streamed = np.stack(list(talker.stream(np.array_split(wave, 7))))
    assert streamed.shape == offline.shape
    diff = np.abs(streamed.astype(np.int16) - offline.astype(np.int16))
    print(f"stream vs offline on CUDA: mean {diff.mean():.3f}, max {diff.max()} uint8 levels")
    assert diff.mean() < STREAM_MEAN_TOL
