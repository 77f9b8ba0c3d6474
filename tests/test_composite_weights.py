"""composite_weights (each sample's weight in the compositing's feature sum): every back end against
the reference, the identity with the compositing op, gradients, opcheck and bad inputs."""
from __future__ import annotations

import pytest
import torch

from composite_cases import (BACKENDS, CASES, CompositeCase, FP32_ATOL, FP32_GRAD_ATOL, FP32_GRAD_RTOL, FP32_RTOL,
                             FP64_ATOL, FP64_OPAQUE_GRAD_ATOL, FP64_RTOL, HALF_ATOL, make_dense, OPAQUE_SIGMA_SCALE)
from composite_cases import device_of as _device
from talk3d import extension
from talk3d.ops import composite, composite_weights

def _run(impl, sigma, t, grads, needs=(True, True)):
    ins = [x.detach().clone().requires_grad_(n) for x, n in zip((sigma, t), needs)]
    outs = composite_weights(*ins, impl=impl)
    wanted = [x for x in ins if x.requires_grad]
    got = iter(torch.autograd.grad(outs, wanted, grads) if wanted else [])
    return [o.detach() for o in outs], [next(got) if n else None for n in needs]


def _grads_like(outs_shapes, dtype, device):
    return [torch.randn(s, dtype=torch.float64).to(device, dtype) for s in outs_shapes]


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(impl, case, dtype):
    sigma, _, t = make_dense(case, dtype, _device(impl))
    B, R, S = sigma.shape[:3]
    grads = _grads_like([(B, R, S, 1), (B, R, 1), (B, R, 1)], dtype, sigma.device)
    outs, dins = _run(impl, sigma, t, grads)
    ref_outs, ref_dins = _run("torch", sigma.cpu().double(), t.cpu().double(), [g.cpu().double() for g in grads])
    atol, rtol = (FP64_ATOL, FP64_RTOL) if dtype == torch.float64 else (FP32_ATOL, FP32_RTOL)
    gatol, grtol = (FP64_ATOL, FP64_RTOL) if dtype == torch.float64 else (FP32_GRAD_ATOL, FP32_GRAD_RTOL)
    if dtype == torch.float64 and case.sigma_scale >= OPAQUE_SIGMA_SCALE:
        gatol = FP64_OPAQUE_GRAD_ATOL
    for name, a, e in zip(("omega", "depth", "weight_sum"), outs, ref_outs):
        torch.testing.assert_close(a.cpu().double(), e, atol=atol, rtol=rtol, msg=name)
    for name, a, e in zip(("dsigma", "dt"), dins, ref_dins):
        torch.testing.assert_close(a.cpu().double(), e, atol=gatol, rtol=grtol, msg=name)


@pytest.mark.parametrize("impl", ["torch", *BACKENDS])
def test_weighted_sum_is_the_composited_feature_image(impl):
    """2 sum_j omega_j f_j - 1 == composite's feature image, in any order of the samples."""
    sigma, feat, t = make_dense(CompositeCase(B=2, R=9, S=12, F=4), torch.float64, _device(impl))
    img, depth, wsum = composite(sigma, feat, t, impl="torch")
    omega, depth_w, wsum_w = composite_weights(sigma, t, impl=impl)
    torch.testing.assert_close(2 * (omega * feat).sum(dim=2) - 1, img, atol=FP64_ATOL, rtol=FP64_RTOL)
    torch.testing.assert_close(depth_w, depth, atol=FP64_ATOL, rtol=FP64_RTOL)
    torch.testing.assert_close(wsum_w, wsum, atol=FP64_ATOL, rtol=FP64_RTOL)
    perm = torch.randperm(12, device=feat.device)
    shuffled = 2 * torch.einsum("brs,brsf->brf", omega[..., perm, 0], feat[:, :, perm]) - 1
    torch.testing.assert_close(shuffled, img, atol=FP64_ATOL, rtol=FP64_RTOL)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("needs", [(True, False), (False, True), (False, False)])
def test_partial_gradients(impl, needs):
    sigma, _, t = make_dense(CompositeCase(), torch.float64, _device(impl))
    B, R, S = sigma.shape[:3]
    grads = _grads_like([(B, R, S, 1), (B, R, 1), (B, R, 1)], torch.float64, sigma.device)
    _, dins = _run(impl, sigma, t, grads, needs)
    _, full = _run(impl, sigma, t, grads)
    for d, f, n in zip(dins, full, needs):
        assert (d is None) == (not n)
        if n:
            torch.testing.assert_close(d, f, atol=0, rtol=0)


@pytest.mark.parametrize("impl", BACKENDS)
def test_noncontiguous_inputs(impl):
    sigma, _, t = make_dense(CompositeCase(B=2, R=10, S=8, F=1), torch.float64, _device(impl))
    sigma_nc = sigma.transpose(0, 1).contiguous().transpose(0, 1)  # same values, permuted strides
    assert not sigma_nc.is_contiguous()
    for a, e in zip(composite_weights(sigma_nc, t, impl=impl), composite_weights(sigma, t, impl="torch")):
        torch.testing.assert_close(a, e, atol=FP64_ATOL, rtol=FP64_RTOL, equal_nan=True)


