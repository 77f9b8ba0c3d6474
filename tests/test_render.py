"""The renderer: two-pass sampling against independent code, fused vs reference, occupancy skipping."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from talk3d import extension
from talk3d.render import (DecoderWeights, OccupancyGrid, RenderConfig, Renderer, RenderRandoms,
                           importance_depths, look_at_camera, render, stratified_depths)
from talk3d.render.sampling import PDF_EPS, WEIGHT_FLOOR
from talk3d.render.synthetic import head_scene

needs_ext = pytest.mark.skipif(not extension.available(), reason="talk3d._C not built")
# Fused (fp32 kernels) vs reference (fp32 PyTorch) on the same samples: per-point field errors of
# ~1e-6 pass through compositing sums of <= 96 terms.
RENDER_ATOL = 2e-5
# The CUDA kernels build with --use_fast_math (__expf, approximate division): ~2x the CPU's error.
CUDA_RENDER_ATOL = 5e-5
# Occupancy skipping on the head-like scene: the quality bar, in dB against dense.
MIN_SKIP_PSNR = 40.0
# Importance depths: the float32 weight smoothing moves CDF steps by ~1e-7, depths (~3) by ~1e-7.
SMOOTHING_ATOL = 1e-6
# Full-grid skipping against the dense fused render: the same samples and weights (depth and weight
# sum are bit-identical), but the dense path sums each pass's features by matrix product and the
# skipping path ray by ray (segment_reduce): fp32 sums of 48 O(1) terms in two orders. Measured:
# 4.8e-7 (4 ulps; 1.43e-6 when the skipping path composited merged samples).
FULL_GRID_ATOL = 2e-6
# The same on the reference (torch) path: the dense reference composites the merged samples, the
# skipping path sums each pass's features. Measured 4.8e-7 (CPU VM); 1e-6 allows a few fp32 ulps of
# O(1) features.
FULL_GRID_REF_ATOL = 1e-6
# Fused vs reference gradients (planes, decoder weights), as a share of the largest |gradient|: fp32
# backward scans of <= 96 samples and scatter sums over all rays in other orders. Measured on the
# CPU VM: 3.1e-6 (b2), 1.6e-6..2.8e-6 the others. The CUDA test shares them (fast math; unmeasured).
GRAD_RTOL_OF_MAX = 1e-4
GRAD_ATOL = 1e-7
# Depth of rays that see the object (weight sum > 0.5) against a reference render: under one coarse
# step (1.05 / 47 = 0.022). Measured on the CPU VM: 0.013 for occupancy skipping (the (-0.5, -0.3)
# view), 0.011 for bf16 planes.
HIT_DEPTH_TOL = 0.02
# An empty grid's depth (the last coarse depth) is the far end: no dense depth lies past it but for
# fp32 rounding (an ulp near 3.3 is 2.4e-7). Measured: dense depths end 0.037 before it (CPU VM).
FAR_END_TOL = 1e-6


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    mse = ((a - b) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * np.log10(data_range**2 / mse)


def test_stratified_depths_follow_eg3d():
    jitter = torch.rand(2, 3, 48)
    t = stratified_depths(48, 2.25, 3.3, (2, 3), jitter=jitter)
    expected = torch.linspace(2.25, 3.3, 48) + jitter * (3.3 - 2.25) / 47
    torch.testing.assert_close(t[..., 0], expected)
    det = stratified_depths(48, 2.25, 3.3, (1, 1), deterministic=True)
    torch.testing.assert_close(det[0, 0, :, 0], torch.linspace(2.25, 3.3, 48))


def _importance_numpy(t, w, u):
    """EG3D's importance sampling written out per ray with numpy loops (independent of the torch code)."""
    S = t.shape[0]
    wp = np.concatenate([[w[0]], np.maximum(w[:-1], w[1:]), [w[-1]]])  # max-pool k2 s1 pad1
    ws = (wp[:-1] + wp[1:]) / 2 + WEIGHT_FLOOR                          # avg-pool k2 s1, + floor
    mids = (t[:-1] + t[1:]) / 2
    pdf = ws[1:-1] + PDF_EPS
    pdf = pdf / pdf.sum()
    cdf = np.concatenate([[0.0], np.cumsum(pdf)])
    out = []
    for x in u:
        i = int(np.searchsorted(cdf, x, side="right"))
        lo, hi = max(i - 1, 0), min(i, S - 3)
        step = cdf[hi] - cdf[lo]
        step = 1.0 if step < PDF_EPS else step
        out.append(mids[lo] + (x - cdf[lo]) / step * (mids[hi] - mids[lo]))
    return np.array(out)


def test_importance_depths_match_independent_implementation():
    B, R, S, n = 1, 6, 48, 48
    t = stratified_depths(S, 2.25, 3.3, (B, R), dtype=torch.float64)
    w = torch.rand(B, R, S - 1, 1, dtype=torch.float64) ** 4
    u = torch.rand(B, R, n, dtype=torch.float64)
    got = importance_depths(t, w, n, u=u)
    for r in range(R):
        ref = _importance_numpy(t[0, r, :, 0].numpy(), w[0, r, :, 0].numpy(), u[0, r].numpy())
        # EG3D smooths the weights in float32 (``.float()`` before the pools): ~1e-7 relative.
        np.testing.assert_allclose(got[0, r, :, 0].numpy(), ref, rtol=0, atol=SMOOTHING_ATOL)
    det = importance_depths(t, w, n, deterministic=True)
    ref = _importance_numpy(t[0, 0, :, 0].numpy(), w[0, 0, :, 0].numpy(), np.linspace(0, 1, n))
    np.testing.assert_allclose(det[0, 0, :, 0].numpy(), ref, rtol=0, atol=SMOOTHING_ATOL)


def _scene(res=24, B=1, yaw=0.25, pitch=-0.1):
    planes, dec = head_scene(plane_res=32, generator=torch.Generator().manual_seed(3))
    planes = planes.expand(B, -1, -1, -1, -1).contiguous()
    cams = look_at_camera(torch.full((B,), yaw), torch.full((B,), pitch))
    return planes, dec, cams, RenderConfig(resolution=res)


def _randoms(B, cfg):
    R = cfg.resolution**2
    return RenderRandoms(torch.rand(B, R, cfg.coarse_samples), torch.rand(B, R, cfg.importance_samples))


def _loss(out):
    # depth * weight_sum (the depth numerator), not depth: see _assert_outputs_close.
    return out.feature_image.square().mean() + (out.depth * out.weight_sum).mean() + out.weight_sum.mean()


