"""Fake-quantizer modules. Each is a plain ``nn.Module`` whose forward reads top to bottom."""

from __future__ import annotations

from enum import Enum

import torch
from torch import nn

from mecqtk.quant.arith import fake_quantize, floored_step, integer_range, lsq_grad_scale
from mecqtk.quant.observers import MIN_STEP, Observer
from mecqtk.quant.registry import OBSERVERS, QUANTIZERS, register_quantizer
from mecqtk.quant.spec import QuantSpec


class Mode(Enum):
    QUANTIZE = "quantize"
    OBSERVE = "observe"  # pass through unchanged, feed the calibration observer
    BYPASS = "bypass"  # pass through unchanged (to measure float behaviour)


class FakeQuantizer(nn.Module):
    """Base class: a learned step size per tensor or per channel on a symmetric integer grid.

    Args:
        spec: bits, signedness, granularity and observer.
        channels: number of channels for a per-channel quantizer (1 for per-tensor).
        axis: channel axis of the tensors this quantizer sees (per-channel only).
    """

    weight_capable = True  # False for quantizers meant for activations only
    # whether the training step keeps this quantizer's output for the backward as integer codes
    # (mecqtk.quant.saved_codes); prepare() turns it off for weight quantizers
    keeps_codes = True

    def __init__(self, spec: QuantSpec, channels: int = 1, axis: int = 0) -> None:
        super().__init__()
        self.spec = spec
        self.bits = spec.bits
        self.signed = spec.signed
        self.qmin, self.qmax = integer_range(spec.bits, spec.signed)
        self.per_channel = spec.granularity == "per_channel"
        self.axis = axis if self.per_channel else None
        self.scale = nn.Parameter(torch.ones(channels if self.per_channel else 1),
                                  requires_grad=spec.learn_step)
        self.register_buffer("initialized", torch.tensor(False))
        # the smallest step this quantizer may take, set at calibration relative to the range it
        # saw (see STEP_FLOOR_FRACTION); training projects the learned step back above it
        self.register_buffer("step_floor", torch.full_like(self.scale.detach(), MIN_STEP))
        # the step after the last projection (0: not calibrated yet), see keep_step_valid
        self.register_buffer("previous_step", torch.zeros_like(self.scale.detach()))
        # the integer grid, saved with the step: a checkpoint trained on another grid (an older
        # mecqtk proved fewer values non-negative) is refused, not evaluated on this one
        self.register_buffer("grid", torch.tensor([float(self.qmin), float(self.qmax)]))
        self.mode = Mode.QUANTIZE
        self.observer: Observer | None = None

    def extra_repr(self) -> str:
        return f"{self.spec.describe()}, channels={self.scale.numel()}"

    def broadcast(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``t`` (one value per channel) shaped to broadcast against ``x``."""
        if self.axis is None:
            return t.reshape(())
        shape = [1] * x.dim()
        shape[self.axis] = -1
        return t.reshape(shape)

    def zero_point(self) -> torch.Tensor | None:
        """The integer zero point, or None for a symmetric grid."""
        return None

    def grad_scale(self, x: torch.Tensor) -> float:
        # LSQ's N: all weights of the layer (N_W, also for per-channel steps) or the features of
        # one sample (N_F) for activations.
        per_step = x.numel() if self.per_channel else x.numel() // max(x.shape[0], 1)
        return lsq_grad_scale(per_step, self.qmax)

    # A step below 1/256 of the range's own step (absmax / largest code) would put all but a few
    # values of the tensor into the clipped bounds: no training state worth keeping is down there.
    STEP_FLOOR_FRACTION = 1.0 / 256
    MAX_STEP_CHANGE = 2.0

    def step_size(self) -> torch.Tensor:
        """The step size in use: the learned one (with its LSQ gradient) wherever it is at or
        above its floor, else the floor, so the forward stays valid even in a training loop
        that never calls :meth:`keep_step_valid`."""
        return floored_step(self.scale, self.step_floor.to(self.scale))

    def keep_step_valid(self) -> None:
        """Project the learned step back onto ``[step_floor, inf)`` after an optimizer update
        (projected gradient descent: the LSQ gradient itself is unchanged). A momentum-driven
        update can take a step of small-fanout layers (depthwise, squeeze-excitation) below
        zero in one iteration. No host sync: safe to call every step on a GPU."""
        _project_steps([self])

    def invalid_step(self) -> str | None:
        """Why the learned step is unusable (non-finite, or below its floor), or None."""
        step = self.scale.detach()
        if not bool(torch.isfinite(step).all()):
            return f"step size is not finite ({step.min().item():.3g} .. {step.max().item():.3g})"
        below = step < self.step_floor.to(step)
        if bool(below.any()):
            return (f"step size {step[below].min().item():.3g} is below its floor "
                    f"{self.step_floor.to(step)[below].min().item():.3g}")
        return None

    def _set_floor(self, reference: torch.Tensor) -> None:
        """Floor from ``reference`` (the range's own step per channel); a channel that saw only
        zeros takes the median floor of the others."""
        floor = (reference.to(self.scale) * self.STEP_FLOOR_FRACTION).clamp_min(MIN_STEP)
        empty = reference <= MIN_STEP
        if self.per_channel and empty.any() and not empty.all():
            floor[empty] = floor[~empty].median()
        self.step_floor.copy_(floor)
        self.scale.copy_(torch.maximum(self.scale, floor))
        self.previous_step.copy_(self.scale)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # run folders written before step floors existed: the old absolute floor
        scale = state_dict.get(prefix + "scale")
        if scale is not None:
            state_dict.setdefault(prefix + "step_floor", torch.full_like(scale, MIN_STEP))
            state_dict.setdefault(prefix + "previous_step", scale.detach().clone())
        saved = state_dict.get(prefix + "grid")
        if isinstance(saved, torch.Tensor) and not torch.equal(saved.to(self.grid), self.grid):
            error_msgs.append(
                f"{prefix[:-1]} was trained on the integer grid [{saved[0]:.0f}, "
                f"{saved[1]:.0f}]; this model builds [{self.qmin}, {self.qmax}]")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def start_observing(self, observer: str | None = None) -> None:
        """Pass values through and collect them; ``observer`` overrides the spec's."""
        self.observer = OBSERVERS[observer or self.spec.observer](axis=self.axis)
        self.mode = Mode.OBSERVE

    @torch.no_grad()
    def finish_observing(self) -> None:
        """Set the step size from what the observer saw, and go back to quantizing."""
        assert self.observer is not None, "start_observing() first"
        self.initialize_from(self.observer)
        self.initialized.fill_(True)
        self.observer = None
        self.mode = Mode.QUANTIZE

    @torch.no_grad()
    def initialize_from(self, observer: Observer) -> None:
        """Take the step size from ``observer``. A channel that saw only zeros (a weight scaled by
        a zero-initialised BN gamma under folding) gets the median step of the others, so it can
        still learn once its weights move."""
        scale = observer.compute_scale(self.qmin, self.qmax).to(self.scale)
        empty = scale <= MIN_STEP
        if self.per_channel and empty.any() and not empty.all():
            scale[empty] = scale[~empty].median()
        self.scale.copy_(scale)
        bound = max(-self.qmin, self.qmax)
        self._set_floor(observer.data().abs().amax(dim=1) / bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode is Mode.OBSERVE:
            assert self.observer is not None
            self.observer.update(x)
            return x
        if self.mode is Mode.BYPASS:
            return x
        if x.dtype != torch.float32 and x.is_floating_point():
            # under AMP the codes are still computed exactly in float32, as ONNX computes them;
            # the dequantized value goes on in the autocast dtype, as the float layer's would
            # (compiled, the casts fuse into the quantizer's kernel)
            with torch.autocast(x.device.type, enabled=False):
                return self(x.float()).to(x.dtype)
        if self.training and not self.scale.requires_grad:
            self.track_range(x)
        # the step_size() floor and the per-channel broadcast happen inside the kernel: on a
        # CPU or a GPU each extra call per quantizer costs more than its arithmetic
        return fake_quantize(x, self.scale, self.qmin, self.qmax, zero_point=self.zero_point(),
                             grad_scale=self.grad_scale(x), floor=self.step_floor,
                             axis=self.axis, keep_codes=self.keeps_codes)

    @torch.no_grad()
    def track_range(self, x: torch.Tensor) -> None:
        """A step that is not learned follows the data while training (as 8-bit observers do in
        other QAT tools): per-channel steps cover the current max of each channel, per-tensor
        steps an exponential moving average of the batch max. A frozen calibration step would
        clip features that grow during training (seen: 34 % of a classifier's inputs)."""
        bound = max(-self.qmin, self.qmax)
        if self.per_channel:
            dims = [d for d in range(x.dim()) if d != self.axis]
            self.scale.copy_((x.abs().amax(dim=dims) / bound).clamp_min(MIN_STEP))
        else:
            low, high = torch.aminmax(x)  # one read of x, no |x| written
            batch_step = (torch.maximum(high, -low) / bound).clamp_min(MIN_STEP)
            self.scale.mul_(1 - self.RANGE_MOMENTUM).add_(self.RANGE_MOMENTUM * batch_step)

    RANGE_MOMENTUM = 0.01

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``x`` (int32), exactly as ONNX QuantizeLinear produces them."""
        scaled = torch.round(x / self.broadcast(self.step_size(), x))
        zero_point = self.zero_point()
        if zero_point is not None:
            scaled = scaled + self.broadcast(zero_point, x)
        return scaled.clamp(self.qmin, self.qmax).to(torch.int32)


@register_quantizer("lsq")
class LSQQuantizer(FakeQuantizer):
    """Learned Step Size Quantization (Esser et al., 2020): the step is learned by gradient
    descent."""


@register_quantizer("lsq_plus")
class LSQPlusQuantizer(FakeQuantizer):
    """LSQ+ (Bhalgat et al., 2020): a learned step and a learned offset, for asymmetric ranges
    such as the outputs of Swish/GELU.

    The offset is learned as a float zero point in code units and rounded with a straight-through
    estimator on every use, so the grid is always ``scale * ([qmin, qmax] - z)`` with integer
    ``z`` in ``[qmin, qmax]``: exactly an ONNX QuantizeLinear/DequantizeLinear pair with that zero
    point. Its gradient is LSQ+'s: zero for values inside the range, ``-scale`` per clipped value.
    Activations only (weights keep symmetric grids, so integer convs need no weight zero point).
    """

    weight_capable = False

    def __init__(self, spec: QuantSpec, channels: int = 1, axis: int = 0) -> None:
        super().__init__(spec, channels=channels, axis=axis)
        self.offset = nn.Parameter(torch.zeros_like(self.scale), requires_grad=spec.learn_step)

    def zero_point(self) -> torch.Tensor:
        bounded = self.offset.clamp(self.qmin, self.qmax)
        return bounded + (torch.round(bounded) - bounded).detach()

    @torch.no_grad()
    def initialize_from(self, observer: Observer) -> None:
        scale, zero_point = observer.compute_affine(self.qmin, self.qmax)
        self.scale.copy_(scale.to(self.scale))
        self.offset.copy_(zero_point.to(self.offset))
        data = observer.data()
        spread = data.amax(dim=1).clamp(min=0.0) - data.amin(dim=1).clamp(max=0.0)
        self._set_floor(spread / (self.qmax - self.qmin))

    @torch.no_grad()
    def track_range(self, x: torch.Tensor) -> None:
        """A step that is not learned follows the data: an exponential moving average of the
        batch's min and max moves the (asymmetric) range. The offset is kept unrounded (it is
        rounded on use), so small moves accumulate instead of being rounded away."""
        low = (self.qmin - self.offset) * self.scale
        high = (self.qmax - self.offset) * self.scale
        low = low.lerp(x.min().expand_as(low), self.RANGE_MOMENTUM).clamp(max=0.0)
        high = high.lerp(x.max().expand_as(high), self.RANGE_MOMENTUM).clamp(min=0.0)
        scale = ((high - low) / (self.qmax - self.qmin)).clamp_min(MIN_STEP)
        self.scale.copy_(scale)
        self.offset.copy_((self.qmin - low / scale).clamp(self.qmin, self.qmax))


@register_quantizer("pact")
class PACTQuantizer(FakeQuantizer):
    """PACT (Choi et al., 2018): a learned clipping level ``alpha``, uniform levels below it.

    Expressed on the ONNX grid: the learned parameter is the step ``scale = alpha / qmax``, so
    the output ``scale * clamp(round(x / scale), qmin, qmax)`` is exactly a QDQ pair, clipping at
    ``alpha`` (and at ``scale * qmin`` for a signed grid). Gradients are PACT's: straight-through
    for ``x`` inside the range, and for alpha 1 per value clipped above (``qmin / qmax`` below),
    0 inside, with no LSQ gradient scaling. Activations only.
    """

    weight_capable = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode is not Mode.QUANTIZE:
            return super().forward(x)
        scale = self.broadcast(self.step_size(), x)
        out = fake_quantize(x, scale.detach(), self.qmin, self.qmax)
        with torch.no_grad():
            scaled = x / scale
            clipped = torch.where(scaled > self.qmax, float(self.qmax), 0.0)
            clipped = torch.where(scaled < self.qmin, float(self.qmin), clipped)
        # d out / d scale = the clipped code (qmax * d alpha), exactly 0 in value
        return out + (scale - scale.detach()) * clipped


@torch.no_grad()
def _project_steps(quantizers: list[FakeQuantizer]) -> None:
    """:meth:`FakeQuantizer.keep_step_valid` of all ``quantizers`` at once: the steps, floors and
    previous steps are concatenated, so a model's hundreds of quantizers cost a dozen kernel
    launches per optimizer step instead of a dozen each (on a GPU, launches are the cost)."""
    # steps, floors and previous steps are 1-D and of one dtype (no reshape or cast per
    # quantizer: on a CPU each is a dispatch of its own)
    step = torch.cat([q.scale for q in quantizers])
    floor = torch.cat([q.step_floor for q in quantizers])
    previous = torch.cat([q.previous_step for q in quantizers])
    # one update moves a step by at most a factor MAX_STEP_CHANGE either way: from an
    # over-confident initialisation the first gradients push every activation step down at
    # once, and a step that collapses in one iteration clips its whole tensor to one code
    # (seen: efficientnet_b0 at W2A2 went constant, then NaN, at its third SGD step)
    low = torch.maximum(previous / FakeQuantizer.MAX_STEP_CHANGE, floor)
    bounded = torch.minimum(torch.where(step >= low, step, low),  # NaN -> low
                            previous * FakeQuantizer.MAX_STEP_CHANGE)
    calibrated = previous > 0  # before calibration there is nothing to compare with
    projected = torch.where(calibrated, bounded, torch.maximum(step, floor))
    pieces = list(projected.split([q.scale.numel() for q in quantizers]))
    torch._foreach_copy_([q.scale.data for q in quantizers], pieces)
    torch._foreach_copy_([q.previous_step for q in quantizers], pieces)


def keep_steps_valid(model: nn.Module) -> None:
    """Project every learned step of ``model`` back above its floor; call after each optimizer
    step (mecqtk's training loop and ``doctor`` do; so should a hand-written loop).

    Example:
        >>> optimizer.step(); keep_steps_valid(qmodel)
    """
    learned = [m for m in model.modules()
               if isinstance(m, FakeQuantizer) and m.scale.requires_grad]
    if learned:
        _project_steps(learned)


def first_invalid_step(model: nn.Module) -> tuple[str, str] | None:
    """(name, reason) of the first quantizer, in module order, whose step is unusable."""
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantizer):
            reason = module.invalid_step()
            if reason is not None:
                return name, reason
    return None


def make_quantizer(spec: QuantSpec, channels: int = 1, axis: int = 0) -> FakeQuantizer:
    """Build the registered quantizer named by ``spec.quantizer``."""
    return QUANTIZERS[spec.quantizer](spec, channels=channels, axis=axis)
