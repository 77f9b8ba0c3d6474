"""Fused triplane field vs the PyTorch reference (and tiny-cuda-nn's MLP where installed).

Groups ``field-forward`` and ``field-forward-backward``; one benchmark per back end on the same
inputs, at the CPU size (1 x 32^2 rays x 48 samples, planes 3 x 32 x 256 x 256) and the GPU size
(4 x 128^2 rays x 96 samples); ``field-forward-bf16`` (GPU only) at the GPU size in bf16.
``extra_info`` records points, peak memory and the device.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from field_cases import FieldCase, make_field_inputs, make_ray_points
from memory import peak_memory_bytes
from talk3d import extension
from talk3d.ops import triplane_field

HAS_CUDA = torch.cuda.is_available()
# (case, rays per side, samples per ray): points lie along EG3D-like camera rays (ray-major), the
# access pattern the renderer produces.
SIZES = {
    "cpu_size": (FieldCase(B=1, N=32 * 32 * 48, C=32, hidden=64, out=33, H=256, W=256), 32, 48),
    "gpu_size": (FieldCase(B=4, N=128 * 128 * 96, C=32, hidden=64, out=33, H=256, W=256), 128, 96),
}


def _device(impl: str) -> str:
    return "cuda" if impl == "cuda" or (impl in ("torch", "triton") and HAS_CUDA) else "cpu"


def _skip_reason(impl: str, size: str) -> str | None:
    if impl == "cpu" and not extension.available():
        return "talk3d._C not built"
    if impl == "cuda" and not (HAS_CUDA and extension.with_cuda()):
        return "needs CUDA and the CUDA extension"
    if impl == "triton" and importlib.util.find_spec("triton") is None:
        return "triton not installed"
    if impl == "triton" and not HAS_CUDA:
        # The interpreter is a correctness tool (tests), not a timing: ~40 s per forward here.
        return "Triton is timed on a GPU only"
    if size == "gpu_size" and _device(impl) != "cuda":
        return "the GPU size only runs on a GPU"
    return None


IMPLS = ["torch", "cpu", "cuda", "triton"]


# "api": planes contiguous as [B, 3, C, H, W] (the fused back ends pay a channels-last copy);
# "channels_last": planes stored [B, 3, H, W, C] and passed as a view, as the model keeps them.
LAYOUTS = ["api", "channels_last"]


def _setup(impl, size, requires_grad, layout):
    if reason := _skip_reason(impl, size):
        pytest.skip(reason)
    case, rays_side, samples = SIZES[size]
    device = torch.device(_device(impl))
    inputs = list(make_field_inputs(case, device=device, planes_layout=layout))
    inputs[1] = make_ray_points(case.B, rays_side, samples, device=device)
    inputs = [t.requires_grad_(requires_grad) for t in inputs]
    return case, device, inputs


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _record(benchmark, impl, case, device, fn):
    benchmark.extra_info.update(
        impl=impl,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        threads=torch.get_num_threads(),
        points=case.B * case.N,
        peak_memory_mb=round(peak_memory_bytes(fn, device) / 2**20, 2),
    )


@pytest.mark.benchmark(group="field-forward")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("impl", IMPLS)
def test_field_forward(benchmark, impl, size, layout):
    case, device, inputs = _setup(impl, size, requires_grad=False, layout=layout)
    _bench_forward(benchmark, impl, case, device, inputs)


def _bench_forward(benchmark, impl, case, device, inputs):
    def run():
        with torch.no_grad():
            out = triplane_field(*inputs, impl=impl)
        _sync(device)
        return out

    _record(benchmark, impl, case, device, run)
    benchmark(run)


@pytest.mark.benchmark(group="field-forward-backward")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("impl", IMPLS)
def test_field_forward_backward(benchmark, impl, size, layout):
    case, device, inputs = _setup(impl, size, requires_grad=True, layout=layout)
    g_sigma = torch.randn(case.B, case.N, 1, device=device)
    g_feat = torch.randn(case.B, case.N, case.out - 1, device=device)

    def run():
        sigma, feat = triplane_field(*inputs, impl=impl)
        grads = torch.autograd.grad((sigma, feat), inputs, (g_sigma, g_feat))
        _sync(device)
        return grads

    _record(benchmark, impl, case, device, run)
    benchmark(run)


@pytest.mark.benchmark(group="field-forward-bf16")
@pytest.mark.parametrize("impl", ["torch", "cuda", "cuda-mma", "triton"])
def test_field_forward_bf16(benchmark, impl, monkeypatch):
    """The inference path's precision (issue 3's "under 1 ms in bf16"): bf16 planes and weights,
    fp32 points and accumulation, channels-last planes, at the GPU size. Triton's decoder runs its
    two layers as bf16 tensor-core dots; the CUDA kernel's on fp32 FMAs, or (``cuda-mma``,
    TALK3D_FIELD_MMA=1) as mma.sync products (which is fastest is what this group measures)."""
    if impl == "cuda-mma":
        monkeypatch.setenv("TALK3D_FIELD_MMA", "1")
        impl = "cuda"
    if reason := _skip_reason(impl, "gpu_size"):
        pytest.skip(reason)
    case, rays_side, samples = SIZES["gpu_size"]
    device = torch.device("cuda")
    inputs = list(make_field_inputs(case, dtype=torch.bfloat16, device=device, planes_layout="channels_last"))
    inputs[1] = make_ray_points(case.B, rays_side, samples, device=device)
    _bench_forward(benchmark, impl, case, device, inputs)


@pytest.mark.benchmark(group="field-forward")
@pytest.mark.parametrize("size", list(SIZES))
def test_tinycudann_mlp_peer(benchmark, size):
    """tiny-cuda-nn's FullyFusedMLP on the same number of 32-d features (the MLP alone)."""
    if importlib.util.find_spec("tinycudann") is None or not HAS_CUDA:
        pytest.skip("tinycudann is optional and not installed (or no CUDA)")
    import tinycudann as tcnn

    case = SIZES[size][0]
    device = torch.device("cuda")
    mlp = tcnn.Network(case.C, case.out, {"otype": "FullyFusedMLP", "activation": "ReLU",
                                          "output_activation": "None", "n_neurons": case.hidden,
                                          "n_hidden_layers": 1})
    feats = torch.randn(case.B * case.N, case.C, device=device)

    def run():
        with torch.no_grad():
            out = mlp(feats)
        _sync(device)
        return out

    _record(benchmark, "tinycudann", case, device, run)
    benchmark(run)
