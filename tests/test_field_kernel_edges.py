"""Edge cases of the Triton triplane field kernel that the broader tests in test_triplane_field.py
miss (found by a mutation audit: each test here fails under a one-line slip of
kernels/triplane_field/triplane_field_triton.py that every other test passes).

- planes taller than wide (H > W + 2): the row clamp must use H, not W;
- NaN / infinite / huge points: they read zeros (the kernel's contract, as the compiled back ends);
- planes passed as a channels-last view of a padded buffer (texel stride > C): the backward must
  read them with their own strides for d_xyz;
- fp16 / bf16 decoder products that are not representable in the storage dtype before the bias is
  added: the dots must return fp32 (not round to the storage dtype) before the bias add.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from field_cases import FieldCase, make_field_inputs
from talk3d.ops import reference, triplane_field

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed"),
]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton interpreter (conftest)
ARG_NAMES = ("planes", "xyz", "w1", "b1", "w2", "b2")

# fp32 kernel against a float64 reference: the same bound as test_triplane_field.py's FP32_ATOL /
# FP32_RTOL (sums of at most 64 O(1) products: a few fp32 ulps times sqrt(terms); plane and weight
# gradients sum over hundreds of points, hence the relative part).
FP32_ATOL, FP32_RTOL = 3e-5, 3e-5
# Half-precision outputs against the float64 reference, in units of the storage dtype's eps: h is
# rounded to the storage dtype before the second product and both outputs are rounded to it once
# more, so a few eps of an O(1) value.
HALF_OUTPUT_EPS = 4


def _run(fn, inputs, grad_outputs):
    inputs = [t.detach().requires_grad_() for t in inputs]
    sigma, feat = fn(*inputs)
    grads = torch.autograd.grad((sigma, feat), inputs, grad_outputs)
    return sigma.detach(), feat.detach(), grads


def _check_fp32_against_reference(inputs, case: FieldCase, axes: str, ref_inputs=None):
    """Forward and every gradient of the Triton kernel against the float64 reference (run on
    ``ref_inputs`` when given: the same values written in a form the reference handles)."""
    grad_outputs = [torch.randn(case.B, case.N, 1, device=DEVICE),
                    torch.randn(case.B, case.N, case.out - 1, device=DEVICE)]
    got = _run(lambda *a: triplane_field(*a, box_warp=case.box_warp, axes=axes, impl="triton"),
               inputs, grad_outputs)
    want = _run(lambda *a: reference.triplane_field(*a, box_warp=case.box_warp, axes=axes),
                [t.detach().cpu().double() for t in (inputs if ref_inputs is None else ref_inputs)],
                [g.cpu().double() for g in grad_outputs])
    names = ["sigma", "feat", *[f"d{n}" for n in ARG_NAMES]]
    for name, g, w in zip(names, [got[0], got[1], *got[2]], [want[0], want[1], *want[2]]):
        g = g.detach().cpu().double()
        assert g.shape == w.shape, f"{name}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        err = (g - w).abs().max().item()
        bound = FP32_ATOL + FP32_RTOL * w.abs().max().item()
        assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("axes", ["fixed", "eg3d"])
def test_triton_planes_taller_than_wide(axes):
    """H = 24 > W + 2 = 10: a row clamp to W + 1 instead of H + 1 would move every point past row
    W + 1 back inside the plane. (test_triplane_field.py's cases all have H <= W.)"""
    case = FieldCase(B=2, N=150, H=24, W=8, spread=1.6)
    inputs = make_field_inputs(case, device=DEVICE)
    _check_fp32_against_reference(inputs, case, axes)


def test_triton_channels_last_view_of_padded_planes():
    """Planes given as a channels-last view of a buffer with 3 padding channels per texel (texel
    stride C + 3, row stride W * (C + 3)): the op passes them to the kernel without a copy, and both
    directions must use these strides (the backward's d_xyz reads the planes too)."""
    case = FieldCase(B=2, N=120, C=8, H=12, W=20, spread=1.2)
    planes, xyz, w1, b1, w2, b2 = make_field_inputs(case, device=DEVICE)
    wide = torch.full((case.B, 3, case.H, case.W, case.C + 3), 777.0, device=DEVICE)  # padding: garbage
    wide[..., : case.C] = planes.permute(0, 1, 3, 4, 2)
    view = wide[..., : case.C].permute(0, 1, 4, 2, 3)
    assert view.stride(2) == 1 and view.stride(4) == case.C + 3  # really the padded layout
    _check_fp32_against_reference([view, xyz, w1, b1, w2, b2], case, "fixed")


def test_triton_nan_and_infinite_points_read_zeros():
    """NaN, +-inf and huge coordinates read as far outside the box (zeros), like the compiled back
    ends (test_triplane_field.py::test_points_outside_box_read_zero_features does not run Triton):
    with every coordinate of a point bad, or just one (the planes reading the other two still see
    the point), every output and gradient matches the reference run with the bad coordinates
    replaced by 1000 (far outside: grid_sample's zero padding; the reference itself propagates NaN)."""
    case = FieldCase(B=1, N=40)
    planes, xyz, w1, b1, w2, b2 = make_field_inputs(case, device=DEVICE)
    bad = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30], device=DEVICE)
    k = len(bad)
    xyz[0, :k] = bad[:, None].expand(k, 3)      # every coordinate of the point bad
    for axis in range(3):                       # one coordinate bad, the others inside the box
        xyz[0, (axis + 1) * k:(axis + 2) * k, axis] = bad
    far = torch.where(torch.isfinite(xyz) & (xyz.abs() < 1e3), xyz, torch.full_like(xyz, 1e3))
    _check_fp32_against_reference([planes, xyz, w1, b1, w2, b2], case, "eg3d",
                                  ref_inputs=[planes, far, w1, b1, w2, b2])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_triton_half_dots_return_fp32_before_the_bias(dtype):
    """fp16/bf16 weights: both decoder products must come out in fp32 and only then get their bias.

    Planes of ones sampled at texel centres give f = 1 exactly. Hidden unit 2 has f . w1 = 2049
    (not representable in fp16 or bf16) and bias -2048, so pre = 1; hidden units 0 and 1 are 2048
    and 32 (softplus is the identity there); feature 0's logit is 2048 + 32 / 32 = 2049, bias -2048,
    so o = 1. A product rounded to the storage dtype before the bias gives pre = 0 and o = 0
    (sigma off by 0.62, feature 0 by 0.18). Every input, h0, h1 and o are exact in both dtypes.
    Under the CPU interpreter bf16 takes the kernel's fp32 product path, so only fp16 can fail
    here; on a GPU both can.
    """
    C, HID, OUT, H, W = 16, 16, 17, 8, 8
    planes = torch.ones(1, 3, C, H, W)
    # 64 points: whole blocks of the default launch, so no masked row (f = 0, logit -2048) makes the
    # interpreter warn about exp overflowing in its (discarded) sigmoid.
    k = torch.randint(0, H, (1, 64, 3), generator=torch.Generator().manual_seed(3))
    xyz = ((2 * k + 1) / H - 1) / 2  # texel centres: one tap of weight 1 per plane
    w1, b1 = torch.zeros(HID, C), torch.zeros(HID)
    w1[0, 0], w1[1, 0] = 2048.0, 32.0
    w1[2, 0], w1[2, 1], b1[2] = 2048.0, 1.0, -2048.0
    w2, b2 = torch.zeros(OUT, HID), torch.zeros(OUT)
    w2[0, 2] = 1.0                                   # sigma = h2 = softplus(1)
    w2[1, 0], w2[1, 1], b2[1] = 1.0, 1.0 / 32, -2048.0  # o = 1
    inputs = [planes.to(dtype), xyz] + [t.to(dtype) for t in (w1, b1, w2, b2)]
    exact_s, exact_f = reference.triplane_field(*[t.double() for t in inputs])
    sigma, feat = triplane_field(*[t.to(DEVICE) for t in inputs], impl="triton")
    tol = HALF_OUTPUT_EPS * torch.finfo(dtype).eps
    torch.testing.assert_close(sigma.double().cpu(), exact_s, atol=tol, rtol=0)
    torch.testing.assert_close(feat.double().cpu(), exact_f, atol=tol, rtol=0)
