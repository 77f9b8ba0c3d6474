"""The rendering CUDA kernels (compositing, occupancy marching) and the super-resolution's FIR and
bias_act, emulated on the CPU, against the CPU ops.

No GPU is needed: tests/cuda_emu/emu_render.cpp mocks the CUDA runtime calls the launchers make and
runs every CUDA thread as a std::thread, after the kernel launches are rewritten into emulator calls
(as tests/test_cuda_emulation.py does for the field kernels). The kernels are thread-per-ray loops
around the same headers the CPU ops use, so what this checks is the CUDA side proper: ray ranges in
both layouts, the F = 32 and generic instances, storage-type conversions, the grid-stride loop, null
gradient outputs and outputs left to the caller's zeros. The emulator runs the host branch of the
shared math (talk3d/common.h's host exp/softplus); what the device's fast-math intrinsics change,
and everything about speed, needs a GPU run.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from composite_cases import CompositeCase, make_dense, make_packed
from emu_build import CXX, SANITIZE, sanitizers_link
from emu_build import cuda_include as _cuda_include
from talk3d import extension
from talk3d.ops import reference
from talk3d.ops.reference.composite import composite as reference_composite
from talk3d.ops.reference.composite import finish_depth

ROOT = Path(__file__).resolve().parents[1]
KERNELS = {"composite": ROOT / "kernels" / "composite" / "composite.cu",
           "occupancy": ROOT / "kernels" / "occupancy" / "occupancy.cu",
           "fir": ROOT / "kernels" / "binomial_filter" / "binomial_filter.cu",
           "bias_act": ROOT / "kernels" / "bias_act" / "bias_act.cu"}
NVCC = shutil.which("nvcc")


pytestmark = [
    pytest.mark.skipif(CXX is None or _cuda_include() is None, reason="needs g++ and the CUDA headers"),
    pytest.mark.skipif(not extension.available(), reason="talk3d._C not built (the CPU ops are the yardstick)"),
]

# CompositeDType code and storage dtype.
DTYPES = {"f32": (0, torch.float32), "f16": (1, torch.float16), "bf16": (2, torch.bfloat16), "f64": (3, torch.float64)}

# --- Tolerances against the CPU op (same inputs, same saved outputs) -----------------------------
# The emulated kernel and the CPU op run the same per-ray code in the same order; they differ only
# in how the compilers contract a*b+c into FMAs (the CPU op is built with -O3 -march=native, the
# emulator without): a few ulps per operation over a scan of <= 24 samples, amplified where the
# backward's L - P_i cancels (alpha -> 1 rays: 1.4e-6 seen in fp32). Relative to the largest value.
SAME_CODE_ATOL = {"f32": 4e-6, "f64": 1e-14, "f16": 4e-6, "bf16": 4e-6}
# Half-precision outputs are the fp32 result rounded once to storage: within one unit in the last
# place of either neighbour, i.e. 2^-10 (fp16) / 2^-7 (bf16) of the value (one ulp, not half: the
# fp32 values being rounded may differ by the contraction noise above and round apart).
ROUNDING_RTOL = {"f32": 0.0, "f64": 0.0, "f16": 2.0**-10, "bf16": 2.0**-7}

# --- Tolerances against the float64 PyTorch reference, relative to the largest value -------------
# fp32 accumulation over <= 24 samples: transmittance is a product of <= 23 factors (~23 ulps),
# sums of <= 24 O(1) terms; gradients of t carry 1/W from the depth, hence looser.
REF_OUTPUT_RTOL = {"f32": 2e-5, "f64": 1e-11, "f16": 2e-3, "bf16": 1.6e-2}
# Half precision: inputs are the same rounded values, but the backward reads the forward's outputs
# as saved in storage precision (2^-11 / 2^-8 relative), and its scalar L = gC.C + ... (a sum over F
# features) enters every dsigma/dt through L - P_i: errors of a few rounding units of L (seen: 2.3e-3
# fp16, 1.1e-2 bf16), on top of rounding the gradients themselves.
REF_GRAD_RTOL = {"f32": 1e-4, "f64": 1e-10, "f16": 6e-3, "bf16": 4e-2}
# A ray whose weight sum W is tiny has outputs and depth gradients that float32 cannot give to the
# bounds above: alpha = 1 - exp(-x) (EG3D's formula) keeps few bits for x ~ 1e-6, and depth divides
# by W. PyTorch's autograd of the reference run in float32 missed REF_GRAD_RTOL in 28 of 140 seeds of
# the packed case (by up to 7e-3 of the largest; seed 112: W = 6.1e-6, dt 21.460 in both float32
# runs, 21.308 in float64), and a forward depth in seed 606 (8.4e-5 off at W = 9.7e-4). So each
# output and gradient may also miss by up to this many times PyTorch's largest float32 error on the
# same inputs. Measured over 140 seeds: the kernels' largest error was at most 1.8x PyTorch's
# (forward) and 2.2x (gradients; 6.2x before the thirteenth session, when the header's depth
# gradient cancelled two terms of order t / W).
TORCH_FP32_ERROR_FACTOR = 4.0


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Path:
    build = tmp_path_factory.mktemp("cuda_emu_render")
    sanitize = SANITIZE if sanitizers_link(build) else []
    launch = re.compile(r"(\w+)<<<\s*(\w+)\s*,\s*(\w+)\s*,\s*(\w+)\s*,\s*\w+\s*>>>\(([^;]*)\);")
    for name, cu in KERNELS.items():
        rewritten, n = launch.subn(r"emu_launch(\1, \2, \3, \4, \5);", cu.read_text())
        assert n > 0 and "<<<" not in rewritten, f"could not rewrite the kernel launches of {cu.name}"
        (build / f"{name}_emu.cu").write_text(rewritten)
    exe = build / "emu_render"
    cmd = [CXX, "-std=c++20", "-O1", "-pthread", *sanitize, f"-I{_cuda_include()}", f"-I{ROOT / 'csrc' / 'include'}",
           f"-I{ROOT / 'kernels'}", *[f"-I{cu.parent}" for cu in KERNELS.values()], f"-I{build}",
           str(ROOT / "tests" / "cuda_emu" / "emu_render.cpp"), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return exe


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("cu", list(KERNELS.values()), ids=lambda p: p.name)
def test_kernels_compile_with_torch_extension_flags(cu, tmp_path):
    """torch's CUDAExtension adds -D__CUDA_NO_HALF_CONVERSIONS__ and friends, which remove the
    __half <-> float conversions composite_math.h's static_casts would need; test_build.py compiles
    without them. Compile as the extension build does, warnings as errors."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    manifest = json.loads((ROOT / "csrc" / "sources.json").read_text())
    cmd = [NVCC, "-c", "-arch=sm_90", *manifest["nvcc_flags"], *COMMON_NVCC_FLAGS, "-Werror", "all-warnings",
           *[f"-I{ROOT / d}" for d in manifest["include_dirs"]], str(cu), "-o", str(tmp_path / "k.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr}"


def _raw(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    return (t.view(torch.int16) if t.dtype in (torch.float16, torch.bfloat16) else t).numpy().tobytes()


def _load(path: Path, dtype, shape) -> torch.Tensor:
    np_dtype = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.int16,
                torch.bfloat16: np.int16, torch.int32: np.int32}[dtype]
    t = torch.from_numpy(np.fromfile(path, dtype=np_dtype).copy())
    if dtype in (torch.float16, torch.bfloat16):
        t = t.view(dtype)
    return t.reshape(shape)


def _run(emulator: Path, mode: str, case_dir: Path) -> str:
    proc = subprocess.run([str(emulator), mode, str(case_dir)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _assert_close(name, got, want, atol_rel, rtol=0.0, floor=0.0):
    """|got - want| <= max(rtol |want| + atol_rel * max|want|, floor) elementwise; NaN exactly where
    want is NaN."""
    got, want = got.to(torch.float64), want.to(torch.float64)
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), f"{name}: NaN where the expected value is not, or vice versa"
    g, w = got[~nan], want[~nan]
    if w.numel() == 0:
        return
    assert torch.isfinite(g).all(), f"{name}: non-finite values"
    scale = max(w.abs().max().item(), 1e-30)
    bound = (rtol * w.abs() + atol_rel * scale).clamp_min(floor)
    excess = ((g - w).abs() - bound).max().item()
    err = (g - w).abs().max().item()
    assert excess <= 0, f"{name}: error {err:.3g} exceeds rtol={rtol:.3g} |x| + {atol_rel:.3g} * {scale:.3g}"


def _reference_run(reference_op, inputs, needs, grad_outputs, dtype, has_w=None):
    """A PyTorch reference ``(a, depth, wsum) = reference_op(*inputs)`` run in ``dtype``, and the
    gradients of the tests' loss sum(g_a a) + sum(g_depth has_w depth) + sum(g_wsum wsum) for the
    inputs with ``needs`` (None for the others; zeros for one the loss does not reach).
    ``has_w`` [.., 1]: rays with weight (a ray without has no depth, and the kernels give it no
    depth gradient; the reference's NaN -> t.max() clean-up would); default: the run's own.
    Returns (outputs, gradients, has_w), in float64."""
    ins = [x.to(dtype).clone().requires_grad_(n) for x, n in zip(inputs, needs)]
    outs = reference_op(*ins)
    a, depth, wsum = outs
    if has_w is None:
        has_w = (wsum.detach() > 0).to(torch.float64)
    g_a, g_depth, g_wsum = (g.to(dtype) for g in grad_outputs)
    loss = (g_a * a).sum() + (g_depth * has_w.to(dtype) * depth).sum() + (g_wsum * wsum).sum()
    grads = iter(torch.autograd.grad(loss, [x for x in ins if x.requires_grad], allow_unused=True))
    out = []
    for x, need in zip(ins, needs):
        g = next(grads) if need else None
        out.append(None if not need else torch.zeros_like(x).double() if g is None else g.double())
    return [o.detach().double() for o in outs], out, has_w


def _torch_fp32_floors(reference_op, inputs, needs, grad_outputs, ref64, dtype_code):
    """TORCH_FP32_ERROR_FACTOR x the largest error of the reference run in float32 against its
    float64 run ``ref64`` (``_reference_run``'s result), per output and per gradient; zeros for
    float64 kernels (held to the bounds above alone)."""
    outs64, grads64, has_w = ref64
    if dtype_code == "f64":
        return [0.0] * len(outs64), [0.0] * len(grads64)
    outs32, grads32, _ = _reference_run(reference_op, inputs, needs, grad_outputs, torch.float32, has_w)

    def floor(a, b):
        return 0.0 if b is None else TORCH_FP32_ERROR_FACTOR * (a - b).abs().nan_to_num().max().item()
    return [floor(a, b) for a, b in zip(outs32, outs64)], [floor(a, b) for a, b in zip(grads32, grads64)]


# ------------------------------------------------------------------------------------------------
# Compositing
# ------------------------------------------------------------------------------------------------

COMPOSITE_CASES = {
    "dense_eg3d_f32": dict(F=32),
    "dense_eg3d_f64": dict(F=32, dtype="f64"),
    "dense_eg3d_f16": dict(F=32, dtype="f16"),
    "dense_eg3d_bf16": dict(F=32, dtype="bf16"),
    "dense_generic_f32": dict(F=5),
    "dense_generic_f64": dict(F=7, dtype="f64"),
    "dense_generic_f16_one_feature": dict(F=1, dtype="f16"),
    "dense_generic_bf16_max_features": dict(F=64, dtype="bf16", R=9),
    "dense_generic_f32_max_features": dict(F=64, R=9),
    "dense_alpha_to_one_f32": dict(F=3, sigma_scale=40.0, sigma_shift=20.0),
    "dense_one_interval": dict(F=32, S=2),
    "dense_single_sample_rays": dict(F=4, S=1),
    "dense_no_samples": dict(F=4, S=0),
    "dense_grid_stride_loop": dict(F=3, B=1, R=2100, S=6, sms=1),  # > 16 blocks x 128 threads
    "dense_only_dt": dict(F=32, mask=4),
    "dense_only_dsigma_dfeat_f16": dict(F=6, dtype="f16", mask=3),
    "packed_eg3d_f32": dict(F=32, packed=True),
    "packed_eg3d_f64": dict(F=32, packed=True, dtype="f64"),
    "packed_eg3d_f16": dict(F=32, packed=True, dtype="f16"),
    "packed_eg3d_bf16": dict(F=32, packed=True, dtype="bf16"),
    "packed_generic_f32": dict(F=5, packed=True),
    "packed_generic_f64": dict(F=9, packed=True, dtype="f64"),
    "packed_generic_bf16": dict(F=3, packed=True, dtype="bf16"),
    "packed_grid_stride_loop": dict(F=2, R=2100, S=3, packed=True, sms=1),
    "packed_only_dfeat": dict(F=32, packed=True, mask=2),
}


def _composite_case(name):
    c = dict(dtype="f32", B=2, R=37, S=24, F=5, sigma_scale=4.0, sigma_shift=0.0, packed=False, sms=2, mask=7)
    c.update(COMPOSITE_CASES[name])
    return c


def _composite_inputs(c):
    """Inputs in float64 (rounded through the storage dtype), packed_info, and the in-ray sample mask."""
    case = CompositeCase(B=c["B"], R=c["R"], S=c["S"], F=c["F"], sigma_scale=c["sigma_scale"],
                         sigma_shift=c["sigma_shift"])
    _, sdt = DTYPES[c["dtype"]]
    if c["packed"]:
        sigma, feat, t, pinfo = make_packed(case, torch.float64)
        inside = torch.zeros(sigma.shape[0], dtype=torch.bool)
        for s, n in pinfo.tolist():
            inside[s:s + n] = True
        # Samples between rays are NaN: a kernel that reads one poisons that ray's outputs.
        for x in (sigma, feat, t):
            x[~inside] = float("nan")
    else:
        sigma, feat, t = make_dense(case, torch.float64)
        pinfo, inside = None, torch.ones(sigma.numel(), dtype=torch.bool)
    sigma, feat, t = (x.to(sdt).to(torch.float64) for x in (sigma, feat, t))
    return sigma, feat, t, pinfo, inside


@pytest.mark.parametrize("name", list(COMPOSITE_CASES))
def test_composite_kernels_in_emulation(emulator, tmp_path, name):
    c = _composite_case(name)
    code, sdt = DTYPES[c["dtype"]]
    sigma, feat, t, pinfo, inside = _composite_inputs(c)
    F = c["F"]
    lead = tuple(sigma.shape[:2]) if pinfo is None else (pinfo.shape[0],)
    R = int(np.prod(lead))
    g_feat = torch.randn(*lead, F, dtype=torch.float64).to(sdt)
    g_depth = torch.randn(*lead, 1, dtype=torch.float64).to(sdt)
    g_wsum = torch.randn(*lead, 1, dtype=torch.float64).to(sdt)
    files = {"sigma": sigma, "t": t, "feat": feat, "gfeat": g_feat, "gdepth": g_depth, "gwsum": g_wsum}
    for fn, x in files.items():
        (tmp_path / f"{fn}.bin").write_bytes(_raw(x.to(sdt)))
    if pinfo is not None:
        (tmp_path / "packed_info.bin").write_bytes(pinfo.contiguous().numpy().tobytes())
    N = sigma.shape[0] if pinfo is not None else sigma.numel()
    meta = [code, R, 0 if pinfo is not None else c["S"], F, N, int(pinfo is not None), c["sms"], c["mask"]]
    (tmp_path / "meta.txt").write_text(" ".join(map(str, meta)))
    out = _run(emulator, "composite", tmp_path)
    assert "forward: err=0" in out and "backward: err=0" in out, out

    o_feat = _load(tmp_path / "out_feat.bin", sdt, (*lead, F))
    o_depth = _load(tmp_path / "out_depth.bin", sdt, (*lead, 1))
    o_wsum = _load(tmp_path / "out_wsum.bin", sdt, (*lead, 1))
    grads = [_load(tmp_path / f"out_{g}.bin", sdt, x.shape) for g, x in (("dsigma", sigma), ("dfeat", feat), ("dt", t))]
    needs = [bool(c["mask"] >> i & 1) for i in range(3)]

    # 1. Against the CPU op on the same values (in fp32 for half storage) and the same saved outputs.
    cdt = sdt if sdt in (torch.float32, torch.float64) else torch.float32
    up = [x.to(cdt) for x in (sigma, feat, t)]
    want_fwd = torch.ops.talk3d.composite_fwd(*up, pinfo)
    atol, rtol = SAME_CODE_ATOL[c["dtype"]], ROUNDING_RTOL[c["dtype"]]
    for nm, got, want in zip(("feat", "depth", "weight_sum"), (o_feat, o_depth, o_wsum), want_fwd):
        _assert_close(f"forward {nm} vs cpu op", got, want, atol, rtol)
    want_bwd = torch.ops.talk3d.composite_bwd(
        g_feat.to(cdt), g_depth.to(cdt), g_wsum.to(cdt), *up, pinfo,
        o_feat.to(cdt), o_depth.to(cdt), o_wsum.to(cdt), needs)
    for nm, got, want, need in zip(("dsigma", "dfeat", "dt"), grads, want_bwd, needs):
        if need:  # unwanted outputs get a null pointer: their buffers are not looked at
            _assert_close(f"backward {nm} vs cpu op", got, want, atol, rtol)
    if pinfo is not None:
        for nm, got, need in zip(("dsigma", "dfeat", "dt"), grads, needs):
            if need:
                assert (got.reshape(inside.shape[0], -1)[~inside] == 0).all(), f"{nm}: wrote outside the rays"

    # 2. Against the float64 PyTorch reference.
    if N == 0:
        return  # the reference's depth range (t.min()) is undefined without samples
    t_ref = t.clone()
    t_ref[~inside.reshape(t.shape[:-1])] = t[inside.reshape(t.shape[:-1])].min()  # only for its depth range
    def ref_op(*x):
        return reference_composite(*x, packed_info=pinfo)

    # A ray without weight has depth NaN: the op gives it no depth gradient, while the reference's
    # NaN -> t.max() clean-up would route it to t.max(). Leave those rays' depth out of the loss.
    inputs, g_out = (sigma, feat, t_ref), (g_feat.double(), g_depth.double(), g_wsum.double())
    ref64 = _reference_run(ref_op, inputs, needs, g_out, torch.float64)
    (r_feat, r_depth, r_wsum), want, _ = ref64
    (f_feat, f_depth, f_wsum), floors = _torch_fp32_floors(ref_op, inputs, needs, g_out, ref64, c["dtype"])
    _assert_close("forward feat vs reference", o_feat, r_feat, REF_OUTPUT_RTOL[c["dtype"]], floor=f_feat)
    _assert_close("forward weight_sum vs reference", o_wsum, r_wsum, REF_OUTPUT_RTOL[c["dtype"]], floor=f_wsum)
    _assert_close("forward depth vs reference", finish_depth(o_depth.to(torch.float64), t_ref), r_depth,
                  REF_OUTPUT_RTOL[c["dtype"]], floor=f_depth)
    for nm, got, w, need, floor in zip(("dsigma", "dfeat", "dt"), grads, want, needs, floors):
        if need:
            _assert_close(f"backward {nm} vs reference", got, w, REF_GRAD_RTOL[c["dtype"]], floor=floor)


WEIGHTS_CASES = {
    "dense_f32": dict(),
    "dense_f64": dict(dtype="f64"),
    "dense_bf16": dict(dtype="bf16"),
    "dense_f16_opaque": dict(dtype="f16", sigma_scale=40.0, sigma_shift=20.0),
    "grid_stride_loop": dict(B=1, R=2100, S=3, sms=1),
    "only_dt": dict(mask=2),
    "eg3d_96_samples": dict(B=1, R=40, S=96),
}


@pytest.mark.parametrize("name", list(WEIGHTS_CASES))
def test_composite_weights_kernels_in_emulation(emulator, tmp_path, name):
    c = dict(dtype="f32", B=2, R=37, S=24, sigma_scale=4.0, sigma_shift=0.0, sms=2, mask=3)
    c.update(WEIGHTS_CASES[name])
    code, sdt = DTYPES[c["dtype"]]
    case = CompositeCase(B=c["B"], R=c["R"], S=c["S"], F=1, sigma_scale=c["sigma_scale"], sigma_shift=c["sigma_shift"])
    sigma, _, t = (x.to(sdt).to(torch.float64) for x in make_dense(case, torch.float64))
    B, R, S = sigma.shape[:3]
    g_omega, g_depth, g_wsum = (torch.randn(*shape, dtype=torch.float64).to(sdt)
                                for shape in ((B, R, S, 1), (B, R, 1), (B, R, 1)))
    for fn, x in {"sigma": sigma, "t": t, "gomega": g_omega, "gdepth": g_depth, "gwsum": g_wsum}.items():
        (tmp_path / f"{fn}.bin").write_bytes(_raw(x.to(sdt)))
    (tmp_path / "meta.txt").write_text(" ".join(map(str, [code, B * R, S, c["sms"], c["mask"]])))
    out = _run(emulator, "weights", tmp_path)
    assert "forward: err=0" in out and "backward: err=0" in out, out
    outs = [_load(tmp_path / f"out_{n}.bin", sdt, shape)
            for n, shape in (("omega", (B, R, S, 1)), ("depth", (B, R, 1)), ("wsum", (B, R, 1)))]
    grads = [_load(tmp_path / f"out_{n}.bin", sdt, (B, R, S, 1)) for n in ("dsigma", "dt")]
    needs = [bool(c["mask"] >> i & 1) for i in range(2)]
    # Against the CPU op on the same values and the same saved outputs.
    cdt = sdt if sdt in (torch.float32, torch.float64) else torch.float32
    atol, rtol = SAME_CODE_ATOL[c["dtype"]], ROUNDING_RTOL[c["dtype"]]
    want = torch.ops.talk3d.composite_weights_fwd(sigma.to(cdt), t.to(cdt))
    for nm, got, w in zip(("omega", "depth", "weight_sum"), outs, want):
        _assert_close(f"forward {nm} vs cpu op", got, w, atol, rtol)
    want_bwd = torch.ops.talk3d.composite_weights_bwd(
        g_omega.to(cdt), g_depth.to(cdt), g_wsum.to(cdt), sigma.to(cdt), t.to(cdt), *[o.to(cdt) for o in outs], needs)
    for nm, got, w, need in zip(("dsigma", "dt"), grads, want_bwd, needs):
        if need:
            _assert_close(f"backward {nm} vs cpu op", got, w, atol, rtol)
    # Against the float64 reference (rays without weight: no depth gradient, as in the composite test).
    g_out = (g_omega.double(), g_depth.double(), g_wsum.double())
    ref64 = _reference_run(reference.composite_weights, (sigma, t), needs, g_out, torch.float64)
    (r_omega, _, r_wsum), want, _ = ref64
    (f_omega, _, f_wsum), floors = _torch_fp32_floors(reference.composite_weights, (sigma, t), needs, g_out, ref64,
                                                      c["dtype"])
    _assert_close("forward omega vs reference", outs[0], r_omega, REF_OUTPUT_RTOL[c["dtype"]], floor=f_omega)
    _assert_close("forward weight_sum vs reference", outs[2], r_wsum, REF_OUTPUT_RTOL[c["dtype"]], floor=f_wsum)
    for nm, got, w, need, floor in zip(("dsigma", "dt"), grads, want, needs, floors):
        if need:
            _assert_close(f"backward {nm} vs reference", got, w, REF_GRAD_RTOL[c["dtype"]], floor=floor)


def test_composite_rejects_too_many_features(emulator, tmp_path):
    """F above the generic instance's bound is an error from the launcher, with no output written."""
    R, S, F = 3, 4, 65
    x = torch.rand(R * S * F)
    for fn, n in (("sigma", R * S), ("t", R * S), ("feat", R * S * F), ("gfeat", R * F), ("gdepth", R), ("gwsum", R)):
        (tmp_path / f"{fn}.bin").write_bytes(_raw(x[:n]))
    (tmp_path / "meta.txt").write_text(" ".join(map(str, [0, R, S, F, R * S, 0, 2, 7])))
    out = _run(emulator, "composite", tmp_path)
    assert "forward: err=1 blocks=0" in out, out  # cudaErrorInvalidValue, nothing launched
    assert np.all(np.fromfile(tmp_path / "out_feat.bin", dtype=np.uint8) == 0xFF)


def test_composite_packed_ray_out_of_range_is_empty(emulator, tmp_path):
    """A packed range leaving [0, N) (rejected by the Python wrapper) must not be read: it is empty."""
    F, N = 4, 10
    sigma, t = torch.randn(N), torch.linspace(2.0, 3.0, N)
    feat = torch.rand(N, F)
    pinfo = torch.tensor([[0, 5], [8, 5], [-1, 2], [5, 5]], dtype=torch.int64)
    R = pinfo.shape[0]
    files = {"sigma": sigma, "t": t, "feat": feat, "gfeat": torch.randn(R, F), "gdepth": torch.randn(R),
             "gwsum": torch.randn(R)}
    for fn, x in files.items():
        (tmp_path / f"{fn}.bin").write_bytes(_raw(x))
    (tmp_path / "packed_info.bin").write_bytes(pinfo.numpy().tobytes())
    (tmp_path / "meta.txt").write_text(" ".join(map(str, [0, R, 0, F, N, 1, 2, 7])))
    out = _run(emulator, "composite", tmp_path)
    assert "forward: err=0" in out and "backward: err=0" in out, out
    o_feat = _load(tmp_path / "out_feat.bin", torch.float32, (R, F))
    o_wsum = _load(tmp_path / "out_wsum.bin", torch.float32, (R,))
    o_depth = _load(tmp_path / "out_depth.bin", torch.float32, (R,))
    for r in (1, 2):
        assert (o_feat[r] == -1).all() and o_wsum[r] == 0 and torch.isnan(o_depth[r])
    good = pinfo[[0, 3]]
    want = torch.ops.talk3d.composite_fwd(sigma[:, None], feat, t[:, None], good)
    _assert_close("valid rays", o_feat[[0, 3]], want[0], SAME_CODE_ATOL["f32"])


# ------------------------------------------------------------------------------------------------
# Occupancy marching
# ------------------------------------------------------------------------------------------------

# The kernel and the CPU op run the same DDA code in the same precision and return integers: they
# must agree exactly (a mismatch would need a sample depth within an ulp of a cell face).
OCCUPANCY_CASES = {
    f"{grid}_{'outside' if outside else 'inside'}_{dt}": dict(grid=grid, outside=outside, dtype=dt)
    for grid in ("random", "sparse", "full", "empty")
    for outside in (False, True)
    for dt in ("f32", "f64")
}
OCCUPANCY_CASES.update({
    "random_res7_odd_bit_count": dict(grid="random", res=7),
    "full_res1_inside": dict(grid="full", res=1),
    "random_grid_stride_loop": dict(grid="random", B=1, R=2300, S=8, sms=1),
    # Axis-parallel rays lying on cell faces (and edges): they touch the cells on both sides.
    "random_face_rays_f64": dict(grid="random", dtype="f64", faces=True, p=0.1),
    "random_face_rays_f32": dict(grid="random", faces=True, p=0.1),
})


def _grid_bits(kind: str, res: int, p: float) -> torch.Tensor:
    n = res**3
    if kind == "full":
        occ = np.ones(n, dtype=bool)
    elif kind == "empty":
        occ = np.zeros(n, dtype=bool)
    else:
        occ = (torch.rand(n) < (p if kind == "random" else 0.02)).numpy()
    return torch.from_numpy(np.packbits(occ, bitorder="little").copy())  # bit i of byte i // 8, LSB first


def _march_rays(B, R, S, box, dtype, faces_res=None):
    """Rays from inside and outside the cube, some axis-parallel, some pointing away; with
    ``faces_res``, half the axis-parallel rays moved onto the nearest cell face of that grid along
    each axis they are parallel to (within the cube: on a face plane, or an edge for two axes)."""
    M = B * R
    inside = (torch.rand(M, 3, dtype=torch.float64) - 0.5) * 0.8 * box
    far = torch.nn.functional.normalize(torch.randn(M, 3, dtype=torch.float64), dim=-1) * 1.5 * box
    origins = torch.where(torch.rand(M, 1) < 0.5, inside, far)
    # Aim at a random point of the cube (or near it), so most outside rays cross it.
    target = (torch.rand(M, 3, dtype=torch.float64) - 0.5) * 1.2 * box
    dirs = torch.nn.functional.normalize(target - origins, dim=-1)
    flip = torch.rand(M) < 0.1
    dirs[flip] = -dirs[flip]
    for axes in ((0,), (1,), (2,), (0, 1), (1, 2)):  # exact zeros exercise the parallel-slab branch
        pick = torch.rand(M) < 0.04
        for a in axes:
            dirs[pick, a] = 0.0
    dirs = torch.nn.functional.normalize(dirs, dim=-1)
    if faces_res is not None:
        cell = box / faces_res
        snap = (dirs == 0) & (torch.rand(M, 1) < 0.5) & (origins.abs() < box / 2)
        origins = torch.where(snap, torch.round((origins + box / 2) / cell) * cell - box / 2, origins)
    near = torch.rand(M, 1, dtype=torch.float64) * 0.5
    t = near + torch.rand(M, S, dtype=torch.float64).sort(dim=-1).values * 3.0 * box
    t[:, :1], t[:, -1:] = near, near + 3.0 * box
    return [x.reshape(B, R, -1).to(dtype) for x in (origins, dirs, t)]


@pytest.mark.parametrize("name", list(OCCUPANCY_CASES))
def test_occupancy_kernel_in_emulation(emulator, tmp_path, name):
    c = dict(dtype="f32", B=2, R=300, S=16, res=16, box=1.0, outside=False, p=0.3, sms=2)
    c.update(OCCUPANCY_CASES[name])
    dtype = torch.float32 if c["dtype"] == "f32" else torch.float64
    origins, dirs, t = _march_rays(c["B"], c["R"], c["S"], c["box"], dtype, c["res"] if c.get("faces") else None)
    bits = _grid_bits(c["grid"], c["res"], c["p"])
    for fn, x in (("origins", origins), ("dirs", dirs), ("t", t)):
        (tmp_path / f"{fn}.bin").write_bytes(_raw(x))
    (tmp_path / "bits.bin").write_bytes(bits.numpy().tobytes())
    M = c["B"] * c["R"]
    meta = [0 if c["dtype"] == "f32" else 1, M, c["S"], c["res"], repr(c["box"]), int(c["outside"]), c["sms"]]
    (tmp_path / "meta.txt").write_text(" ".join(map(str, meta)))
    out = _run(emulator, "occupancy", tmp_path)
    assert "occupancy: err=0" in out, out
    got = _load(tmp_path / "out.bin", torch.int32, (c["B"], c["R"], 2))
    want = torch.ops.talk3d.occupied_intervals(origins, dirs, t, bits, c["res"], c["box"], c["outside"])
    bad = (got != want).any(-1)
    assert not bad.any(), f"{int(bad.sum())} of {M} rays differ, e.g. got {got[bad][:3].tolist()} want {want[bad][:3].tolist()}"
    # Two cases whose answer does not depend on the marching at all.
    if c["grid"] == "empty" and not c["outside"]:
        assert (got == -1).all()
    if c["grid"] == "full" and c["outside"]:
        assert (got[..., 0] == 0).all() and (got[..., 1] == c["S"] - 2).all()
    if c["grid"] == "random" and not c["outside"]:
        assert ((got[..., 0] >= 0).float().mean() > 0.3), "too few rays hit the grid: the case tests little"
    if c.get("faces"):  # cell faces at multiples of box / 16, exact in binary: the reference's closed boxes
        on_face = ((dirs == 0) & (((origins.double() + c["box"] / 2) * c["res"] / c["box"]).frac() == 0)).any(-1)
        assert on_face.sum() >= 10, "too few rays on cell faces: the case tests little"
        ref = reference.occupied_intervals(origins, dirs, t, bits, c["res"], c["box"], c["outside"])
        bad = (got != ref).any(-1)
        assert not bad.any(), f"{int(bad.sum())} rays differ from the reference, e.g. got {got[bad][:3].tolist()} " \
                              f"want {ref[bad][:3].tolist()}"


# --- binomial_filter2d --------------------------------------------------------------------------

FIR_DTYPES = {"f32": (0, torch.float32), "f16": (1, torch.float16), "bf16": (2, torch.bfloat16), "f64": (3, torch.float64)}
# Same per-strip code as the CPU op, up to the compilers' FMA contraction over 16 taps (fp32: a
# few ulps of the output's scale); half outputs are fp32 sums rounded once, so they may round to
# either neighbour (ROUNDING_RTOL).
FIR_SAME_CODE_ATOL = {"f32": 1e-6, "f64": 1e-14, "f16": 1e-6, "bf16": 1e-6}

# 16 taps of O(1) values with weights summing to the gain: a few fp32 ulps of the output's scale.
FIR_FP32_TOL_OF_SCALE = 1e-5

FIR_CASES = {
    # name: (dtype, N, C, H, W, (left, right, top, bottom), channels_last, sms, int64 indices)
    "nchw-f32": ("f32", 2, 3, 9, 14, (2, 1, 2, 1), False, 2, False),
    "nhwc-f32": ("f32", 2, 5, 9, 13, (2, 1, 2, 1), True, 2, False),
    "nhwc-crop-f64": ("f64", 1, 7, 8, 11, (-1, 2, 3, -2), True, 2, False),
    "nhwc-bf16": ("bf16", 2, 6, 7, 10, (1, 1, 1, 1), True, 2, False),
    "nchw-f16": ("f16", 1, 4, 6, 9, (3, 3, 3, 3), False, 2, False),
    "nhwc-grid-stride": ("f32", 3, 9, 12, 17, (2, 1, 2, 1), True, 1, False),  # more strips than one SM's grid
    # The int64-index kernels (tensors past 2^31 elements), on small tensors: the emulator lowers
    # the launcher's int32 limit to 0.
    "int64-nchw-crop": ("f32", 2, 3, 9, 14, (-1, 2, 3, -2), False, 2, True),
    "int64-nhwc-grid-stride-bf16": ("bf16", 3, 9, 12, 17, (2, 1, 2, 1), True, 1, True),
    # NHWC, 2-byte storage, C % 8 == 0: eight channels a thread, 16-byte loads and stores.
    "lanes-nhwc-bf16": ("bf16", 2, 16, 9, 13, (2, 1, 2, 1), True, 2, False),
    "lanes-nhwc-crop-f16": ("f16", 1, 8, 8, 11, (-1, 2, 3, -2), True, 2, False),
    "lanes-int64-nhwc-grid-stride-f16": ("f16", 3, 24, 12, 17, (2, 1, 2, 1), True, 1, True),
}


@pytest.mark.parametrize("name", list(FIR_CASES))
def test_binomial_filter_kernel_in_emulation(emulator, tmp_path, name):
    dtype_name, N, C, H, W, (left, right, top, bottom), nhwc, sms, wide = FIR_CASES[name]
    code, dtype = FIR_DTYPES[dtype_name]
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    x = torch.randn(N, C, H, W).to(dtype).to(memory_format=fmt)
    out_h, out_w = H + top + bottom - 3, W + left + right - 3
    # _raw writes NCHW order; the kernel reads the tensor's own memory.
    memory = x.permute(0, 2, 3, 1) if nhwc else x
    (tmp_path / "x.bin").write_bytes(_raw(memory))
    meta = [code, N, C, H, W, out_h, out_w, top, left, int(nhwc), 4.0, sms, int(wide)]
    (tmp_path / "meta.txt").write_text(" ".join(map(str, meta)))
    out = _run(emulator, "fir", tmp_path)
    assert "fir: err=0" in out, out
    got = _load(tmp_path / "out.bin", dtype, (N, out_h, out_w, C) if nhwc else (N, C, out_h, out_w))
    if nhwc:
        got = got.permute(0, 3, 1, 2)
    want = torch.ops.talk3d.binomial_filter2d(x, top, left, out_h, out_w, 4.0)
    _assert_close("y", got.double(), want.double(), FIR_SAME_CODE_ATOL[dtype_name], ROUNDING_RTOL[dtype_name])
    ref = reference.binomial_filter2d(x.double(), (left, right, top, bottom), 4.0)
    # and against float64 on the same (rounded) input: the fp32 sum's error, plus one rounding
    _assert_close("y vs float64", got.double(), ref, FIR_FP32_TOL_OF_SCALE, ROUNDING_RTOL[dtype_name])


# --- bias_act ------------------------------------------------------------------------------------

BIAS_ACT_CASES = {
    # name: (dtype, shape, channels_last, (slope, gain, clamp), has_bias, sms, int64 indices)
    "nchw-f32-lrelu-clamp": ("f32", (2, 5, 7, 9), False, (0.2, 2**0.5, 0.8), True, 2, False),
    "nhwc-f32-lrelu": ("f32", (2, 6, 5, 7), True, (0.2, 2**0.5, -1.0), True, 2, False),
    "nhwc-bf16-linear-clamp": ("bf16", (2, 4, 6, 5), True, (1.0, 1.0, 1.5), True, 2, False),
    "nchw-f16-relu-nobias": ("f16", (3, 3, 4, 4), False, (0.0, 2**0.5, -1.0), False, 2, False),
    "rank2-f64": ("f64", (7, 9), False, (0.2, 1.3, 2.0), True, 2, False),
    "grid-stride": ("f32", (2, 8, 16, 12), True, (0.2, 2**0.5, 1.0), True, 1, False),
    # The int64-index kernels (tensors past 2^31 elements), on small tensors: the emulator lowers
    # the launchers' int32 limit to 0.
    "int64-nchw-grid-stride": ("f32", (2, 5, 16, 12), False, (0.2, 2**0.5, 0.8), True, 1, True),
    "int64-nhwc-bf16": ("bf16", (2, 6, 5, 7), True, (0.2, 2**0.5, -1.0), True, 2, True),
    # NCHW with several grid-stride steps (one block of 2048 threads): the channel and the offset in
    # its run advance by the stride's share; 2048 = 58 x 35 + 18 wraps the offset on some steps.
    "nchw-grid-stride-steps": ("f32", (10, 7, 5, 7), False, (0.2, 2**0.5, 1.0), True, 1, False),
    "int64-nchw-grid-stride-steps": ("bf16", (2, 6, 20, 20), False, (0.2, 2**0.5, -1.0), True, 1, True),
}


@pytest.mark.parametrize("name", list(BIAS_ACT_CASES))
def test_bias_act_kernels_in_emulation(emulator, tmp_path, name):
    dtype_name, shape, nhwc, (slope, gain, clamp), has_bias, sms, wide = BIAS_ACT_CASES[name]
    code, dtype = FIR_DTYPES[dtype_name]
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    x = (2 * torch.randn(*shape)).to(dtype).to(memory_format=fmt)
    dy = torch.randn(*shape).to(dtype).to(memory_format=fmt)
    b = torch.randn(shape[1], dtype=torch.float64 if dtype_name == "f64" else torch.float32)
    memory = (lambda t: t.permute(0, 2, 3, 1)) if nhwc else (lambda t: t)  # _raw writes logical order
    (tmp_path / "x.bin").write_bytes(_raw(memory(x)))
    (tmp_path / "dy.bin").write_bytes(_raw(memory(dy)))
    (tmp_path / "b.bin").write_bytes(b.numpy().tobytes())
    inner = 1 if nhwc else int(torch.tensor(shape[2:]).prod()) if len(shape) > 2 else 1
    meta = [code, x.numel(), shape[1], inner, repr(slope), repr(gain), repr(clamp), int(has_bias), sms, int(wide)]
    (tmp_path / "meta.txt").write_text(" ".join(map(str, meta)))
    out = _run(emulator, "bias_act", tmp_path)
    assert "forward: err=0" in out and "backward: err=0" in out, out
    logical = (shape[0], *shape[2:], shape[1]) if nhwc else shape
    unperm = (lambda t: t.permute(0, 3, 1, 2)) if nhwc else (lambda t: t)
    y = unperm(_load(tmp_path / "y.bin", dtype, logical))
    dx = unperm(_load(tmp_path / "dx.bin", dtype, logical))
    args = (slope, gain, clamp)
    want_y = torch.ops.talk3d.bias_act_fwd(x, b if has_bias else None, *args)
    want_dx = torch.ops.talk3d.bias_act_bwd(dy, want_y, *args)
    # The same per-element code as the CPU op: equal up to FMA contraction, then one rounding.
    _assert_close("y", y.double(), want_y.double(), FIR_SAME_CODE_ATOL[dtype_name], ROUNDING_RTOL[dtype_name])
    _assert_close("dx", dx.double(), want_dx.double(), FIR_SAME_CODE_ATOL[dtype_name], ROUNDING_RTOL[dtype_name])
