"""The CPU targets' ratios, measured fairly on a noisy machine: the PyTorch reference and the fused
back end alternate round by round in one process (so both see the same load), medians of each.

    python benchmarks/compare_cpu.py [--rounds 15] [--resolution 32] [--only field|frame] [--out DIR]

Cases: the field's forward + backward at the CPU size (1 x 32^2 rays x 48 samples, planes
3 x 32 x 256^2; API and channels-last planes), and one frame of the renderer (field + two-pass
sampling + compositing, 96 samples a ray; 32^2 rays by default, issue 3's full frame with
``--resolution 128``), forward and forward + backward, on the synthetic head.
Same inputs as benchmarks/test_bench_triplane_field.py and test_bench_render.py. The issues' CPU
targets are 3x. A measuring tool, not a test.
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
from talk3d.render import RenderConfig, look_at_camera, render  # noqa: E402
from talk3d.render.synthetic import head_scene  # noqa: E402


def field_case(layout):
    case, rays_side, samples = SIZES["cpu_size"]
    torch.manual_seed(0)
    inputs = list(make_field_inputs(case, planes_layout=layout))
    inputs[1] = make_ray_points(case.B, rays_side, samples)
    inputs = [t.requires_grad_() for t in inputs]
    gs, gf = torch.randn(case.B, case.N, 1), torch.randn(case.B, case.N, case.out - 1)

    def run(impl):
        sigma, feat = triplane_field(*inputs, impl=impl)
        torch.autograd.grad((sigma, feat), inputs, (gs, gf))
    return run


def frame_case(backward, resolution=32):
    planes, dec = head_scene(plane_res=256, generator=torch.Generator().manual_seed(0))
    cams = look_at_camera(torch.tensor([0.3]), torch.tensor([0.1]))
    cfg = RenderConfig(resolution=resolution)
    planes.requires_grad_(backward)
    w = [x.requires_grad_(backward) for x in dec]

    def run(impl):
        with torch.set_grad_enabled(backward):
            r = render(planes, type(dec)(*w), cams, cfg, impl=impl, deterministic=True)
            if backward:
                (r.feature_image.square().mean() + r.depth.mean()).backward()
    return run


def cases(resolution):
    """(kind, name, builder) of every case; kind is what ``--only`` selects."""
    return [
        ("field", "field forward + backward (API planes)", lambda: field_case("api")),
        ("field", "field forward + backward (channels-last planes)", lambda: field_case("channels_last")),
        ("frame", f"{resolution}² frame forward", lambda: frame_case(False, resolution)),
        ("frame", f"{resolution}² frame forward + backward", lambda: frame_case(True, resolution)),
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", type=Path, default=None, help="folder for compare_cpu.md")
    ap.add_argument("--resolution", type=int, default=32,
                    help="rays per side of the frame cases (issue 3's full frame: 128)")
    ap.add_argument("--only", choices=["field", "frame"], default=None, help="run only these cases")
    args = ap.parse_args()
    lines = [f"# Reference vs fused on the CPU, interleaved ({torch.get_num_threads()} threads, "
             f"medians of {args.rounds} rounds)", "",
             "| case | torch reference (ms) | fused cpu (ms) | ratio of medians | median of round ratios |",
             "|---|---|---|---|---|"]
    for kind, name, make in cases(args.resolution):
        if args.only not in (None, kind):
            continue
        run = make()
        for impl in ("torch", "cpu"):  # warm-up
            run(impl)
        times = {"torch": [], "cpu": []}
        for _ in range(args.rounds):
            for impl in ("torch", "cpu"):
                t0 = time.perf_counter()
                run(impl)
                times[impl].append((time.perf_counter() - t0) * 1e3)
        ref, fused = statistics.median(times["torch"]), statistics.median(times["cpu"])
        # Each round's two runs follow each other, so their ratio sees the same machine state; the
        # median of those ratios is steadier than the ratio of medians when the VM's speed drifts.
        paired = statistics.median(r / f for r, f in zip(times["torch"], times["cpu"]))
        lines.append(f"| {name} | {ref:.1f} | {fused:.1f} | {ref / fused:.2f}x | {paired:.2f}x |")
        print(lines[-1], flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compare_cpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
