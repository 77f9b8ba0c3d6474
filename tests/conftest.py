"""Shared test set-up.

- The one CUDA marker: tests marked ``cuda`` are skipped unless ``torch.cuda.is_available()``.
- Without a GPU, Triton kernels run in its interpreter: TRITON_INTERPRET must be set before any
  ``@triton.jit`` function is defined, so it is set here, before talk3d is imported.
"""
import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is False")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


#: TALK3D_TEST_SEED=N draws other random inputs in every test (a seed mixed with each test's name;
#: "random" draws a new one per run and prints it), to look past the inputs a run always uses.
SEED_ENV = "TALK3D_TEST_SEED"


def _run_seed() -> int:
    given = os.environ.get(SEED_ENV, "0")
    if given == "random":
        given = str(int.from_bytes(os.urandom(4), "little"))
        os.environ[SEED_ENV] = given  # one seed for the whole run
        sys.stderr.write(f"{SEED_ENV}={given} (rerun with it to draw these inputs again)\n")
    return int(given)


def pytest_configure(config):
    _run_seed()  # a 'random' seed is drawn and said here, before output capture


def pytest_report_header(config):
    return f"{SEED_ENV}={_run_seed()} (test inputs; set it to another number or 'random' for others)"


@pytest.fixture(autouse=True)
def _seed():
    # Random inputs in every test, reproducible from the test's name and the run's seed (printed in
    # the header) when one fails.
    import zlib

    name = os.environ.get("PYTEST_CURRENT_TEST", "").encode()
    torch.manual_seed(zlib.crc32(name, _run_seed()) if _run_seed() else zlib.crc32(name))
