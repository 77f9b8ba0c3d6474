"""binomial_filter2d (EG3D's 4x4 FIR) against its reference: every back end, forward and backward,
paddings that pad and that crop, half precision, gradcheck, opcheck, input errors, and upfirdn2d
taking the kernel."""
from __future__ import annotations

import pytest
import torch

from talk3d import extension
from talk3d.models import layers
from talk3d.ops import binomial_filter2d, reference

# fp32 kernels against float64: each output sums 16 products of O(1) values with weights summing to
# gain, so a few fp32 ulps (~1e-7) of the output's scale.
FP32_TOL = 1e-5
# float64 kernels against float64 (the reference, or upfirdn2d's convolution): the same 16-term sums
# in another order, ~1e-16 of the output's scale.
FP64_TOL = 1e-12
# float16/bfloat16 storage: the kernel rounds each output once (it accumulates in float32), so its
# error is at most half an ulp of the output plus the float32 sum's; PyTorch's half convolution is
# allowed HALF_ERR_FACTOR times more than that in its own right. Judged as: kernel error <= this
# factor times PyTorch's own error in that dtype, both against float64 on the same rounded input.
HALF_ERR_FACTOR = 2.0

BACKENDS = [
    pytest.param("cpu", marks=pytest.mark.skipif(not extension.available(), reason="talk3d._C not built")),
    pytest.param("cuda", marks=pytest.mark.cuda),
]
# (left, right, top, bottom): upfirdn2d's paddings (after a stride-2 transposed conv, upsample2d,
# downsample2d), an asymmetric one, and crops.
PADDINGS = [(1, 1, 1, 1), (2, 1, 2, 1), (0, 3, 2, 0), (-1, 2, 3, -2), (3, 3, 3, 3), (4, 0, -2, 5)]


def device_of(impl: str) -> str:
    return "cuda" if impl == "cuda" else "cpu"


def check(impl, shape, padding, gain, dtype=torch.float32, memory_format=torch.contiguous_format):
    x = torch.randn(*shape, dtype=dtype, device=device_of(impl)).to(memory_format=memory_format).requires_grad_()
    y = binomial_filter2d(x, padding, gain, impl=impl)
    gy = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, gy)
    for t in (y, gx):  # the layout is kept, forward and backward
        assert t.is_contiguous(memory_format=memory_format)
    x64 = x.detach().cpu().double().requires_grad_()
    y64 = reference.binomial_filter2d(x64, padding, gain)
    (gx64,) = torch.autograd.grad(y64, x64, gy.cpu().double())
    tol = FP64_TOL if dtype == torch.float64 else FP32_TOL
    assert y.dtype == dtype and y.shape == y64.shape
    for name, got, want in (("y", y, y64), ("dx", gx, gx64)):
        err = (got.detach().cpu().double() - want).abs().max().item()
        assert err <= tol * max(1.0, want.abs().max().item()), f"{name}: max error {err:.3g}"


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("padding", PADDINGS)
def test_matches_reference(impl, padding):
    check(impl, (2, 3, 9, 14), padding, gain=4.0)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("padding", PADDINGS[:4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channels_last(impl, padding, dtype):
    # NHWC in, NHWC out (the super-resolution runs channels-last); 5 channels and 13 columns leave
    # partial strips and no alignment to lean on.
    check(impl, (2, 5, 9, 13), padding, gain=4.0, dtype=dtype, memory_format=torch.channels_last)


@pytest.mark.parametrize("impl", BACKENDS)
def test_empty_input_padded_to_an_output_gives_zeros(impl):
    """H = 0 with enough padding: every tap is padding (on CUDA the empty input has no storage)."""
    x = torch.empty(1, 2, 0, 5, device=device_of(impl))
    y = binomial_filter2d(x, (0, 0, 2, 2), impl=impl)
    assert y.shape == (1, 2, 1, 2) and not y.any()


@pytest.mark.parametrize("impl", BACKENDS)
def test_float64_and_odd_widths(impl):
    # widths that leave partial strips of 1, 2 and 3 outputs at the row's end
    for W in (4, 5, 6, 7):
        check(impl, (1, 2, 5, W), (1, 1, 1, 1), gain=1.0, dtype=torch.float64)


@pytest.mark.parametrize("impl", BACKENDS)
def test_non_contiguous_input(impl):
    x = torch.randn(2, 8, 12, 10, device=device_of(impl))[:, ::2].transpose(2, 3)
    assert not x.is_contiguous()
    y = binomial_filter2d(x, (1, 2, 2, 1), 2.0, impl=impl)
    want = reference.binomial_filter2d(x.cpu().double(), (1, 2, 2, 1), 2.0)
    assert (y.cpu().double() - want).abs().max().item() <= FP32_TOL * want.abs().max().item()


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(impl, dtype):
    x = torch.randn(2, 4, 33, 40, device=device_of(impl)).to(dtype)
    pad = (2, 1, 2, 1)
    want = reference.binomial_filter2d(x.cpu().double(), pad, 4.0)
    got = binomial_filter2d(x, pad, 4.0, impl=impl)
    torch_own = reference.binomial_filter2d(x.cpu().float(), pad, 4.0).to(dtype)  # a result rounded once
    err = (got.cpu().double() - want).abs().max().item()
    base = (torch_own.double() - want).abs().max().item()
    assert got.dtype == dtype and err <= HALF_ERR_FACTOR * base, f"{dtype}: {err:.3g} vs rounding {base:.3g}"


@pytest.mark.parametrize("impl", BACKENDS)
def test_gradcheck_float64(impl):
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, device=device_of(impl), requires_grad=True)
    fn = lambda t: binomial_filter2d(t, (-1, 2, 3, 1), 4.0, impl=impl)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.skipif(not extension.available(), reason="talk3d._C not built")
def test_opcheck():
    torch.library.opcheck(torch.ops.talk3d.binomial_filter2d.default, (torch.randn(2, 3, 7, 9), 1, 2, 6, 9, 4.0))


@pytest.mark.skipif(not extension.available(), reason="talk3d._C not built")
def test_opcheck_channels_last():
    x = torch.randn(2, 3, 7, 9).to(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.talk3d.binomial_filter2d.default, (x, 1, 2, 6, 9, 4.0))


@pytest.mark.cuda
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_opcheck_cuda(memory_format):
    x = torch.randn(2, 3, 7, 9, device="cuda").to(memory_format=memory_format)
    torch.library.opcheck(torch.ops.talk3d.binomial_filter2d.default, (x, 1, 2, 6, 9, 4.0))


def test_input_errors():
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        binomial_filter2d(torch.randn(3, 8, 8))
    with pytest.raises(TypeError, match="float32"):
        binomial_filter2d(torch.zeros(1, 1, 8, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="leaves no output"):
        binomial_filter2d(torch.randn(1, 1, 4, 4), (-1, 0, 0, 0))
    with pytest.raises(ValueError, match="impl"):
        binomial_filter2d(torch.randn(1, 1, 8, 8), impl="triton")
    with pytest.raises(ValueError, match="padding"):
        binomial_filter2d(torch.randn(1, 1, 8, 8), (1, 1))


@pytest.mark.skipif(not extension.available(), reason="talk3d._C not built")
def test_compiled_op_checks_its_inputs():
    with pytest.raises(ValueError, match="at least 1 x 1"):
        torch.ops.talk3d.binomial_filter2d(torch.randn(1, 1, 4, 4), 0, 0, 0, 1, 1.0)
    with pytest.raises(TypeError, match="float32"):
        torch.ops.talk3d.binomial_filter2d(torch.zeros(1, 1, 4, 4, dtype=torch.int64), 0, 0, 1, 1, 1.0)


@pytest.mark.skipif(not extension.available(), reason="talk3d._C not built")
@pytest.mark.parametrize("up, down", [(1, 1), (2, 1), (1, 2)])
def test_upfirdn2d_takes_the_kernel(monkeypatch, up, down):
    """upfirdn2d's binomial filtering goes through the op (spied on) and matches the convolution
    path (another filter's, here the same taps as an explicit filter), values and gradients."""
    f = layers.setup_filter()
    x = torch.randn(2, 3, 10, 12, dtype=torch.float64, requires_grad=True)
    pad = (2, 1, 2, 1)
    calls = []
    real = layers.binomial_filter2d

    def spy(*args, **kwargs):
        calls.append(kwargs.get("impl", "auto"))
        return real(*args, **kwargs)

    monkeypatch.setattr(layers, "binomial_filter2d", spy)
    as_other = f.clone()
    as_other[0, 0] += 1e-3  # not recognised as EG3D's filter: the depthwise convolution
    # What the float32 tap really gained, exactly: 1e-3 rounded into it is off by 1.6e-10, which
    # times gain and |x| reached 2.4e-9 (far over FP64_TOL; measured failing on 3 % of inputs).
    bump = float(as_other[0, 0]) - float(f[0, 0])
    want = layers.upfirdn2d(x, as_other, up=up, down=down, padding=pad, gain=up * up)
    want = want - (bump * up * up) * _corner_tap(x, up, down, pad)
    (gwant,) = torch.autograd.grad(want.square().sum(), x)
    assert calls == []  # other filters keep the convolution
    got = layers.upfirdn2d(x, f, up=up, down=down, padding=pad, gain=up * up)
    (ggot,) = torch.autograd.grad(got.square().sum(), x)
    assert calls == ["auto"]  # the C++ kernel on the CPU
    # float64 both ways, the same taps: measured 5.3e-15 (CPU VM, 300 seeds each).
    assert torch.allclose(got, want, rtol=0, atol=FP64_TOL) and torch.allclose(ggot, gwant, rtol=0, atol=FP64_TOL)


def _corner_tap(x, up, down, pad):
    """What the extra 1e-3 on tap [0, 0] of the perturbed filter adds (before the gain): the
    zero-inserted, padded input shifted by the flipped tap's offset, decimated."""
    e = torch.zeros(4, 4, dtype=x.dtype)
    e[0, 0] = 1.0
    return layers.upfirdn2d(x, e, up=up, down=down, padding=pad)


@pytest.mark.skipif(not extension.available(), reason="talk3d._C not built")
def test_torch_compile_forward_and_backward():
    """The autograd wrapper traces whole (fake impl, backward through the op again)."""
    x = torch.randn(2, 3, 9, 10, requires_grad=True)

    def loss(t):
        return binomial_filter2d(t, (2, 1, 2, 1), 4.0, impl="cpu").square().mean()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got, want = compiled(x), loss(x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])
