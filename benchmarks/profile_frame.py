"""Where an inference frame's time goes: U-Net (deltaplane), volume render, super-resolution.

    python benchmarks/profile_frame.py [--batch 1 8] [--out DIR]

Builds the model at the release's sizes on a GPU (the no-argument demo's sizes on a CPU), like the
``infer-frame`` benchmark, and times each stage of one frame (the model's own forward, with
hooks that synchronise and read the clock as the U-Net and the SR start and end; after warm-up,
medians of ``--rounds``) for the fp32 reference path (torch renderer, whole
U-Net) and the fast path (fused engine, bf16 autocast on a GPU, the U-Net encoder's features of
P_ID cached). Then a torch.profiler table of the fast path's top operators. Writes
``profile_frame.md`` (and the profiler tables) under ``--out``. A measuring tool, not a test: the
pytest-benchmark groups hold the figures the README quotes.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_bench_train import AUDIO_DIM, _batch  # noqa: E402  (the benchmarks' own batch builder)

from talk3d import extension  # noqa: E402
from talk3d.train import TrainConfig, build_model, demo_config  # noqa: E402


def _timer(device: torch.device):
    """A function returning seconds since some origin, synchronised with the device's queue."""
    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()
    return now


def stages(model, frames, *, impl: str, amp, now) -> dict[str, float]:
    """Seconds spent in each stage of one ``model(frames)`` call, the inference forward itself:
    hooks on the deltaplane U-Net and the super-resolution take the (synchronised) time as each
    starts and ends; the render is what lies between them."""
    marks = {}

    def mark(name):
        def hook(*_):
            marks[name] = now()
        return hook

    unet, sr = model.deltaplane, model.generator.superresolution
    handles = [unet.register_forward_pre_hook(mark("unet0")), unet.register_forward_hook(mark("unet1")),
               sr.register_forward_pre_hook(mark("sr0")), sr.register_forward_hook(mark("sr1"))]
    try:
        with torch.no_grad(), amp:
            t0 = now()
            model(frames, impl=impl, deterministic=True)
            t1 = now()
    finally:
        for h in handles:
            h.remove()
    return dict(unet=marks["unet1"] - marks["unet0"], render=marks["sr0"] - marks["unet1"],
                sr=marks["sr1"] - marks["sr0"], total=t1 - t0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path("profile-out"))
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    fused = "cuda" if cuda else "cpu"
    if not extension.available():
        sys.exit("talk3d._C is not built: pip install -e . --no-build-isolation")
    cfg = TrainConfig(batch_size=1) if cuda else TrainConfig.from_dict({**demo_config("cpu"), "batch_size": 1})
    torch.manual_seed(0)
    model = build_model(cfg, AUDIO_DIM, prior=None, log=lambda m: None).to(device).eval().requires_grad_(False)
    now = _timer(device)
    args.out.mkdir(parents=True, exist_ok=True)
    g = model.generator.cfg
    rc = g.render_config(model.generator.neural_rendering_resolution)
    lines = [f"# One inference frame by stage ({torch.cuda.get_device_name() if cuda else 'CPU'}, torch "
             f"{torch.__version__})", "",
             f"planes 3 x {g.plane_channels} x {g.plane_resolution}^2, render "
             f"{rc.resolution}^2 x ({rc.coarse_samples}+{rc.importance_samples}) samples, SR to {g.sr_resolution}^2; "
             f"medians of {args.rounds} rounds after 3 warm-ups, ms per call (per frame in brackets)", "",
             "| path | batch | U-Net | render | SR | total | frames/s |", "| --- | --- | --- | --- | --- | --- | --- |"]
    paths = {"reference fp32": ("torch", False, None),
             "fast" + (" bf16" if cuda else " fp32"): (fused, True, torch.bfloat16 if cuda else None)}
    for name, (impl, cache, dtype) in paths.items():
        model.cache_encoder = cache
        amp = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        for b in args.batch:
            frames = _batch(model, b)
            for _ in range(3):
                stages(model, frames, impl=impl, amp=amp, now=now)
            runs = [stages(model, frames, impl=impl, amp=amp, now=now) for _ in range(args.rounds)]
            med = {k: statistics.median(r[k] for r in runs) * 1e3 for k in runs[0]}
            cells = " | ".join(f"{med[k]:.2f} ({med[k] / b:.2f})" for k in ("unet", "render", "sr", "total"))
            lines.append(f"| {name} | {b} | {cells} | {1e3 * b / med['total']:.0f} |")
            print(lines[-1], flush=True)
    # The fast path's operators, largest batch.
    model.cache_encoder = True
    b = max(args.batch)
    frames = _batch(model, b)
    dtype = torch.bfloat16 if cuda else None
    amp = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(3):
            stages(model, frames, impl=fused, amp=amp, now=now)
    key = "cuda_time_total" if cuda else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=25)
    (args.out / "profile_ops.txt").write_text(table)
    lines += ["", f"fast path, batch {b}, 3 frames' worth of calls, top operators by {key}:", "", "```", table, "```"]
    (args.out / "profile_frame.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-5:]))


if __name__ == "__main__":
    main()
