"""The recipe: typed, frozen configuration of one quantization run.

YAML is only the serialisation of these dataclasses (see :mod:`mecqtk.recipe.loader`). Each section
checks its own cross-field rules in ``__post_init__``; single-field ranges and allowed names are
declared on the field with :func:`~mecqtk.recipe.validate.constrained`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mecqtk.errors import RecipeError
from mecqtk.recipe.validate import constrained


def _quantizer_names() -> list[str]:
    from mecqtk.quant.registry import QUANTIZERS

    return list(QUANTIZERS)


def _observer_names() -> list[str]:
    from mecqtk.quant.registry import OBSERVERS

    return list(OBSERVERS)


def _weight_capable(name: str) -> bool:
    from mecqtk.quant.registry import QUANTIZERS

    return getattr(QUANTIZERS.get(name), "weight_capable", True)


Granularity = Literal["per_tensor", "per_channel"]
Signedness = Literal["auto", "signed", "unsigned"]
OpKind = Literal["conv", "linear", "matmul", "add", "cat", "pool"]


@dataclass(frozen=True)
class QuantizerConfig:
    """How one kind of tensor (weights or activations) is fake-quantized."""

    bits: int = constrained(4, ge=2, le=8, doc="bit width of the integer grid")
    quantizer: str = constrained("lsq", choices=_quantizer_names, doc="quantizer by registry name")
    granularity: Granularity = "per_tensor"
    observer: str = constrained(
        "mse", choices=_observer_names, doc="how the step size is initialised by calibration"
    )
    signed: Signedness = "auto"
    learn_step: bool = constrained(
        True, doc="train the step size (LSQ); false keeps the calibrated one"
    )


@dataclass(frozen=True)
class QuantizerOverride:
    """Fields a layer rule may change; ``None`` keeps the value from the defaults."""

    bits: int | None = constrained(None, ge=2, le=8)
    quantizer: str | None = constrained(None, choices=_quantizer_names)
    granularity: Granularity | None = None
    observer: str | None = constrained(None, choices=_observer_names)
    signed: Signedness | None = None
    learn_step: bool | None = None


@dataclass(frozen=True)
class LayerMatch:
    """Which layers a rule applies to; every given condition must hold."""

    name: str | None = constrained(
        None, doc="module name: a glob (layer1.*.conv1) or a regex written re:<pattern>"
    )
    op: tuple[OpKind, ...] = ()
    position: Literal["any", "first", "last"] = "any"


@dataclass(frozen=True)
class LayerRule:
    """An ordered per-layer rule: the first matching rule wins for each field it sets."""

    match: LayerMatch = field(default_factory=LayerMatch)
    weight: QuantizerOverride = field(default_factory=QuantizerOverride)
    activation: QuantizerOverride = field(default_factory=QuantizerOverride)
    skip: bool = False

    def __post_init__(self) -> None:
        if self.match == LayerMatch():
            raise RecipeError("match: a rule needs at least one of name, op, position")


def _default_rules() -> tuple[LayerRule, ...]:
    # 8-bit steps are calibrated, not learned: an 8-bit step is ~30x finer than a 2-bit one, so
    # a learning rate that suits 2-bit steps moves it by more than its own size in a few steps.
    eight_bits = QuantizerOverride(bits=8, learn_step=False)
    return (
        LayerRule(match=LayerMatch(position="first"), weight=eight_bits, activation=eight_bits),
        LayerRule(match=LayerMatch(position="last"), weight=eight_bits, activation=eight_bits),
    )


JunctionOp = Literal["add", "cat", "pool"]


@dataclass(frozen=True)
class ResidualConfig:
    """Quantization of the junctions between layers: residual Add and Concat (each operand that is
    not already quantized, and the result) and pooling inputs.

    With these quantized, an exported graph can run every conv on integer kernels (a conv's output
    reaches a QuantizeLinear through at most BN and an activation). Per-tensor, signed unless the
    value is provably non-negative; ``quant.rules`` with ``op: [add]`` (etc.) override or skip.
    """

    enabled: bool = constrained(True, doc="quantize residual add/cat outputs and pool inputs")
    ops: tuple[JunctionOp, ...] = constrained(
        ("add", "cat", "pool"), doc="which junctions: add (tensor + tensor), cat, pool"
    )
    bits: int = constrained(8, ge=2, le=8, doc="bit width of junction quantizers")
    quantizer: str = constrained("lsq", choices=_quantizer_names, doc="quantizer by registry name")
    observer: str = constrained(
        "mse", choices=_observer_names, doc="how the step size is initialised by calibration"
    )
    learn_step: bool = constrained(
        False, doc="train junction steps; by default 8-bit steps stay calibrated, like the "
        "first/last layers' (a learning rate for 2-bit steps is far too large for them)"
    )

    def as_quantizer(self) -> QuantizerConfig:
        return QuantizerConfig(bits=self.bits, quantizer=self.quantizer,
                               granularity="per_tensor", observer=self.observer, signed="auto",
                               learn_step=self.learn_step)


@dataclass(frozen=True)
class BatchNormConfig:
    """BatchNorm after a Conv/Linear during QAT. By default BN stays as is (folded exactly at
    export); ``fold`` simulates the folding during training instead, so the quantizer sees the
    folded weight ``w * gamma / sigma`` an integer kernel will use. Gamma is never divided by."""

    fold: bool = constrained(False, doc="simulate conv-BN folding during QAT")
    freeze_epoch: int | None = constrained(
        None, ge=0, doc="epoch from which folded BN running statistics are frozen (null: never)"
    )


@dataclass(frozen=True)
class CalibrationConfig:
    batches: int = constrained(4, ge=1, doc="batches of training data seen before training")


@dataclass(frozen=True)
class QuantConfig:
    weight: QuantizerConfig = field(
        default_factory=lambda: QuantizerConfig(granularity="per_channel", signed="signed")
    )
    activation: QuantizerConfig = field(default_factory=QuantizerConfig)
    rules: tuple[LayerRule, ...] = field(default_factory=_default_rules)
    residual: ResidualConfig = field(default_factory=ResidualConfig)
    batchnorm: BatchNormConfig = field(default_factory=BatchNormConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    leaf_modules: tuple[str, ...] = constrained(
        (), doc="class names the tracer keeps whole (their inner Conv/Linear stay quantized)"
    )
    auto_leaf: bool = constrained(
        True, doc="keep a submodule whole when tracing fails inside it, instead of stopping"
    )

    def __post_init__(self) -> None:
        if self.weight.signed == "unsigned":
            raise RecipeError("weight.signed: weights are always signed; use signed or auto")
        if self.activation.granularity != "per_tensor":
            raise RecipeError("activation.granularity: activations are quantized per tensor; "
                              "use per_tensor")
        weights = [("weight", self.weight.quantizer)] + [
            (f"rules[{i}].weight", r.weight.quantizer) for i, r in enumerate(self.rules)
        ]
        for key, name in weights:
            if name is not None and not _weight_capable(name):
                raise RecipeError(f"{key}.quantizer: {name!r} quantizes activations only; "
                                  "use lsq for weights")
        for i, rule in enumerate(self.rules):
            if rule.weight.signed == "unsigned":
                raise RecipeError(f"rules[{i}].weight.signed: weights are always signed")
            if rule.activation.granularity == "per_channel":
                raise RecipeError(f"rules[{i}].activation.granularity: activations are "
                                  "quantized per tensor")


@dataclass(frozen=True)
class OptimizerConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = constrained(0.01, gt=0.0)
    momentum: float = constrained(0.9, ge=0.0, lt=1.0)
    nesterov: bool = True
    weight_decay: float = constrained(1e-4, ge=0.0)
    quantizer_lr_scale: float = constrained(
        1.0, gt=0.0, doc="learning-rate multiplier for step sizes (no weight decay on them)"
    )


@dataclass(frozen=True)
class ScheduleConfig:
    name: Literal["cosine", "onecycle", "step", "constant"] = "cosine"
    warmup_epochs: float = constrained(0.0, ge=0.0)
    step_epochs: int = constrained(30, ge=1, doc="epochs between lr drops (name: step)")
    step_gamma: float = constrained(0.1, gt=0.0, le=1.0)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = constrained(1, ge=0)
    batch_size: int = constrained(128, ge=1)
    eval_batch_size: int = constrained(256, ge=1)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    label_smoothing: float = constrained(0.0, ge=0.0, lt=1.0)
    grad_clip: float | None = constrained(None, gt=0.0, doc="max global grad norm")
    seed: int = constrained(0, ge=0)
    fused_quantizers: bool = constrained(
        True, doc="run fake-quant arithmetic through torch.compile (bit-identical, much faster)"
    )
    compile_model: bool = constrained(False, doc="torch.compile the whole student model")
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = False
    sync_bn: bool = constrained(False, doc="SyncBatchNorm across processes under torchrun")
    checkpoint_every_steps: int | None = constrained(
        None, ge=1, doc="also checkpoint every N optimizer steps (epoch ends always are)"
    )


@dataclass(frozen=True)
class MECConfig:
    """Maximum-entropy-coding regulariser (docs/mec.md)."""

    enabled: bool = False
    weight: float = constrained(0.5, ge=0.0, doc="gamma: weight of the MEC loss in the total loss")
    weight_warmup_epochs: float = constrained(0.0, ge=0.0)
    eps2: float | None = constrained(
        None, gt=0.0, doc="distortion eps^2; null means the feature dimension d (series converges)"
    )
    order: int | None = constrained(4, ge=1, le=16, doc="Taylor order; null means exact logdet")
    lam_warmup_epochs: float = constrained(
        0.0, ge=0.0, doc="lambda rises from lambda/8 to lambda over these epochs"
    )
    view: Literal["teacher", "self", "augmented"] = "teacher"
    tap: str = constrained(
        "pooled", doc="features: 'pooled' (classifier input) or a traced node name"
    )
    projector: int | None = constrained(None, ge=1, doc="width of a linear projector; null: none")
    experts: int = constrained(1, ge=1, le=64, doc="K: mixture components or channel groups")
    expert_form: Literal["mixture", "grouped"] = "mixture"


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation from the full-precision model (KL on softened logits)."""

    enabled: bool = False
    weight: float = constrained(1.0, ge=0.0)
    temperature: float = constrained(4.0, gt=0.0)


@dataclass(frozen=True)
class Recipe:
    """A whole quantization run: what is quantized and how it is trained."""

    name: str = ""
    description: str = ""
    quant: QuantConfig = field(default_factory=QuantConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mec: MECConfig = field(default_factory=MECConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
