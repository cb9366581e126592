"""`mecqtk quantize` as a library call: float model -> calibrated, trained fake-quant model."""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

import mecqtk
from mecqtk.data import build_data, peek_num_classes
from mecqtk.errors import MecqtkError
from mecqtk.graph import prepare
from mecqtk.io import append_jsonl, atomic_torch_save
from mecqtk.models import create_model
from mecqtk.progress import progress_bar, say
from mecqtk.quant.arith import use_compiled_kernels
from mecqtk.quant.calibrate import calibrate
from mecqtk.recipe import Recipe, load_recipe
from mecqtk.rundir import RunDir, RunInfo
from mecqtk.train import build_optimizer, build_scheduler, evaluate, train_one_epoch
from mecqtk.train.teacher import Teacher
from mecqtk.train.terms import DistillTerm, MECTerm


@dataclass(frozen=True)
class QuantizeOptions:
    """Everything `mecqtk quantize` takes besides the recipe's own contents."""

    model: str
    recipe: str
    data: str
    out: Path
    checkpoint: str | None = None
    pretrained: bool = False
    epochs: int | None = None
    limit_train: int | None = None
    limit_val: int | None = None
    device: str = "auto"
    force: bool = False
    workers: int = 0
    show_progress: bool = True


@dataclass
class RunSummary:
    model: str
    recipe: str
    fp_top1: float
    quant_top1: float
    epochs: int
    wall_seconds: float
    out: str
    history: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "model": self.model, "recipe": self.recipe, "fp_top1": self.fp_top1,
            "quant_top1": self.quant_top1, "epochs": self.epochs,
            "wall_seconds": self.wall_seconds, "out": self.out,
        }


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MecqtkError("--device cuda: no CUDA device is available; use --device cpu")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def build_loss_terms(recipe: Recipe, float_model: torch.nn.Module, qmodel: torch.fx.GraphModule,
                     steps_per_epoch: int, probe: torch.Tensor,
                     device: torch.device) -> list:
    """The MEC and distillation terms the recipe asks for, sharing one frozen float teacher."""
    needs_teacher = recipe.distill.enabled or (
        recipe.mec.enabled and recipe.mec.view == "teacher")
    teacher = Teacher(float_model, recipe.quant.leaf_modules).to(device) if needs_teacher else None
    terms: list = []
    if recipe.mec.enabled:
        terms.append(MECTerm(recipe.mec, qmodel, qmodel, teacher, steps_per_epoch, probe,
                             seed=recipe.train.seed))
    if recipe.distill.enabled:
        assert teacher is not None
        terms.append(DistillTerm(recipe.distill, teacher))
    return terms


def _checkpoint_state(qmodel, optimizer, scheduler, epoch: int, step: int) -> dict[str, Any]:
    return {
        "format": 1,
        "state_dict": qmodel.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "step": step,
        "torch_rng": torch.get_rng_state(),
    }


