"""Edge cases of the hand-written kernels that the per-op suites did not reach, each found by a mutation
audit (a small slip in the kernel that every other test let through): rays without weight, dense
single-sample rays, bias_act's clamp of 0, axis-parallel rays on the occupancy cube's faces and
rays starting on a cell face."""
from __future__ import annotations

import pytest
import torch

from composite_cases import BACKENDS, FP64_ATOL, FP64_RTOL, device_of
from talk3d import extension
from talk3d.ops import bias_act, composite, occupied_intervals, reference
from talk3d.ops.reference.occupancy import pack_bits

# bias_act in float64 against its float64 reference: an add, a multiply or two and a clamp per
# element, so agreement to a few ulps (the value test_bias_act.py uses for float64).
BIAS_ACT_FP64_TOL = 1e-14

# ------------------------------------------------------------------------------------------------
# Compositing
# ------------------------------------------------------------------------------------------------


def _composite_grads(impl, sigma, feat, t, gos):
    ins = [x.detach().clone().to(device_of(impl)).requires_grad_() for x in (sigma, feat, t)]
    outs = composite(*ins, impl=impl)
    grads = torch.autograd.grad(outs, ins, [g.to(device_of(impl)) for g in gos])
    return [o.detach().cpu() for o in outs], [g.cpu() for g in grads]


@pytest.mark.parametrize("impl", BACKENDS)
def test_zero_weight_ray_backward_matches_reference(impl):
    """A ray whose intervals all have zero length has W = 0 and depth NaN: the op gives it no depth
    gradient (its doc), and its other gradients stay finite and equal the reference's. Next to it an
    ordinary ray, whose gradients must be unaffected."""
    torch.manual_seed(0)
    sigma = torch.randn(1, 2, 5, 1, dtype=torch.float64)
    feat = torch.rand(1, 2, 5, 3, dtype=torch.float64)
    t = torch.tensor([2.3, 2.5, 2.6, 2.9, 3.2] + [3.0] * 5, dtype=torch.float64).view(1, 2, 5, 1)
    g_feat, g_depth, g_wsum = torch.randn(1, 2, 3, dtype=torch.float64), torch.randn(1, 2, 1, dtype=torch.float64), \
        torch.randn(1, 2, 1, dtype=torch.float64)
    # The reference turns the NaN depth into t.max() and would route a depth gradient there: the
    # zero-weight ray's depth is left out of the comparison's loss.
    g_depth[0, 1] = 0.0
    outs, grads = _composite_grads(impl, sigma, feat, t, (g_feat, g_depth, g_wsum))
    _, ref_grads = _composite_grads("torch", sigma, feat, t, (g_feat, g_depth, g_wsum))
    assert outs[2][0, 1].item() == 0.0  # no weight (the wrapper turns its NaN depth into the far end)
    for name, g, e in zip(("d_sigma", "d_feat", "d_t"), grads, ref_grads):
        assert torch.isfinite(g).all(), f"{name}: non-finite values"
        torch.testing.assert_close(g, e, atol=FP64_ATOL, rtol=FP64_RTOL, msg=name)
    # The op itself (before the wrapper's NaN clean-up, which routes a depth gradient to the far
    # end) gives the zero-weight ray no depth gradient: its gradients ignore g_depth there.
    ins = [x.to(device_of(impl)) for x in (sigma, feat, t)]
    out = torch.ops.talk3d.composite_fwd(*ins, None)
    assert torch.isnan(out[1][0, 1]).all()
    gos = [x.to(device_of(impl)) for x in (g_feat, g_depth, g_wsum)]
    want = torch.ops.talk3d.composite_bwd(*gos, *ins, None, *out, [True, True, True])
    gos[1][0, 1] = 1.0
    got = torch.ops.talk3d.composite_bwd(*gos, *ins, None, *out, [True, True, True])
    for name, g, w in zip(("d_sigma", "d_feat", "d_t"), got, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0, msg=name)


def _poison_allocator(*likes, copies=16):
    """Fill and free NaN tensors shaped like `likes`: an uninitialised buffer the op allocates
    next (at::empty) most likely reuses one, so an output element it forgets to write shows."""
    junk = [torch.full_like(x, float("nan")) for x in likes for _ in range(copies)]
    del junk


