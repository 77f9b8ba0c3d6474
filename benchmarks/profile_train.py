"""Where a training step's time goes, and what the step's switches are worth.

    python benchmarks/profile_train.py [--steps 10] [--out DIR] [--compile BACKEND]

The ``train-step`` benchmark's step (deltaplane stage at the release's sizes on a GPU, the demo's on a
CPU; batch 2; L1 + mouth L1; backward; gradient clipping; Adam) timed with each combination of
cuDNN autotuning (``torch.backends.cudnn.benchmark``, GPU only) and Adam's fused kernel (``fused=True``),
then the aten operations a step dispatches (host time on a GPU; ``TALK3D_FEW_OPS=0|1`` picks the
U-Net's form, see ``talk3d.models.deltaplane.few_ops``) and a torch.profiler table of one variant's
top operators by device time. ``--compile inductor`` also times the step with the whole model
compiled (the trainer's ``compile = "model"``; inductor's code generation takes minutes). Writes
``profile_train.md`` (and ``profile_train_ops.txt``) under ``--out``. A measuring tool, not a test.
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backends import fused_impl  # noqa: E402
from test_bench_train import HAS_CUDA, _config, make_train_step  # noqa: E402


def sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


def count_ops(fn) -> int:
    """aten operations ``fn()`` dispatches (views and in-place updates included)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    sync()
    return Count.n


def time_step(step, steps: int) -> float:
    for _ in range(3):  # warm-up (and cuDNN's autotuning when on)
        step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--compile", default=None, metavar="BACKEND",
                        help="also time the step with the model compiled by this torch.compile backend")
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if HAS_CUDA else "cpu"
    lines = [f"# Train step ({device}, batch {_config().batch_size}, median of {args.steps} steps)", "",
             "| cudnn.benchmark | fused Adam | ms / step | steps / s |", "|---|---|---|---|"]
    best = None
    for bench, fused in itertools.product([False, True] if HAS_CUDA else [False], [False, True]):
        torch.backends.cudnn.benchmark = bench
        ms = time_step(make_train_step(fused_impl(), fused_adam=fused)[0], args.steps)
        lines.append(f"| {bench} | {fused} | {ms:.1f} | {1e3 / ms:.1f} |")
        print(lines[-1], flush=True)
        if best is None or ms < best[0]:
            best = (ms, bench, fused)
    _, bench, fused = best
    torch.backends.cudnn.benchmark = bench
    if args.compile:
        t0 = time.perf_counter()
        compiled = make_train_step(fused_impl(), fused_adam=fused, compile_backend=args.compile)[0]
        compiled()
        sync()
        first = time.perf_counter() - t0
        ms = time_step(compiled, args.steps)
        lines.append(f"| {bench} | {fused} + model compiled ({args.compile}; first step {first:.0f} s) | {ms:.1f} "
                     f"| {1e3 / ms:.1f} |")
        print(lines[-1], flush=True)
    step = make_train_step(fused_impl(), fused_adam=fused)[0]
    time_step(step, 2)
    # Host-side cost: every aten operation a step dispatches (the GPU step was partly host-bound).
    lines.append(f"\naten operations a step: {count_ops(step)} (TALK3D_FEW_OPS={os.environ.get('TALK3D_FEW_OPS', '')!r})")
    print(lines[-1], flush=True)
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if HAS_CUDA else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        sync()
    key = "self_cuda_time_total" if HAS_CUDA else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=40)
    text = "\n".join(lines)
    print(text)
    print(f"\nTop operators of 3 steps (cudnn.benchmark={bench}, fused Adam={fused}):\n{table}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile_train.md").write_text(text + "\n")
        (args.out / "profile_train_ops.txt").write_text(table)


if __name__ == "__main__":
    main()