def quantize(options: QuantizeOptions) -> RunSummary:
    """Trace, quantize, calibrate, train and evaluate; write the run folder.

    Example:
        >>> quantize(QuantizeOptions(model="cifar_resnet20", recipe="quickstart.yaml",
        ...          data="imagefolder:../shared/data/cifar10-jpeg", out=Path("runs/quick")))
    """
    started = time.perf_counter()
    recipe: Recipe = load_recipe(options.recipe)
    if options.epochs is not None:
        recipe = replace(recipe, train=replace(recipe.train, epochs=options.epochs))
    run_dir = RunDir(options.out)
    if run_dir.holds_a_run() and not options.force:
        raise MecqtkError(
            f"{run_dir.path} already holds a run; choose another --out or pass --force to replace it"
        )
    device = resolve_device(options.device)
    seed_everything(recipe.train.seed)
    use_compiled_kernels(recipe.train.fused_quantizers)

    num_classes, class_names = peek_num_classes(options.data)
    model = create_model(options.model, num_classes=num_classes, pretrained=options.pretrained,
                         checkpoint=options.checkpoint)
    data = build_data(
        options.data, model=model, batch_size=recipe.train.batch_size,
        eval_batch_size=recipe.train.eval_batch_size, limit_train=options.limit_train,
        limit_val=options.limit_val, seed=recipe.train.seed, num_workers=options.workers,
    )
    run_dir.path.mkdir(parents=True, exist_ok=True)
    if options.force:
        for stale in (run_dir.metrics, run_dir.path / "summary.json"):
            stale.unlink(missing_ok=True)
    run_dir.write_recipe(recipe)
    run_dir.write_info(RunInfo(
        model=options.model, num_classes=num_classes, data=options.data, class_names=class_names,
        input_size=list(data.input_size), mean=list(data.mean), std=list(data.std),
        checkpoint_source=options.checkpoint, mecqtk_version=mecqtk.__version__,
    ))
    show = options.show_progress
    model = model.to(device)
    with progress_bar("eval float", len(data.val_loader), show) as advance:
        fp_top1, fp_loss = evaluate(model, data.val_loader, device, advance)
    say(f"float model: top-1 {fp_top1:.2f} %  loss {fp_loss:.4f}")

    qmodel = prepare(model, recipe).to(device)
    batches = (images for images, _ in itertools.islice(data.train_loader,
                                                      recipe.quant.calibration.batches))
    calibrate(qmodel, batches)
    with progress_bar("eval quantized (calibrated)", len(data.val_loader), show) as advance:
        calib_top1, _ = evaluate(qmodel, data.val_loader, device, advance)
    say(f"quantized after calibration: top-1 {calib_top1:.2f} %")

    epochs = recipe.train.epochs
    steps_per_epoch = len(data.train_loader)
    probe = next(iter(data.train_loader))[0][:16].to(device)
    terms = build_loss_terms(recipe, model, qmodel, steps_per_epoch, probe, device)
    optimizer = build_optimizer(qmodel, recipe.train.optimizer)
    extra_params = [p for term in terms for p in term.trainable.parameters()]
    if extra_params:
        optimizer.add_param_group({"params": extra_params, "weight_decay": 0.0})
    scheduler = build_scheduler(optimizer, recipe.train.schedule, epochs * steps_per_epoch,
                                steps_per_epoch)
    history: list[dict[str, Any]] = []
    quant_top1 = calib_top1
    step = 0
    for epoch in range(epochs):
        data.train_loader.set_epoch(epoch)
        epoch_start = time.perf_counter()
        with progress_bar(f"epoch {epoch + 1}/{epochs}", steps_per_epoch, show) as advance:
            stats = train_one_epoch(
                qmodel, data.train_loader, optimizer, scheduler, device, epoch=epoch,
                start_step=step, extra_terms=terms, label_smoothing=recipe.train.label_smoothing, grad_clip=recipe.train.grad_clip,
                progress=advance,
            )
        step += stats.steps
        with progress_bar("eval quantized", len(data.val_loader), show) as advance:
            quant_top1, val_loss = evaluate(qmodel, data.val_loader, device, advance)
        record = {
            "epoch": epoch + 1, "step": step, "train_loss": stats.loss, "train_top1": stats.top1,
            **{f"train_{k}": v for k, v in stats.terms.items()},
            "val_loss": val_loss, "val_top1": quant_top1,
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_seconds": time.perf_counter() - epoch_start,
        }
        atomic_torch_save(run_dir.checkpoint,
                          _checkpoint_state(qmodel, optimizer, scheduler, epoch + 1, step))
        append_jsonl(run_dir.metrics, record)
        history.append(record)
        say(f"epoch {epoch + 1}: train loss {stats.loss:.4f}  quantized top-1 {quant_top1:.2f} %")
    if epochs == 0:
        atomic_torch_save(run_dir.checkpoint, _checkpoint_state(qmodel, optimizer, scheduler, 0, 0))

    summary = RunSummary(
        model=options.model, recipe=recipe.name, fp_top1=fp_top1, quant_top1=quant_top1,
        epochs=epochs, wall_seconds=round(time.perf_counter() - started, 1),
        out=str(run_dir.path), history=history,
    )
    run_dir.write_summary({**summary.as_json(), "calibrated_top1": calib_top1})
    return summary
