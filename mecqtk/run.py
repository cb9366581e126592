"""`mecqtk quantize` as a library call: float model -> calibrated, trained fake-quant model ->
verified integer ONNX and a per-layer report, all in one run folder.

This module only orders the stages; each lives in its own module: the run folder
(:mod:`mecqtk.rundir`), the float model and data (:mod:`mecqtk.run_inputs`), preparation
(:func:`mecqtk.prepare`) and calibration, training (:mod:`mecqtk.train.session`), and the
end stages, export + verify and report (:mod:`mecqtk.outcome`). Runs in one process or, under
torchrun, as DistributedDataParallel (only rank 0 writes files and shows progress).
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

import mecqtk
from mecqtk.device import resolve_device
from mecqtk.errors import MecqtkError
from mecqtk.outcome import RunSummary, end_stages, fail_training
from mecqtk.progress import say
from mecqtk.qat import prepare
from mecqtk.quant.arith import use_compiled_kernels
from mecqtk.quant.calibrate import calibrate
from mecqtk.recipe import Recipe, load_recipe
from mecqtk.run_inputs import build_run_inputs
from mecqtk.rundir import RunDir, RunInfo, load_checkpoint
from mecqtk.train.distributed import (
    DistContext,
    average_parameters,
    device_for,
    init_distributed,
    shutdown,
)
from mecqtk.train.session import TrainingSession, evaluate_on_main


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
    batch_size: int | None = None  # overrides the recipe's train.batch_size
    limit_train: int | None = None
    limit_val: int | None = None
    device: str = "auto"
    force: bool = False
    resume: bool = False
    workers: int = 0
    show_progress: bool = True
    report: bool = True
    report_images: int = 500
    export: bool = True


def quantize(options: QuantizeOptions) -> RunSummary:
    """Trace, quantize, calibrate, train and evaluate; export, verify and report; write the run
    folder.

    Example:
        >>> quantize(QuantizeOptions(model="cifar_resnet20", recipe="quickstart.yaml",
        ...          data="imagefolder:../shared/data/cifar10-jpeg", out=Path("runs/quick")))
    """
    started = time.perf_counter()
    recipe = load_recipe(options.recipe)
    if options.epochs is not None:
        recipe = replace(recipe, train=replace(recipe.train, epochs=options.epochs))
    if options.batch_size is not None:
        recipe = replace(recipe, train=replace(recipe.train, batch_size=options.batch_size))
    device = resolve_device(options.device)
    context = init_distributed(device)
    try:
        return _run(options, recipe, device_for(device, context), context, started)
    finally:
        shutdown(context)


def _run(options: QuantizeOptions, recipe: Recipe, device: torch.device, context: DistContext,
         started: float) -> RunSummary:
    run_dir, train = RunDir(options.out), recipe.train
    show = options.show_progress and context.is_main

    def tell(message: str) -> None:
        if context.is_main:
            say(message)

    run_dir.prepare(recipe, resume=options.resume, force=options.force, is_main=context.is_main)
    random.seed(train.seed)
    torch.manual_seed(train.seed)
    use_compiled_kernels(train.fused_quantizers)
    if train.batch_size % context.world_size:
        raise MecqtkError(
            f"train.batch_size {train.batch_size} is the global batch and must divide "
            f"evenly over {context.world_size} processes"
        )
    inputs = build_run_inputs(
        options.model, options.data, checkpoint=options.checkpoint, pretrained=options.pretrained,
        batch_size=train.batch_size // context.world_size, eval_batch_size=train.eval_batch_size,
        limit_train=options.limit_train, limit_val=options.limit_val, seed=train.seed,
        workers=options.workers, distributed=context.enabled, say=tell)
    data = inputs.data
    resume_state = load_checkpoint(run_dir.checkpoint) if options.resume else None
    if context.is_main and resume_state is None:
        run_dir.path.mkdir(parents=True, exist_ok=True)
        run_dir.write_recipe(recipe)
        run_dir.write_info(RunInfo(
            model=options.model, num_classes=inputs.num_classes, data=options.data,
            class_names=inputs.class_names, input_size=list(data.input_size),
            mean=list(data.mean), std=list(data.std), checkpoint_source=options.checkpoint,
            mecqtk_version=mecqtk.__version__, model_kwargs=inputs.model_kwargs,
        ))
    float_model = inputs.float_model.to(device)
    qmodel = prepare(float_model, recipe).to(device)
    if train.sync_bn and device.type != "cuda":
        raise MecqtkError("train.sync_bn: SyncBatchNorm needs CUDA devices; set it to false "
                          "for CPU runs")
    if train.sync_bn and context.enabled:
        qmodel = nn.SyncBatchNorm.convert_sync_batchnorm(qmodel)
    if train.channels_last:
        qmodel.to(memory_format=torch.channels_last)
    if resume_state is None:
        fp_top1 = evaluate_on_main(float_model, data, device, context, "eval float", show)
        tell(f"float model: top-1 {fp_top1:.2f} %")
        if recipe.distill.enabled or (recipe.mec.enabled and recipe.mec.view == "teacher"):
            # a teacher weaker than the student costs accuracy: say which model it is
            source = options.checkpoint or ("timm's pretrained weights" if options.pretrained
                                            else "timm's random initialisation")
            tell(f"teacher (distillation / MEC teacher view): this float model, from {source}, "
                 f"top-1 {fp_top1:.2f} %")
        calibrate(qmodel, (images for images, _ in
                           itertools.islice(data.train_loader, recipe.quant.calibration.batches)))
        average_parameters(qmodel, context)
        calibrated_top1 = evaluate_on_main(qmodel, data, device, context, "eval calibrated", show)
        tell(f"quantized after calibration: top-1 {calibrated_top1:.2f} %")
    else:
        qmodel.load_state_dict(resume_state["state_dict"])
        fp_top1, calibrated_top1 = resume_state["fp_top1"], resume_state["calibrated_top1"]
    session = TrainingSession(
        recipe, qmodel, float_model, data, device, context, checkpoint=run_dir.checkpoint,
        metrics=run_dir.metrics, show=show,
        scores={"fp_top1": fp_top1, "calibrated_top1": calibrated_top1})
    if resume_state is not None:
        session.restore(resume_state)
    elif train.epochs > 0:
        # the calibrated model is the first good checkpoint: a loss that turns NaN in the
        # first steps still leaves a run that `mecqtk export` and --resume can use
        session.save(0, 0, None)
    try:
        session.train()
    except Exception as err:
        fail_training(err, run_dir, context.is_main, {
            "model": options.model, "recipe": recipe.name, "fp_top1": fp_top1,
            "calibrated_top1": calibrated_top1, "epochs": train.epochs,
            "epochs_finished": len(session.history), "step": session.global_step,
            "wall_seconds": round(time.perf_counter() - started, 1),
            "out": str(run_dir.path), "world_size": context.world_size})
    summary = RunSummary(
        model=options.model, recipe=recipe.name, fp_top1=fp_top1, quant_top1=session.quant_top1,
        epochs=train.epochs, wall_seconds=round(time.perf_counter() - started, 1),
        out=str(run_dir.path), calibrated_top1=calibrated_top1,
        resumed_from_step=session.resumed_from_step, world_size=context.world_size,
        history=session.history,
    )
    if context.is_main:
        end_stages(run_dir, summary, data=options.data, limit_val=options.limit_val,
                   export=options.export, report=options.report,
                   report_images=options.report_images, device=device, show_progress=show,
                   say=tell)
    return summary
