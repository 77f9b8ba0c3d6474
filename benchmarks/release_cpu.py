"""The release's sizes on the CPU: one inference frame by stage and one training step.

    python benchmarks/release_cpu.py [--batch 2] [--rounds 3] [--steps 2]

The pytest-benchmark groups and the profile scripts run the no-argument demo's sizes on a CPU (a
release-size step takes tens of seconds there). This script runs the release's (256^2 x 32 planes,
128^2 x (48 + 48) render, 512^2 SR): the fast inference path by stage (U-Net with the encoder
cached, render, SR; fp32, fused CPU kernels) and the trainer's step (deltaplane stage, L1 + mouth
L1, backward, clipping, fused Adam). Model-side changes (U-Net, SR) that the demo's small sizes hide
show here, and the same script run against another checkout (``PYTHONPATH=OTHER python
benchmarks/release_cpu.py``: it uses only talk3d's public API) compares revisions. Medians, seconds.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_frame import stages  # noqa: E402
from test_bench_train import AUDIO_DIM, _batch, make_train_step  # noqa: E402

import talk3d  # noqa: E402
from talk3d.train import TrainConfig, build_model  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=2, help="frames per inference call and per training step")
    p.add_argument("--rounds", type=int, default=3, help="inference calls timed (after one warm-up)")
    p.add_argument("--steps", type=int, default=2, help="training steps timed (after one warm-up)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    cfg = TrainConfig(batch_size=args.batch)
    print(f"talk3d from {Path(talk3d.__file__).parent}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)

    model = build_model(cfg, AUDIO_DIM, prior=None, log=lambda m: None).eval().requires_grad_(False)
    frames = _batch(model, args.batch)
    no_amp = torch.autocast("cpu", enabled=False)
    stages(model, frames, impl="cpu", amp=no_amp, now=time.perf_counter)
    runs = [stages(model, frames, impl="cpu", amp=no_amp, now=time.perf_counter) for _ in range(args.rounds)]
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"inference, batch {args.batch}, fast path fp32: " +
          ", ".join(f"{k} {v:.2f} s" for k, v in med.items()) + f" ({med['total'] / args.batch:.2f} s a frame)",
          flush=True)
    del model

    step, _ = make_train_step("cpu", cfg=cfg)
    step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(f"training step, batch {args.batch}: {statistics.median(times):.2f} s (of {[round(t, 2) for t in times]})")


if __name__ == "__main__":
    main()
