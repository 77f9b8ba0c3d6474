"""The field forward's choices that were never timed on a GPU, in one table: fp32 and bf16, the CUDA
kernel against the Triton kernel at each (points per program, warps) launch setting.

    python benchmarks/sweep_field_forward.py [--rounds 10] [--out DIR]

Same inputs as the ``field-forward`` benchmarks at the GPU size (4 x 128^2 rays x 96 samples, planes
channels-last). Triton's default launch settings came from compiling for sm_90 with the least
register spilling, not from timings; its bf16 decoder uses tensor-core dots, the CUDA kernel fp32
FMAs, or with TALK3D_FIELD_MMA=1 (bf16) mma.sync products. The table says which back end
``impl="auto"`` should pick per dtype and which Triton setting should be its default. A measuring
tool (GPU only), not a test.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from profile_field import _median_ms, print_table  # noqa: E402
from test_bench_triplane_field import SIZES  # noqa: E402

from field_cases import make_field_inputs, make_ray_points  # noqa: E402
from talk3d.ops import triplane_field  # noqa: E402

TRITON_SETTINGS = [(32, 4), (32, 8), (64, 4), (64, 8), (128, 4), (128, 8)]


def _with_mma(fn):
    """fn with the CUDA adapter's tensor-core switch on (fp32 planes ignore it: the FMA kernel)."""
    def run():
        before = os.environ.get("TALK3D_FIELD_MMA")
        os.environ["TALK3D_FIELD_MMA"] = "1"
        try:
            return fn()
        finally:
            if before is None:
                os.environ.pop("TALK3D_FIELD_MMA")
            else:
                os.environ["TALK3D_FIELD_MMA"] = before
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("sweep_field_forward.py times GPU kernels: no CUDA device here")
    from talk3d.kernels.triplane_field import triplane_field_triton as tt

    case, rays_side, samples = SIZES["gpu_size"]
    device = torch.device("cuda")
    timings: dict[str, dict[str, float]] = {}
    for dtype in (torch.float32, torch.bfloat16):
        inputs = list(make_field_inputs(case, dtype=dtype, device=device, planes_layout="channels_last"))
        inputs[1] = make_ray_points(case.B, rays_side, samples, device=device)
        planes_cl = inputs[0].permute(0, 1, 3, 4, 2)  # the [B, 3, H, W, C] buffer itself
        runs = {"cuda": lambda: triplane_field(*inputs, impl="cuda"),
                "cuda, tensor-core decoder (TALK3D_FIELD_MMA=1; bf16 only)": _with_mma(
                    lambda: triplane_field(*inputs, impl="cuda")),
                "torch (reference)": lambda: triplane_field(*inputs, impl="torch")}
        for block, warps in TRITON_SETTINGS:
            runs[f"triton block {block}, {warps} warps"] = (
                lambda b=block, w=warps: tt.field_forward(planes_cl, inputs[1], *inputs[2:], 1.0, 0,
                                                          block=b, num_warps=w))
        with torch.no_grad():
            for name, fn in runs.items():
                try:
                    ms = _median_ms(fn, device, args.rounds)
                except Exception as e:  # a setting that does not compile (shared memory, registers)
                    print(f"{name} {dtype}: {type(e).__name__}: {str(e)[:200]}")
                    ms = float("nan")
                timings.setdefault(name, {})[str(dtype)] = ms
    rows = [[name, f"{row[str(torch.float32)]:.2f}", f"{row[str(torch.bfloat16)]:.2f}"] for name, row in timings.items()]
    print_table(f"Field forward by back end and launch setting ({torch.cuda.get_device_name()}, "
                f"{case.B * case.N / 1e6:.1f} M points, ms, median of {args.rounds})",
                ["back end", "fp32", "bf16"], rows, args.out, "sweep_field_forward.md")


if __name__ == "__main__":
    main()