def _assert_outputs_close(got, expected, atol):
    """Feature image, weight sum and depth numerator (depth * weight_sum) of two renders.

    depth = Dnum / W is ill-conditioned on nearly empty rays: EG3D's float32 alpha = 1 - exp(-x)
    carries ~1e-7 absolute error per interval, so on a ray with W ~ 1e-5 two correct exp
    implementations give depths millimetres apart (seen on an H100 host CPU: 5e-3 at W = 1.8e-5).
    Dnum and W themselves are sums of the weights and stay within atol.
    """
    got = [x.detach().cpu() for x in (got.feature_image, got.weight_sum, got.depth * got.weight_sum)]
    exp = [x.detach().cpu() for x in (expected.feature_image, expected.weight_sum, expected.depth * expected.weight_sum)]
    for name, g, e in zip(("feature_image", "weight_sum", "depth numerator"), got, exp):
        torch.testing.assert_close(g, e, atol=atol, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


@needs_ext
def test_fused_render_matches_reference_forward_and_backward():
    planes, dec, cams, cfg = _scene(res=12, B=2, yaw=0.4)
    planes = planes + 0.05 * torch.randn_like(planes)  # different planes per batch element
    rnd = _randoms(2, cfg)
    outs, grads = [], []
    for impl in ("torch", "cpu"):
        p = planes.clone().requires_grad_()
        w = [x.clone().requires_grad_() for x in dec]
        out = render(p, DecoderWeights(*w), cams, cfg, impl=impl, randoms=rnd)
        loss = _loss(out)
        grads.append(torch.autograd.grad(loss, [p, *w]))
        outs.append(out)
    _assert_outputs_close(outs[1], outs[0], RENDER_ATOL)
    for g_fused, g_ref in zip(*grads):
        scale = g_ref.abs().max().item()
        assert (g_fused - g_ref).abs().max().item() <= GRAD_RTOL_OF_MAX * scale + GRAD_ATOL


def test_render_gradcheck_float64_tiny():
    planes, dec, cams, cfg = _scene()
    # No importance pass: its depths depend on the planes through EG3D's no-grad resampling, which
    # finite differences see and the analytic gradient (as EG3D's) deliberately does not.
    cfg = RenderConfig(resolution=2, coarse_samples=6, importance_samples=0)
    planes = planes[:, :, :4, ::8, ::8].contiguous().double().requires_grad_()
    dec = DecoderWeights(dec.w1[:, :4].double(), dec.b1.double(), dec.w2.double() * 0.1, dec.b2.double() + 8)
    rnd = _randoms(1, cfg)
    rnd = RenderRandoms(rnd.coarse_jitter.double(), rnd.importance_u.double())
    assert rnd.importance_u.shape[-1] == 0
    impl = "cpu" if extension.available() else "torch"
    fn = lambda p: render(p, dec, cams.double(), cfg, impl=impl, randoms=rnd).feature_image  # noqa: E731
    assert torch.autograd.gradcheck(fn, (planes,))


@needs_ext
def test_full_grid_equals_dense():
    planes, dec, cams, cfg = _scene()
    rnd = _randoms(1, cfg)
    dense = render(planes, dec, cams, cfg, impl="cpu", randoms=rnd)
    grid = OccupancyGrid(16).fill()
    skip = render(planes, dec, cams, cfg, impl="cpu", randoms=rnd, grid=grid)
    torch.testing.assert_close(skip.feature_image, dense.feature_image, atol=FULL_GRID_ATOL, rtol=0)
    for name in ("depth", "weight_sum"):  # the same samples and weights: exact
        assert torch.equal(getattr(skip, name), getattr(dense, name)), name
    assert skip.samples_per_ray == dense.samples_per_ray == 96


def test_full_grid_equals_dense_reference_path():
    planes, dec, cams, cfg = _scene(res=10)
    rnd = _randoms(1, cfg)
    dense = render(planes, dec, cams, cfg, impl="torch", randoms=rnd)
    skip = render(planes, dec, cams, cfg, impl="torch", randoms=rnd, grid=OccupancyGrid(8).fill())
    torch.testing.assert_close(skip.feature_image, dense.feature_image, atol=FULL_GRID_REF_ATOL, rtol=0)


@needs_ext
@pytest.mark.parametrize("yaw,pitch", [(0.0, 0.0), (0.5, 0.3), (-0.5, -0.3)])
def test_occupancy_skipping_on_head_scene(yaw, pitch):
    """Empty space skipped: >= 40 dB against dense while evaluating at most half the samples."""
    planes, dec, cams, cfg = _scene(res=32, yaw=yaw, pitch=pitch)
    dense = render(planes, dec, cams, cfg, impl="cpu", deterministic=True)
    renderer = Renderer(cfg)
    grid = OccupancyGrid(48)
    for step in range(4):  # warm-up updates, each with fresh points in every cell
        grid.update(step, renderer.density(planes, dec), cfg.coarse_step)
    assert 0.01 < grid.occupied_fraction() < 0.2
    # chunk=1: the first coarse steps hold no live sample of any ray, and later ones must still run.
    # chunk=None: one coarse pass (the default); early_stop then only drops importance samples.
    for early_stop, chunk in ((0.0, 8), (1e-4, 8), (1e-4, 1), (0.0, None), (1e-3, None)):
        skip = render(planes, dec, cams, cfg, impl="cpu", deterministic=True, grid=grid,
                      early_stop=early_stop, chunk=chunk)
        assert psnr(skip.feature_image[:, :3], dense.feature_image[:, :3]) >= MIN_SKIP_PSNR
        assert skip.samples_per_ray <= dense.samples_per_ray / 2
        hit = dense.weight_sum > 0.5  # depth of rays that see the object
        assert (skip.depth[hit] - dense.depth[hit]).abs().max() < HIT_DEPTH_TOL


@needs_ext
def test_early_stop_drops_importance_samples_past_termination():
    """In one coarse pass, early termination keeps the importance samples where the coarse
    transmittance is still above the threshold: fewer samples, the same picture; a huge threshold
    keeps none (only coarse samples remain). Bad chunks are refused."""
    planes, dec, cams, cfg = _scene(res=24, yaw=0.3, pitch=0.1)
    renderer, grid = Renderer(cfg), OccupancyGrid(48)
    for step in range(4):
        grid.update(step, renderer.density(planes, dec), cfg.coarse_step)
    kw = dict(impl="cpu", deterministic=True, grid=grid)
    full = render(planes, dec, cams, cfg, **kw)
    stop = render(planes, dec, cams, cfg, early_stop=1e-2, **kw)
    assert stop.samples_per_ray < full.samples_per_ray
    assert psnr(stop.feature_image[:, :3], full.feature_image[:, :3]) >= MIN_SKIP_PSNR
    coarse_only = render(planes, dec, cams, cfg, early_stop=2.0, **kw)  # T <= 1 < 2 everywhere
    live = render(planes, dec, cams, RenderConfig(**{**cfg.__dict__, "importance_samples": 0}), **kw)
    assert coarse_only.samples_per_ray == live.samples_per_ray
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="chunk"):
            render(planes, dec, cams, cfg, chunk=bad, **kw)


