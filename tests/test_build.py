"""The build: kernels compile on CPU-only machines, the source manifest is the one truth, and a
missing extension says how to build it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from emu_build import cuda_include

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = json.loads((ROOT / "csrc" / "sources.json").read_text())
CU_FILES = sorted((ROOT / "kernels").rglob("*.cu"))
NVCC = shutil.which("nvcc")
# The architectures the kernels must compile for: Ampere (sm_80) and Hopper (sm_90, the H100/H200);
# files with __CUDA_ARCH__ branches also for Turing (sm_75: no bf16 mma, no vector atomics).
NVCC_ARCHES = ("sm_80", "sm_90")
OLDEST_ARCH = "sm_75"
ARCH_CASES = [(cu, arch) for cu in CU_FILES for arch in NVCC_ARCHES] + [
    (cu, OLDEST_ARCH) for cu in CU_FILES
    if any("__CUDA_ARCH__" in f.read_text() for f in [cu, *cu.parent.glob("*.cuh")])]


def test_manifest_lists_every_source():
    listed = {str(ROOT / p) for p in MANIFEST["cpu_sources"] + MANIFEST["cuda_sources"]}
    on_disk = {str(p) for p in (ROOT / "csrc").rglob("*.cpp")} | {str(p) for p in CU_FILES}
    assert on_disk == listed, f"csrc/sources.json and the tree disagree: {on_disk ^ listed}"


def test_cmake_reads_the_same_manifest():
    text = (ROOT / "CMakeLists.txt").read_text()
    assert "csrc/sources.json" in text
    for src in MANIFEST["cpu_sources"] + MANIFEST["cuda_sources"]:
        assert src not in text, f"CMakeLists.txt repeats {src}: it must read csrc/sources.json"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("cu, arch", ARCH_CASES, ids=[f"{cu.name}-{arch}" for cu, arch in ARCH_CASES])
def test_cuda_kernels_compile(cu, arch, tmp_path):
    """Compile-only: the kernels are torch-free, so nvcc checks them on machines without a GPU.
    Warning-free too: nvcc's warnings about device code (a __host__ function called from a kernel,
    a narrowing, an unreachable or unused result) are mostly bugs that only a GPU run would show."""
    includes = [f"-I{ROOT / d}" for d in MANIFEST["include_dirs"]]
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS  # what torch's build adds: no implicit half casts

    cmd = [NVCC, "-c", f"-arch={arch}", *COMMON_NVCC_FLAGS, *MANIFEST["nvcc_flags"], *includes, str(cu),
           "-o", str(tmp_path / "k.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr}"
    assert "warning" not in proc.stderr.lower(), f"{' '.join(cmd)}\n{proc.stderr}"


def test_cuda_kernels_do_not_include_torch():
    for path in list(CU_FILES) + sorted((ROOT / "kernels").rglob("*.h")):
        text = path.read_text()
        for banned in ("<torch/", "<ATen/", "<c10/"):
            assert banned not in text, f"{path.name} includes {banned}: kernels/ must stay torch-free"


def test_import_never_compiles_and_missing_extension_says_how_to_build(tmp_path):
    """Import talk3d with the extension hidden: it imports, and asking for the kernels explains."""
    code = (
        "import sys, importlib.abc\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'talk3d._C': raise ImportError('hidden by the test')\n"
        "sys.meta_path.insert(0, Hide())\n"
        "import torch.utils.cpp_extension as ce\n"
        "ce.load = ce.load_inline = lambda *a, **k: (_ for _ in ()).throw(AssertionError('compiled at import'))\n"
        "import talk3d\n"
        "from talk3d import extension\n"
        "assert not extension.available()\n"
        "assert talk3d.ops.available_impls('cpu')[0] == 'torch'\n"
        "try:\n"
        "    extension.load()\n"
        "except ImportError as e:\n"
        "    assert 'pip install -e . --no-build-isolation' in str(e), e\n"
        "    print('OK')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr


def test_repository_kernels_folder_shadows_no_top_level_package(tmp_path):
    """Run from the repository root (``python -m ...`` puts it first on sys.path), ``kernels/`` must
    not be a regular package: it would shadow an installed top-level ``kernels`` (Hugging Face's,
    which transformers imports: ``from kernels import ...`` then failed inside wav2vec2 loading).
    A namespace folder loses to any installed package; the device code is ``talk3d.kernels``."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("MARK = 'installed'\n")
    code = ("import kernels, talk3d.kernels, talk3d.kernels.triplane_field.triplane_field_triton as t\n"
            "print(kernels.MARK, talk3d.kernels.__file__, t.__file__)\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"), TRITON_INTERPRET="1")
    # cwd on sys.path first, as with ``python -m``; the "installed" package comes later on the path.
    out = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, ''); exec(open(0).read())"],
                         input=code, capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    mark, pkg, triton_file = out.stdout.split()
    assert mark == "installed"
    assert Path(pkg).resolve() == ROOT / "talk3d" / "kernels" / "__init__.py"
    assert Path(triton_file).resolve() == ROOT / "kernels" / "triplane_field" / "triplane_field_triton.py"


@pytest.mark.skipif(cuda_include() is None, reason="no CUDA headers on this machine")
def test_cuda_host_adapter_compiles(tmp_path):
    """Syntax-check the torch-facing CUDA code (csrc/*_cuda.cpp) against the installed torch's headers.

    The CPU torch wheel lacks one generated header (c10/cuda/impl/cuda_cmake_macros.h); an empty
    stand-in is enough for a syntax check. Catches API drift in code only a GPU build would compile.
    """
    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    cxx = shutil.which("c++") or shutil.which("g++")
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{ROOT / d}" for d in MANIFEST["include_dirs"]]
    import sysconfig

    includes += [f"-I{sysconfig.get_paths()['include']}", f"-I{cuda_include()}", f"-I{tmp_path}"]
    std = [f for f in MANIFEST["cxx_flags"] if f.startswith("-std=")]
    for src in MANIFEST["cuda_sources"]:
        if not src.endswith(".cpp"):
            continue
        cmd = [cxx, "-fsyntax-only", *std, *includes, "-DTORCH_EXTENSION_NAME=_C", str(ROOT / src)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, f"{src}:\n{proc.stderr[-3000:]}"


def test_ci_runs_the_readme_test_command():
    """.ci/run must run exactly the command the README gives for the tests."""
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("pip install") and "pytest tests" in line]
    assert len(commands) == 1, "README.md must give one install-and-test command"
    assert commands[0] in ci.splitlines(), ".ci/run does not run the README's test command"
