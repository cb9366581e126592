"""Small elementwise kernels compiled by inductor once per call signature, then called directly.

A ``torch.compile``'d function pays dynamo's frame evaluation, guard checks and AOTAutograd's
runtime wrappers on every call: about 50 us on a CPU, four times the fused loop itself on an
activation at batch 2. A QAT step calls the fake-quant kernels three times per quantizer
(forward, backward, and rebuilding the saved codes), so at small batches, on any device, that
wrapper was a large share of the step. Here each kernel is traced once per *signature* (the
non-tensor arguments, and each tensor's dtype, rank, memory layout and device) into a graph
with symbolic sizes, compiled by inductor (``torch._inductor.standalone_compile``), and called
without dynamo: a forward call on such an activation costs 28-39 us instead of 61 us.

Safety does not rest on this module's bookkeeping alone. Inductor's compiled code asserts each
input's sizes and strides against the traced layout, so a call a graph was not built for raises
before computing anything, and that call runs the ``fallback`` (the ``torch.compile``'d kernel,
which handles every layout). And each new signature's graph is checked on its first inputs
against the eager kernel (elementwise outputs bit for bit); a graph that disagrees is never
used.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.fx.experimental.proxy_tensor import make_fx

# example sizes for tracing: distinct, and none 0 or 1, so that the traced graph specialises
# on no size (a size-1 dimension would be traced as a broadcast)
_PRIMES = (3, 5, 7, 11, 13, 17, 19, 23)


def _layout(t: torch.Tensor) -> str | tuple | None:
    """The memory layout a graph is built for: ``"contiguous"``, ``"channels_last"``, or, for
    another strided tensor, the order of its strides (innermost first), whether each stride
    spans the dimensions inside it exactly or leaves a gap (a slice of a larger tensor: the
    query of a fused qkv projection, say), and its broadcast (stride-0) dimensions, such as an
    expanded class token. Size-1 dimensions, whose stride is never used, are left out. None
    for overlapping memory, which no graph is built for."""
    if t.is_contiguous():
        return "contiguous"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    sizes, strides = t.shape, t.stride()
    strided = [d for d in range(t.dim()) if sizes[d] != 1 and strides[d] != 0]
    order = tuple(sorted(strided, key=strides.__getitem__))
    span, dense = 1, []
    for d in order:
        if strides[d] < span:
            return None
        dense.append(strides[d] == span)
        span = strides[d] * sizes[d]
    broadcast = tuple(d for d in range(t.dim()) if strides[d] == 0 and sizes[d] != 1)
    return order, tuple(dense), broadcast


def _example_like(t: torch.Tensor, sizes: dict[int, int], reference: torch.Tensor | None,
                  axis: int | None) -> torch.Tensor:
    """A tensor of ``t``'s dtype, device and layout whose sizes keep exactly the relations the
    kernel relies on: a size-1 dimension stays 1 (a broadcast), a dimension that matches the
    reference tensor's (the data) takes the same example size, all others distinct ones. A
    strided layout keeps its stride order, gaps (which trace as stride symbols of their own) and
    broadcast dimensions."""
    if reference is None or t.shape == reference.shape:
        shape = [sizes[i] for i in range(t.dim())]
    elif t.dim() == 1 and axis is not None and t.shape[0] == reference.shape[axis]:
        shape = [sizes[axis % reference.dim()]]  # one value per channel along ``axis``
    else:
        lead = reference.dim() - t.dim()
        shape = [1 if n == 1 else sizes[lead + i] for i, n in enumerate(t.shape)]
    layout = _layout(t)
    if isinstance(layout, tuple):
        order, dense, broadcast = layout
        strides, span = [0] * t.dim(), 1
        for d, exact in zip(order, dense, strict=True):
            strides[d] = span if exact else 2 * span
            span = strides[d] * shape[d]
        for d in range(t.dim()):  # the size-1 dimensions of t, outermost
            if d not in order and d not in broadcast:
                strides[d] = span
                span *= shape[d]
        return torch.zeros(span, dtype=t.dtype, device=t.device).as_strided(shape, strides)
    example = torch.zeros(shape, dtype=t.dtype, device=t.device)
    if layout == "channels_last":
        example = example.contiguous(memory_format=torch.channels_last)
    return example


class PrecompiledKernel:
    """``kernel`` compiled per signature by inductor and called without dynamo.

    ``kernel``'s tensor arguments are the inputs of the compiled graph; its other arguments
    (ints, bools, dtypes, None: a few distinct values each) are constants of it and part of the
    signature, as are each tensor's dtype, rank, layout and device (a graph launches on the
    device it was built for). The first argument is the data tensor, the one whose sizes vary;
    ``axis_arg`` is the position of the channel-axis argument, if any (per-channel tensors have
    the data's size along it). ``fallback`` runs the calls no graph was compiled for.
    """

    def __init__(self, kernel: Callable, fallback: Callable, axis_arg: int | None = None):
        self.kernel = kernel
        self.fallback = fallback
        self.axis_arg = axis_arg
        self.compiled: dict[tuple, Callable | None] = {}
        self.fallback_calls = 0  # calls no graph served (a step of a zoo model makes none)

    @staticmethod
    def _signature(args: Sequence[Any]) -> tuple | None:
        data_shape = args[0].shape
        key = []
        for a in args:
            if isinstance(a, torch.Tensor):
                layout = _layout(a)
                if layout is None:
                    return None
                key.append((a.dtype, a.dim(), layout, a.device, a.shape == data_shape))
            else:
                key.append(a)
        return tuple(key)

    def _compile(self, args: Sequence[Any]) -> Callable | None:
        data = args[0]
        axis = None  # the channel axis, where the kernel takes one (and it was passed)
        if self.axis_arg is not None and self.axis_arg < len(args):
            axis = args[self.axis_arg]
        sizes = dict(enumerate(_PRIMES[:data.dim()]))
        slots = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

        returns_tuple = []

        def traced(*inputs):
            full = list(args)
            for i, t in zip(slots, inputs, strict=True):
                full[i] = t
            out = self.kernel(*full)
            returns_tuple.append(isinstance(out, tuple))
            return out

        try:
            examples = [_example_like(args[i], sizes, None if i == 0 else data, axis)
                        for i in slots]
            graph = make_fx(traced, tracing_mode="symbolic")(*examples)
            return _without_wrappers(torch._inductor.standalone_compile(
                graph, examples, dynamic_shapes="from_graph"), returns_tuple[-1])
        except Exception as err:  # an older torch, no compiler: the fallback serves
            warnings.warn(f"inductor precompilation of {self.kernel.__name__} failed ({err}); "
                          "using torch.compile", stacklevel=3)
            return None

    def __call__(self, *args: Any) -> Any:
        key = self._signature(args)
        compiled = self.compiled.get(key) if key is not None else None
        if compiled is None:
            if key is None or key in self.compiled:
                self.fallback_calls += 1
                return self.fallback(*args)
            return self._first_call(key, args)
        try:
            return _run(compiled, args)
        except AssertionError:  # sizes or strides it was not compiled for
            self.fallback_calls += 1
            return self.fallback(*args)

    def _first_call(self, key: tuple, args: Sequence[Any]) -> Any:
        """Compile for a new signature, and check the graph on its first inputs against the
        eager kernel: a graph that computes anything else is never used."""
        compiled = self.compiled[key] = self._compile(args)
        expected = self.kernel(*args)
        if compiled is None:
            return expected
        try:
            out = _run(compiled, args)
            problem = _disagreement(out, expected, args[0].shape)
        except Exception as err:
            problem = f"it failed: {err}"
        if problem is None:
            return out
        self.compiled[key] = None
        warnings.warn(f"the precompiled {self.kernel.__name__} is not used for {key}: {problem}",
                      stacklevel=3)
        return expected


def _without_wrappers(artifact: Callable, returns_tuple: bool) -> Callable:
    """The inductor graph inside a ``standalone_compile`` artifact, called with its tensors.

    The artifact wraps the graph in dynamo's disable context and AOTAutograd's runtime wrappers,
    which these graphs do not need (no mutation, no input aliasing, no autograd): 7-9 us of a
    19 us call on a batch-2 activation, three calls per quantizer and step. Where this torch
    nests it differently, the artifact itself is returned (and each graph is still checked on
    its first call against the eager kernel). ``returns_tuple``: whether the kernel returns a
    tuple (the bare graph always does) or one tensor."""
    from torch._inductor.output_code import CompiledFxGraph

    inner = getattr(artifact, "_compiled_fn", None)
    for _ in range(16):  # a few wrappers deep, each naming the next as ``__wrapped__``
        if isinstance(inner, CompiledFxGraph) and inner.current_callable is not None:
            graph = inner
            if returns_tuple:
                return lambda *tensors: graph(list(tensors))
            return lambda *tensors: graph(list(tensors))[0]
        inner = getattr(inner, "__wrapped__", None)
    return artifact


def _run(compiled: Callable, args: Sequence[Any]) -> Any:
    """A compiled graph on the tensor arguments, its outputs as the kernel returns them."""
    out = compiled(*(a for a in args if isinstance(a, torch.Tensor)))
    return tuple(out) if isinstance(out, list) else out


def _disagreement(out: Any, expected: Any, data_shape: torch.Size) -> str | None:
    """How ``out`` differs from ``expected``, or None. Outputs shaped like the data are
    elementwise and must be equal bit for bit, as must integer and boolean ones; other floating
    outputs are sums, whose order may differ."""
    if isinstance(out, tuple) != isinstance(expected, tuple):
        return f"it returns {type(out).__name__}, not {type(expected).__name__}"
    outs = out if isinstance(out, tuple) else (out,)
    refs = expected if isinstance(expected, tuple) else (expected,)
    if len(outs) != len(refs):
        return f"{len(outs)} outputs, not {len(refs)}"
    for i, (a, b) in enumerate(zip(outs, refs, strict=True)):
        if a is None or b is None:
            if (a is None) != (b is None):
                return f"output {i} is {'None' if a is None else 'a tensor'}"
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"output {i} is {a.dtype} {tuple(a.shape)}, not {b.dtype} {tuple(b.shape)}"
        if a.shape == data_shape or not a.is_floating_point():
            same = torch.equal(a, b)
        else:
            tolerance = 1e-5 * (1.0 + float(b.abs().amax())) if b.numel() else 0.0
            same = torch.allclose(a, b, rtol=1e-3, atol=tolerance)
        if not same:
            worst = float((a.double() - b.double()).abs().amax())
            return f"output {i} differs by up to {worst:.3g}"
    return None
