"""The CPU field backward's phase B (points bucketed into (batch element, plane, 8-row band) units,
each band summed in a buffer and written channels-last or transposed into the API layout), on the
cases its bookkeeping can get wrong: planes smaller than a band or not a whole number of bands,
ragged channel counts (the 8 x 8 transpose's edges), points on band boundaries and outside the
planes, chunks of a few points crossing batch elements, every subset of gradients, and thread
counts (the plane gradient sums each element's points in point order whatever the thread count)."""
from __future__ import annotations

import itertools

import pytest
import torch

from field_cases import FieldCase, make_field_inputs
from talk3d import extension
from talk3d.ops import reference, triplane_field

pytestmark = pytest.mark.skipif(not extension.available(), reason="talk3d._C not built")

ARG_NAMES = ("planes", "xyz", "w1", "b1", "w2", "b2")
# float64 kernels against the float64 reference: the same sums, in another order.
FP64_ATOL, FP64_RTOL = 1e-10, 1e-10
# float32 kernels against float64 on points off the texel edges (see field_cases.TEXEL_EDGE_MARGIN).
FP32_ATOL, FP32_RTOL = 3e-5, 1e-4
# A float32 point whose row the kernel takes one way or the other (see
# test_cpu_rows_decided_by_rounding_land_in_their_band): its dxyz must match the float64 reference
# evaluated just below or just above the edge. The two differ by the bilinear slope change, O(1)
# times the texels per unit; agreeing with one of them to this tolerance tells them apart.
EDGE_DXYZ_ATOL = 1e-3
# How far (in world units) the float64 references are moved off such an edge.
EDGE_NUDGE = 1e-7
# Points per chunk that make many chunks of a few dozen points, crossing batch elements. (Chunks of
# one point are tested on few points: each chunk is several parallel regions, and on a loaded 2-core
# machine thousands of them take seconds.)
SMALL_CHUNKS = (7, 50)
# ulps searched on each side of every texel edge for rows that rounding decides.
SEARCH_ULPS = 200

NEEDS = {
    "all": (True,) * 6,
    "planes": (True, False, False, False, False, False),
    "xyz": (False, True, False, False, False, False),
    "planes+xyz": (True, True, False, False, False, False),
    "weights": (False, False, True, True, True, True),
}


def _grads(fn, inputs, grad_outputs, needs):
    ins = [t.detach().requires_grad_(n) for t, n in zip(inputs, needs)]
    sigma, feat = fn(*ins)
    wanted = [t for t in ins if t.requires_grad]
    grads = iter(torch.autograd.grad((sigma, feat), wanted, grad_outputs))
    return [sigma.detach(), feat.detach()] + [next(grads) if n else None for n in needs]


def _kernel(inputs, grad_outputs, needs=(True,) * 6, axes="fixed", box_warp=1.0):
    fn = lambda *a: triplane_field(*a, box_warp=box_warp, axes=axes, impl="cpu")  # noqa: E731
    return _grads(fn, inputs, grad_outputs, needs)


def _reference(inputs, grad_outputs, needs=(True,) * 6, axes="fixed", box_warp=1.0):
    fn = lambda *a: reference.triplane_field(*a, box_warp=box_warp, axes=axes)  # noqa: E731
    return _grads(fn, [t.double() for t in inputs], [g.double() for g in grad_outputs], needs)


def _assert_matches(got, want, atol, rtol, what):
    for name, g, w in zip(("sigma", "feat") + tuple("d" + n for n in ARG_NAMES), got, want):
        if w is None:
            assert g is None, f"{what}: {name} was not asked for"
            continue
        err = (g.double() - w).abs().max().item()
        scale = w.abs().max().item()
        assert err <= atol + rtol * scale, f"{what}: {name} max error {err:.3g} (scale {scale:.3g})"


def _inputs(case, dtype=torch.float64, layout="api", seed=0):
    torch.manual_seed(seed)
    inputs = list(make_field_inputs(case, dtype=dtype, planes_layout=layout))
    gos = [torch.randn(case.B, case.N, 1, dtype=dtype), torch.randn(case.B, case.N, case.out - 1, dtype=dtype)]
    return inputs, gos


def _world(pixel, size, box_warp=1.0):
    """World coordinate whose texel coordinate (align_corners=False) along `size` pixels is `pixel`."""
    return ((2 * pixel + 1) / size - 1) * box_warp / 2


