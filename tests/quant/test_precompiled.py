"""The fake-quant kernels precompiled per signature (mecqtk.quant.precompiled) compute what the
eager kernels compute, on every layout, and never run a graph on inputs it was not built for."""

import pytest
import timm
import torch

import mecqtk
from mecqtk.quant import arith, saved_codes
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
        # timm's attention: q, k, v are slices of one fused projection, permuted
        ("attention_query", rand(2, 9, 3, 4, 8).permute(2, 0, 3, 1, 4)[0], torch.tensor(0.1),
         None, None, -2, 1, None),
        ("transposed", rand(2, 9, 12).transpose(1, 2), torch.tensor(0.1), None, None, -2, 1,
         None),
        ("class_token", rand(1, 1, 12).expand(3, 1, 12), torch.tensor(0.1), None, None, -2, 1,
         None),
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
    code_dtype = torch.int8 if qmin < 0 else torch.uint8  # saved_codes.code_dtype's choice
    fast = quantized = forward(x, scale, floor, zp, qmin, qmax, axis, code_dtype)
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
    # the saved codes rebuilt: one tensor (not a tuple), the forward's output bit for bit
    decode = PrecompiledKernel(arith._decode_kernel, _Counting(arith._decode_kernel))
    out, step, grid = quantized
    zero_point = None if zp is None else arith._along(zp, x, axis)
    for _ in range(2):  # compiled on the first call, then the graph alone
        rebuilt = decode(grid, step, zero_point)
        assert isinstance(rebuilt, torch.Tensor) and torch.equal(rebuilt, out)
    # none of it ran the fallback: these are the layouts a QAT step hands the kernels
    assert forward.fallback.calls == backward.fallback.calls == decode.fallback.calls == 0
    assert len(forward.compiled) == len(backward.compiled) == len(decode.compiled) == 1


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
    overlapping = torch.randn(40).as_strided((4, 6, 5), (2, 3, 1))  # elements shared
    out = forward(overlapping, scale, None, None, 0, 3, None, None)[0]
    assert forward.fallback.calls == 1 and not forward.compiled
    assert torch.equal(out, arith._forward_kernel(overlapping, scale, None, None, 0, 3, None,
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


@pytest.mark.parametrize(("model_name", "channels_last"), [
    ("resnet18", True), ("mobilenetv3_small_100", False), ("vit_tiny_patch16_224", False)])
def test_a_training_step_of_a_zoo_model_runs_on_precompiled_graphs_only(model_name,
                                                                        channels_last):
    """Every fake-quant call of a QAT step (forward, backward, rebuilding the saved codes) is
    served by a compiled graph: none falls back to the slow path, none was refused."""
    if not arith.use_compiled_kernels(True):
        pytest.skip("torch.compile is not available on this machine")
    try:
        torch.manual_seed(0)
        extra = {"img_size": 32} if model_name.startswith("vit") else {}
        model = timm.create_model(model_name, num_classes=10, **extra)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        images = torch.randn(4, 3, 32, 32).to(memory_format=memory_format)
        qmodel = mecqtk.prepare(model, mecqtk.load_recipe("w2a2_lsq.yaml"))
        qmodel = qmodel.to(memory_format=memory_format)
        mecqtk.calibrate(qmodel, [images])
        kernels = arith._compiled_kernels
        before = {name: kernel.fallback_calls for name, kernel in kernels.items()}
        qmodel.train()
        with saved_codes.codes_for_backward():
            loss = qmodel(images).logsumexp(dim=1).mean()
        loss.backward()
        for name, kernel in kernels.items():
            assert kernel.fallback_calls == before[name], name
            assert None not in kernel.compiled.values(), name
        if channels_last:
            layouts = {part[2] for key in kernels["forward"].compiled for part in key
                       if isinstance(part, tuple)}
            assert "channels_last" in layouts
    finally:
        arith.use_compiled_kernels(False)


def test_a_signature_inductor_cannot_build_for_warns_once_and_runs_the_fallback():
    forward, _ = _kernels()
    x, scale = torch.randn([2] * 9), torch.tensor(0.25)  # more dimensions than example sizes
    expected = arith._forward_kernel(x, scale, None, None, 0, 3, None, None)[0]
    with pytest.warns(UserWarning, match="precompilation of _forward_kernel failed"):
        assert torch.equal(forward(x, scale, None, None, 0, 3, None, None)[0], expected)
    assert torch.equal(forward(x, scale, None, None, 0, 3, None, None)[0], expected)
    assert list(forward.compiled.values()) == [None] and forward.fallback.calls == 1