@needs_ext
def test_skipping_batch_matches_single_frames():
    """Batch elements with different poses and planes select different numbers of samples; the
    skipping path packs them into one field call, and each element gets what rendering it alone
    gives: the same points, each evaluated on its own by the CPU kernel, so bit-identical
    (measured: difference 0)."""
    planes, dec, _, cfg = _scene(res=16, B=3)
    planes = planes.clone()
    planes[2] *= 0.5  # another head: less density, other occupied intervals
    cams = look_at_camera(torch.tensor([0.0, 0.5, -0.4]), torch.tensor([0.0, 0.3, -0.2]))
    grid = OccupancyGrid(32)
    renderer = Renderer(cfg)
    for step in range(4):
        grid.update(step, renderer.density(planes, dec), cfg.coarse_step)
    both = render(planes, dec, cams, cfg, impl="cpu", deterministic=True, grid=grid, early_stop=1e-4)
    per_ray = []
    for b in range(3):
        one = render(planes[b:b + 1], dec, cams[b:b + 1], cfg, impl="cpu", deterministic=True, grid=grid,
                     early_stop=1e-4)
        per_ray.append(one.samples_per_ray)
        for name in ("feature_image", "depth", "weight_sum"):
            assert torch.equal(getattr(both, name)[b:b + 1], getattr(one, name)), name
    assert len(set(per_ray)) == 3  # the elements really differ in their sample counts
    assert both.samples_per_ray == pytest.approx(sum(per_ray) / 3)


@pytest.mark.parametrize("impl", ["torch", pytest.param("cpu", marks=needs_ext)])
def test_empty_grid_renders_nothing(impl):
    """No occupied cell: no sample is evaluated, the image is zero, the depth is the far end."""
    planes, dec, cams, cfg = _scene(res=8, B=2)
    grid = OccupancyGrid(8).fill(False)
    out = render(planes, dec, cams, cfg, impl=impl, deterministic=True, grid=grid)
    dense = render(planes, dec, cams, cfg, impl=impl, deterministic=True)
    assert out.samples_per_ray == 0
    assert not out.feature_image.any() and not out.weight_sum.any()
    far = out.depth.flatten()[0]  # one far end (the last coarse depth) for every ray
    assert torch.all(out.depth == far) and far >= dense.depth.max() - FAR_END_TOL


def test_grid_outside_flag_follows_every_change():
    """The grid keeps ``outside`` on the host (on a GPU, reading the buffer waits for the device)
    and in its buffer (for state_dict); every way of setting it is seen: fill, set_occupied,
    outside_occupied, load_state_dict, in-place writes and reassignment by hand; copies and grids
    built in inference mode too."""
    o = torch.tensor([[[0.0, 0.0, -3.0]]])
    d = torch.tensor([[[0.0, 0.0, 1.0]]])
    t = torch.linspace(0.0, 0.5, 6)[None, None]  # never reaches the cube [-0.8, 0.8]^3: outside only
    grid = OccupancyGrid(8)
    hits = lambda g: bool((g.occupied_intervals(o, d, t, impl="torch") >= 0).all())  # noqa: E731
    assert hits(grid)  # default: the outside is occupied
    grid.fill(False)
    assert not hits(grid)
    grid.set_occupied(torch.zeros(8, 8, 8, dtype=torch.bool), outside=True)
    assert hits(grid)
    empty = OccupancyGrid(8).fill(False)
    grid.load_state_dict(empty.state_dict())
    assert not hits(grid)
    grid.outside_occupied = True
    assert hits(grid) and not hits(empty) and bool(grid.outside)
    grid.outside.fill_(False)  # by hand, in place
    assert not hits(grid)
    grid.outside = torch.tensor(True)  # by hand, another tensor
    assert hits(grid)
    assert hits(copy.deepcopy(grid)) and not hits(copy.deepcopy(empty))
    with torch.inference_mode():
        built = OccupancyGrid(8).fill(False)
        assert not hits(built) and not built.outside_occupied
    fresh = OccupancyGrid(8)
    fresh.load_state_dict(built.state_dict())
    assert not hits(fresh)


def test_grid_update_follows_nerfacc_rules():
    grid = OccupancyGrid(8, box=1.0, warmup_steps=2)
    calls = []

    def density(points):
        calls.append(points.shape[0])
        return (points.norm(dim=-1) < 0.3).float() * 10.0

    grid.update(0, density, step_size=0.1)  # warm-up: every cell
    assert calls[-1] == 8**3
    occ = grid.occupied
    centres = grid.cell_points(torch.arange(8**3), jitter=False).reshape(8, 8, 8, 3)
    assert bool(occ[centres.norm(dim=-1) < 0.15].all()) and not bool(occ[centres.norm(dim=-1) > 0.6].any())
    before = grid.opacity.clone()
    def nothing(points):
        calls.append(points.shape[0])
        return torch.zeros(points.shape[0])

    grid.update(5, nothing, step_size=0.1)  # after warm-up: a random quarter + the occupied cells
    assert calls[-1] < 8**3
    changed = grid.opacity != before
    torch.testing.assert_close(grid.opacity[changed], before[changed] * 0.95)  # EMA decay of the max
    assert grid.update_every_n_steps(3, density, 0.1) is False and grid.update_every_n_steps(16, density, 0.1)


