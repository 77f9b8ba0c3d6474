"""The CUDA kernels, run on the CPU in a thread-per-CUDA-thread emulator, against the reference.

No GPU is needed: tests/cuda_emu/emu_main.cpp mocks the few CUDA runtime calls the launchers make
and runs every block's threads as std::threads with a real barrier, so the kernels' indexing,
shared-memory tiling, partial tiles, masks and shared-memory fallbacks are all exercised. What it
cannot check is GPU-only behaviour (memory model, warp scheduling, speed): that needs a GPU run.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from emu_build import CXX, SANITIZE, sanitizers_link
from emu_build import cuda_include as _cuda_include
from field_cases import accumulation_probe
from talk3d.ops.reference import triplane_field as reference

ROOT = Path(__file__).resolve().parents[1]
CU = ROOT / "kernels" / "triplane_field" / "triplane_field.cu"


pytestmark = pytest.mark.skipif(CXX is None or _cuda_include() is None, reason="needs g++ and the CUDA headers")

# storage dtype code of FieldDType, storage dtype, xyz dtype
DTYPES = {"f32": (0, torch.float32, torch.float32), "f16": (1, torch.float16, torch.float32),
          "bf16": (2, torch.bfloat16, torch.float32), "f64": (3, torch.float64, torch.float64)}
# Errors relative to the largest reference value. Outputs in half precision are rounded to that
# precision (fp16: 2^-11, bf16: 2^-8 relative, times a few roundings); gradients accumulate in fp32
# (fp64 for f64) whatever the storage, so they are held to fp32 (fp64) accuracy.
OUTPUT_RTOL = {"f32": 2e-5, "f64": 1e-12, "f16": 2e-3, "bf16": 1.6e-2}
GRAD_RTOL = {"f32": 2e-5, "f64": 1e-10, "f16": 2e-5, "bf16": 2e-5}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Path:
    build = tmp_path_factory.mktemp("cuda_emu")
    src = CU.read_text()
    launch = re.compile(r"(\w+)<<<\s*(\w+)\s*,\s*(\w+)\s*,\s*(\w+)\s*,\s*\w+\s*>>>\(([^;]*)\);")
    rewritten, n = launch.subn(r"emu_launch(\1, \2, \3, \4, \5);", src)
    assert n > 0 and "<<<" not in rewritten, "could not rewrite the kernel launches for the emulator"
    (build / "triplane_field_emu.cu").write_text(rewritten)
    exe = build / "emu"
    # Under the sanitizers (tests/emu_build.py): an out-of-bounds access, or a misaligned 16-byte
    # load of the vector tap paths (a fault on a GPU), stops the emulator too.
    sanitize = SANITIZE if sanitizers_link(build) else []
    cmd = [CXX, "-std=c++20", "-O1", "-pthread", *sanitize, f"-I{_cuda_include()}", f"-I{ROOT / 'csrc' / 'include'}",
           f"-I{ROOT / 'kernels'}", f"-I{CU.parent}", f"-I{build}", str(ROOT / "tests" / "cuda_emu" / "emu_main.cpp"),
           "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return exe


def _raw(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    return (t.view(torch.int16) if t.dtype in (torch.float16, torch.bfloat16) else t).numpy().tobytes()


def _load(path: Path, dtype, shape) -> torch.Tensor:
    np_dtype = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.int16, torch.bfloat16: np.int16}[dtype]
    t = torch.from_numpy(np.fromfile(path, dtype=np_dtype))
    if dtype in (torch.float16, torch.bfloat16):
        t = t.view(dtype)
    return t.to(torch.float64).reshape(shape)


CASES = {
    "eg3d_f32": {},
    "eg3d_f32_strided_eg3d_axes": dict(pad=(3, 5, 7, 11), axes=1, box=1.3, B=3, N=170),
    "eg3d_f64": dict(dtype="f64"),
    "eg3d_f16": dict(dtype="f16", pad=(1, 0, 2, 0)),  # texels not 16-byte aligned: channel by channel
    "eg3d_f16_aligned": dict(dtype="f16", pad=(8, 0, 16, 8)),  # 16-byte loads of eight halves
    # Only the texel stride (C + 1) breaks the 16-byte alignment (rows, planes and batches stay
    # aligned): channel by channel, not vector loads (a misaligned 16-byte load faults on a GPU).
    "eg3d_f32_texel_stride_unaligned": dict(pad=(1, 0, 0, 0), N=100),
    "eg3d_f16_texel_stride_unaligned": dict(dtype="f16", pad=(1, 0, 0, 0), N=100),
    "eg3d_bf16": dict(dtype="bf16"),
    "generic_f32": dict(C=5, HID=7, OUT=4, H=9, W=13, pad=(2, 1, 0, 3)),
    "generic_f64_no_features": dict(dtype="f64", C=3, HID=10, OUT=1, H=5, W=4),
    "generic_f16_eg3d_axes": dict(dtype="f16", C=6, HID=9, OUT=6, H=7, W=8, axes=1),
    "generic_max_sizes": dict(C=64, HID=128, OUT=129, N=150, H=6, W=5),
    "eg3d_small_shared_memory": dict(optin=30000, N=200),
    "generic_weights_in_global_memory": dict(C=5, HID=7, OUT=4, optin=200, N=40),
    "generic_many_tiles_per_block": dict(C=5, HID=7, OUT=4, B=3, N=1000, sms=1),
    "eg3d_only_layer2_grads": dict(mask=16 | 8),
    "eg3d_only_xyz_grad_from_sigma": dict(mask=2, gmask=1),
    "eg3d_planes_and_b2_from_feat": dict(mask=1 | 32, gmask=2),
    # The streaming backward (EG3D sizes, float accumulation): chunks of 128 points by default; here
    # the frozen-decoder case (planes and xyz only: no rows, one launch) and one chunk for all points.
    "eg3d_bf16_frozen_decoder": dict(dtype="bf16", mask=1 | 2, B=3, N=211),
    "eg3d_f32_one_chunk": dict(chunk=0, N=257),
    # Chunks of whole waves (2 SMs x 2 blocks x 128 threads = 512 points) under a cap of 1100: one of
    # 1024 and a last of 76, as the adapter sizes them from field_backward_streaming_wave.
    "eg3d_f32_wave_chunks": dict(chunk=-1100, per_sm=2, B=2, N=550),
    # The streaming forward writes features through shared memory a tile of points at a time: one
    # block walking every tile (the last one partial), fewer points than a tile, and each output
    # alone (the other pointer null).
    "eg3d_f32_one_block_many_tiles": dict(B=3, N=250, sms=1),
    "eg3d_bf16_fewer_points_than_a_tile": dict(dtype="bf16", B=1, N=50),
    "eg3d_f32_sigma_only": dict(omask=1, N=170),
    "eg3d_f16_features_only": dict(dtype="f16", omask=2, N=170),
    # The tensor-core forward (FieldProblem::mlp = 1, fp16/bf16 storage): warps of 32 points, the
    # decoder as two mma.sync products whose fragments the emulator gathers with warp shuffles.
    # Aligned and unaligned texels, a partial last warp tile, one block walking many tiles, each
    # output alone, and a pre-sm_80 device (the FMA kernel runs instead).
    "eg3d_f16_tensor_cores": dict(dtype="f16", mlp=1, pad=(8, 0, 16, 8), N=150),
    "eg3d_bf16_tensor_cores": dict(dtype="bf16", mlp=1, B=3, N=77, sms=1),
    "eg3d_bf16_tensor_cores_unaligned": dict(dtype="bf16", mlp=1, pad=(1, 0, 2, 0), N=45),
    "eg3d_f16_tensor_cores_features_only": dict(dtype="f16", mlp=1, omask=2, N=40),
    "eg3d_bf16_tensor_cores_sigma_only": dict(dtype="bf16", mlp=1, omask=1, N=40),
    "eg3d_f16_tensor_cores_sm75": dict(dtype="f16", mlp=1, cc=7, N=40),
    # field_cases.accumulation_probe: inputs on which only a decoder that sums in fp32 gets sigma
    # exactly (91); half-precision sums give 0.7 (serial) or 56-89 (tree). FMA and tensor-core paths.
    "probe_f16": dict(dtype="f16", probe=True),
    "probe_bf16": dict(dtype="bf16", probe=True),
    "probe_f16_tensor_cores": dict(dtype="f16", probe=True, mlp=1),
    "probe_bf16_tensor_cores": dict(dtype="bf16", probe=True, mlp=1),
}
# The tensor-core forward rounds the 32 features and 64 hidden units to the storage type before
# each product (PyTorch's half-precision decoder does the same): a few more roundings of 2^-11
# (fp16) / 2^-8 (bf16) relative, through sums of 32 and 64 terms, and it is held to the same
# OUTPUT_RTOL. Measured (CPU emulator): fp16 under 1e-3, bf16 5.1e-3 of the largest output.


@pytest.mark.parametrize("name", list(CASES))
def test_cuda_kernels_in_emulation(emulator, tmp_path, name):
    c = dict(dtype="f32", B=2, H=16, W=16, C=32, N=300, HID=64, OUT=33, axes=0, box=1.0, pad=(0, 0, 0, 0),
             optin=232448, sms=2, per_sm=1, mask=63, gmask=3, chunk=128, omask=3, mlp=0, cc=9)
    c.update(CASES[name])
    probe = accumulation_probe(DTYPES[c["dtype"]][1]) if c.get("probe") else None
    if probe is not None:
        c.update(B=1, N=probe[0][1].shape[1], mask=0)  # forward only: the probe's weights are extreme
    code, sdt, pdt = DTYPES[c["dtype"]]
    B, H, W, C, N, HID, OUT = (c[k] for k in ("B", "H", "W", "C", "N", "HID", "OUT"))
    master = (torch.randn(B, 3, H, W, C, dtype=torch.float64) * 0.7).to(sdt)
    # Planes inside a padded buffer (padding 777) so any stride mix-up reads garbage.
    px, py, pp, pb = c["pad"]
    sx = C + px; sy = W * sx + py; sp = H * sy + pp; sb = 3 * sp + pb  # noqa: E702
    buf = torch.full((B * sb,), 777.0, dtype=sdt)
    idx = (torch.arange(B).view(-1, 1, 1, 1, 1) * sb + torch.arange(3).view(1, -1, 1, 1, 1) * sp
           + torch.arange(H).view(1, 1, -1, 1, 1) * sy + torch.arange(W).view(1, 1, 1, -1, 1) * sx
           + torch.arange(C).view(1, 1, 1, 1, -1))
    buf[idx.reshape(-1)] = master.reshape(-1)
    xyz = ((torch.rand(B, N, 3, dtype=torch.float64) * 2 - 1) * 0.6 * c["box"]).to(pdt)
    w1 = (torch.randn(HID, C, dtype=torch.float64) / C**0.5).to(sdt)
    b1 = (torch.randn(HID, dtype=torch.float64) * 0.3).to(sdt)
    w2 = (torch.randn(OUT, HID, dtype=torch.float64) / HID**0.5).to(sdt)
    b2 = (torch.randn(OUT, dtype=torch.float64) * 0.3).to(sdt)
    if probe is not None:
        planes, xyz, w1, b1, w2, b2 = probe[0]
        master = planes.permute(0, 1, 3, 4, 2).contiguous()
        buf[idx.reshape(-1)] = master.reshape(-1)
    gs = torch.randn(B, N, 1, dtype=torch.float64).to(sdt)
    gf = torch.randn(B, N, OUT - 1, dtype=torch.float64).to(sdt)
    for fn, t in [("planes", buf), ("xyz", xyz), ("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2), ("gsigma", gs), ("gfeat", gf)]:
        (tmp_path / f"{fn}.bin").write_bytes(_raw(t))
    meta = [code, B, H, W, C, N, HID, OUT, c["axes"], c["box"], sb, sp, sy, sx, c["optin"], c["sms"], c["per_sm"], c["mask"], c["gmask"], c["chunk"], c["omask"], c["mlp"], c["cc"]]
    (tmp_path / "meta.txt").write_text(" ".join(map(str, meta)))
    proc = subprocess.run([str(emulator), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "forward: err=0" in proc.stdout and "backward: err=0" in proc.stdout, proc.stdout
    streaming = (C, HID, OUT) == (32, 64, 33) and c["dtype"] != "f64"  # what the CUDA adapter runs
    assert ("streaming backward" in proc.stdout) == streaming, proc.stdout
    if c["chunk"] < 0:
        assert f"wave={c['per_sm'] * c['sms'] * 128} " in proc.stdout, proc.stdout
    smem = int(re.search(r"forward smem bytes (\d+) \(tensor cores: (\d+)\)", proc.stdout).group(1))
    tensor_cores = c["mlp"] == 1 and c["cc"] >= 8 and (C, HID, OUT) == (32, 64, 33) and c["dtype"] in ("f16", "bf16")
    mma_bytes = int(re.search(r"tensor cores: (\d+)", proc.stdout).group(1))
    assert (smem == mma_bytes) == tensor_cores, proc.stdout  # the kernel that ran, by its shared memory

    # Reference in float64 on the same (rounded) values.
    P = master.to(torch.float64).permute(0, 1, 4, 2, 3).contiguous().requires_grad_()
    X = xyz.to(torch.float64).requires_grad_()
    Ws = [t.to(torch.float64).requires_grad_() for t in (w1, b1, w2, b2)]
    sigma, feat = reference(P, X, *Ws, box_warp=c["box"], axes=["fixed", "eg3d"][c["axes"]])
    loss = (sigma * gs.double()).sum() * (c["gmask"] & 1) + (feat * gf.double()).sum() * ((c["gmask"] >> 1) & 1)
    loss.backward()
    acc = torch.float64 if c["dtype"] == "f64" else torch.float32
    # A forward output not asked for (null pointer) stays as the emulator allocated it: zeros.
    results = {
        "sigma": (_load(tmp_path / "out_sigma.bin", sdt, sigma.shape),
                  sigma.detach() if c["omask"] & 1 else torch.zeros_like(sigma), OUTPUT_RTOL),
        "feat": (_load(tmp_path / "out_feat.bin", sdt, feat.shape),
                 feat.detach() if c["omask"] & 2 else torch.zeros_like(feat), OUTPUT_RTOL),
    }
    refs = [P.grad.permute(0, 1, 3, 4, 2), X.grad] + [w.grad for w in Ws]
    for bit, (nm, r) in enumerate(zip(["dplanes", "dxyz", "dw1", "db1", "dw2", "db2"], refs)):
        want = r if (c["mask"] >> bit) & 1 else torch.zeros_like(r)  # unwanted outputs stay untouched
        results[nm] = (_load(tmp_path / f"out_{nm}.bin", acc, r.shape), want, GRAD_RTOL)
    for nm, (got, want, rtol) in results.items():
        if want.numel() == 0:
            continue
        assert torch.isfinite(got).all(), f"{nm}: non-finite values"
        scale = max(want.abs().max().item(), 1e-30)
        err = (got - want).abs().max().item()
        assert err <= rtol[c["dtype"]] * scale, f"{nm}: error {err:.3g} > {rtol[c['dtype']]} * {scale:.3g}"
    if probe is not None:  # exact, not merely within OUTPUT_RTOL (a half sum gives 56-89 or 0.7)
        torch.testing.assert_close(results["sigma"][0], probe[1], atol=0, rtol=0)
