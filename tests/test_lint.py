"""Static checks of every Python file: names that are never defined, imports never used, syntax.

Some branches never run on the CPU machines that run the tests: the CUDA paths of inference and
training (CUDA graphs, pinned copies, streams), the GPU benchmarks and profiling scripts. A name
misspelled there would first fail on a GPU, whose time is scarce. pyflakes' rules, through ruff
(requirements-dev), read every line whether it runs or not.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUFF = shutil.which("ruff")
# pyflakes' rules (F: undefined and unused names, redefinitions, f-string and format slips,
# `is` with a literal, ...) and syntax errors (E9). Style is not checked.
RULES = "F,E9"


@pytest.mark.skipif(RUFF is None, reason="ruff is not installed (pip install -r requirements-dev.txt)")
def test_no_undefined_or_unused_names():
    done = subprocess.run([RUFF, "check", "--select", RULES, "--no-cache", "--output-format", "concise",
                           "--exclude", ".venv,build,runs,.weights", str(ROOT)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