@pytest.mark.skipif(not extension.available(), reason="talk3d._C not built")
def test_dense_single_sample_rays_get_zero_weights_and_gradients():
    """Dense rays of one sample have no interval: the sample's weight omega and all its gradients
    are zero. The Python wrappers ask for S >= 2, but the registered ops take S = 1 (the CUDA
    emulation test runs that case against them), and they allocate their dense outputs
    uninitialised (at::empty), so the kernels must write these zeros."""
    R, F = 37, 3
    torch.manual_seed(0)
    sigma = torch.randn(1, R, 1, 1)
    feat = torch.rand(1, R, 1, F)
    t = torch.rand(1, R, 1, 1) + 2.0
    for _ in range(3):
        _poison_allocator(sigma, feat, t)
        out = torch.ops.talk3d.composite_fwd(sigma, feat, t, None)
        assert torch.equal(out[0], torch.full_like(out[0], -1.0)) and not out[2].any()
        gos = [torch.randn_like(o) for o in out]
        _poison_allocator(sigma, feat, t)
        for g in torch.ops.talk3d.composite_bwd(*gos, sigma, feat, t, None, *out, [True, True, True]):
            assert torch.equal(g, torch.zeros_like(g))
        _poison_allocator(sigma, t)
        omega, depth, wsum = torch.ops.talk3d.composite_weights_fwd(sigma, t)
        assert torch.equal(omega, torch.zeros_like(omega)) and not wsum.any()
        gos = [torch.randn_like(o) for o in (omega, depth, wsum)]
        _poison_allocator(sigma, t)
        for g in torch.ops.talk3d.composite_weights_bwd(*gos, sigma, t, omega, depth, wsum, [True, True]):
            assert torch.equal(g, torch.zeros_like(g))


# ------------------------------------------------------------------------------------------------
# bias_act
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_bias_act_clamp_zero(impl, memory_format):
    """clamp = 0 is a valid bound (``clamp >= 0``): every output is 0 and no gradient passes, as the
    reference's x.clamp(-0, 0) gives (its gradient is nonzero only where x + b is exactly 0)."""
    dev = device_of(impl)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, device=dev).to(memory_format=memory_format).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, device=dev, requires_grad=True)
    y = bias_act(x, b, slope=0.2, gain=2**0.5, clamp=0.0, impl=impl)
    gy = torch.randn_like(y)
    dx, db = torch.autograd.grad(y, (x, b), gy)
    x64, b64 = x.detach().cpu().requires_grad_(), b.detach().cpu().requires_grad_()
    y64 = reference.bias_act(x64, b64, slope=0.2, gain=2**0.5, clamp=0.0)
    dx64, db64 = torch.autograd.grad(y64, (x64, b64), gy.cpu())
    for name, got, want in (("y", y, y64), ("dx", dx, dx64), ("db", db, db64)):
        err = (got.detach().cpu() - want).abs().max().item()
        assert err <= BIAS_ACT_FP64_TOL, f"{name}: max error {err:.3g}"
    assert not y.detach().any() and not dx.any() and not db.any()


# ------------------------------------------------------------------------------------------------
# Occupancy marching
# ------------------------------------------------------------------------------------------------

OCC_BACKENDS = ["torch", *BACKENDS]