@pytest.mark.parametrize("impl", ["torch", *BACKENDS])
def test_gradcheck_float64(impl):
    sigma, _, t = make_dense(CompositeCase(B=1, R=3, S=6, F=1), torch.float64, _device(impl))
    ins = [sigma.requires_grad_(), t.requires_grad_()]
    assert torch.autograd.gradcheck(lambda s, tt: composite_weights(s, tt, impl=impl), ins)


@pytest.mark.parametrize("impl", BACKENDS)
def test_opaque_intervals_give_finite_gradients(impl):
    sigma, _, t = make_dense(CompositeCase(R=16, S=20, sigma_scale=40.0, sigma_shift=30.0), torch.float32,
                             _device(impl))
    B, R, S = sigma.shape[:3]
    grads = _grads_like([(B, R, S, 1), (B, R, 1), (B, R, 1)], torch.float32, sigma.device)
    _, (ds, dt) = _run(impl, sigma, t, grads)
    assert torch.isfinite(ds).all() and torch.isfinite(dt).all()


@pytest.mark.skipif(not extension.available(), reason="talk3d._C not built")
def test_opcheck():
    sigma, _, t = make_dense(CompositeCase(B=1, R=6, S=8, F=1), torch.float64)
    torch.library.opcheck(torch.ops.talk3d.composite_weights_fwd.default,
                          (sigma.requires_grad_(), t.requires_grad_()))
    plain = [sigma.detach(), t.detach()]
    outs = torch.ops.talk3d.composite_weights_fwd(*plain)
    grads = [torch.randn_like(o) for o in outs]
    for needs in ([True, True], [False, True]):
        torch.library.opcheck(torch.ops.talk3d.composite_weights_bwd.default, (*grads, *plain, *outs, needs))


@pytest.mark.skipif(not extension.available(), reason="talk3d._C not built")
def test_torch_compile():
    sigma, _, t = make_dense(CompositeCase(B=1, R=6, S=8, F=1))
    fn = torch.compile(lambda s, tt: torch.ops.talk3d.composite_weights_fwd(s, tt), fullgraph=True,
                       backend="aot_eager")
    for a, e in zip(fn(sigma, t), torch.ops.talk3d.composite_weights_fwd(sigma, t)):
        torch.testing.assert_close(a, e, equal_nan=True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision(dtype):
    sigma, _, t = make_dense(CompositeCase(B=1, R=64, S=96, F=1), torch.float32, "cuda")
    # Depths in half precision: rounded once, then the reference runs on the same rounded values.
    sigma_h, t_h = sigma.to(dtype), t.to(dtype).sort(dim=2).values
    got = composite_weights(sigma_h, t_h, impl="cuda")
    ref = composite_weights(sigma_h.double(), t_h.double(), impl="torch")
    for a, e in zip(got, ref):
        torch.testing.assert_close(a.double(), e, atol=HALF_ATOL[dtype], rtol=HALF_ATOL[dtype], equal_nan=True)


def test_unchecked_order_skips_only_the_sortedness_check():
    sigma, t = torch.zeros(1, 1, 3, 1), torch.tensor([3.0, 2.0, 1.0]).reshape(1, 1, 3, 1)
    omega, _, _ = composite_weights(sigma, t, impl="torch", check_sorted=False)  # no error, no sync
    assert omega.shape == sigma.shape
    with pytest.raises(ValueError, match="t must be"):
        composite_weights(sigma, t[:, :, :2], check_sorted=False)


@pytest.mark.parametrize("match,make", [
    ("sigma must be", lambda: (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))),
    ("t must be", lambda: (torch.zeros(1, 2, 4, 1), torch.zeros(1, 2, 5, 1))),
    ("at least 2 samples", lambda: (torch.zeros(1, 2, 1, 1), torch.zeros(1, 2, 1, 1))),
    ("sorted", lambda: (torch.zeros(1, 1, 3, 1), torch.tensor([3.0, 2.0, 1.0]).reshape(1, 1, 3, 1))),
])
def test_bad_inputs_raise(match, make):
    with pytest.raises(ValueError, match=match):
        composite_weights(*make(), impl="auto")
    with pytest.raises(TypeError, match="dtype"):
        composite_weights(torch.zeros(1, 2, 4, 1), torch.zeros(1, 2, 4, 1, dtype=torch.float64))


def test_zero_weight_ray_depth_is_far_end():
    """As composite's (test_composite.py): a ray with no weight (zero-length intervals) gets depth
    t.max() on every back end, not the compiled kernels' raw 0 / 0 = NaN; its omegas are 0."""
    from talk3d.ops.composite import available_impls

    sigma = torch.zeros(1, 2, 3, 1)
    t = torch.tensor([2.5, 2.6, 2.7, 3.0, 3.0, 3.0]).view(1, 2, 3, 1)
    for impl in available_impls("cpu"):
        omega, depth, acc = composite_weights(sigma, t, impl=impl)
        assert acc[0, 1].item() == 0 and not omega[0, 1].any()
        assert depth[0, 1].item() == pytest.approx(3.0), impl