@pytest.mark.parametrize("scale", [1e-3, 1.0], ids=["mean-below-threshold", "mean-above-threshold"])
def test_grid_threshold_and_refresh_rules(scale):
    """Graded opacities: a cell is occupied when its opacity exceeds min(mean opacity, 0.01) (nerfacc's
    rule; a faint field is thresholded at its mean, a dense one at 0.01), and after warm-up every
    occupied cell is probed again, besides a random quarter of all cells."""
    grid = OccupancyGrid(8, box=1.0, warmup_steps=1)
    g = torch.Generator().manual_seed(0)

    def density(points):  # graded: 0 from radius 0.5 (the box's half-width) out, `scale` / 0.1 at the centre
        return (1 - 2 * points.norm(dim=-1)).clamp(min=0) * scale / 0.1

    grid.update(0, density, step_size=0.1, generator=g)
    thre = min(float(grid.opacity.mean()), grid.threshold)
    assert (thre == grid.threshold) == (scale == 1.0)  # each case exercises one side of the min
    expected = (grid.opacity > thre).reshape(8, 8, 8)
    assert 0 < int(expected.sum()) < 8**3 and torch.equal(grid.occupied, expected)
    occupied = grid.occupied.reshape(-1).clone()
    probed = []

    def spy(points):
        probed.append(points)
        return density(points)

    before = grid.opacity.clone()
    grid.update(1, spy, step_size=0.1, generator=g)
    assert sum(p.shape[0] for p in probed) < 8**3
    # Every occupied cell was probed again: max(decay * old, new probe) changed its opacity (a cell
    # left alone keeps it exactly).
    touched = grid.opacity != before
    assert bool(touched[occupied].all())
    assert int(touched.sum()) < 8**3  # and not every cell: the rest only by the random quarter


def test_bad_render_inputs_raise():
    planes, dec, cams, cfg = _scene()
    with pytest.raises(ValueError, match="cameras"):
        render(planes, dec, cams[:, :16], cfg)
    bad = cams.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError):
        render(planes, dec, bad, cfg)
    with pytest.raises(ValueError, match="planes"):
        render(planes[0], dec, cams, cfg)
    with pytest.raises(ValueError, match="ray_start"):
        RenderConfig(ray_start=3.0, ray_end=2.0)
    with pytest.raises(ValueError, match="randoms"):
        render(planes, dec, cams, cfg, randoms=RenderRandoms(torch.rand(1, 2, 3), torch.rand(1, 2, 3)))
    # Jitter outside [0, 1) could unsort the depths, which the compositing takes unchecked.
    rnd = _randoms(1, cfg)
    with pytest.raises(ValueError, match=r"jitter must lie in \[0, 1\)"):
        render(planes, dec, cams, cfg, randoms=RenderRandoms(rnd.coarse_jitter + 1.5, rnd.importance_u))


@pytest.mark.cuda
def test_cuda_render_matches_reference_forward_backward_and_skipping():
    """The whole frame on the GPU (CUDA field + composite + marching) against the CPU reference."""
    planes, dec, cams, cfg = _scene(res=16, B=2, yaw=0.3)
    rnd = _randoms(2, cfg)
    dev = torch.device("cuda")
    outs, grads = [], []
    for impl, device in (("torch", torch.device("cpu")), ("cuda", dev)):
        p = planes.to(device).requires_grad_()
        w = [x.to(device).requires_grad_() for x in dec]
        r = RenderRandoms(rnd.coarse_jitter.to(device), rnd.importance_u.to(device))
        out = render(p, DecoderWeights(*w), cams.to(device), cfg, impl=impl, randoms=r)
        loss = _loss(out)
        grads.append([g.cpu() for g in torch.autograd.grad(loss, [p, *w])])
        outs.append(out)
    _assert_outputs_close(outs[1], outs[0], CUDA_RENDER_ATOL)
    for g_fused, g_ref in zip(*grads):
        assert (g_fused - g_ref).abs().max().item() <= GRAD_RTOL_OF_MAX * g_ref.abs().max().item() + GRAD_ATOL
    # Occupancy skipping on the GPU: a full grid reproduces the dense frame.
    p, d = planes.to(dev), DecoderWeights(*[x.to(dev) for x in dec])
    r = RenderRandoms(rnd.coarse_jitter.to(dev), rnd.importance_u.to(dev))
    skip = render(p, d, cams.to(dev), cfg, impl="cuda", randoms=r, grid=OccupancyGrid(16).to(dev).fill())
    torch.testing.assert_close(skip.feature_image.cpu(), outs[0].feature_image, atol=CUDA_RENDER_ATOL, rtol=0)


def test_render_compiles_with_a_symbolic_batch():
    """torch.compile with dynamic shapes: the batch becomes symbolic and the random jitter and
    importance numbers are drawn at that size (torch.rand's overload with a generator takes
    concrete sizes only: a training step compiled after a change of batch size failed to trace).
    Same random numbers, same frame, eager or compiled."""
    planes, dec, cams, cfg = _scene(res=6, B=2)
    compiled = torch.compile(render, backend="aot_eager", dynamic=True)
    for B in (2, 1):
        torch.manual_seed(0)
        eager = render(planes[:B], dec, cams[:B], cfg, impl="torch", check_cameras=False).feature_image
        torch.manual_seed(0)
        got = compiled(planes[:B], dec, cams[:B], cfg, impl="torch", check_cameras=False).feature_image
        torch.testing.assert_close(got, eager, rtol=0, atol=0)  # aot_eager runs the same ops


def test_render_ignores_autocast():
    """Geometry stays fp32 under autocast: the same frame as without it."""
    planes, dec, cams, cfg = _scene(res=8)
    rnd = _randoms(1, cfg)
    plain = render(planes, dec, cams, cfg, impl="torch", randoms=rnd)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = render(planes, dec, cams, cfg, impl="torch", randoms=rnd)
    assert auto.feature_image.dtype == torch.float32
    torch.testing.assert_close(auto.feature_image, plain.feature_image, rtol=0, atol=0)


# bf16 planes and decoder weights against fp32 ones holding the same (rounded) values: the field's
# bf16 outputs (sigma, features) carry ~2^-9 relative rounding into the image. Measured on the CPU
# VM: 55.3 dB dense, 55.6 dB skipping (2026-12-06). A render whose depths were rounded to bf16
# (0.016 apart near t = 3, coarser than the samples) would fall far below this.
HALF_PLANES_MIN_PSNR = 35.0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda),
                                    pytest.param("cuda-mma", marks=pytest.mark.cuda)])
