"""The fused compositing op: every back end against the reference, against nerfacc, and its gradients."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from composite_cases import (BACKENDS, CASES, CompositeCase, device_of, FP32_ATOL, FP32_GRAD_ATOL, FP32_GRAD_RTOL,
                             FP32_RTOL, FP64_ATOL, FP64_OPAQUE_GRAD_ATOL, FP64_RTOL, HALF_ATOL, make_dense,
                             make_packed, OPAQUE_SIGMA_SCALE)
from talk3d import extension
from talk3d.ops import composite, reference
from talk3d.ops.composite import available_impls

HAS_NERFACC = importlib.util.find_spec("nerfacc") is not None
# float64 compositing against nerfacc's: they differ only by EG3D's 1e-10 guard in each of <= 47
# transmittance factors, which moves each weight by <= 4.7e-9 (absolute; T <= 1). Measured (torch and
# cpu): 2.3e-9 on the image, 1.9e-9 on the weight sum, 8.1e-10 on the depth (CPU VM).
NERFACC_ATOL = NERFACC_RTOL = 1e-8
# The reference against the MipRayMarcher2 steps written out in scalar float64: 4 intervals, values
# up to 2.7 (an ulp is 4.4e-16). Measured: bit-identical (CPU VM).
EG3D_LOOP_ATOL = 1e-14



def run(impl, inputs, grad_outputs, packed_info=None, needs=(True, True, True)):
    ins = [x.detach().clone().requires_grad_(n) for x, n in zip(inputs, needs)]
    outs = composite(*ins, packed_info=packed_info, impl=impl)
    wanted = [x for x in ins if x.requires_grad]
    used = [(o, g) for o, g in zip(outs, grad_outputs) if o.requires_grad]  # depth ignores feat
    grads = iter(torch.autograd.grad([o for o, _ in used], wanted, [g for _, g in used]) if wanted else [])
    return [o.detach() for o in outs], [next(grads) if n else None for n in needs]


def reference64(inputs, grad_outputs, packed_info=None, needs=(True, True, True)):
    ins = [x.detach().to("cpu", torch.float64) for x in inputs]
    gos = [g.detach().to("cpu", torch.float64) for g in grad_outputs]
    pi = None if packed_info is None else packed_info.cpu()
    return run("torch", ins, gos, pi, needs)


def assert_close(name, actual, expected, atol, rtol):
    actual = actual.detach().to("cpu", torch.float64)
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    assert err <= atol + rtol * scale, f"{name}: max error {err:.3g} > {atol} + {rtol} * {scale:.3g}"


def grad_outputs_like(outs_shapes, dtype, device):
    return [torch.randn(s, dtype=dtype, device=device) for s in outs_shapes]


def check(impl, inputs, packed_info=None, dtype=torch.float32, needs=(True, True, True), opaque=False):
    device = device_of(impl)
    inputs = [x.to(device) for x in inputs]
    pi = None if packed_info is None else packed_info.to(device)
    lead = inputs[0].shape[:2] if pi is None else pi.shape[:1]
    F_ = inputs[1].shape[-1]
    gos = grad_outputs_like([(*lead, F_), (*lead, 1), (*lead, 1)], dtype, device)
    outs, grads = run(impl, inputs, gos, pi, needs)
    ref_outs, ref_grads = reference64(inputs, gos, pi, needs)
    if dtype == torch.float64:
        tol = dict(atol=FP64_ATOL, rtol=FP64_RTOL)
        gtol = dict(atol=FP64_OPAQUE_GRAD_ATOL, rtol=FP64_RTOL) if opaque else tol
    elif dtype == torch.float32:
        tol = dict(atol=FP32_ATOL, rtol=FP32_RTOL)
        gtol = dict(atol=FP32_GRAD_ATOL, rtol=FP32_GRAD_RTOL)
    else:  # half storage: judged against the reference on the same rounded inputs
        tol = dict(atol=HALF_ATOL[dtype], rtol=HALF_ATOL[dtype])
        gtol = tol
    for name, a, e in zip(("feat", "depth", "weight_sum"), outs, ref_outs):
        assert a.dtype == dtype
        assert_close(name, a, e, **tol)
    for name, g, e, n in zip(("d_sigma", "d_feat", "d_t"), grads, ref_grads, needs):
        if n:
            assert_close(name, g, e, **gtol)
        else:
            assert g is None and e is None


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c.B}R{c.R}S{c.S}F{c.F}s{c.sigma_scale:g}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_dense_matches_reference(impl, case, dtype):
    check(impl, make_dense(case, dtype), dtype=dtype, opaque=case.sigma_scale >= OPAQUE_SIGMA_SCALE)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_packed_matches_reference(impl, dtype):
    *inputs, pi = make_packed(CompositeCase(R=29, S=17, F=6), dtype)
    check(impl, inputs, pi, dtype=dtype)


@pytest.mark.parametrize("impl", BACKENDS)
def test_packed_equals_dense(impl):
    """A packed batch whose rays all hold S samples gives the dense result."""
    case = CompositeCase(B=1, R=11, S=9, F=4)
    sigma, feat, t = [x.to(device_of(impl)) for x in make_dense(case)]
    R, S = case.R, case.S
    pi = torch.stack([torch.arange(R) * S, torch.full((R,), S)], 1).to(device_of(impl))
    dense = composite(sigma, feat, t, impl=impl)
    packed = composite(sigma.view(R * S, 1), feat.view(R * S, -1), t.view(R * S, 1), packed_info=pi, impl=impl)
    for d, p in zip(dense, packed):
        torch.testing.assert_close(d[0], p, rtol=0, atol=0)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("needs", [(False, True, False), (True, False, False), (False, False, True)],
                         ids=["feat", "sigma", "t"])
def test_partial_gradients(impl, needs):
    check(impl, make_dense(CompositeCase(R=9, S=10)), needs=needs)


@pytest.mark.parametrize("impl", BACKENDS)
def test_noncontiguous_inputs(impl):
    sigma, feat, t = make_dense(CompositeCase(R=10, S=12, F=4))
    feat_nc = feat.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    assert not feat_nc.is_contiguous()
    check(impl, [sigma, feat_nc, t])


@pytest.mark.parametrize("impl", ["torch", *BACKENDS])
def test_gradcheck_float64(impl):
    """Analytic gradients against finite differences, dense and packed (empty rays included)."""
    case = CompositeCase(B=1, R=3, S=6, F=2)
    ins = [x.requires_grad_() for x in make_dense(case, torch.float64, device_of(impl))]
    assert torch.autograd.gradcheck(lambda s, f, t: composite(s, f, t, impl=impl), ins)
    *pins, pi = make_packed(CompositeCase(R=5, S=5, F=2), torch.float64, device_of(impl))
    pins = [x.requires_grad_() for x in pins]
    assert torch.autograd.gradcheck(lambda s, f, t: composite(s, f, t, packed_info=pi, impl=impl), pins)


@pytest.mark.parametrize("impl", BACKENDS)
def test_opaque_intervals_give_finite_gradients(impl):
    """alpha == 1 exactly in float32: a backward dividing by 1 - alpha would give inf/NaN here."""
    sigma, feat, t = make_dense(CompositeCase(B=1, R=8, S=12, F=3))
    sigma[:, :, 4:7] = 1e4  # exp(-x) underflows: alpha is exactly 1
    check(impl, [sigma, feat, t])


# A ray of almost no weight (W = 3.9e-5: two samples 2.1e-5 apart) whose depth, weight sum and
# features are all in the loss: float32 gradients in t must come within this of float64. The kernels'
# error is 4.3e-8 (CPU); before the thirteenth session their depth gradient summed g_depth t / W and
# -g_depth depth / W, terms of order 6e4 here, and was 2.9e-3 off. PyTorch's own float32 autograd of
# the reference misses by 5.8e-3 on this ray.
LOW_WEIGHT_DT_ATOL = 1e-5


@pytest.mark.parametrize("impl", BACKENDS)
def test_depth_gradient_of_a_ray_with_almost_no_weight(impl):
    device = device_of(impl)
    sigma64 = torch.tensor([6.479522228240967, -1.1150237321853638], dtype=torch.float64).view(1, 1, 2, 1)
    t64 = torch.tensor([2.3498785495758057, 2.3498997688293457], dtype=torch.float64).view(1, 1, 2, 1)
    feat64 = torch.tensor([0.3, 0.7], dtype=torch.float64).view(1, 1, 2, 1)

    def dt(dtype, run):
        ins = [x.to(device=device, dtype=dtype).clone().requires_grad_() for x in (sigma64, feat64, t64)]
        f, d, w = run(*ins)
        (0.4 * f.sum() + 0.7 * d.sum() - 1.3 * w.sum()).backward()
        return ins[2].grad.double().cpu(), w.item()

    want, W = dt(torch.float64, reference.composite)
    assert 0 < W < 1e-4  # the case is what it says
    got, _ = dt(torch.float32, lambda *x: composite(*x, impl=impl))
    assert (got - want).abs().max().item() <= LOW_WEIGHT_DT_ATOL, (got, want)


@pytest.mark.skipif(not HAS_NERFACC, reason="nerfacc not installed")
@pytest.mark.parametrize("impl", ["torch", BACKENDS[0]])
def test_matches_nerfacc(impl):
    """nerfacc's batched compositing (its PyTorch path) after converting EG3D's midpoint convention.

    nerfacc integrates one density and value per interval [t_start, t_end) and uses exp(-sum) for the
    transmittance (no 1e-10 guard): EG3D's intervals are fed as intervals with the mid-point density
    softplus(sigma_mid - 1) and mid-point features.
    """
    import nerfacc

    case = CompositeCase(B=2, R=50, S=48, F=8)
    sigma, feat, t = make_dense(case, torch.float64)
    img, depth, acc = composite(sigma, feat, t, impl=impl)
    t0, t1 = t[..., :-1, 0], t[..., 1:, 0]
    density = F.softplus((sigma[..., :-1, 0] + sigma[..., 1:, 0]) / 2 - 1)
    w, _, _ = nerfacc.render_weight_from_density(t0.reshape(-1, case.S - 1), t1.reshape(-1, case.S - 1),
                                                 density.reshape(-1, case.S - 1))
    f_mid = ((feat[..., :-1, :] + feat[..., 1:, :]) / 2).reshape(-1, case.S - 1, case.F)
    n_img = nerfacc.accumulate_along_rays(w, f_mid) * 2 - 1
    n_acc = nerfacc.accumulate_along_rays(w, None)
    n_depth = nerfacc.accumulate_along_rays(w, ((t0 + t1) / 2).reshape(-1, case.S - 1, 1)) / n_acc
    # The only difference is EG3D's 1e-10 guard (see NERFACC_ATOL).
    torch.testing.assert_close(img.reshape(-1, case.F), n_img, rtol=NERFACC_RTOL, atol=NERFACC_ATOL)
    torch.testing.assert_close(acc.reshape(-1, 1), n_acc, rtol=NERFACC_RTOL, atol=NERFACC_ATOL)
    torch.testing.assert_close(depth.reshape(-1, 1), n_depth, rtol=NERFACC_RTOL, atol=NERFACC_ATOL)


def test_reference_matches_eg3d_formula_written_out():
    """The reference against the MipRayMarcher2 steps written out one by one on a single ray."""
    s = torch.tensor([-3.0, 0.5, 4.0, 10.0, -1.0], dtype=torch.float64)
    f = torch.tensor([[0.1], [0.9], [0.4], [0.2], [0.7]], dtype=torch.float64)
    t = torch.tensor([2.3, 2.5, 2.6, 2.9, 3.2], dtype=torch.float64)
    T, C, D, W = 1.0, 0.0, 0.0, 0.0
    for i in range(4):
        x = math.log1p(math.exp((s[i] + s[i + 1]).item() / 2 - 1)) * (t[i + 1] - t[i]).item()
        a = 1 - math.exp(-x)
        w = a * T
        T *= 1 - a + 1e-10
        C += w * (f[i, 0] + f[i + 1, 0]).item() / 2
        D += w * (t[i] + t[i + 1]).item() / 2
        W += w
    img, depth, acc = reference.composite(s.view(1, 1, 5, 1), f.view(1, 1, 5, 1), t.view(1, 1, 5, 1))
    assert img.item() == pytest.approx(2 * C - 1, abs=EG3D_LOOP_ATOL)
    assert depth.item() == pytest.approx(D / W, abs=EG3D_LOOP_ATOL)
    assert acc.item() == pytest.approx(W, abs=EG3D_LOOP_ATOL)


def test_zero_weight_ray_depth_is_far_end():
    """A ray with no weight (zero-length intervals): depth NaN -> inf -> clamped to t.max()."""
    sigma = torch.zeros(1, 2, 3, 1)
    feat = torch.rand(1, 2, 3, 2)
    t = torch.tensor([2.5, 2.6, 2.7, 3.0, 3.0, 3.0]).view(1, 2, 3, 1)
    for impl in available_impls("cpu"):
        img, depth, acc = composite(sigma, feat, t, impl=impl)
        assert acc[0, 1].item() == 0 and depth[0, 1].item() == pytest.approx(3.0)
        assert torch.equal(img[0, 1], torch.full((2,), -1.0))


@pytest.mark.skipif(not extension.available(), reason="talk3d._C not built")
def test_opcheck():
    sigma, feat, t = make_dense(CompositeCase(B=1, R=4, S=6, F=3))
    args = (sigma.requires_grad_(), feat.requires_grad_(), t.requires_grad_(), None)
    torch.library.opcheck(torch.ops.talk3d.composite_fwd.default, args)
    # Every ray with an interval: no NaN depth (opcheck compares outputs without equal_nan).
    p = [x[0, 0] for x in make_dense(CompositeCase(B=1, R=1, S=9, F=3))]
    pi = torch.tensor([[0, 2], [2, 3], [6, 3]])
    torch.library.opcheck(torch.ops.talk3d.composite_fwd.default, (*[x.requires_grad_() for x in p], pi))
    # The backward op on its own (its fake implementation and schema), dense and packed.
    for inputs, info in ((args[:3], None), (p, pi)):
        plain = [x.detach() for x in inputs]
        outs = torch.ops.talk3d.composite_fwd(*plain, info)
        grads = [torch.randn_like(o) for o in outs]
        torch.library.opcheck(torch.ops.talk3d.composite_bwd.default, (*grads, *plain, info, *outs, [True, True, True]))
        torch.library.opcheck(torch.ops.talk3d.composite_bwd.default, (*grads, *plain, info, *outs, [True, False, True]))


@pytest.mark.skipif(not extension.available(), reason="talk3d._C not built")
def test_torch_compile():
    sigma, feat, t = make_dense(CompositeCase(B=1, R=6, S=8, F=3))
    fn = torch.compile(lambda s, f, t: torch.ops.talk3d.composite_fwd(s, f, t, None), fullgraph=True)
    for a, b in zip(fn(sigma, feat, t), torch.ops.talk3d.composite_fwd(sigma, feat, t, None)):
        torch.testing.assert_close(a, b, equal_nan=True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_cuda_half_precision(dtype):
    inputs = make_dense(CompositeCase(B=1, R=64, S=96, F=32), dtype, "cuda")
    check("cuda", inputs, dtype=dtype)


BAD = [
    ("sigma must be", lambda s, f, t: (s[..., 0], f, t, None)),
    ("feat must be", lambda s, f, t: (s, f[:, :, :-1], t, None)),
    ("t must be", lambda s, f, t: (s, f, t[:, :, :-1], None)),
    ("dtype", lambda s, f, t: (s, f.double(), t, None)),
    ("sorted", lambda s, f, t: (s, f, t.flip(2), None)),
    ("at least 2 samples", lambda s, f, t: (s[:, :, :1], f[:, :, :1], t[:, :, :1], None)),
    ("packed_info must be int64", lambda s, f, t: (s[0, 0], f[0, 0], t[0, 0], torch.zeros(1, 2))),
    ("outside", lambda s, f, t: (s[0, 0], f[0, 0], t[0, 0], torch.tensor([[2, 7]]))),
    ("impl must be", None),
]


@pytest.mark.parametrize("match,make", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_raise(match, make):
    sigma, feat, t = make_dense(CompositeCase(B=1, R=3, S=6, F=2))
    if make is None:
        with pytest.raises(ValueError, match=match):
            composite(sigma, feat, t, impl="triton")
        return
    s, f, tt, pi = make(sigma, feat, t)
    with pytest.raises((ValueError, TypeError), match=match):
        composite(s, f, tt, packed_info=pi)


def test_unchecked_order_skips_only_the_sortedness_check():
    """check_sorted=False (the renderer's: its depths come out of torch.sort) reads nothing back
    from the device; shapes and packed ranges are still checked."""
    sigma, feat, t = make_dense(CompositeCase(B=1, R=3, S=6, F=2))
    flipped = t.flip(2)
    img, _, _ = composite(sigma, feat, flipped, impl="torch", check_sorted=False)  # no error
    assert img.shape == (1, 3, 2)
    with pytest.raises(ValueError, match="sorted"):
        composite(sigma, feat, flipped, impl="torch")
    with pytest.raises(ValueError, match="t must be"):
        composite(sigma, feat, t[:, :, :-1], check_sorted=False)
    s, f, tt = sigma[0, 0], feat[0, 0], flipped[0, 0]  # packed: one ray of 6 samples, out of order
    composite(s, f, tt, packed_info=torch.tensor([[0, 6]]), impl="torch", check_sorted=False)
    with pytest.raises(ValueError, match="sorted"):
        composite(s, f, tt, packed_info=torch.tensor([[0, 6]]), impl="torch")
    with pytest.raises(ValueError, match="outside"):
        composite(s, f, tt, packed_info=torch.tensor([[2, 7]]), check_sorted=False)
