"""Check a model against a recipe: what is quantized, does it run, and does it train.

:func:`explain` only prepares the model and reports per layer. :func:`doctor` goes on to set
BatchNorm statistics and calibrate on one random batch, run one forward and backward pass (and an
eval-mode forward), checks that outputs and gradients are finite and that every quantized layer
actually ran, then takes a few optimizer steps with the recipe's optimizer and learning rate and
checks that the loss, the gradients and every step size stay valid.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from torch import nn

from mecqtk.errors import GraphError
from mecqtk.graph.introspect import quantized_layers
from mecqtk.graph.quant_plan import QuantReport, quant_report
from mecqtk.models import create_model
from mecqtk.qat import prepare
from mecqtk.quant.calibrate import calibrate
from mecqtk.quant.quantizers import FakeQuantizer, first_invalid_step, keep_steps_valid
from mecqtk.recipe import Recipe, load_recipe
from mecqtk.train.optim import build_optimizer

DEFAULT_RECIPE = "w4a4_lsq.yaml"
# optimizer steps doctor takes by default: the first updates are where a step size breaks
DEFAULT_STEPS = 3
# their batch, which calibration sees too: BatchNorm in train mode over 2 samples of a 1x1
# feature map has a variance of 0 whenever both quantize to the same code, which no real
# training batch sees; and statistics settled on 2 images leave each channel of a 1x1 map one
# degree of freedom, so eval-mode calibration on them set efficientnet_b0's activation steps
# past blocks.5.0 to 1e2..1e18 times what training computes (constant logits, an infinite
# gradient at the first step). The user's path calibrates on many real batches.
TRAIN_BATCH = 16
# Weight step sizes for the check come from min-max: per-channel MSE on millions of weights
# takes most of a minute on a CPU. Activations use the recipe's own observers, as training does.
CHECK_WEIGHT_OBSERVER = "minmax"


def build_model(name: str) -> nn.Module:
    """A timm (or mecqtk CIFAR) model by name, randomly initialised, with its default classes."""
    cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=True)
    num_classes = getattr(cfg, "num_classes", None) or 1000
    return create_model(name, num_classes=num_classes)


def _recipe(recipe: str | Recipe | None) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    return load_recipe(recipe or DEFAULT_RECIPE)


@dataclass(frozen=True)
class Explanation:
    model: str
    recipe: str
    report: QuantReport


def explain(model: str, recipe: str | Recipe | None = None) -> Explanation:
    """Prepare ``model`` with ``recipe`` and report, per layer, what is quantized and how.

    Raises:
        ModelError: unknown model name. GraphError: the model cannot be traced.

    Example:
        >>> explain("resnet18", "w2a2_lsq.yaml").report.layers_quantized
        21
    """
    loaded = _recipe(recipe)
    float_model = build_model(model)
    return Explanation(model, loaded.name, quant_report(float_model, prepare(float_model, loaded)))


@dataclass(frozen=True)
class DoctorResult:
    """Everything ``mecqtk doctor`` found; :meth:`as_json` is its machine-readable form."""

    model: str
    recipe: str
    input_size: tuple[int, ...]
    traced: bool
    forward_ok: bool = False
    backward_ok: bool = False
    error: str | None = None
    auto_leaves: tuple[str, ...] = ()
    report: QuantReport | None = None
    not_run: tuple[str, ...] = ()
    seconds: float = 0.0
    ops: dict[str, int] = field(default_factory=dict)
    steps: int = 0  # optimizer steps asked for
    losses: tuple[float, ...] = ()  # loss before each optimizer step taken
    smallest_step: float | None = None  # smallest learned step size after the last update
    train_error: str | None = None

    @property
    def layers_total(self) -> int:
        return self.report.layers_total if self.report else 0

    @property
    def layers_quantized(self) -> int:
        return self.report.layers_quantized if self.report else 0

    @property
    def float_layers(self) -> list[dict[str, str]]:
        if not self.report:
            return []
        return [{"name": r.name, "reason": r.float_reason or ""} for r in self.report.layers_float]

    @property
    def ok(self) -> bool:
        """Traced, ran forward and backward with finite values, every layer quantized and run."""
        return (self.traced and self.forward_ok and self.backward_ok and not self.float_layers
                and not self.not_run and self.train_error is None
                and len(self.losses) == self.steps)

    def as_json(self) -> dict[str, Any]:
        return {
            "model": self.model, "recipe": self.recipe, "input_size": list(self.input_size),
            "ok": self.ok, "traced": self.traced, "needed_leaves": bool(self.auto_leaves),
            "auto_leaves": list(self.auto_leaves), "forward_ok": self.forward_ok,
            "backward_ok": self.backward_ok, "layers_total": self.layers_total,
            "layers_quantized": self.layers_quantized, "layers_float": len(self.float_layers),
            "float_layers": self.float_layers,
            "layers_not_run": list(self.not_run), "quantized_ops": self.ops,
            "error": self.error, "steps": self.steps, "losses": list(self.losses),
            "smallest_step": self.smallest_step, "train_error": self.train_error,
            "seconds": round(self.seconds, 2),
        }


def _input_size(model: nn.Module, image_size: int | None) -> tuple[int, ...]:
    size = tuple(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224)))
    if image_size is not None:
        size = (size[0], *([image_size] * (len(size) - 1)))
    return size


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def _run_once(qmodel: nn.Module, x: torch.Tensor,
              calibration: torch.Tensor) -> tuple[bool, bool, tuple[str, ...], str | None]:
    """Calibrate on ``calibration``, then one forward + backward of ``x`` in train mode and one
    forward in eval mode; (forward_ok, backward_ok, quantized layers that never ran, error)."""
    ran: set[str] = set()
    layers = [site.name for site in quantized_layers(qmodel)]
    hooks = [qmodel.get_submodule(n).register_forward_hook(lambda mod, *_, name=n: ran.add(name))
             for n in layers]
    try:
        # settles BN statistics too
        calibrate(qmodel, [calibration], weight_observer=CHECK_WEIGHT_OBSERVER)
        invalid = first_invalid_step(qmodel)
        if invalid is not None:
            return False, False, (), f"after calibration, {invalid[0]}: {invalid[1]}"
        qmodel.train()
        out = qmodel(x)
        outputs = out if isinstance(out, tuple | list) else (out,)
        finite = all(torch.isfinite(o).all() for o in outputs if isinstance(o, torch.Tensor))
        if not finite:
            return False, False, (), "forward output is not finite"
        sum(o.float().sum() for o in outputs if isinstance(o, torch.Tensor)).backward()
    except Exception as err:  # the point of doctor is to report any failure, not to raise it
        return bool(ran), False, (), _first_line(err)
    finally:
        for hook in hooks:
            hook.remove()
    grads = [p.grad for p in qmodel.parameters() if p.grad is not None]
    if not grads or not all(torch.isfinite(g).all() for g in grads):
        return True, False, (), "gradients are missing or not finite"
    not_run = tuple(n for n in layers if n not in ran)
    try:  # the graph was traced in train mode: eval (running BN statistics) must work too
        qmodel.eval()
        with torch.no_grad():
            out = qmodel(x)
        outputs = out if isinstance(out, tuple | list) else (out,)
        if not all(torch.isfinite(o).all() for o in outputs if isinstance(o, torch.Tensor)):
            return False, True, not_run, "eval-mode output is not finite"
    except Exception as err:
        return False, True, not_run, f"eval mode: {_first_line(err)}"
    return True, True, not_run, None


def _smallest_step(qmodel: nn.Module) -> float | None:
    steps = [m.step_size().min().item() for m in qmodel.modules()
             if isinstance(m, FakeQuantizer) and m.scale.requires_grad]
    return min(steps) if steps else None


def _train_steps(qmodel: nn.Module, recipe: Recipe, x: torch.Tensor, steps: int,
                 seed: int) -> tuple[tuple[float, ...], str | None]:
    """``steps`` optimizer steps on the batch ``x`` with random labels, the recipe's optimizer
    at its full learning rate (no warm-up: the hardest point of any schedule); (losses, first
    error)."""
    optimizer = build_optimizer(qmodel, recipe.train.optimizer)
    qmodel.train()
    losses: list[float] = []
    generator = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        out = qmodel(x)
        logits = out[0] if isinstance(out, tuple | list) else out
        if logits.dim() == 2:
            labels = torch.randint(logits.shape[1], (logits.shape[0],), generator=generator)
            loss = nn.functional.cross_entropy(logits.float(), labels)
        else:
            loss = logits.float().square().mean()
        if not torch.isfinite(loss):
            return tuple(losses), f"loss is {loss.item()} at optimizer step {step}"
        losses.append(loss.item())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for name, param in qmodel.named_parameters():
            if param.grad is not None and not bool(torch.isfinite(param.grad).all()):
                return tuple(losses), f"gradient of {name} is not finite at optimizer step {step}"
        optimizer.step()
        keep_steps_valid(qmodel)
        invalid = first_invalid_step(qmodel)
        if invalid is not None:
            return tuple(losses), f"after optimizer step {step}, {invalid[0]}: {invalid[1]}"
        for name, param in qmodel.named_parameters():
            if not bool(torch.isfinite(param).all()):
                return tuple(losses), f"{name} is not finite after optimizer step {step}"
    return tuple(losses), None


def check_model(
    float_model: nn.Module,
    recipe: str | Recipe | None = None,
    *,
    input_size: tuple[int, ...] | None = None,
    name: str | None = None,
    batch_size: int = 2,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
) -> DoctorResult:
    """:func:`doctor` for a model object (built with whatever arguments it needs).

    Example:
        >>> check_model(timm.create_model("vit_tiny_patch16_224", img_size=32)).ok
        True
    """
    start = time.perf_counter()
    loaded = _recipe(recipe)
    size = input_size or _input_size(float_model, None)
    name = name or type(float_model).__name__
    try:
        qmodel = prepare(float_model, loaded)
    except GraphError as err:
        return DoctorResult(name, loaded.name, size, traced=False, error=str(err),
                            seconds=time.perf_counter() - start)
    report = quant_report(float_model, qmodel)
    ops: dict[str, int] = {}
    for row in report.rows:
        if row.quantized and row.kind not in ("conv", "linear"):
            ops[row.kind] = ops.get(row.kind, 0) + 1
    torch.manual_seed(seed)
    x = torch.randn(batch_size, *size)
    batch = torch.randn(max(batch_size, TRAIN_BATCH), *size,
                        generator=torch.Generator().manual_seed(seed + 1))
    forward_ok, backward_ok, not_run, error = _run_once(qmodel, x, batch)
    losses: tuple[float, ...] = ()
    train_error = None
    if forward_ok and backward_ok and steps > 0:
        try:
            losses, train_error = _train_steps(qmodel, loaded, batch, steps, seed)
        except Exception as err:  # reported, not raised, like every other doctor failure
            train_error = f"training step: {_first_line(err)}"
    return DoctorResult(
        name, loaded.name, size, traced=True, forward_ok=forward_ok, backward_ok=backward_ok,
        error=error, auto_leaves=report.auto_leaves, report=report, not_run=not_run,
        seconds=time.perf_counter() - start, ops=ops, steps=steps, losses=losses,
        smallest_step=_smallest_step(qmodel), train_error=train_error,
    )


def doctor(
    model: str,
    recipe: str | Recipe | None = None,
    *,
    image_size: int | None = None,
    batch_size: int = 2,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
) -> DoctorResult:
    """Trace and quantize ``model``, run it once forward and backward, take ``steps`` optimizer
    steps, and report.

    Calibration (min-max, on the same random batch) comes first, so step sizes are realistic.
    Failures to trace or run are reported in the result, not raised; an unknown model name or a
    bad recipe raise (ModelError / RecipeError).

    Example:
        >>> result = doctor("resnet18", "w2a2_lsq.yaml", image_size=64)
        >>> result.ok, result.layers_total
        (True, 21)
    """
    start = time.perf_counter()
    loaded = _recipe(recipe)
    # the random weights are part of what is checked: the same seed gives the same verdict
    torch.manual_seed(seed)
    float_model = build_model(model)
    result = check_model(float_model, loaded, input_size=_input_size(float_model, image_size),
                         name=model, batch_size=batch_size, seed=seed, steps=steps)
    return dataclasses.replace(result, seconds=time.perf_counter() - start)
