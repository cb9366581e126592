"""The fake-quant kernels precompiled per signature (mecqtk.quant.precompiled) compute what the
eager kernels compute, on every layout, and never run a graph on inputs it was not built for."""

import pytest
import torch

from mecqtk.quant import arith
from mecqtk.quant.precompiled import PrecompiledKernel


class _Counting:
    """A fallback that counts its calls."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, 0

    def __call__(self, *args):
        self.calls += 1
        return self.kernel(*args)


def _kernels():
    forward = PrecompiledKernel(arith._forward_kernel, _Counting(arith._forward_kernel),
                                axis_arg=6)
    backward = PrecompiledKernel(arith._backward_kernel, _Counting(arith._backward_kernel),
                                 axis_arg=7)
    return forward, backward


def _cases():
    """(name, x, scale, floor, zero point, qmin, qmax, axis): the quantizers of a timm model."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    conv_act = rand(3, 16, 7, 5) * 2
    return [
        ("activation", conv_act, torch.tensor(0.3), torch.tensor(1e-3), None, 0, 3, None),
        ("channels_last", conv_act.contiguous(memory_format=torch.channels_last),
         torch.tensor(0.3), None, None, -2, 1, None),
        ("pooled", rand(3, 16, 1, 1), torch.tensor(0.2), None, None, -8, 7, None),
        ("tokens", rand(2, 9, 12), torch.tensor(0.1), None, None, -8, 7, None),
        ("zero_point", rand(4, 10) + 1, torch.tensor(0.02), None, torch.tensor(37.0), 0, 255,
         None),
        ("conv_weight", rand(16, 8, 3, 3), torch.rand(16, generator=g) * 0.3 + 0.05,
         torch.full((16,), 0.1), None, -2, 1, 0),
        ("linear_weight", rand(10, 12), torch.rand(10, generator=g) * 0.3 + 0.05, None, None,
         -8, 7, 0),
        ("per_channel_activation", conv_act, torch.rand(16, generator=g) + 0.1, None, None, 0, 15,
         1),
    ]


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_precompiled_kernels_equal_the_eager_kernels(case):
    _, x, scale, floor, zp, qmin, qmax, axis = case
    forward, backward = _kernels()
    code_dtype = torch.int8 if zp is None else torch.int16
    fast = forward(x, scale, floor, zp, qmin, qmax, axis, code_dtype)
    slow = arith._forward_kernel(x, scale, floor, zp, qmin, qmax, axis, code_dtype)
    for a, b in zip(fast, slow, strict=True):
        assert torch.equal(a, b) and a.stride() == b.stride()
    grad = torch.linspace(-1, 1, x.numel()).view(x.shape)
    args = (grad, x, scale, floor, zp, qmin, qmax, axis, True, True, zp is not None)
    fast, slow = backward(*args), arith._backward_kernel(*args)
    assert torch.equal(fast[0], slow[0])  # the input gradient, elementwise: bit for bit
    # the step gradient is a sum, whose order the fused loop may change
    torch.testing.assert_close(fast[1], slow[1], rtol=1e-5, atol=1e-7)
    if zp is not None:
        torch.testing.assert_close(fast[2], slow[2], rtol=1e-5, atol=1e-7)
    # none of it ran the fallback: these are the layouts a QAT step hands the kernels
    assert forward.fallback.calls == backward.fallback.calls == 0
    assert len(forward.compiled) == len(backward.compiled) == 1


def test_one_graph_serves_every_size_and_a_new_layout_gets_its_own():
    forward, _ = _kernels()
    scale = torch.tensor(0.25)
    for shape in [(2, 8, 4, 4), (5, 3, 1, 1), (1, 1, 9, 2), (64, 32, 16, 16)]:
        x = torch.randn(shape)
        assert torch.equal(forward(x, scale, None, None, 0, 3, None, None)[0],
                           arith._forward_kernel(x, scale, None, None, 0, 3, None, None)[0])
    assert len(forward.compiled) == 1
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    forward(x, scale, None, None, 0, 3, None, None)
    assert len(forward.compiled) == 2 and forward.fallback.calls == 0


def test_inputs_a_graph_was_not_built_for_run_the_fallback():
    forward, _ = _kernels()
    scale = torch.tensor(0.25)
    transposed = torch.randn(4, 6, 5, 3).transpose(1, 2)  # neither contiguous nor channels_last
    out = forward(transposed, scale, None, None, 0, 3, None, None)[0]
    assert forward.fallback.calls == 1 and not forward.compiled
    assert torch.equal(out, arith._forward_kernel(transposed, scale, None, None, 0, 3, None,
                                                  None)[0])
    # a step compiled as a full broadcast, then handed one value per channel in the same rank
    # (the same signature): inductor's size check refuses the graph, the fallback computes it
    x = torch.randn(2, 3, 4, 5)
    forward(x, torch.full((1, 1, 1, 1), 0.25), None, None, 0, 3, None, None)
    per_channel = (torch.rand(1, 3, 1, 1) + 0.1)
    out = forward(x, per_channel, None, None, 0, 3, None, None)[0]
    assert forward.fallback.calls == 2 and len(forward.compiled) == 1
    assert torch.equal(out, arith._forward_kernel(x, per_channel, None, None, 0, 3, None,
                                                  None)[0])


def test_a_graph_that_disagrees_with_the_eager_kernel_is_never_used():
    """Each new signature's graph is checked on its first inputs against the eager kernel."""
    traced = []

    def kernel(x, scale):  # traced once (doubles), then run eagerly (does not)
        traced.append(True)
        return x * scale * (2.0 if len(traced) == 1 else 1.0)

    fallback = _Counting(lambda x, scale: x * scale)
    precompiled = PrecompiledKernel(kernel, fallback)
    x, scale = torch.randn(4, 5), torch.tensor(3.0)
    with pytest.warns(UserWarning, match="output 0 differs"):
        assert torch.equal(precompiled(x, scale), x * scale)
    assert list(precompiled.compiled.values()) == [None]
    assert torch.equal(precompiled(x, scale), x * scale) and fallback.calls == 1
