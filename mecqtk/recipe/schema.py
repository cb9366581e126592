"""The recipe: typed, frozen configuration of one quantization run.

YAML is only the serialisation of these dataclasses (see :mod:`mecqtk.recipe.loader`). Each section
checks its own cross-field rules in ``__post_init__``; single-field ranges and allowed names are
declared on the field with :func:`~mecqtk.recipe.validate.constrained`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mecqtk.errors import RecipeError
from mecqtk.quant.registry import OBSERVERS, QUANTIZERS
from mecqtk.recipe.validate import constrained


def _quantizer_names() -> list[str]:
    return list(QUANTIZERS)  # read when checked: quantizers registered later count too


def _observer_names() -> list[str]:
    return list(OBSERVERS)


def _weight_capable(name: str) -> bool:
    return getattr(QUANTIZERS.get(name), "weight_capable", True)


Granularity = Literal["per_tensor", "per_channel"]
Signedness = Literal["auto", "signed", "unsigned"]
# the kinds of op a recipe rule can name (graph.meta.OpKind adds the graph-internal "select")
OpKind = Literal["conv", "linear", "matmul", "add", "cat", "pool"]


@dataclass(frozen=True)
class QuantizerConfig:
    """How one kind of tensor (weights or activations) is fake-quantized."""

    bits: int = constrained(4, ge=2, le=8, doc="bit width of the integer grid")
    quantizer: str = constrained("lsq", choices=_quantizer_names, doc="quantizer by registry name")
    granularity: Granularity = constrained(
        "per_tensor", doc="per_tensor: one step size; per_channel: one per output channel "
        "(weights only)"
    )
    observer: str = constrained(
        "mse", choices=_observer_names, doc="how the step size is initialised by calibration"
    )
    signed: Signedness = constrained(
        "auto", doc="auto: unsigned where the value is provably non-negative (after a ReLU), "
        "else signed; weights are always signed"
    )
    learn_step: bool = constrained(
        True, doc="train the step size (LSQ); false keeps the calibrated one"
    )


@dataclass(frozen=True)
class QuantizerOverride:
    """Fields a layer rule may change; ``None`` keeps the value from the defaults."""

    bits: int | None = constrained(None, ge=2, le=8, doc="bit width")
    quantizer: str | None = constrained(
        None, choices=_quantizer_names, doc="quantizer by registry name"
    )
    granularity: Granularity | None = constrained(
        None, doc="per_tensor or per_channel (per_channel for weights only)"
    )
    observer: str | None = constrained(
        None, choices=_observer_names, doc="how the step size is initialised by calibration"
    )
    signed: Signedness | None = constrained(None, doc="auto, signed or unsigned (activations)")
    learn_step: bool | None = constrained(None, doc="train the step size")


@dataclass(frozen=True)
class LayerMatch:
    """Which layers a rule applies to; every given condition must hold."""

    name: str | None = constrained(
        None, doc="module name: a glob (layer1.*.conv1) or a regex written re:<pattern>"
    )
    op: tuple[OpKind, ...] = constrained(
        (), doc="kinds of op the rule applies to; empty: any kind"
    )
    position: Literal["any", "first", "last"] = constrained(
        "any", doc="first / last: only the first or last Conv/Linear layer in execution order"
    )


@dataclass(frozen=True)
class LayerRule:
    """An ordered per-layer rule: the first matching rule wins for each field it sets."""

    match: LayerMatch = constrained(
        default_factory=LayerMatch, doc="which layers and ops the rule applies to"
    )
    weight: QuantizerOverride = constrained(
        default_factory=QuantizerOverride, doc="changes to quant.weight for the matched layers"
    )
    activation: QuantizerOverride = constrained(
        default_factory=QuantizerOverride,
        doc="changes to the input quantizer (quant.activation, or quant.residual for "
        "add/cat/pool) of the matched layers and ops",
    )
    skip: bool = constrained(False, doc="leave the matched layers and ops in float")

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
    """Observers see a few training batches and set every step size before training starts."""

    batches: int = constrained(4, ge=1, doc="batches of training data seen before training")


@dataclass(frozen=True)
class QuantConfig:
    """Defaults for weights and activations, ordered per-layer rules, junctions, BatchNorm,
    calibration and tracing."""

    weight: QuantizerConfig = constrained(
        default_factory=lambda: QuantizerConfig(granularity="per_channel", signed="signed"),
        doc="the weights of every Conv/Linear layer",
    )
    activation: QuantizerConfig = constrained(
        default_factory=QuantizerConfig,
        doc="the input of every Conv/Linear layer and the operands of matmul",
    )
    rules: tuple[LayerRule, ...] = constrained(
        default_factory=_default_rules,
        doc="ordered per-layer rules; a recipe that gives rules replaces the default list",
    )
    residual: ResidualConfig = constrained(
        default_factory=ResidualConfig, doc="residual add and cat, pooling inputs"
    )
    batchnorm: BatchNormConfig = constrained(
        default_factory=BatchNormConfig, doc="BatchNorm folding"
    )
    calibration: CalibrationConfig = constrained(
        default_factory=CalibrationConfig, doc="step-size initialisation before training"
    )
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
    """Weight decay applies to weight matrices and kernels only: biases, normalisation
    parameters and step sizes are not decayed."""

    name: Literal["sgd", "adamw"] = constrained("sgd", doc="sgd (with momentum) or adamw")
    lr: float = constrained(0.01, gt=0.0, doc="base learning rate (the schedule multiplies it)")
    momentum: float = constrained(0.9, ge=0.0, lt=1.0, doc="SGD momentum (sgd only)")
    nesterov: bool = constrained(True, doc="Nesterov momentum (sgd with momentum > 0 only)")
    weight_decay: float = constrained(1e-4, ge=0.0, doc="decoupled for adamw, L2 for sgd")
    quantizer_lr_scale: float = constrained(
        1.0, gt=0.0, doc="learning-rate multiplier for the quantizers' step sizes and offsets"
    )
    quantizer_weight_decay: float = constrained(
        0.0, ge=0.0, doc="weight decay of step sizes and offsets (LSQ trains them without: decay "
        "shrinks the quantization range)"
    )


@dataclass(frozen=True)
class ScheduleConfig:
    """A factor on every parameter group's learning rate, updated at every optimizer step."""

    name: Literal["cosine", "onecycle", "step", "constant"] = constrained(
        "cosine", doc="cosine: decay to 0 after the warm-up; onecycle: ramp up over the warm-up "
        "(default 30 %), then cosine to 0; step: times step_gamma every step_epochs; constant"
    )
    warmup_epochs: float = constrained(
        0.0, ge=0.0, doc="linear warm-up from 0 over these epochs (fractions allowed)"
    )
    step_epochs: int = constrained(30, ge=1, doc="epochs between lr drops (name: step)")
    step_gamma: float = constrained(
        0.1, gt=0.0, le=1.0, doc="factor of each lr drop (name: step)"
    )


