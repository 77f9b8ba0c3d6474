"""Random inputs, tolerances and back ends for the compositing ops, shared by their tests and the
emulator tests."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from talk3d import extension

# fp32 kernels against float64: one scan of <= 96 intervals per ray; transmittance is a product of
# <= 96 factors (~96 ulps relative) and the sums add <= 96 O(1) terms, so ~1e-5 absolute at most.
FP32_ATOL, FP32_RTOL = 2e-5, 2e-5
# Gradients of t also carry 1/W from the depth: a few times looser.
FP32_GRAD_ATOL, FP32_GRAD_RTOL = 1e-4, 1e-4
FP64_ATOL, FP64_RTOL = 1e-11, 1e-11
# float64 gradients of nearly opaque intervals (alpha -> 1, the sigma_scale 40 case): alpha = 1 - e
# is computed as EG3D does, not with expm1, so with e ~ 1e-5 the backward keeps ~1e-16 / e of
# rounding; element by element the kernel's and autograd's dsigma differed by up to 2e-11 over 40
# seeds (other cases: 1e-15).
FP64_OPAQUE_GRAD_ATOL = 1e-10
OPAQUE_SIGMA_SCALE = 40.0
# Half-precision storage (CUDA): inputs and outputs rounded to 2^-8 (bf16) / 2^-11 (fp16).
HALF_ATOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# The compiled back ends of the compositing ops (the reference is "torch").
BACKENDS = [
    pytest.param("cpu", marks=pytest.mark.skipif(not extension.available(), reason="talk3d._C not built")),
    pytest.param("cuda", marks=pytest.mark.cuda),
]


def device_of(impl: str) -> str:
    return "cuda" if impl == "cuda" else "cpu"


@dataclass(frozen=True)
class CompositeCase:
    B: int = 2
    R: int = 37
    S: int = 24
    F: int = 5
    #: raw densities are randn * sigma_scale + sigma_shift; a large scale drives alpha to 1
    sigma_scale: float = 4.0
    sigma_shift: float = 0.0
    t_start: float = 2.25
    t_end: float = 3.3


CASES = [
    CompositeCase(),
    CompositeCase(B=1, R=64, S=96, F=32),                       # EG3D's final pass: 48 + 48 samples
    CompositeCase(B=1, R=16, S=20, F=3, sigma_scale=OPAQUE_SIGMA_SCALE, sigma_shift=20.0),  # alpha -> 1 everywhere
    CompositeCase(B=2, R=8, S=2, F=1),                          # one interval per ray
]


def make_dense(case: CompositeCase, dtype=torch.float32, device="cpu"):
    """sigma [B, R, S, 1], feat [B, R, S, F] in EG3D's (-0.001, 1.001) range, t [B, R, S, 1] sorted."""
    B, R, S = case.B, case.R, case.S
    sigma = torch.randn(B, R, S, 1, dtype=torch.float64) * case.sigma_scale + case.sigma_shift
    feat = torch.rand(B, R, S, case.F, dtype=torch.float64) * 1.002 - 0.001
    # Stratified depths like EG3D's coarse pass, plus a few exact ties (zero-length intervals).
    base = torch.linspace(case.t_start, case.t_end, S, dtype=torch.float64)
    t = base + torch.rand(B, R, S, dtype=torch.float64) * (case.t_end - case.t_start) / max(S - 1, 1)
    t = t.sort(dim=-1).values
    if S > 3:
        t[:, : R // 5, 3] = t[:, : R // 5, 2]
    return [x.to(device, dtype) for x in (sigma, feat, t[..., None])]


def make_packed(case: CompositeCase, dtype=torch.float32, device="cpu"):
    """Packed samples of R rays with 0..S samples each, in shuffled ray order with gaps between rays.

    Returns sigma [N, 1], feat [N, F], t [N, 1], packed_info [R, 2].
    """
    R, S = case.R, case.S
    counts = torch.randint(0, S + 1, (R,))
    counts[:3] = torch.tensor([0, 1, 2])[: min(3, R)]  # empty, single-sample and one-interval rays
    gaps = torch.randint(0, 3, (R,))  # unused samples between rays: they must get zero gradient
    order = torch.randperm(R)  # rays need not be stored in ray order
    starts = torch.zeros(R, dtype=torch.int64)
    pos = 0
    for r in order.tolist():
        pos += int(gaps[r])
        starts[r] = pos
        pos += int(counts[r])
    N = pos + 2
    dense = make_dense(CompositeCase(1, 1, N, case.F, case.sigma_scale, case.sigma_shift), torch.float64)
    sigma, feat = dense[0][0, 0], dense[1][0, 0]
    # Samples between rays are never composited, but the depth clamp takes the min/max of all of ``t``:
    # they hold t_start (the lowest depth a ray can have) so that they are defined and never the max.
    # (They were left uninitialised once; garbage like 1e300 made gradcheck's +-eps vanish there.)
    t = torch.full((N, 1), case.t_start, dtype=torch.float64)
    for r in range(R):
        s, c = int(starts[r]), int(counts[r])
        t[s:s + c, 0] = torch.rand(c, dtype=torch.float64).sort().values + case.t_start
    packed_info = torch.stack([starts, counts], dim=1)
    return [x.to(device, dtype) for x in (sigma, feat, t)] + [packed_info.to(device)]