@pytest.mark.parametrize("layout", ["api", "channels_last", "strided"])
@pytest.mark.parametrize("HW", [(1, 1), (2, 1), (1, 5), (3, 4), (7, 1), (8, 3), (9, 2), (17, 5)], ids=str)
def test_cpu_small_and_ragged_planes(HW, layout, monkeypatch):
    """Planes smaller than one band of rows (H < 8, H = 1, W = 1) or not a whole number of bands, with
    channel counts the transpose's 8 x 8 blocks do not divide (1, 3, 9) and the EG3D sizes, three batch
    elements in chunks of 7 points: every output and gradient against the float64 reference."""
    monkeypatch.setenv("TALK3D_CPU_FIELD_CHUNK", "7")
    H, W = HW
    for C, hidden, out in ((1, 16, 5), (3, 16, 5), (9, 16, 5), (32, 64, 33)):
        case = FieldCase(B=3, N=23, C=C, hidden=hidden, out=out, H=H, W=W, spread=1.5)
        inputs, gos = _inputs(case, layout=layout, seed=C)
        _assert_matches(_kernel(inputs, gos), _reference(inputs, gos), FP64_ATOL, FP64_RTOL, f"C={C}")


@pytest.mark.parametrize("layout", ["api", "channels_last"])
@pytest.mark.parametrize("HW", [(16, 16), (32, 2), (8, 1), (2, 8), (1, 4)], ids=str)
def test_cpu_points_on_band_boundaries(HW, layout, monkeypatch):
    """Points whose texel rows are exactly the band boundaries (rows 7 / 8, 15 / 16), the planes'
    edges, half a texel and more outside them, on a grid of columns likewise (float64, power-of-two
    sizes: the texel coordinates are exact, so kernel and reference take the same cells), for both
    plane conventions, in one chunk and in chunks of 50 points across three batch elements."""
    H, W = HW
    rows = sorted({-2.5, -2, -1.5, -1, -0.5, 0, 0.5, 6.5, 7, 7.5, 8, 15, 15.5, 16, H - 1, H - 0.5, H, H + 0.5, H + 2})
    cols = sorted({-1, -0.5, 0.25, W - 1, W - 0.5, W})
    pts = [[_world(x, W), _world(y, H), _world(z, H)] for y, x, z in itertools.product(rows, cols, (7.0, 8.0))]
    xyz = torch.tensor(pts, dtype=torch.float64)
    case = FieldCase(B=3, N=len(pts), C=9, H=H, W=W)
    inputs, gos = _inputs(case, layout=layout)
    inputs[1] = torch.stack([xyz, xyz.flip(0), xyz.roll(5, 0)])
    for axes, chunk in itertools.product(("fixed", "eg3d"), (None, 50)):
        if chunk is None:
            monkeypatch.delenv("TALK3D_CPU_FIELD_CHUNK", raising=False)
        else:
            monkeypatch.setenv("TALK3D_CPU_FIELD_CHUNK", str(chunk))
        got = _kernel(inputs, gos, axes=axes)
        _assert_matches(got, _reference(inputs, gos, axes=axes), FP64_ATOL, FP64_RTOL, f"{axes}, chunk {chunk}")


@pytest.mark.parametrize("needs", list(NEEDS.values()), ids=list(NEEDS))
@pytest.mark.parametrize("layout", ["api", "channels_last"])
def test_cpu_gradient_subsets_over_small_chunks(needs, layout, monkeypatch):
    """Each subset of gradients (phase B runs for the planes, for xyz, for both, or not at all), in one
    chunk (API planes: the bands transposed as written) and in chunks of 1, 7 and 50 points (bands
    added chunk after chunk, then transposed once), float32 at the EG3D sizes and float64 generic."""
    for chunk, (dtype, C, hidden, out) in itertools.product(
            (None,) + SMALL_CHUNKS, ((torch.float32, 32, 64, 33), (torch.float64, 9, 16, 5))):
        if chunk is None:
            monkeypatch.delenv("TALK3D_CPU_FIELD_CHUNK", raising=False)
        else:
            monkeypatch.setenv("TALK3D_CPU_FIELD_CHUNK", str(chunk))
        case = FieldCase(B=3, N=61, C=C, hidden=hidden, out=out, H=19, W=13, spread=1.4)
        inputs, gos = _inputs(case, dtype=dtype, layout=layout)
        atol, rtol = (FP64_ATOL, FP64_RTOL) if dtype == torch.float64 else (FP32_ATOL, FP32_RTOL)
        got = _kernel(inputs, gos, needs, axes="eg3d")
        _assert_matches(got, _reference(inputs, gos, needs, axes="eg3d"), atol, rtol, f"{dtype}, chunk {chunk}")