@dataclass(frozen=True)
class BitScheduleConfig:
    """Train wider first: quantizers narrower than ``start_bits`` start on that grid."""

    start_bits: int | None = constrained(
        None, ge=3, le=8, doc="width every narrower quantizer trains at first (e.g. 4 for a W2A2 "
        "recipe); null: off"
    )
    start_epochs: float = constrained(
        0.25, gt=0.0, doc="epochs at start_bits, counted in the run's own budget; then each "
        "quantizer narrows to its own bits, its step set afresh by its observer"
    )


@dataclass(frozen=True)
class TrainConfig:
    """Runs after calibration; every epoch ends with an evaluation and a checkpoint."""

    epochs: int = constrained(
        1, ge=0, doc="training epochs; 0 calibrates only (mecqtk quantize --epochs overrides)"
    )
    batch_size: int = constrained(
        128, ge=1, doc="global batch; split evenly over the processes under torchrun"
    )
    eval_batch_size: int = constrained(256, ge=1, doc="batch size of evaluation")
    optimizer: OptimizerConfig = constrained(
        default_factory=OptimizerConfig, doc="optimizer and its parameter groups"
    )
    schedule: ScheduleConfig = constrained(
        default_factory=ScheduleConfig, doc="learning-rate schedule"
    )
    label_smoothing: float = constrained(
        0.0, ge=0.0, lt=1.0, doc="label smoothing of the cross-entropy task loss"
    )
    grad_clip: float | None = constrained(None, gt=0.0, doc="max global grad norm")
    seed: int = constrained(
        0, ge=0, doc="seeds the run: data order, augmentation, new parameters"
    )
    fused_quantizers: bool = constrained(
        True, doc="run fake-quant arithmetic through torch.compile (bit-identical, much faster)"
    )
    oscillation_dampening: float = constrained(
        0.0, ge=0.0, doc="weight of the oscillation-dampening loss (Nagel et al., 2022), the sum "
        "over quantized weights of their squared distance, in steps, from their code's value: "
        "weights stop flipping between two codes; ramped from 0 to this weight over training "
        "(cosine); 0: off"
    )
    oscillation_freezing: float = constrained(
        0.0, ge=0.0, le=1.0, doc="freeze a quantized weight once the moving average of its "
        "oscillation frequency (code flips against its previous direction, per step) passes this "
        "threshold (Nagel et al., 2022; e.g. 0.02): its latent value is set to its average "
        "code's bin centre and kept there; 0: off"
    )
    bit_schedule: BitScheduleConfig = constrained(
        default_factory=BitScheduleConfig, doc="start wider, narrow to the recipe's bits"
    )
    bn_reestimate_batches: int = constrained(
        0, ge=0, doc="after the last epoch, re-estimate every BatchNorm's running statistics "
        "over this many training batches with the final quantizers (no gradient), before the "
        "final evaluation and export; 0: off"
    )
    compile_model: bool | Literal["auto"] = constrained(
        "auto", doc="torch.compile the whole student model, fusing each fake-quantizer into its "
        "neighbouring kernels (the GPU fast path); auto: on CUDA only"
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = (
        constrained("default", doc="torch.compile mode of the student model (reduce-overhead: "
                    "CUDA graphs)")
    )
    amp: Literal["none", "bf16", "fp16"] = constrained(
        "none", doc="autocast precision; fp16 (with a grad scaler) only on CUDA"
    )
    channels_last: bool = constrained(False, doc="NHWC memory format for model and batches")
    sync_bn: bool = constrained(False, doc="SyncBatchNorm across processes under torchrun")
    checkpoint_every_steps: int | None = constrained(
        None, ge=1, doc="also checkpoint every N optimizer steps (epoch ends always are)"
    )


@dataclass(frozen=True)
class MECTap:
    """Features MEC spreads besides the main tap, with their own weight."""

    tap: str = constrained(
        "stages", doc="'stages' (the output of every intermediate stage in timm's feature_info) "
        "or a traced node name"
    )
    weight: float = constrained(0.25, ge=0.0, doc="weight of this tap's MEC loss, relative to the "
                                "main tap's (each stage of 'stages' gets it)")


@dataclass(frozen=True)
class MECConfig:
    """A maximum-entropy-coding term between the student's features and a second view of the
    batch, added to the training loss (docs/mec.md)."""

    enabled: bool = constrained(False, doc="add the MEC term to the training loss")
    weight: float = constrained(0.5, ge=0.0, doc="gamma: weight of the MEC loss in the total loss")
    weight_warmup_epochs: float = constrained(
        0.0, ge=0.0, doc="gamma rises linearly from 0 over these epochs"
    )
    eps2: float | None = constrained(
        None, gt=0.0, doc="distortion eps^2; null means the feature dimension d (series converges)"
    )
    order: int | None = constrained(4, ge=1, le=16, doc="Taylor order; null means exact logdet")
    lam_warmup_epochs: float = constrained(
        0.0, ge=0.0, doc="lambda rises from lambda/8 to lambda over these epochs"
    )
    view: Literal["teacher", "self", "augmented"] = constrained(
        "teacher", doc="second view: the frozen float teacher on the same batch, the student "
        "itself (spreading terms only), or the student on a shifted and flipped copy"
    )
    tap: str = constrained(
        "pooled", doc="features: 'pooled' (classifier input) or a traced node name"
    )
    extra_taps: tuple[MECTap, ...] = constrained(
        (), doc="more features to apply MEC to, each averaged over space or tokens and compared "
        "with the same place in the second view, e.g. [{tap: stages, weight: 0.25}]"
    )
    projector: int | None = constrained(None, ge=1, doc="width of a linear projector; null: none")
    experts: int = constrained(1, ge=1, le=64, doc="K: mixture components or channel groups")
    expert_form: Literal["mixture", "grouped"] = constrained(
        "mixture", doc="with experts > 1: a learned gating mixture, or contiguous channel groups"
    )


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation from the full-precision model (KL on softened logits)."""

    enabled: bool = constrained(False, doc="add the distillation term to the training loss")
    weight: float = constrained(1.0, ge=0.0, doc="weight of the KL term (also scaled by T^2)")
    temperature: float = constrained(4.0, gt=0.0, doc="T: softmax temperature of both models")


@dataclass(frozen=True)
class Recipe:
    """A whole quantization run: what is quantized and how it is trained."""

    name: str = constrained(
        "", doc="name shown in run summaries and reports; empty: the file name without .yaml"
    )
    description: str = constrained("", doc="one-line summary of what the recipe is for")
    quant: QuantConfig = constrained(default_factory=QuantConfig, doc="what is quantized, and how")
    train: TrainConfig = constrained(default_factory=TrainConfig, doc="quantization-aware training")
    mec: MECConfig = constrained(default_factory=MECConfig, doc="the MEC regulariser")
    distill: DistillConfig = constrained(
        default_factory=DistillConfig, doc="knowledge distillation"
    )