@pytest.mark.parametrize("impl", OCC_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_axis_parallel_rays_on_the_cube_faces(impl, dtype):
    """Rays down -z lying in a face plane of the cube (x or y = +-box/2, exactly representable) are
    inside the cube, as the reference's closed slabs say: they cross the border cells. Each ray runs
    over one occupied border cell and hits it (hand computed)."""
    res, box = 4, 1.0  # cells of 0.25; cell z = 1 spans z in [-0.25, 0]
    half = box / 2
    occ = torch.zeros(res, res, res, dtype=torch.bool)  # [z, y, x]
    # (x, y) of each ray and the border cell (x, y) under it; every other coordinate inside cell 2.
    rays_xy = [(half, 0.1), (-half, 0.1), (0.1, half), (0.1, -half)]
    cells_xy = [(3, 2), (0, 2), (2, 3), (2, 0)]
    for cx, cy in cells_xy:
        occ[1, cy, cx] = True
    o = torch.tensor([[x, y, 2.73] for x, y in rays_xy], dtype=torch.float64)[None]
    d = torch.tensor([[0.0, 0.0, -1.0]] * 4, dtype=torch.float64)[None]
    t = torch.linspace(2.0, 3.4, 15, dtype=torch.float64).expand(1, 4, 15).contiguous()  # step 0.1
    device = device_of(impl) if impl != "torch" else "cpu"
    got = occupied_intervals(*(v.to(device, dtype) for v in (o, d, t)), pack_bits(occ).to(device), res, box, False,
                             impl=impl).cpu()
    # The occupied cell spans depths [2.73, 2.98]: intervals [2.7, 2.8] (7) .. [2.9, 3.0] (9).
    assert got.tolist() == [[[7, 9]] * 4]


@pytest.mark.parametrize("impl", OCC_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_rays_starting_on_a_cell_face(impl, dtype):
    """Two rays start at depth 0 exactly on the face z = 0 between cells z = 1 and z = 2 (cell z = 2
    occupied): the one going up runs through the occupied cell, the one going down only touches it
    at its start, a zero-length contact that is no hit (the reference's a < b). Hand computed."""
    res, box = 4, 1.0  # cells of 0.25; x = y = 0.1 lies inside cell 2
    occ = torch.zeros(res, res, res, dtype=torch.bool)  # [z, y, x]
    occ[2, 2, 2] = True  # z in [0, 0.25]
    o = torch.tensor([[[0.1, 0.1, 0.0]] * 2], dtype=torch.float64)
    d = torch.tensor([[[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]]], dtype=torch.float64)
    t = torch.linspace(0.0, 1.4, 15, dtype=torch.float64).expand(1, 2, 15).contiguous()  # step 0.1
    device = device_of(impl) if impl != "torch" else "cpu"
    got = occupied_intervals(*(v.to(device, dtype) for v in (o, d, t)), pack_bits(occ).to(device), res, box, False,
                             impl=impl).cpu()
    # Up: occupied over depths [0, 0.25], intervals 0 .. 2. Down: nothing.
    assert got.tolist() == [[[0, 2], [-1, -1]]]


@pytest.mark.parametrize("impl", OCC_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("res", [4, 8])
def test_rays_along_internal_cell_faces_touch_both_cells(impl, dtype, res):
    """A ray down -z lying in the plane between two columns of cells (x = a cell boundary, or x and
    y both: along an edge, between four) runs through every one of them: the cells are closed boxes,
    as the reference intersects them. The kernels' walk used to look at the cell on the + side only
    and missed an occupied cell on the - side (found by the kernel mutation audit). Each case
    occupies one of the touching cells, at z cell 1; the answer is computed by hand."""
    box = 1.0  # cell boundaries at multiples of 1/4 or 1/8, exact in binary: x = 0 is one of them
    half, cell, m = box / 2, box / res, res // 2  # x = 0 lies between cells m - 1 and m
    z_lo = 1 * cell - half  # the occupied cells' z slab [z_lo, z_lo + cell]
    cases = []  # (ray origin (x, y), occupied cell (x, y))
    for cx in (m - 1, m):  # on the face x = 0, y inside cell m
        cases.append(((0.0, 0.5 * cell), (cx, m)))
    for cx in (m - 1, m):  # on the edge x = y = 0
        for cy in (m - 1, m):
            cases.append(((0.0, 0.0), (cx, cy)))
    for cy in (m - 1, m):  # on the face y = 0, x inside cell m
        cases.append(((0.5 * cell, 0.0), (m, cy)))
    o_z, t = 2.73, torch.linspace(2.0, 3.4, 15, dtype=torch.float64)  # depth step 0.1
    # The ray is at z = o_z - depth: it is in the occupied slab for depths [o_z - z_lo - cell, o_z - z_lo].
    first, last = o_z - z_lo - cell, o_z - z_lo
    ks = [i for i in range(len(t) - 1) if t[i + 1] >= first and t[i] <= last]
    want = [ks[0], ks[-1]]
    device = device_of(impl) if impl != "torch" else "cpu"
    for (x, y), (cx, cy) in cases:
        occ = torch.zeros(res, res, res, dtype=torch.bool)  # [z, y, x]
        occ[1, cy, cx] = True
        o = torch.tensor([[[x, y, o_z]]], dtype=torch.float64)
        d = torch.tensor([[[0.0, 0.0, -1.0]]], dtype=torch.float64)
        got = occupied_intervals(*(v.to(device, dtype) for v in (o, d, t.view(1, 1, -1))), pack_bits(occ).to(device),
                                 res, box, False, impl=impl).cpu()
        assert got.view(-1).tolist() == want, f"ray at (x, y) = ({x}, {y}), occupied cell {(cx, cy)}"
        # A cell not touching the ray stays empty: one column further on each side.
        far = torch.zeros_like(occ)
        far[1, cy, cx + (1 if cx >= m else -1)] = True
        got = occupied_intervals(*(v.to(device, dtype) for v in (o, d, t.view(1, 1, -1))), pack_bits(far).to(device),
                                 res, box, False, impl=impl).cpu()
        assert got.view(-1).tolist() == [-1, -1], f"ray at (x, y) = ({x}, {y}), occupied cell away from it"
