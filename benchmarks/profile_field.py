"""Where the fused triplane field's backward spends its time: forward, then backward with each subset
of gradients (all; planes + xyz, the U-Net training case with a frozen decoder; planes only; decoder
weights only; xyz only), for the fused back end and the PyTorch reference.

    python benchmarks/profile_field.py [--size gpu_size|cpu_size] [--rounds 10] [--out DIR]

Same inputs as the ``field-forward-backward`` benchmark (points along camera rays, planes stored
channels-last as the model keeps them). Medians of ``--rounds`` after a warm-up, device synchronised.
A measuring tool, not a test: the pytest-benchmark groups hold the figures the README quotes.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from test_bench_triplane_field import SIZES  # noqa: E402

from field_cases import make_field_inputs, make_ray_points  # noqa: E402
from talk3d.ops import triplane_field  # noqa: E402

# Which inputs require a gradient: planes, xyz, w1, b1, w2, b2.
SUBSETS = {
    "all": (1, 1, 1, 1, 1, 1),
    "planes+xyz": (1, 1, 0, 0, 0, 0),
    "planes": (1, 0, 0, 0, 0, 0),
    "weights": (0, 0, 1, 1, 1, 1),
    "xyz": (0, 1, 0, 0, 0, 0),
}


def _median_ms(fn, device, rounds):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    fn()
    sync()
    times = []
    for _ in range(rounds):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def profile(impl: str, size: str, rounds: int) -> dict[str, float]:
    case, rays_side, samples = SIZES[size]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = list(make_field_inputs(case, device=device, planes_layout="channels_last"))
    base[1] = make_ray_points(case.B, rays_side, samples, device=device)
    rows = {}
    with torch.no_grad():
        rows["forward"] = _median_ms(lambda: triplane_field(*base, impl=impl), device, rounds)
    for name, mask in SUBSETS.items():
        inputs = [t.detach().requires_grad_(bool(m)) for t, m in zip(base, mask)]
        sigma, feat = triplane_field(*inputs, impl=impl)
        gs, gf = torch.randn_like(sigma), torch.randn_like(feat)
        wanted = [t for t in inputs if t.requires_grad]

        def backward():
            torch.autograd.grad((sigma, feat), wanted, (gs, gf), retain_graph=True)
        rows[f"backward {name}"] = _median_ms(backward, device, rounds)
    return rows


def print_table(title: str, header: list[str], rows: list[list[str]], out: Path | None, name: str) -> None:
    """Prints a Markdown table and, with ``out``, writes it to ``out/name``."""
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|---|" + "---|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    text = "\n".join(lines)
    print(text)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="gpu_size" if torch.cuda.is_available() else "cpu_size",
                        choices=sorted(SIZES))
    parser.add_argument("--impls", nargs="+", default=None)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    impls = args.impls or (["cuda", "torch"] if torch.cuda.is_available() else ["cpu", "torch"])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results = {impl: profile(impl, args.size, args.rounds) for impl in impls}
    rows = [[part, *(f"{results[i][part]:.2f}" for i in impls)] for part in next(iter(results.values()))]
    print_table(f"Triplane field by part ({args.size}, {device}, ms, median of {args.rounds})", ["part", *impls], rows,
                args.out, "profile_field.md")


if __name__ == "__main__":
    main()