def test_half_precision_planes_render_in_fp32_depths(device, monkeypatch):
    """The fast path's bf16 planes: dense and skipping renders close to fp32 planes of the same
    values, with the compositing done on fp32 depths (the compositing ops take one dtype).

    On the CPU the half outputs were already widened before compositing, so there this checks the
    numbers only; the CUDA case is the one that fails without the widening. ``cuda-mma``: the
    field's decoder on tensor cores (TALK3D_FIELD_MMA=1; the head scene has the EG3D sizes)."""
    from talk3d.render import renderer as renderer_module

    if device == "cuda-mma":
        monkeypatch.setenv("TALK3D_FIELD_MMA", "1")
        device = "cuda"
    planes, dec, cams, cfg = _scene(res=24, B=2)
    dev = torch.device(device)
    # On the CPU "auto" picks Triton for bf16, which the tests run in its (slow) interpreter.
    impl = "auto" if device == "cuda" else "torch"
    p16 = planes.to(dev, torch.bfloat16)
    d16 = DecoderWeights(*[x.to(dev, torch.bfloat16) for x in dec])
    p32, d32 = p16.float(), DecoderWeights(*[x.float() for x in d16])
    cams = cams.to(dev)
    seen = []
    for name in ("composite", "composite_weights"):
        real = getattr(renderer_module, name)
        monkeypatch.setattr(renderer_module, name, lambda sigma, *a, _real=real, **k: seen.append(a[-1].dtype) or
                            _real(sigma, *a, **k))
    grid = OccupancyGrid(32).to(dev)
    for step in range(4):
        grid.update(step, Renderer(cfg).density(p32, d32), cfg.coarse_step)
    lines = []
    for kw in ({}, dict(grid=grid, early_stop=1e-3)):
        half = render(p16, d16, cams, cfg, impl=impl, deterministic=True, **kw)
        full = render(p32, d32, cams, cfg, impl=impl, deterministic=True, **kw)
        value = psnr(half.feature_image[:, :3].float(), full.feature_image[:, :3])
        lines.append(f"{'skipping' if kw else 'dense'} {value:.1f} dB")
        assert value >= HALF_PLANES_MIN_PSNR, lines
        hit = full.weight_sum > 0.5
        assert (half.depth.float()[hit] - full.depth[hit]).abs().max() < HIT_DEPTH_TOL
    assert seen and all(dtype == torch.float32 for dtype in seen), seen
    print(f"{device}: bf16 planes against fp32: " + ", ".join(lines))


@needs_ext
def test_skipping_evaluates_no_sample_outside_the_occupied_intervals(monkeypatch):
    """A grid whose only occupied cells form a cube: every point the skipping render hands to the
    field (coarse and importance samples) lies within that cube, up to the one coarse step by which
    an interval's end sample may stand outside it; the dense render's points spread far beyond."""
    import talk3d.render.renderer as R

    planes, dec, cams, cfg = _scene(res=12)
    grid = OccupancyGrid(16)  # the default 1.6 box: cells 0.1 wide
    cube = torch.zeros(16, 16, 16, dtype=torch.bool)
    cube[6:10, 6:10, 6:10] = True  # [-0.2, 0.2]^3
    grid.set_occupied(cube, outside=False)
    seen = []
    field = R._field

    def spy(planes, decoder, xyz, cfg, impl):
        seen.append(xyz.detach().reshape(-1, 3))
        return field(planes, decoder, xyz, cfg, impl)

    monkeypatch.setattr(R, "_field", spy)
    out = render(planes, dec, cams, cfg, impl="cpu", deterministic=True, grid=grid)
    points = torch.cat(seen)
    step = (cfg.ray_end - cfg.ray_start) / (cfg.coarse_samples - 1)  # the coarse spacing along a ray
    assert out.samples_per_ray > 0 and points.abs().max().item() <= 0.2 + step + 1e-6
    seen.clear()
    render(planes, dec, cams, cfg, impl="cpu", deterministic=True)
    assert torch.cat(seen).abs().max().item() > 0.5  # the dense render's samples: well outside


# --------------------------------------------------------------------------------------------------
# Hand-computed checks of EG3D's constants and nerfacc's grid rules (mutation audit): the tests
# above feed the module's own WEIGHT_FLOOR / PDF_EPS to their reference, so a wrong constant passed.

# Hand-computed sampling values in float64: only rounding of O(1) numbers separates them.
HAND_ATOL = 1e-9


def test_smoothed_weights_by_hand():
    """EG3D's coarse-weight smoothing with its literal constants: max-pool (2, stride 1, pad 1), then
    avg-pool (2, stride 1), then + 0.01 (not the module's WEIGHT_FLOOR, which a slip could change)."""
    from talk3d.render.sampling import smoothed_weights

    w = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.5]], dtype=torch.float64)
    # max-pool over [-inf, 0, 1, 0, 0, 0.5, -inf]: [0, 1, 1, 0, 0.5, 0.5]; avg-pool: [0.5, 1, 0.5, 0.25, 0.5]
    expected = torch.tensor([[0.51, 1.01, 0.51, 0.26, 0.51]], dtype=torch.float64)
    torch.testing.assert_close(smoothed_weights(w), expected, atol=HAND_ATOL, rtol=0)


def test_invert_cdf_by_hand():
    """Inverse CDF on two bins, by hand, with EG3D's literal 1e-5: a CDF step of 5e-4 is divided by
    as it is, while a step under 1e-5 is replaced by 1 (EG3D's ``denom[denom < eps] = 1``), not
    clamped to 1e-5."""
    from talk3d.render.sampling import invert_cdf

    bins = torch.tensor([[0.0, 1.0, 2.0]] * 2, dtype=torch.float64)
    weights = torch.tensor([[0.9995, 0.0005], [1 - 1e-6, 1e-6]], dtype=torch.float64)
    u = torch.tensor([[0.5, 0.99975], [0.5, 1 - 5e-7]], dtype=torch.float64)
    expected = torch.tensor([
        [0.5 / 0.9995, 1.0 + (0.99975 - 0.9995) / 0.0005],  # 1.5: half-way through the small bin
        [0.5 / (1 - 1e-6), 1.0 + 5e-7],                    # step 1e-6 < 1e-5: divided by 1
    ], dtype=torch.float64)
    torch.testing.assert_close(invert_cdf(bins, weights, u), expected, atol=HAND_ATOL, rtol=0)


def test_grid_cell_points_by_hand():
    """Cell index -> world point: x varies fastest, then y, then z (the bits' [z, y, x] order), and
    ``jitter=False`` gives the cell centres; jittered points stay inside their cells."""
    grid = OccupancyGrid(2, box=1.0)
    centres = grid.cell_points(torch.arange(8), jitter=False)
    q = 0.25  # cells of 0.5 in the cube [-0.5, 0.5]^3: centres at +-0.25
    expected = torch.tensor([[x, y, z] for z in (-q, q) for y in (-q, q) for x in (-q, q)])
    torch.testing.assert_close(centres, expected, atol=1e-7, rtol=0)
    jittered = grid.cell_points(torch.arange(8), generator=torch.Generator().manual_seed(0))
    assert bool(((jittered - expected).abs() <= q).all())


