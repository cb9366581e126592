"""Fake-quantization arithmetic that equals ONNX QuantizeLinear -> DequantizeLinear bit for bit.

ONNX computes ``q = saturate(round_half_even(x / scale) + zero_point)`` and
``y = (q - zero_point) * scale`` in float32. We do the same: divide by the step (never multiply
by its reciprocal, which rounds differently), ``torch.round`` (half to even), clamp to the integer
range. Gradients are LSQ's: straight-through for ``x`` inside the range, and for the step size
``d y / d s = q - x/s`` inside, ``q`` (the clamped bound) outside, times a gradient scale.
"""

from __future__ import annotations

import math
import warnings

import torch

from mecqtk.quant import saved_codes
from mecqtk.quant.precompiled import PrecompiledKernel


def integer_range(bits: int, signed: bool) -> tuple[int, int]:
    """The integer grid [qmin, qmax] of a ``bits``-wide signed or unsigned code."""
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def lsq_grad_scale(elements_per_step: int, qmax: int) -> float:
    """LSQ's step-size gradient scale ``1 / sqrt(N * Qp)``."""
    return 1.0 / math.sqrt(max(elements_per_step, 1) * max(qmax, 1))


def _reduce_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum ``grad`` back to ``shape``, the shape of a tensor that was broadcast against it."""
    if grad.shape == shape:
        return grad
    lead = grad.dim() - len(shape)
    dims = list(range(lead)) + [
        lead + i for i, s in enumerate(shape) if s == 1 and grad.shape[lead + i] != 1
    ]
    return grad.sum(dim=dims, keepdim=True).reshape(shape)


def _along(t, x, axis: int | None):
    """``t`` (one value per channel along ``axis`` of ``x``; with ``axis`` None, ``t`` already
    broadcasts against ``x``) shaped to broadcast against ``x``."""
    if axis is None or t is None:
        return t
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def floored_step(scale, floor):
    """The step in use: ``scale`` wherever it is at or above ``floor``, else the floor (which
    gets no gradient). The one place the step floor is applied: the fused kernels, the traced
    expression and :meth:`~mecqtk.quant.quantizers.FakeQuantizer.step_size` all call it."""
    return scale if floor is None else torch.where(scale >= floor, scale, floor)


def _forward_kernel(x, scale, floor, zero_point, qmin: int, qmax: int, axis: int | None = None,
                    code_dtype=None):
    """The fake-quantized ``x``, the step in use (broadcast against ``x``) and, when
    ``code_dtype`` is given, the grid integers ``q`` (in ``[qmin, qmax]``, before the zero point
    is taken off) in that integer type, written by the same loop (see
    :mod:`mecqtk.quant.saved_codes`)."""
    scale, floor, zero_point = (_along(t, x, axis) for t in (scale, floor, zero_point))
    step = floored_step(scale, floor)
    grid = torch.round(x / step)
    if zero_point is not None:
        grid = grid + zero_point
    grid = grid.clamp(qmin, qmax)
    codes = grid if zero_point is None else grid - zero_point
    return codes * step, step, None if code_dtype is None else grid.to(code_dtype)


def _decode_kernel(grid, scale, zero_point=None):
    """A saved quantizer output rebuilt from its grid integers: the forward's own float32
    subtraction and product."""
    codes = grid.to(torch.float32)
    if zero_point is not None:
        codes = codes - zero_point
    return codes * scale


def _backward_kernel(grad, x, scale, floor, zero_point, qmin: int, qmax: int,
                     axis: int | None, need_x: bool, need_scale: bool, need_zp: bool):
    shapes = (scale.shape, None if zero_point is None else zero_point.shape)
    scale, floor, zero_point = (_along(t, x, axis) for t in (scale, floor, zero_point))
    step = floored_step(scale, floor)
    # x / step again, the same float32 division as the forward: bit for bit its value (saving
    # the input instead of the quotient costs no memory where the input is kept anyway, by an
    # in-place ReLU before the quantizer, say; a saved quotient was a second activation-sized
    # tensor per quantizer: 2.2x the float model's training memory on inception_v3)
    scaled = x / step
    # Inside the range (in code space, round(x/s) + z in [qmin, qmax], LSQ's -Qn <= x/s <= Qp):
    # straight-through for x and round(x/s) - x/s for s. Outside: zero for x, the clamped code
    # (bound - z) for s, and -s for z. A step held at its floor gets none (the floor is a
    # constant). The caller applies LSQ's gradient scale to the reduced step and zero-point
    # gradients (as a constant of the kernel it would compile one kernel per layer).
    if zero_point is None:
        low, high = qmin, qmax
    else:
        low, high = qmin - zero_point, qmax - zero_point
    clamped = torch.clamp(scaled, low, high)
    inside = clamped == scaled
    grad_x = torch.where(inside, grad, 0.0) if need_x else None
    grad_step = grad_zp = None
    if need_scale:
        d_scale = (torch.round(clamped) - torch.where(inside, scaled, 0.0)) * grad
        grad_step = _reduce_to(d_scale, scale.shape)
        if floor is not None:
            grad_step = torch.where(scale >= floor, grad_step, 0.0)
        grad_step = grad_step.reshape(shapes[0])
    if need_zp:
        grad_zp = _reduce_to(torch.where(inside, 0.0, -step) * grad, zero_point.shape)
        grad_zp = grad_zp.reshape(shapes[1])
    return grad_x, grad_step, grad_zp


_EAGER_KERNELS = {"forward": _forward_kernel, "backward": _backward_kernel,
                  "decode": _decode_kernel}
_AXIS_ARGUMENT = {"forward": 6, "backward": 7}  # where each kernel takes its channel axis
_kernels = dict(_EAGER_KERNELS)
_compiled_kernels: dict | None = None  # built on first use, kept for the process


def use_compiled_kernels(enabled: bool = True, *, direct: bool = True) -> bool:
    """Run the fake-quant arithmetic through inductor (one fused loop per direction).

    The compiled kernels give bit-identical results (tested) and make fake-quant nearly free on
    CPU and GPU; compiling costs seconds once per process (switching back and forth is free).
    ``direct``: call each compiled graph without dynamo (:mod:`mecqtk.quant.precompiled`);
    False calls the ``torch.compile``'d kernels, wrappers and all (for benchmarks).
    Returns whether compiled kernels are now in use: on any compile failure (no C++ compiler,
    say) mecqtk stays on the eager kernels.
    """
    global _compiled_kernels
    if not enabled:
        _kernels.update(_EAGER_KERNELS)
        return False
    if _compiled_kernels is None:
        # one compiled variant per (rank, granularity, zero point, needed gradients): a dozen
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        try:
            compiled = {name: PrecompiledKernel(kernel, torch.compile(kernel, dynamic=True),
                                                axis_arg=_AXIS_ARGUMENT.get(name))
                        for name, kernel in _EAGER_KERNELS.items()}
            probe = torch.randn(4, 3, 2)
            compiled["forward"](probe, torch.tensor(0.5), None, None, -2, 1)
            compiled["backward"](probe, probe, torch.tensor(0.5), None, None, -2, 1, None,
                                 True, True, False)
        except Exception as err:  # a missing compiler must not stop training
            warnings.warn(f"torch.compile unavailable for fake-quant ({err}); using eager "
                          "kernels", stacklevel=2)
            return use_compiled_kernels(False)
        _compiled_kernels = compiled
    _kernels.update(_compiled_kernels if direct else
                    {name: kernel.fallback for name, kernel in _compiled_kernels.items()})
    return True


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, floor, zero_point, qmin, qmax, axis, grad_scale, code_dtype):
        # detach the parameters (a weight, a step, a learned zero point): the compiled kernel
        # would specialise on the shape of each (the floor is a buffer)
        x, scale, zero_point = x.detach(), scale.detach(), _detached(zero_point)
        out, step, codes = _kernels["forward"](x, scale, floor, zero_point, qmin, qmax, axis,
                                               code_dtype)
        ctx.save_for_backward(x, scale, floor, zero_point)
        ctx.bounds = (qmin, qmax, axis)
        ctx.grad_scale = grad_scale
        # the step and the codes get no gradient: no zeros materialised for them
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(step)
        if codes is not None:
            ctx.mark_non_differentiable(codes)
        return out, step, codes

    @staticmethod
    def backward(ctx, grad_out, grad_step, grad_codes):
        if grad_out is None:
            return (None,) * 9
        x, scale, floor, zero_point = ctx.saved_tensors
        need_x, need_scale, _, need_zp = ctx.needs_input_grad[:4]
        grad_x, grad_s, grad_zp = _kernels["backward"](
            grad_out, x, scale, floor, zero_point, *ctx.bounds,
            need_x, need_scale, need_zp and zero_point is not None,
        )
        # LSQ's gradient scale, on the reduced (per-step) gradients: the same float32 products
        # the kernel would compute
        if grad_s is not None:
            grad_s = grad_s * ctx.grad_scale
        if grad_zp is not None:
            grad_zp = grad_zp * ctx.grad_scale
        return grad_x, grad_s, None, grad_zp, None, None, None, None, None


def _traceable_fake_quantize(x, scale, zero_point, qmin: int, qmax: int, grad_scale: float,
                             floor=None, axis: int | None = None):
    """The same values and gradients as :class:`_FakeQuantize`, as a plain differentiable
    expression: what ``torch.compile`` of a whole QAT model traces, so that inductor fuses each
    quantizer into its neighbouring kernels (an autograd.Function or a custom op stays one opaque
    call per quantizer).

    The forward value is the eager kernel's exactly: the integer grid is computed without
    gradient, and each gradient path is added as ``(t - t.detach()) * coefficient``, which is
    exactly zero in value. The ``x`` gradient is the straight-through mask itself (bit-identical
    to eager); the step and zero-point gradients are the same per-element terms, summed in
    whatever order the fused reduction takes.
    """
    scale, floor, zero_point = (_along(t, x, axis) for t in (scale, floor, zero_point))
    scale = floored_step(scale, floor)
    step = scale.detach()
    scaled = x.detach() / step
    if zero_point is None:
        low, high = qmin, qmax
        clamped = scaled.clamp(low, high)
    else:
        zero = zero_point.detach()
        clamped = torch.clamp(scaled, qmin - zero, qmax - zero)
    codes = torch.round(clamped)
    inside = clamped == scaled
    out = codes * step
    if scale.requires_grad:
        out = out + (scale - step) * ((codes - torch.where(inside, scaled, 0.0)) * grad_scale)
    if zero_point is not None and zero_point.requires_grad:
        out = out + (zero_point - zero) * (torch.where(inside, 0.0, -step) * grad_scale)
    if x.requires_grad:
        out = out + torch.where(inside, x - x.detach(), 0.0)
    return out


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    qmin: int,
    qmax: int,
    *,
    zero_point: torch.Tensor | None = None,
    grad_scale: float = 1.0,
    floor: torch.Tensor | None = None,
    axis: int | None = None,
    keep_codes: bool = True,
) -> torch.Tensor:
    """Quantize-dequantize ``x`` on the grid ``step * ([qmin, qmax] - zero_point)``.

    ``scale`` (and ``zero_point``, which must hold integers) broadcast against ``x``, or, with
    ``axis``, hold one value per channel along that axis of ``x``. The step is ``scale``, or
    ``floor`` (shaped like ``scale``) where ``scale`` is below it; a floored step gets no
    gradient. Eager calls run the fused kernels of :func:`use_compiled_kernels`
    (floor, quantization and LSQ's gradient scale in one call each way); inside
    ``torch.compile`` of a model the same arithmetic is traced as plain ops, so inductor fuses
    it with its neighbours.

    ``keep_codes``: inside :func:`~mecqtk.quant.saved_codes.codes_for_backward`, the output is
    kept for the backward as integer codes (for activations; a weight is better kept as is).

    Example:
        >>> fake_quantize(torch.tensor([0.26, -3.0]), torch.tensor(0.5), -2, 1)
        tensor([ 0.5000, -1.0000])
    """
    if torch.compiler.is_compiling():
        return _traceable_fake_quantize(x, scale, zero_point, qmin, qmax, grad_scale, floor,
                                        axis)
    differentiable = torch.is_grad_enabled() and (
        x.requires_grad or scale.requires_grad
        or (zero_point is not None and zero_point.requires_grad))
    code_dtype = (saved_codes.code_dtype(qmin, qmax)
                  if keep_codes and differentiable and x.dtype == torch.float32 else None)
    out, step, codes = _FakeQuantize.apply(x, scale, floor, zero_point, qmin, qmax, axis,
                                           grad_scale, code_dtype)
    if codes is not None:
        saved_codes.remember_codes(out, codes, step, _along(_detached(zero_point), x, axis),
                                   _kernels["decode"])
    return out


def quantize_to_codes(
    x: torch.Tensor,
    scale: torch.Tensor,
    qmin: int,
    qmax: int,
    zero_point: torch.Tensor | None = None,
) -> torch.Tensor:
    """The integer codes (as float) that ONNX QuantizeLinear would produce for ``x``."""
    codes = torch.round(x / scale)
    if zero_point is not None:
        codes = codes + zero_point
    return codes.clamp(qmin, qmax)
