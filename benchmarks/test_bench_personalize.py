"""One step of each optimisation of the personalisation stage (Talk3D section 3.2).

- ``invert``: joint inversion of M = 4 frames (w_ID, offsets, cameras; generator frozen);
- ``tune``: pivotal tuning of the generator on the 4 frames plus one locality render;
- ``track``: per-frame inversion of a batch of 4 frames (cameras only, the default).

Each is forward + backward + Adam step through synthesis, render and super-resolution (the
optimiser's set-up, a few small tensors, is inside the timing). GPU: the FFHQ-size generator
(512^2 output, 128^2 render). CPU: the tiny config at 128^2 output so a round takes seconds.
Random weights: timing does not depend on them.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from backends import fused_impl
from memory import peak_memory_bytes

from talk3d.models import GeneratorConfig, TriplaneGenerator
from talk3d.personalize import PersonalizeConfig, TrackConfig, invert, pivotal_tune, track_batch
from talk3d.render import look_at_camera

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
ROUNDS = dict(rounds=3, iterations=1, warmup_rounds=1) if not HAS_CUDA else dict(rounds=10, iterations=1,
                                                                                 warmup_rounds=2)
M = 4  # the release's frame count and our default track batch


def _config() -> GeneratorConfig:
    if HAS_CUDA:
        return GeneratorConfig.ffhq()
    return dataclasses.replace(GeneratorConfig.tiny(), sr_resolution=128, neural_rendering_resolution=32)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    if not HAS_CUDA:
        torch.set_flush_denormal(True)  # random-weight gradients underflow; see talk3d.personalize
    gen = TriplaneGenerator(_config()).to(DEVICE).eval().requires_grad_(False)
    cams = look_at_camera(torch.linspace(-0.3, 0.3, M), torch.linspace(-0.1, 0.1, M),
                          rig=gen.cfg.camera_rig()).to(DEVICE)
    s = gen.cfg.sr_resolution
    frames = {"image": torch.rand(M, 3, s, s, device=DEVICE) * 2 - 1, "camera": cams,
              "face_mask": torch.ones(M, 1, s, s, device=DEVICE)}
    with torch.no_grad():
        ws = gen.mapping(torch.randn(M, gen.cfg.z_dim, device=DEVICE), cams)
    return gen, frames, ws


def _run(benchmark, fn, extra: dict):
    def step():
        fn()
        if HAS_CUDA:
            torch.cuda.synchronize()

    step()
    benchmark.extra_info.update(device=str(DEVICE), peak_memory_mb=peak_memory_bytes(step, DEVICE) / 2**20, **extra)
    benchmark.pedantic(step, **ROUNDS)


@pytest.mark.benchmark(group="personalize-step")
@pytest.mark.parametrize("phase", ["invert", "tune", "track"])
def test_personalize_step(benchmark, setup, phase):
    gen, frames, ws = setup
    cfg = PersonalizeConfig(invert_steps=1, tune_steps=1, impl=fused_impl(), locality_samples=1)
    extra = {"frames": M, "image": gen.cfg.sr_resolution, "render": gen.cfg.neural_rendering_resolution}
    if phase == "invert":
        _run(benchmark, lambda: invert(gen, frames, cfg), extra)
    elif phase == "tune":
        tuned, frozen = copy.deepcopy(gen), copy.deepcopy(gen)
        _run(benchmark, lambda: pivotal_tune(tuned, frames, ws, frames["camera"], cfg, frozen=frozen), extra)
    else:
        tcfg = TrackConfig(max_steps=1)
        w_id = ws[:1]
        _run(benchmark, lambda: track_batch(gen, w_id, frames["image"], frames["camera"], frames["face_mask"],
                                            torch.zeros(M, 2, device=DEVICE), None, cfg, tcfg,
                                            pivot=gen.cfg.camera_pivot), extra)
