import pytest
import torch

from mecqtk.quant import arith


@pytest.fixture(params=["direct", "dynamo"])
def compiled(request):
    """The compiled kernels, called directly (the default) or through torch.compile (what a
    layout no graph was built for falls back to)."""
    if not arith.use_compiled_kernels(True, direct=request.param == "direct"):
        pytest.skip("torch.compile is not available on this machine")
    yield
    arith.use_compiled_kernels(False)


def _run(x, scale, zp, qmin, qmax):
    x = x.clone().requires_grad_(True)
    scale = scale.clone().requires_grad_(True)
    zp = None if zp is None else zp.clone().requires_grad_(True)
    y = arith.fake_quantize(x, scale, qmin, qmax, zero_point=zp, grad_scale=0.1)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), x.grad, scale.grad, None if zp is None else zp.grad


def _case(case: str, seed: int):
    """(x, step, zero point, (qmin, qmax)) of a per-tensor 2-bit, a per-channel 2-bit weight
    or an 8-bit zero-point quantizer."""
    torch.manual_seed(seed)
    if case == "per_channel":
        return torch.randn(16, 8, 3, 3), torch.rand(16, 1, 1, 1) + 0.05, None, (-2, 1)
    if case == "zero_point":
        return torch.randn(4, 8, 5, 5), torch.tensor(0.013), torch.tensor(100.0), (0, 255)
    return torch.randn(4, 8, 5, 5) * 3, torch.tensor(0.1), None, (0, 3)


def _eager_fake_quantize(x, scale, zero_point, qmin, qmax, grad_scale):
    """The eager path (the autograd.Function around the kernels), without saved codes."""
    return arith._FakeQuantize.apply(x, scale, None, zero_point, qmin, qmax, None,
                                     grad_scale, None)[0]


@pytest.mark.parametrize("case", ["per_tensor", "per_channel", "zero_point"])
def test_compiled_kernels_are_bit_identical_to_eager(compiled, case):
    x, scale, zp, q = _case(case, seed=0)
    fast = _run(x, scale, zp, *q)
    arith.use_compiled_kernels(False)
    slow = _run(x, scale, zp, *q)
    # values and input gradients are elementwise: bit-identical; step-size gradients are sums,
    # whose order the fused loop may change
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
    assert torch.allclose(fast[2], slow[2], rtol=1e-5, atol=1e-7)
    assert (fast[3] is None) == (slow[3] is None)
    if fast[3] is not None:
        assert torch.allclose(fast[3], slow[3], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", ["per_tensor", "per_channel", "zero_point"])
def test_traced_expression_under_torch_compile_equals_the_eager_kernels(case):
    """What torch.compile of a whole QAT model traces (arith._traceable_fake_quantize, fused by
    inductor) computes the eager kernels' values and input gradients bit for bit."""
    x, scale, zp, q = _case(case, seed=1)
    # exact halves: x/s lands on .5 and must round to even in both
    x.view(-1)[:8] = scale.view(-1)[0] * torch.tensor([0.5, 1.5, -0.5, -1.5, 0.5, 1.5, -1.5, 0.5])
    traced = torch.compile(arith._traceable_fake_quantize, fullgraph=True)

    def run(fn):
        xs = x.clone().requires_grad_(True)
        ss = scale.clone().requires_grad_(True)
        zs = None if zp is None else zp.clone().requires_grad_(True)
        y = fn(xs, ss, zs, *q, 0.1)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return y.detach(), xs.grad, ss.grad, None if zs is None else zs.grad

    fused, eager = run(traced), run(_eager_fake_quantize)
    assert torch.equal(fused[0], eager[0]) and torch.equal(fused[1], eager[1])
    torch.testing.assert_close(fused[2], eager[2], rtol=1e-5, atol=1e-7)
    if zp is not None:
        torch.testing.assert_close(fused[3], eager[3], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kernels", ["eager", "compiled"])
def test_floor_and_channel_axis_inside_the_kernel_equal_the_broadcast_step(kernels):
    """The quantizer hands its raw per-channel step, its floor and the channel axis to the
    kernel (one call each way, no reshape or where of its own). That gives the values and
    gradients of the plain formulation ``fake_quantize(x, where(s >= floor, s, floor)
    broadcast)``: a floored channel quantizes with its floor and gets no step gradient."""
    if kernels == "compiled" and not arith.use_compiled_kernels(True):
        pytest.skip("torch.compile is not available on this machine")
    try:
        torch.manual_seed(3)
        x = torch.randn(6, 5, 4, 4)
        scale = torch.tensor([0.2, 0.05, 0.3, 1e-4, 0.1])  # channel 3 below its floor
        floor = torch.full((5,), 1e-2)
        upstream = torch.linspace(-1, 1, x.numel()).view_as(x)

        def run(fused: bool):
            xs, ss = x.clone().requires_grad_(True), scale.clone().requires_grad_(True)
            if fused:
                y = arith.fake_quantize(xs, ss, -2, 1, grad_scale=0.1, floor=floor, axis=1)
            else:
                step = torch.where(ss >= floor, ss, floor).reshape(1, -1, 1, 1)
                y = arith.fake_quantize(xs, step, -2, 1, grad_scale=0.1)
            (y * upstream).sum().backward()
            return y.detach(), xs.grad, ss.grad

        fused, plain = run(True), run(False)
        assert torch.equal(fused[0], plain[0]) and torch.equal(fused[1], plain[1])
        torch.testing.assert_close(fused[2], plain[2], rtol=1e-6, atol=0.0)
        assert fused[2][3] == 0 and (fused[2][[0, 1, 2, 4]] != 0).all()
        # channel 3 really quantized with the floor: codes of x / 1e-2 in [-2, 1]
        assert torch.equal(fused[0][:, 3], (x[:, 3] / 1e-2).round().clamp(-2, 1) * 1e-2)
    finally:
        arith.use_compiled_kernels(False)