@pytest.mark.parametrize("layout", ["api", "channels_last"])
@pytest.mark.parametrize("chunk", [None, 333], ids=["one-chunk", "chunks"])
def test_cpu_phase_b_is_bitwise_the_same_at_any_thread_count(chunk, layout, monkeypatch):
    """Outputs, the plane gradient and the coordinate gradient are the same bits with 1, 2 and 3
    threads: phase B's bucket lists keep each band's points in point order whatever the split. (The
    weight gradients sum per-task partial sums, which depend on the thread count, so they are not
    compared bitwise.)"""
    if chunk is not None:
        monkeypatch.setenv("TALK3D_CPU_FIELD_CHUNK", str(chunk))
    case = FieldCase(B=3, N=2000, C=32, hidden=64, out=33, H=37, W=29, spread=1.3)
    inputs, gos = _inputs(case, dtype=torch.float32, layout=layout)
    old = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs.append(_kernel(inputs, gos, (True, True, False, False, False, False)))
    finally:
        torch.set_num_threads(old)
    for other in runs[1:]:
        for name, a, b in zip(("sigma", "feat", "dplanes", "dxyz"), runs[0], other):
            assert torch.equal(a, b), f"{name} differs between thread counts"


def _rows_decided_by_rounding(H):
    """float32 v-coordinates q (the plane's [-1, 1] coordinate) for which floor(((q + 1) H - 1) / 2)
    differs when (q + 1) H - 1 is rounded once (an FMA) or twice: within a few ulps of a texel edge."""
    found = []
    for k in range(1, 2 * H + 1, 2):  # (q + 1) H = k  <=>  texel coordinate (k - 1) / 2, an integer
        q = torch.tensor([k / H - 1], dtype=torch.float32)
        for direction in (2.0, -2.0):
            v = q.clone()
            for _ in range(SEARCH_ULPS):
                x = v + 1  # float32, as the kernel computes q + 1
                twice = torch.floor((x * H - 1) * 0.5)
                once = torch.floor(((x.double() * H - 1).float()) * 0.5)
                if twice.item() != once.item():
                    found.append(v.item())
                v = torch.nextafter(v, torch.tensor([direction]))
    return torch.tensor(sorted(set(found)), dtype=torch.float32)


@pytest.mark.parametrize("layout", ["api", "channels_last"])
def test_cpu_rows_decided_by_rounding_land_in_their_band(layout):
    """float32 points whose tap row depends on how (q + 1) H - 1 is rounded (H = 31: some sit on the
    band boundary 15 / 16). Phase B decides a point's band in its bucket pass and its taps again in
    the band pass; if the two took different rows the point's coordinate-gradient share would be left
    unwritten and its taps dropped. dxyz must agree with the float64 reference on one side of the edge
    or the other, and the plane gradient with the reference (the taps' weights are continuous)."""
    H = 31
    q = _rows_decided_by_rounding(H)
    assert q.numel() > 0
    case = FieldCase(B=1, N=q.numel(), C=32, hidden=64, out=33, H=H, W=13, spread=0.5)
    inputs, gos = _inputs(case, dtype=torch.float32, layout=layout)
    inputs[1][0, :, 1] = q / 2  # box_warp 1: the kernel's q = 2 * xyz, exactly
    inputs[1][0, :, 2] = q / 2
    got = _kernel(inputs, gos)
    dxyz = got[3].double()
    matched = torch.zeros(q.numel(), dtype=torch.bool)
    for nudge in (-EDGE_NUDGE, EDGE_NUDGE):
        moved = [t.double() for t in inputs]
        moved[1][0, :, 1:] += nudge
        want = _reference(moved, gos)
        matched |= (dxyz - want[3]).abs().amax(-1)[0] < EDGE_DXYZ_ATOL
    assert bool(matched.all()), f"dxyz of points {(~matched).nonzero().flatten().tolist()} matches neither side"
    want = _reference(inputs, gos)
    for name, i in (("sigma", 0), ("feat", 1), ("dplanes", 2)):
        err = (got[i].double() - want[i]).abs().max().item()
        assert err <= FP32_ATOL + FP32_RTOL * want[i].abs().max().item(), f"{name}: {err:.3g}"


@pytest.mark.parametrize("layout", ["api", "channels_last"])
def test_cpu_nan_and_inf_points_read_as_far_outside(layout, monkeypatch):
    """NaN and infinite coordinates (which grid_sample turns into NaN) are read as points far outside
    the box by the kernel: the same bits as the run with them replaced by +-10, whose values match the
    reference, over chunks of 3 points."""
    monkeypatch.setenv("TALK3D_CPU_FIELD_CHUNK", "3")
    case = FieldCase(B=2, N=12, C=9, H=10, W=7)
    inputs, gos = _inputs(case, layout=layout)
    special, far = [t.clone() for t in inputs], [t.clone() for t in inputs]
    for j, (s, f) in enumerate(((float("nan"), -10.0), (float("inf"), 10.0), (-float("inf"), -10.0))):
        special[1][0, j, j] = s
        special[1][1, 4 + j] = s
        far[1][0, j, j] = f
        far[1][1, 4 + j] = f
    got, want = _kernel(special, gos), _kernel(far, gos)
    for name, a, b in zip(("sigma", "feat") + ARG_NAMES, got, want):
        assert torch.equal(a, b), name
    _assert_matches(want, _reference(far, gos), FP64_ATOL, FP64_RTOL, "far points")