def test_grid_ema_keeps_a_new_maximum_undecayed():
    """nerfacc's update ``occ = max(decay * occ, new)``: a new probe above the decayed value is
    stored as it is (decayed only by later updates), not ``decay * max(occ, new)``."""
    grid = OccupancyGrid(4, box=1.0, warmup_steps=10)
    ones = lambda p: torch.full((p.shape[0],), 10.0)  # noqa: E731
    grid.update(0, ones, step_size=0.1)
    torch.testing.assert_close(grid.opacity, torch.full((64,), 1.0))  # 10 * 0.1, no decay
    grid.update(1, lambda p: torch.full((p.shape[0],), 2.0), step_size=0.1)
    torch.testing.assert_close(grid.opacity, torch.full((64,), 0.95))  # max(0.95 * 1.0, 0.2)


def test_grid_partial_refresh_probes_a_quarter():
    """After warm-up an empty grid probes only the random quarter: at most res^3 // 4 cells (draws
    with replacement, so fewer distinct ones)."""
    grid = OccupancyGrid(8, box=1.0, warmup_steps=1)
    grid.update(0, lambda p: torch.zeros(p.shape[0]), step_size=0.1)
    assert not bool(grid.occupied.any())
    probed = []

    def spy(points):
        probed.append(points.shape[0])
        return torch.zeros(points.shape[0])

    grid.update(1, spy, step_size=0.1, generator=torch.Generator().manual_seed(0))
    assert 0 < sum(probed) <= 8**3 // 4


def test_grid_threshold_uses_the_mean_of_every_cell():
    """After a partial refresh the threshold is ``min(mean over ALL cells, 0.01)`` (nerfacc), not the
    mean of the refreshed cells only (occupied ones, so a higher mean that would empty the grid's
    fainter occupied cells)."""
    grid = OccupancyGrid(8, box=1.0, warmup_steps=1)
    g = torch.Generator().manual_seed(0)

    def density(points):  # graded and faint: mean opacity below 0.01
        return (1 - 2 * points.norm(dim=-1)).clamp(min=0) * 1e-3 / 0.1

    grid.update(0, density, step_size=0.1, generator=g)
    grid.update(1, density, step_size=0.1, generator=g)
    thre = min(float(grid.opacity.mean()), 0.01)
    expected = (grid.opacity > thre).reshape(8, 8, 8)
    assert 0 < int(expected.sum()) < 8**3 and torch.equal(grid.occupied, expected)


def test_grid_update_every_n_steps_passes_the_step_on():
    """``update_every_n_steps`` after warm-up does the partial refresh (a quarter of an empty grid's
    cells), not another full warm-up pass: it hands its step to :meth:`update`."""
    grid = OccupancyGrid(8, box=1.0, warmup_steps=1, update_every=4)
    probed = []

    def spy(points):
        probed.append(points.shape[0])
        return torch.zeros(points.shape[0])

    assert grid.update_every_n_steps(0, spy, 0.1) and sum(probed) == 8**3  # warm-up: every cell
    probed.clear()
    assert grid.update_every_n_steps(4, spy, 0.1) and 0 < sum(probed) <= 8**3 // 4


# The grid's density from the compiled field against the reference field: per-point fp32 errors of
# ~1e-6 (see RENDER_ATOL) through softplus, whose slope is below 1.
DENSITY_ATOL = 2e-5


def test_renderer_density_is_eg3d_activation_max_over_the_batch():
    """``Renderer.density``: ``softplus(sigma - 1)`` (EG3D's activation, with its -1 shift) of each
    batch element's field, then the max over the batch (a cell is occupied if any frame fills it),
    checked against the reference field evaluated element by element."""
    from talk3d.ops.reference.triplane_field import triplane_field as reference_field

    planes, dec = head_scene(plane_res=32, generator=torch.Generator().manual_seed(3))
    planes = torch.cat([planes, 0.3 * planes.flip(-1)]).contiguous()  # two different frames
    cfg = RenderConfig(resolution=8)
    points = (torch.rand(200, 3, generator=torch.Generator().manual_seed(1)) - 0.5) * 0.8
    got = Renderer(cfg).density(planes, dec)(points)
    per_frame = []
    for b in range(2):
        sigma, _ = reference_field(planes[b:b + 1], points[None], *dec, box_warp=cfg.box_warp, axes=cfg.axes)
        per_frame.append(torch.log1p(torch.exp(sigma[0, :, 0] - 1)))  # softplus written out
    expected = torch.maximum(*per_frame)
    assert not torch.allclose(per_frame[0], per_frame[1], atol=1e-3)  # the max matters here
    torch.testing.assert_close(got, expected, atol=DENSITY_ATOL, rtol=0)


def test_renderer_module_uses_its_grid_for_inference_only():
    """``Renderer`` with a grid: training (grad enabled) renders dense, since skipping has no
    gradient; under no_grad its grid is used (an empty grid: an empty image), unless the call
    passes ``grid=`` itself."""
    planes, dec, cams, cfg = _scene(res=6)
    renderer = Renderer(cfg, grid=OccupancyGrid(8).fill(False))
    kw = dict(impl="torch", deterministic=True)
    dense = render(planes, dec, cams, cfg, **kw)
    assert dense.weight_sum.max() > 0.5
    train = renderer(planes, dec, cams, **kw)
    assert torch.equal(train.weight_sum, dense.weight_sum) and train.samples_per_ray == 96
    with torch.no_grad():
        assert not renderer(planes, dec, cams, **kw).weight_sum.any()
        assert torch.equal(renderer(planes, dec, cams, grid=None, **kw).weight_sum, dense.weight_sum)


def test_empty_grid_depth_is_the_far_end_of_all_samples_with_jitter():
    """Rays with no weight get the largest depth of ALL the render's coarse samples (as the dense
    path's clamp to ``t.max()`` gives), one value for every ray, also with jittered depths where
    each ray's own last depth differs: by hand, ray_end + max(last jitter) * step."""
    planes, dec, cams, cfg = _scene(res=4, B=2)
    rnd = _randoms(2, cfg)
    out = render(planes, dec, cams, cfg, impl="torch", randoms=rnd, grid=OccupancyGrid(8).fill(False))
    step = (cfg.ray_end - cfg.ray_start) / (cfg.coarse_samples - 1)
    far = cfg.ray_end + rnd.coarse_jitter[..., -1].max().item() * step
    assert not out.weight_sum.any()
    torch.testing.assert_close(out.depth, torch.full_like(out.depth, far), atol=FAR_END_TOL, rtol=0)


