"""One training step of Talk3D's deltaplane stage: U-Net + tokens, render, SR, losses, backward, Adam.

GPU: the release's sizes (256^2 x 32 planes, 128^2 render with 48 + 48 samples, 512^2 SR, batch 2).
CPU: the no-argument demo's sizes (a release-size step takes tens of seconds there). LPIPS is off
unless its weights are installed (``extra_info['losses']`` says which ran).
"""
from __future__ import annotations

import pytest
import torch
from backends import fused_impl
from memory import peak_memory_bytes

from talk3d.render import look_at_camera
from talk3d.train import TrainConfig, build_model, demo_config
from talk3d.train.losses import reconstruction_losses

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
AUDIO_DIM = 32  # the built-in log-mel encoder's


def _config() -> TrainConfig:
    if HAS_CUDA:
        return TrainConfig(batch_size=2)
    return TrainConfig.from_dict({**demo_config("cpu"), "batch_size": 2})


def _batch(model, B: int) -> dict:
    cfg, d = model.generator.cfg, model.deltaplane.cfg
    S = cfg.sr_resolution
    cams = look_at_camera(torch.rand(B) * 0.4 - 0.2, torch.rand(B) * 0.2 - 0.1, rig=cfg.camera_rig())
    batch = dict(image=torch.rand(B, 3, S, S) * 2 - 1, camera=cams, pose=torch.randn(B, 3) * 0.1,
                 blink=torch.rand(B, 1), landmarks=torch.rand(B, 5, 2) * 2 - 1,
                 audio=torch.randn(B, d.audio_window, d.audio_steps, AUDIO_DIM),
                 mouth_mask=(torch.rand(B, 1, S, S) > 0.9).float())
    return {k: v.to(DEVICE) for k, v in batch.items()}


def make_train_step(impl: str, *, fused_adam: bool = True, cfg: TrainConfig | None = None,
                    compile_backend: str | None = None):
    """One training step at the benchmark's sizes (or ``cfg``'s: a fresh model, batch and Adam), as
    the trainer runs it (``compile_backend``: the trainer's ``compile = "model"`` with that
    backend); returns the step function (it does not synchronise) and the model."""
    cfg = cfg or _config()
    torch.manual_seed(0)
    model = build_model(cfg, AUDIO_DIM, prior=None, log=lambda m: None).to(DEVICE)
    if compile_backend:
        model.compile(backend=compile_backend)
    batch = _batch(model, cfg.batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, fused=True if fused_adam else None)
    amp = torch.autocast(DEVICE.type, dtype=torch.bfloat16) if HAS_CUDA else torch.autocast(DEVICE.type, enabled=False)

    def step():
        with amp:
            out = model(batch, impl=impl, check_cameras=False)  # as the trainer: cameras checked at load
        loss = reconstruction_losses(out, batch, cfg.loss)["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
    return step, model


@pytest.mark.benchmark(group="train-step")
@pytest.mark.parametrize("path", ["reference", "fused"])
def test_train_step(benchmark, path):
    cfg = _config()
    train_step, model = make_train_step("torch" if path == "reference" else fused_impl())  # fused Adam as the trainer

    def step():
        train_step()
        if HAS_CUDA:
            torch.cuda.synchronize()

    autotune = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = HAS_CUDA  # as the trainer; restored after (other groups time without)
    try:
        step()
        benchmark.extra_info.update(device=str(DEVICE), batch=cfg.batch_size, losses="L1 + mouth L1 (LPIPS off)",
                                    render=model.generator.cfg.neural_rendering_resolution,
                                    planes=model.generator.cfg.plane_resolution,
                                    peak_memory_mb=peak_memory_bytes(step, DEVICE) / 2**20)
        benchmark(step)
    finally:
        torch.backends.cudnn.benchmark = autotune
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["steps_per_s"] = 1.0 / benchmark.stats.stats.median
