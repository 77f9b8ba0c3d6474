"""talk3d.ops.transpose_inner (the planes' channels-last conversion) and channels_last_planes:
the C++ CPU tiled transpose against the reference on fresh random inputs, every dtype, ragged
tiles, non-contiguous inputs; the autograd wrapper's values and gradients; opcheck."""
from __future__ import annotations

import pytest
import torch

from talk3d import extension
from talk3d.ops import channels_last_planes, reference, transpose_inner, triplane_field

needs_ext = pytest.mark.skipif(not extension.available(), reason="talk3d._C not built")

# Shapes: the planes' two directions at a small size, and sizes that leave ragged 64-tiles and
# 8x8 blocks in both dimensions.
SHAPES = [(3, 32, 4096), (3, 4096, 32), (2, 13, 37), (1, 7, 9), (4, 65, 130), (1, 1, 1), (2, 0, 5)]
# The fused field's float64 plane gradient against the reference's: the same products summed in
# another order, a few ulps. Measured 1.7e-16 absolute (gradients up to 0.35), 2e-12 relative on the
# smallest entries (CPU VM).
FIELD_GRAD_RTOL = 1e-10
FIELD_GRAD_ATOL = 1e-12
# Three float64 gradients added into one buffer in another order than sum(weights): an ulp or two of
# O(1) values. Measured 8.9e-16 (CPU VM, 20 seeds).
ACCUMULATE_ATOL = 1e-12


@needs_ext
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_transpose_inner_matches_reference(shape, dtype):
    x = torch.randn(shape).to(dtype)
    got = transpose_inner(x, impl="cpu")
    assert got.is_contiguous() and got.shape == (shape[0], shape[2], shape[1])
    assert torch.equal(got, reference.transpose_inner(x))  # a copy: bit-exact


@needs_ext
def test_transpose_inner_non_contiguous_input():
    x = torch.randn(3, 40, 50).transpose(1, 2)  # [3, 50, 40] viewed
    assert torch.equal(transpose_inner(x, impl="cpu"), x.transpose(1, 2).contiguous())


def test_transpose_inner_errors():
    with pytest.raises(ValueError, match="3-D"):
        transpose_inner(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="impl"):
        transpose_inner(torch.zeros(1, 2, 3), impl="cuda")


@needs_ext
def test_transpose_inner_opcheck():
    torch.library.opcheck(torch.ops.talk3d.transpose_inner.default, (torch.randn(2, 5, 7),))


@needs_ext
def test_channels_last_planes_values_and_gradient():
    """The view has the planes' values and channel stride 1; gradients (float64) pass through."""
    planes = torch.randn(2, 3, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    cl = channels_last_planes(planes)
    assert cl.stride(2) == 1 and torch.equal(cl, planes)
    torch.autograd.gradcheck(lambda p: channels_last_planes(p) * 1.0, (planes,))
    # A gradient arriving as channels-last memory (as the field op's) and as a plain tensor.
    g = torch.randn(2, 3, 5, 6, 4, dtype=torch.float64).permute(0, 1, 4, 2, 3)
    (grad,) = torch.autograd.grad(channels_last_planes(planes), planes, g)
    assert torch.equal(grad, g) and grad.is_contiguous()


@needs_ext
def test_field_gradient_with_api_planes_matches_reference():
    """The fused field op on contiguous [B, 3, C, H, W] planes (converted by transpose_inner, its
    gradient converted back) gives the reference's plane gradient."""
    g = torch.Generator().manual_seed(0)
    planes = torch.randn(1, 3, 32, 16, 16, generator=g, dtype=torch.float64, requires_grad=True)
    xyz = torch.rand(1, 200, 3, generator=g, dtype=torch.float64) - 0.5
    w1, b1 = torch.randn(64, 32, generator=g, dtype=torch.float64) / 32**0.5, torch.zeros(64, dtype=torch.float64)
    w2, b2 = torch.randn(33, 64, generator=g, dtype=torch.float64) / 8, torch.zeros(33, dtype=torch.float64)
    grads = []
    for impl in ("torch", "cpu"):
        sigma, feat = triplane_field(planes, xyz, w1, b1, w2, b2, impl=impl)
        (gp,) = torch.autograd.grad(sigma.sum() + feat.square().sum(), planes)
        grads.append(gp)
    torch.testing.assert_close(grads[1], grads[0], rtol=FIELD_GRAD_RTOL, atol=FIELD_GRAD_ATOL)


def test_shared_buffer_views_accumulate_gradients():
    """Several field calls on one channels-last buffer, each through its own planes_view: the values
    are the planes', and the buffer's gradient is the sum of the calls' (contiguous, owning its
    memory so autograd can add the next call's into it in place)."""
    from talk3d.ops.layout import channels_last_buffer, planes_view

    planes = torch.randn(2, 3, 5, 4, 6, dtype=torch.float64, requires_grad=True)
    buf = channels_last_buffer(planes)
    assert buf.shape == (2, 3, 4, 6, 5) and buf.is_contiguous()
    views = [planes_view(buf) for _ in range(3)]
    for v in views:
        assert torch.equal(v, planes) and v.stride(2) == 1
    weights = [torch.randn_like(planes) for _ in views]
    seen = []
    buf.register_hook(lambda g: seen.append(g))
    sum((v * w).sum() for v, w in zip(views, weights)).backward()
    torch.testing.assert_close(planes.grad, sum(weights), rtol=0, atol=ACCUMULATE_ATOL)
    assert seen[0].is_contiguous()
    # What lets autograd add the calls' gradients in place: the one a view hands back owns its
    # memory (a plain permute's backward hands back a view of the incoming gradient).
    (g_view,) = torch.autograd.grad(planes_view(buf).sum(), buf)
    (g_permute,) = torch.autograd.grad(buf.permute(0, 1, 4, 2, 3).sum(), buf)
    assert g_view._base is None and g_view.is_contiguous()
    assert g_permute._base is not None
    with pytest.raises(ValueError, match="planes_view"):
        planes_view(buf[0])


def test_planes_view_hands_back_an_owning_gradient_for_channels_last_gradients():
    """The field op's plane gradient is channels-last memory viewed [B, 3, C, H, W]: permuted back to
    the buffer's [B, 3, H, W, C] it is already contiguous, so ``.contiguous()`` copies nothing and
    only the detach makes the gradient handed back a tensor of its own (no ``_base``), which autograd
    may add the next call's gradient into in place. Values unchanged."""
    from talk3d.ops.layout import channels_last_buffer, planes_view

    planes = torch.randn(1, 3, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    buf = channels_last_buffer(planes)
    incoming = torch.randn(1, 3, 5, 6, 4, dtype=torch.float64)  # [B, 3, H, W, C] memory
    (g,) = torch.autograd.grad(planes_view(buf), buf, incoming.permute(0, 1, 4, 2, 3))
    assert torch.equal(g, incoming) and g.is_contiguous() and g._base is None
