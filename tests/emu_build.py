"""What the tests that compile CUDA sources with g++ share (the emulators in tests/cuda_emu/, the
host adapters): the compiler, the CUDA headers, and the sanitizers the emulators run under."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

CXX = shutil.which("g++")

# The emulators' buffers are sized exactly, so AddressSanitizer turns any read or write past a
# tensor's end (a wrong stride, a ray range off by one) into a failed run; UndefinedBehaviorSanitizer
# stops at a misaligned vector load (which faults on a GPU but reads the right values on a CPU),
# a signed overflow in an index, or a null pointer handed to memcpy.
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]


def cuda_include() -> Path | None:
    """The CUDA toolkit's include folder ($CUDA_HOME, /usr/local/cuda or /usr/local/cuda-*), or None."""
    for c in [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda", *sorted(map(str, Path("/usr/local").glob("cuda-*")))]:
        if c and (Path(c) / "include" / "cuda_runtime.h").exists():
            return Path(c) / "include"
    return None


def sanitizers_link(build: Path) -> bool:
    """Whether this g++ has the sanitizer runtimes (some minimal images lack libasan)."""
    (build / "probe.cpp").write_text("int main() { return 0; }\n")
    proc = subprocess.run([CXX, *SANITIZE, str(build / "probe.cpp"), "-o", str(build / "probe")], capture_output=True)
    return proc.returncode == 0