@pytest.mark.parametrize("impl", ["torch", pytest.param("cpu", marks=needs_ext)])
def test_deterministic_render_draws_no_random_numbers(impl):
    """``deterministic=True`` reaches both passes of the dense render: no coarse jitter and the
    importance uniforms on linspace(0, 1), so two renders are bit-identical whatever torch's
    generator holds."""
    planes, dec, cams, cfg = _scene(res=6)
    torch.manual_seed(0)
    a = render(planes, dec, cams, cfg, impl=impl, deterministic=True)
    torch.manual_seed(1)
    b = render(planes, dec, cams, cfg, impl=impl, deterministic=True)
    for name in ("feature_image", "depth", "weight_sum"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


# The selected-sample composite against the dense reference on the same samples: float64, only
# the order of a few O(1) sums differs.
SELECTED_ATOL = 1e-12


def test_composite_selected_left_out_samples_never_tie_the_deepest():
    """``_composite_selected`` equals the reference composite of each ray's selected samples sorted
    by depth. The deepest selected sample of the whole render (ray 0's 2.9, at a slot after a
    left-out one) must stay the last real sample of its ray: left-out slots move past it (to the
    deepest depth + 1), never onto it, where a stable sort would put the left-out slot (lower
    index, no density) first and take away the light of the ray's last stretch."""
    from talk3d.ops import composite
    from talk3d.render.renderer import _composite_selected, _Samples

    g = torch.Generator().manual_seed(0)
    t = torch.tensor([[2.5, 2.7, 2.9, 2.6], [2.4, 2.55, 2.65, 2.8]], dtype=torch.float64)[None, :, :, None]
    selected = torch.tensor([[True, False, True, True], [True, True, False, True]])[None]
    sigma = torch.rand(1, 2, 4, 1, generator=g, dtype=torch.float64) * 4 + 1  # dense enough to matter
    ray, index = selected[0].nonzero(as_tuple=True)  # row-major: ray by ray, slots ascending
    feat = torch.rand(6, 3, generator=g, dtype=torch.float64)
    part = _Samples(ray=ray, index=index, sigma=sigma[0, ray, index], feat=feat, count=torch.tensor([3, 3]))
    img, depth, wsum = _composite_selected(sigma, t, selected, [part], [0], "torch")
    # The reference: each ray's three selected samples, sorted by depth.
    t_sel, s_sel = t[0, ray, index].view(2, 3), sigma[0, ray, index].view(2, 3)
    order = t_sel.argsort(dim=1)
    pick = lambda x: x.gather(1, order)  # noqa: E731
    f_sel = feat.view(2, 3, 3).gather(1, order[..., None].expand(-1, -1, 3))
    want = composite(pick(s_sel)[None, ..., None], f_sel[None], pick(t_sel)[None, ..., None], impl="torch")
    for name, got, exp in zip(("feature image", "depth", "weight sum"), (img, depth, wsum), want):
        torch.testing.assert_close(got, exp, atol=SELECTED_ATOL, rtol=0, msg=lambda m: f"{name}: {m}")


# --------------------------------------------------------------------------------------------------
# Mutation audit of the Python rendering code (2026-12-07): behaviour the tests above did not pin.

# A render against the same rays composited by hand from the reference field: both are fp32 PyTorch
# on the same points (the render's depths come from the same linspace), so only the order of a few
# fp32 sums of O(1) terms differs. Measured on the CPU VM: 0 dense, 2.4e-7 (2 ulps) with the full
# grid, whose path sums the features ray by ray; 1e-6 allows a few ulps.
LAYOUT_ATOL = 1e-6


@pytest.mark.parametrize("depths", ["fixed", "auto"])
def test_image_pixel_row_col_is_ray_row_times_res_plus_col(depths):
    """Pixel (row, col) of every output image (features, depth, weight sum) is ray
    ``row * res + col`` of :func:`generate_rays` (row = image down), composited here by hand from
    the reference field and compositing op, dense and with a full grid; with ``ray_start='auto'``
    each ray's depths run from where it enters the cube to where it leaves it
    (:func:`ray_box_limits`). The scene is seen off-axis, so a transposed image, or depths run
    backwards, would not match."""
    from talk3d.ops import composite
    from talk3d.ops.reference.triplane_field import triplane_field as reference_field
    from talk3d.render.cameras import generate_rays, ray_box_limits

    planes, dec, cams, _ = _scene(yaw=0.4, pitch=-0.2)
    res, S = 6, 8
    limits = dict(ray_start="auto", ray_end="auto") if depths == "auto" else {}
    cfg = RenderConfig(resolution=res, coarse_samples=S, importance_samples=0, **limits)
    o, d = generate_rays(cams, res)
    if depths == "auto":
        start, end, hit = ray_box_limits(o, d, cfg.box_warp)
        assert bool(hit.all()) and float(start.max() - start.min()) > 0.1  # a depth range per ray
    else:
        start, end = cfg.ray_start, cfg.ray_end
    t = (start + (end - start) * torch.linspace(0, 1, S)).expand(1, res * res, S)[..., None]
    xyz = (o[:, :, None] + d[:, :, None] * t).reshape(1, -1, 3)
    sigma, feat = reference_field(planes, xyz, *dec, box_warp=cfg.box_warp, axes=cfg.axes)
    want = composite(sigma.view(1, res * res, S, 1), feat.view(1, res * res, S, -1), t, impl="torch")
    img = want[0][0].view(res, res, -1)
    assert (img - img.transpose(0, 1)).abs().max() > 0.05  # not symmetric about the diagonal
    for kw in ({}, dict(grid=OccupancyGrid(8).fill())):
        out = render(planes, dec, cams, cfg, impl="torch", deterministic=True, **kw)
        for name, got, rays in zip(("feature_image", "depth", "weight_sum"),
                                   (out.feature_image, out.depth, out.weight_sum), want):
            expected = rays[0].view(res, res, -1).permute(2, 0, 1)  # [C, row, col] from ray row * res + col
            torch.testing.assert_close(got[0], expected, atol=LAYOUT_ATOL, rtol=0, msg=lambda m: f"{name} {kw}: {m}")


def test_chunked_early_stop_stops_each_ray_at_its_coarse_transmittance():
    """With ``chunk`` and ``early_stop`` (a full grid, no importance pass) a ray evaluates chunk
    after chunk of coarse samples until the transmittance over its evaluated intervals falls under
    ``early_stop``: it takes the first m in (chunk, 2 chunk, ..., S) with T(m) < early_stop (or S),
    T(m) the product of ``exp(-softplus(sigma_mid - 1) * delta) + 1e-10`` over its first m - 1
    intervals, worked out here in float64 from the reference field. samples_per_ray is the mean m."""
    from talk3d.ops.reference.triplane_field import triplane_field as reference_field
    from talk3d.render.cameras import generate_rays

    planes, dec, cams, _ = _scene(yaw=0.3, pitch=0.1)
    res, S, chunk, stop = 8, 24, 4, 1e-2
    cfg = RenderConfig(resolution=res, coarse_samples=S, importance_samples=0)
    o, d = generate_rays(cams, res)
    t = torch.linspace(cfg.ray_start, cfg.ray_end, S)
    xyz = (o[:, :, None] + d[:, :, None] * t[:, None]).reshape(1, -1, 3)
    sigma, _ = reference_field(planes, xyz, *dec, box_warp=cfg.box_warp, axes=cfg.axes)
    sigma, t = sigma.view(res * res, S).double(), t.double()
    density = torch.nn.functional.softplus((sigma[:, :-1] + sigma[:, 1:]) / 2 - 1)
    after = (torch.exp(-density * (t[1:] - t[:-1])) + 1e-10).cumprod(dim=1)  # after[:, m - 2]: T(m)
    expected = []
    for r in range(res * res):
        m = chunk
        while m < S and after[r, m - 2] >= stop:
            m = min(m + chunk, S)
        expected.append(m)
    # Every decision is far from the threshold (measured: T at least 10 % off it), so fp32 against
    # float64 cannot flip one; rays stop at different chunks.
    decided = after[:, chunk - 2::chunk]
    assert float((decided / stop).log().abs().min()) > 0.05 and len(set(expected)) > 2
    out = render(planes, dec, cams, cfg, impl="torch", deterministic=True, grid=OccupancyGrid(8).fill(),
                 early_stop=stop, chunk=chunk)
    assert out.samples_per_ray == pytest.approx(sum(expected) / len(expected), abs=1e-9)


def test_jitter_of_exactly_one_is_refused():
    """Coarse jitter lies in [0, 1): a jitter of exactly 1 would put a depth on the next bin's
    linspace depth, so it is refused like any other value outside the range."""
    with pytest.raises(ValueError, match=r"jitter must lie in \[0, 1\)"):
        stratified_depths(4, 2.0, 3.0, (1, 1), jitter=torch.tensor([[[0.0, 0.5, 1.0, 0.25]]]))
    nearly = torch.tensor([[[0.0, 0.5, 1.0 - 2**-24, 0.25]]])  # the largest float32 below 1 passes
    assert stratified_depths(4, 2.0, 3.0, (1, 1), jitter=nearly).shape == (1, 1, 4, 1)


def test_render_check_cameras_false_runs_no_camera_check(monkeypatch):
    """``check_cameras=False`` skips the cameras' checks (each reads the device back: a GPU sync a
    frame); by default the render checks them once."""
    import talk3d.render.cameras as cameras_module

    planes, dec, cams, _ = _scene()
    calls = []
    real = cameras_module._check_cameras
    monkeypatch.setattr(cameras_module, "_check_cameras", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    cfg = RenderConfig(resolution=2, coarse_samples=4, importance_samples=0)
    render(planes, dec, cams, cfg, impl="torch", deterministic=True)
    assert calls == ["generate_rays"]
    calls.clear()
    render(planes, dec, cams, cfg, impl="torch", deterministic=True, check_cameras=False)
    assert calls == []


def test_weights_summing_to_zero_give_finite_depths():
    """:func:`invert_cdf` does not divide a row of zero weights by its zero sum (NaN depths): by
    hand, every u falls past the flat CDF's last step, onto the edge ``bins_W``."""
    from talk3d.render.sampling import invert_cdf

    bins = torch.linspace(2.0, 3.0, 9, dtype=torch.float64)[None]  # [1, K = 9]
    weights = torch.zeros(1, 6, dtype=torch.float64)  # W = 6 <= K - 1
    u = torch.tensor([[0.0, 0.3, 0.999]], dtype=torch.float64)
    torch.testing.assert_close(invert_cdf(bins, weights, u), bins[:, 6:7].expand(1, 3), atol=HAND_ATOL, rtol=0)


# Half-precision features summed in fp32 against the fp32 sum of the same (widened) values: only the
# order of fp32 sums of 16 O(1) terms differs (measured 2.4e-7 on the CPU VM); a bf16 sum of
# bf16-rounded weights instead is off by 3.1e-3 (measured).
WIDENED_SUM_ATOL = 1e-6


def test_half_features_are_summed_in_fp32_on_the_cpu():
    """On the CPU, bf16 field outputs are widened before the dense path's per-pass feature sums
    (``_composite_unmerged``, which ``impl='auto'`` takes with bf16 planes there), so the image is the
    fp32 composite of the bf16 values; a bf16 matrix product of bf16-rounded weights is not."""
    from talk3d.ops import composite
    from talk3d.render.renderer import _composite_unmerged

    B, R, Sc, Si, F = 1, 5, 10, 6, 4
    sigma = (torch.randn(B, R, Sc + Si, 1) * 3 + 2).to(torch.bfloat16)
    feat = torch.rand(B, R, Sc + Si, F).to(torch.bfloat16)
    t = torch.cat([torch.linspace(2.25, 3.3, Sc).expand(B, R, Sc), 2.25 + 1.05 * torch.rand(B, R, Si)], dim=2)[..., None]
    img, depth, wsum = _composite_unmerged(sigma[:, :, :Sc], feat[:, :, :Sc], sigma[:, :, Sc:], feat[:, :, Sc:], t,
                                           "cpu")
    order = t.argsort(dim=2)
    take = lambda x: x.gather(2, order.expand(-1, -1, -1, x.shape[-1]))  # noqa: E731
    want = composite(take(sigma.float()), take(feat.float()), take(t), impl="torch")
    assert img.dtype == torch.float32
    for name, got, exp in zip(("feature image", "depth", "weight sum"), (img, depth, wsum), want):
        torch.testing.assert_close(got, exp, atol=WIDENED_SUM_ATOL, rtol=0, msg=lambda m: f"{name}: {m}")
