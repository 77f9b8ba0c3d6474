"""kernels/common/grid.cuh's launch cache (the SM count, shared-memory limit and occupancy the CUDA
launchers query before each launch, answered once per device and kernel), checked on the CPU with
counted mocks of the runtime calls: tests/cuda_emu/emu_launch_cache.cpp."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from emu_build import CXX, cuda_include

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(CXX is None or cuda_include() is None, reason="needs g++ and the CUDA headers")
def test_launch_queries_are_made_once_per_device_and_kernel(tmp_path):
    exe = tmp_path / "launch_cache"
    cmd = [CXX, "-std=c++17", "-O1", f"-I{cuda_include()}", f"-I{ROOT / 'kernels'}",
           str(ROOT / "tests" / "cuda_emu" / "emu_launch_cache.cpp"), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr
