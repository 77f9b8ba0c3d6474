"""bias_act (StyleGAN2's bias + leaky ReLU + gain + clamp in one pass) against its reference: every
back end, forward and backward, both layouts, other ranks, no bias, half precision, gradcheck,
opcheck, torch.compile, input errors, and the layers taking the kernel."""
from __future__ import annotations

import pytest
import torch

from talk3d import extension
from talk3d.models import layers
from talk3d.ops import bias_act, reference

# fp32 kernels against float64: one add, one multiply or two and a compare per element: a few ulps.
FP32_TOL = 1e-6
FP64_TOL = 1e-14
# A strided (non-dense) input: the same per-element arithmetic as a dense one, outputs clamped to
# |y| <= 1, so FP32_TOL's few ulps; twice that as margin. Measured 8.3e-8 (CPU VM, 20 seeds).
NON_DENSE_TOL = 2 * FP32_TOL
# A SynthesisLayer's input and parameter gradients through the fused op against the reference chain:
# dy agrees to FP32_TOL, then PyTorch's own conv/affine backward sums ~10^2 products of it in float32.
# Measured: bit-identical (0) on the CPU VM (10 seeds).
SYNTH_GRAD_ATOL = SYNTH_GRAD_RTOL = 1e-5
# float16/bfloat16: the kernels round once from float32; PyTorch's own half-precision chain rounds
# after every step. Kernel error <= this factor times PyTorch's own, both against float64 on the
# same rounded inputs.
HALF_ERR_FACTOR = 2.0

BACKENDS = [
    pytest.param("cpu", marks=pytest.mark.skipif(not extension.available(), reason="talk3d._C not built")),
    pytest.param("cuda", marks=pytest.mark.cuda),
]
# (slope, gain, clamp): EG3D's synthesis layer (lrelu, sqrt 2, conv_clamp), ToRGB (linear with a
# clamp), a ReLU, and a clamp tight enough to cut a good share of the values.
ACTS = [(0.2, 2**0.5, None), (1.0, 1.0, 256.0), (0.0, 2**0.5, None), (0.2, 2**0.5, 0.8)]


def device_of(impl: str) -> str:
    return "cuda" if impl == "cuda" else "cpu"


def check(impl, shape, act, *, dtype=torch.float32, memory_format=torch.contiguous_format, with_bias=True):
    slope, gain, clamp = act
    dev = device_of(impl)
    x = torch.randn(*shape, dtype=dtype, device=dev).to(memory_format=memory_format).requires_grad_()
    b_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # a bias in float32 for half x
    b = torch.randn(shape[1], dtype=b_dtype, device=dev, requires_grad=True) if with_bias else None
    y = bias_act(x, b, slope=slope, gain=gain, clamp=clamp, impl=impl)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous(memory_format=memory_format)
    gy = torch.randn_like(y)
    wanted = (x, b) if with_bias else (x,)
    got = torch.autograd.grad(y, wanted, gy)
    x64 = x.detach().cpu().double().requires_grad_()
    b64 = b.detach().cpu().double().requires_grad_() if with_bias else None
    y64 = reference.bias_act(x64, b64, slope=slope, gain=gain, clamp=clamp)
    want = torch.autograd.grad(y64, (x64, b64) if with_bias else (x64,), gy.cpu().double())
    tol = FP64_TOL if dtype == torch.float64 else FP32_TOL
    for name, g, w in zip(("y", "dx", "db"), (y, *got), (y64, *want)):
        err = (g.detach().cpu().double() - w).abs().max().item()
        # db sums N * H * W gradients: float32 summation over that many terms
        scale = max(1.0, w.abs().max().item()) * (x[:, 0].numel() if name == "db" else 1)
        assert err <= tol * scale, f"{name}: max error {err:.3g}"


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_matches_reference(impl, act, memory_format):
    check(impl, (2, 5, 7, 9), act, memory_format=memory_format)


@pytest.mark.parametrize("impl", BACKENDS)
def test_other_ranks_no_bias_and_float64(impl):
    check(impl, (6, 11), ACTS[0])  # the mapping network's [B, features]
    check(impl, (2, 3, 4, 5, 6), ACTS[3], dtype=torch.float64)
    check(impl, (3, 4, 5, 5), ACTS[1], with_bias=False)
    check(impl, (3, 4, 1, 1), ACTS[0], memory_format=torch.channels_last)  # NCHW and NHWC at once


@pytest.mark.parametrize("impl", BACKENDS)
def test_empty_inputs(impl):
    dev = device_of(impl)
    for shape in ((0, 3, 4, 4), (2, 0, 4, 4), (2, 3, 0, 5)):
        x = torch.randn(shape, device=dev, requires_grad=True)
        b = torch.randn(shape[1], device=dev, requires_grad=True)
        y = bias_act(x, b, impl=impl)
        assert y.shape == x.shape
        dx, db = torch.autograd.grad(y, (x, b), torch.ones_like(y))
        assert dx.shape == x.shape and db.shape == b.shape and not db.any()


@pytest.mark.parametrize("impl", BACKENDS)
def test_non_dense_input(impl):
    x = torch.randn(2, 8, 12, 10, device=device_of(impl))[:, ::2].transpose(2, 3)
    b = torch.randn(4, device=device_of(impl))
    y = bias_act(x, b, slope=0.2, gain=1.5, clamp=1.0, impl=impl)
    want = reference.bias_act(x.cpu().double(), b.cpu().double(), slope=0.2, gain=1.5, clamp=1.0)
    assert (y.cpu().double() - want).abs().max().item() <= NON_DENSE_TOL


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(impl, dtype):
    dev = device_of(impl)
    x = (3 * torch.randn(2, 6, 9, 11, device=dev)).to(dtype)
    b = torch.randn(6, device=dev)
    kw = dict(slope=0.2, gain=2**0.5, clamp=2.0)
    want = reference.bias_act(x.cpu().double(), b.cpu().double(), **kw)
    got = bias_act(x, b, impl=impl, **kw)
    torch_own = reference.bias_act(x.cpu(), b.cpu(), **kw)  # PyTorch's chain in that dtype
    err = (got.cpu().double() - want).abs().max().item()
    base = (torch_own.double() - want).abs().max().item()
    assert got.dtype == dtype and err <= HALF_ERR_FACTOR * base, f"{dtype}: {err:.3g} vs PyTorch's {base:.3g}"


@pytest.mark.parametrize("impl", BACKENDS)
def test_gradcheck_float64(impl):
    dev = device_of(impl)
    # Values kept off 0 and off the clamp, where the derivative jumps.
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, device=dev)
    x = (x + 0.3 * x.sign()).requires_grad_()
    b = torch.zeros(3, dtype=torch.float64, device=dev, requires_grad=True)
    fn = lambda t, c: bias_act(t, c, slope=0.2, gain=1.3, clamp=1.9, impl=impl)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, b))


@pytest.mark.skipif(not extension.available(), reason="talk3d._C not built")
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_opcheck(memory_format):
    x = torch.randn(2, 3, 5, 4).to(memory_format=memory_format)
    torch.library.opcheck(torch.ops.talk3d.bias_act_fwd.default, (x, torch.randn(3), 0.2, 1.4, 0.9))
    torch.library.opcheck(torch.ops.talk3d.bias_act_fwd.default, (x, None, 1.0, 1.0, -1.0))
    torch.library.opcheck(torch.ops.talk3d.bias_act_bwd.default, (torch.randn_like(x), x, 0.2, 1.4, 0.9))


@pytest.mark.cuda
def test_opcheck_cuda():
    x = torch.randn(2, 3, 5, 4, device="cuda").to(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.talk3d.bias_act_fwd.default, (x, torch.randn(3, device="cuda"), 0.2, 1.4, 0.9))
    torch.library.opcheck(torch.ops.talk3d.bias_act_bwd.default, (torch.randn_like(x), x, 0.2, 1.4, 0.9))


@pytest.mark.skipif(not extension.available(), reason="talk3d._C not built")
def test_torch_compile():
    x, b = torch.randn(2, 3, 6, 6, requires_grad=True), torch.randn(3, requires_grad=True)
    fn = torch.compile(lambda t, c: bias_act(t, c, slope=0.2, gain=1.4, clamp=1.0, impl="cpu"),
                       backend="aot_eager", fullgraph=True)
    got = fn(x, b)
    want = bias_act(x, b, slope=0.2, gain=1.4, clamp=1.0, impl="cpu")
    torch.testing.assert_close(got, want)
    g = torch.autograd.grad(got.sum(), (x, b))
    torch.testing.assert_close(g, torch.autograd.grad(want.sum(), (x, b)))


def test_input_errors():
    with pytest.raises(ValueError, match=r"\[N, C, \.\.\.\]"):
        bias_act(torch.randn(3))
    with pytest.raises(TypeError, match="float32"):
        bias_act(torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="b must be"):
        bias_act(torch.randn(2, 3, 4, 4), torch.randn(4))
    with pytest.raises(ValueError, match="gain"):
        bias_act(torch.randn(2, 3), gain=0.0)
    with pytest.raises(ValueError, match="clamp"):
        bias_act(torch.randn(2, 3), clamp=-1.0)
    with pytest.raises(ValueError, match="impl"):
        bias_act(torch.randn(2, 3), impl="triton")


@pytest.mark.skipif(not extension.available(), reason="talk3d._C not built")
def test_compiled_op_checks_its_inputs():
    with pytest.raises(ValueError, match="gain"):
        torch.ops.talk3d.bias_act_fwd(torch.randn(2, 3), None, 0.2, -1.0, -1.0)
    with pytest.raises(ValueError, match=r"b must be \[C\]"):
        torch.ops.talk3d.bias_act_fwd(torch.randn(2, 3), torch.randn(2), 0.2, 1.0, -1.0)
    with pytest.raises(TypeError, match="b must be"):
        torch.ops.talk3d.bias_act_fwd(torch.randn(2, 3), torch.randn(3, dtype=torch.float64), 0.2, 1.0, -1.0)
    with pytest.raises(ValueError, match="grad must match"):
        torch.ops.talk3d.bias_act_bwd(torch.randn(2, 4), torch.randn(2, 3), 0.2, 1.0, -1.0)


@pytest.mark.skipif(not extension.available(), reason="talk3d._C not built")
def test_synthesis_layers_take_the_kernel(monkeypatch):
    """The generator's layers go through the fused op (spied on), with the same result as the
    reference chain they replaced, values and gradients."""
    from talk3d.models import SynthesisLayer

    torch.manual_seed(0)
    layer = SynthesisLayer(4, 6, 8, 10, conv_clamp=0.5).train()
    x, w = torch.randn(2, 4, 10, 10, requires_grad=True), torch.randn(2, 8)
    calls = []
    real = layers.fused_bias_act
    monkeypatch.setattr(layers, "fused_bias_act", lambda *a, **k: calls.append(k.get("slope")) or real(*a, **k))
    got = layer(x, w, noise_mode="const")
    assert calls == [layers.LRELU_SLOPE]
    monkeypatch.setattr(layers, "fused_bias_act", lambda *a, **k: real(*a, **k, impl="torch"))
    want = layer(x, w, noise_mode="const")
    torch.testing.assert_close(got, want, atol=FP32_TOL, rtol=0)
    gy = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, (x, *layer.parameters()), gy),
                    torch.autograd.grad(want, (x, *layer.parameters()), gy)):
        torch.testing.assert_close(a, b, atol=SYNTH_GRAD_ATOL, rtol=SYNTH_GRAD_RTOL)