@pytest.mark.parametrize("make", ["batch-expanded", "channel-expanded", "channel-slice-of-channels-last",
                                  "hw-swapped-memory"])
def test_cpu_planes_as_views(make, monkeypatch):
    """Planes that are views (expanded over the batch or the channels, a channel slice of a
    channels-last buffer, memory ordered [W, H, C]): the gradient reaches the viewed tensor as the
    reference's does, in one chunk and in chunks of 7 points."""
    case = FieldCase(B=3, N=30, C=8, H=9, W=6)
    inputs, gos = _inputs(case)
    base_of = {
        "batch-expanded": (inputs[0][:1].clone(), lambda b: b.expand(3, -1, -1, -1, -1)),
        "channel-expanded": (inputs[0][:, :, :1].clone(), lambda b: b.expand(-1, -1, 8, -1, -1)),
        "channel-slice-of-channels-last": (torch.cat([inputs[0]] * 2, 2).permute(0, 1, 3, 4, 2).contiguous(),
                                           lambda b: b[..., 2:10].permute(0, 1, 4, 2, 3)),
        "hw-swapped-memory": (inputs[0].permute(0, 1, 4, 3, 2).contiguous(), lambda b: b.permute(0, 1, 4, 3, 2)),
    }
    base, view = base_of[make]
    for chunk in (None, 7):
        if chunk is None:
            monkeypatch.delenv("TALK3D_CPU_FIELD_CHUNK", raising=False)
        else:
            monkeypatch.setenv("TALK3D_CPU_FIELD_CHUNK", str(chunk))
        results = []
        for impl, b in (("cpu", base.clone()), ("torch", base.double())):
            b.requires_grad_()
            others = [t if impl == "cpu" else t.double() for t in inputs[1:]]
            sigma, feat = triplane_field(view(b), *others, impl=impl)
            results.append((sigma, feat, torch.autograd.grad((sigma, feat), b, gos)[0]))
        for name, a, w in zip(("sigma", "feat", "dplanes"), *results):
            err = (a.double() - w.double()).abs().max().item()
            assert err <= FP64_ATOL + FP64_RTOL * w.abs().max().item(), f"{name}, chunk {chunk}: {err:.3g}"


@pytest.mark.parametrize("chunk", [None, 13], ids=["one-chunk", "chunks"])
@pytest.mark.parametrize("CHW", [(1, 6, 7), (8, 1, 1), (3, 9, 1)], ids=str)
@pytest.mark.parametrize("layout", ["api", "channels_last", "strided"])
def test_cpu_training_pair_opcheck_small_planes(layout, CHW, chunk, monkeypatch):
    """opcheck of the CPU training pair on planes where the layout rules have corner cases: one
    channel (counts as channels-last), 1 x 1 planes (contiguous and channels-last at once), a single
    column, in one chunk and in chunks of 13 points (the plane gradient's layout must match the fake
    implementation's either way)."""
    ops = torch.ops.talk3d
    if chunk is not None:
        monkeypatch.setenv("TALK3D_CPU_FIELD_CHUNK", str(chunk))
    C, H, W = CHW
    case = FieldCase(B=2, N=20, C=C, H=H, W=W)
    inputs, gos = _inputs(case, dtype=torch.float32, layout=layout)
    torch.library.opcheck(ops.triplane_field_fwd_train.default, (*[t.clone().requires_grad_() for t in inputs], 1.0, 0))
    _, feat, saved, planes_cl = ops.triplane_field_fwd_train(*inputs, 1.0, 0)
    torch.library.opcheck(ops.triplane_field_bwd_saved.default,
                          (*gos, *inputs, saved, feat, planes_cl, 1.0, 0, [True] * 6))


@pytest.mark.parametrize("layout", ["api", "channels_last"])
def test_cpu_chunks_of_one_point(layout, monkeypatch):
    """Chunks of one point: each chunk after the first adds into the few bands its point touches and
    leaves the others alone; API planes take the channels-last sums transposed once at the end."""
    monkeypatch.setenv("TALK3D_CPU_FIELD_CHUNK", "1")
    for needs in (NEEDS["all"], NEEDS["planes"], NEEDS["xyz"]):
        case = FieldCase(B=3, N=4, C=9, H=17, W=3, spread=1.5)
        inputs, gos = _inputs(case, layout=layout)
        _assert_matches(_kernel(inputs, gos, needs), _reference(inputs, gos, needs), FP64_ATOL, FP64_RTOL, str(needs))
