"""Benchmark set-up: the same TRITON_INTERPRET rule as the tests, and the shared input builders."""
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Benchmarks reuse the tests' input builders (pytorch3d's habit), so both measure the same cases.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
