"""`mecqtk quantize` as a library call: float model -> calibrated, trained fake-quant model.

Runs in one process or, under torchrun, as DistributedDataParallel (only rank 0 writes files
and shows progress). Checkpoints are written atomically at every epoch end and every
``train.checkpoint_every_steps`` steps; ``resume=True`` continues from the last one with the
same result an uninterrupted run would give.
"""

from __future__ import annotations

import itertools
import json
import random
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

import mecqtk
from mecqtk.data import build_data, peek_image_size, peek_num_classes
from mecqtk.errors import ExportError, MecqtkError, ModelError
from mecqtk.graph import prepare
from mecqtk.io import append_jsonl, atomic_torch_save, atomic_write_text
from mecqtk.models import (
    InputFit,
    create_model,
    fit_at_own_size,
    fit_model_to_images,
    is_external,
    require_known_model,
)
from mecqtk.outcome import (
    STAGE_ERROR_LOG,
    IncompleteRunError,
    StageOutcome,
    export_stage,
    failure_message,
    log_traceback,
    one_line,
    report_stage,
)
from mecqtk.progress import progress_bar, say
from mecqtk.quant.arith import use_compiled_kernels
from mecqtk.quant.bn_fold import bn_epoch_start
from mecqtk.quant.calibrate import calibrate
from mecqtk.recipe import Recipe, dump_recipe, load_recipe
from mecqtk.rundir import RunDir, RunInfo, load_checkpoint
from mecqtk.train import build_optimizer, build_scheduler, evaluate, train_one_epoch
from mecqtk.train.checkpoint import FORMAT, capture_rng, restore_rng
from mecqtk.train.distributed import (
    DistContext,
    average_parameters,
    barrier,
    device_for,
    init_distributed,
    shutdown,
    sum_over_ranks,
)
from mecqtk.train.loop import EpochStats, TrainStep
from mecqtk.train.teacher import Teacher
from mecqtk.train.terms import DistillTerm, MECTerm

# Files of a finished run that --force removes before starting again.
_RUN_OUTPUTS = ("checkpoint.pt", "metrics.jsonl", "summary.json", "run.json", "recipe.yaml",
                "report.json", "report.html", "suggested_recipe.yaml",
                *(STAGE_ERROR_LOG.format(stage=s) for s in ("train", "export", "report")))


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
    resume: bool = False
    workers: int = 0
    show_progress: bool = True
    report: bool = True
    report_images: int = 500
    export: bool = True


@dataclass
class RunSummary:
    model: str
    recipe: str
    fp_top1: float
    quant_top1: float
    epochs: int
    wall_seconds: float
    out: str
    calibrated_top1: float | None = None
    resumed_from_step: int | None = None
    world_size: int = 1
    history: list[dict[str, Any]] = field(default_factory=list)
    # "export" and "report": what the end stages did (verified / written / failed / skipped)
    stages: dict[str, StageOutcome] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        keys = ("model", "recipe", "fp_top1", "quant_top1", "epochs", "wall_seconds", "out",
                "calibrated_top1", "resumed_from_step", "world_size")
        return {**{k: getattr(self, k) for k in keys},
                **{stage: outcome.as_json() for stage, outcome in self.stages.items()}}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MecqtkError("--device cuda: no CUDA device is available; use --device cpu")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def build_loss_terms(recipe: Recipe, float_model: nn.Module, qmodel: fx.GraphModule,
                     student: nn.Module, steps_per_epoch: int, probe: torch.Tensor,
                     device: torch.device) -> list:
    """The MEC and distillation terms the recipe asks for, sharing one frozen float teacher."""
    needs_teacher = recipe.distill.enabled or (
        recipe.mec.enabled and recipe.mec.view == "teacher")
    teacher = Teacher(float_model, recipe.quant.leaf_modules).to(device) if needs_teacher else None
    terms: list = []
    if recipe.mec.enabled:
        terms.append(MECTerm(recipe.mec, student, qmodel, teacher, steps_per_epoch, probe,
                             seed=recipe.train.seed))
    if recipe.distill.enabled:
        assert teacher is not None
        terms.append(DistillTerm(recipe.distill, teacher))
    return terms


def _resolved_recipe(options: QuantizeOptions) -> Recipe:
    recipe = load_recipe(options.recipe)
    if options.epochs is not None:
        recipe = replace(recipe, train=replace(recipe.train, epochs=options.epochs))
    return recipe


def _prepare_out_dir(run_dir: RunDir, options: QuantizeOptions, recipe: Recipe,
                     context: DistContext) -> None:
    if options.resume:
        run_dir.require()
        stored = (run_dir.path / "recipe.yaml").read_text()
        if stored != dump_recipe(recipe):
            raise MecqtkError(
                f"{run_dir.path}: --resume needs the same recipe and --epochs as the interrupted "
                "run (see its recipe.yaml); use --force to start a new run there"
            )
        return
    if run_dir.holds_a_run() and not options.force:
        raise MecqtkError(
            f"{run_dir.path} already holds a run; pass --resume to continue it, --force to "
            "replace it, or choose another --out"
        )
    if context.is_main and options.force:
        for name in _RUN_OUTPUTS:
            (run_dir.path / name).unlink(missing_ok=True)
        for extra in ("report", "export", "onnx-qcdq", "onnx-packed"):
            shutil.rmtree(run_dir.path / extra, ignore_errors=True)


def quantize(options: QuantizeOptions) -> RunSummary:
    """Trace, quantize, calibrate, train and evaluate; write the run folder.

    Example:
        >>> quantize(QuantizeOptions(model="cifar_resnet20", recipe="quickstart.yaml",
        ...          data="imagefolder:../shared/data/cifar10-jpeg", out=Path("runs/quick")))
    """
    started = time.perf_counter()
    recipe = _resolved_recipe(options)
    device = resolve_device(options.device)
    context = init_distributed(device)
    try:
        return _Run(options, recipe, device_for(device, context), context, started).execute()
    finally:
        shutdown(context)


class _Run:
    """One quantize run; methods are its stages, in the order ``execute`` calls them."""

    def __init__(self, options: QuantizeOptions, recipe: Recipe, device: torch.device,
                 context: DistContext, started: float) -> None:
        self.options, self.recipe, self.device, self.context = options, recipe, device, context
        self.started = started
        self.run_dir = RunDir(options.out)
        self.show = options.show_progress and context.is_main
        self.history: list[dict[str, Any]] = []

    def say(self, message: str) -> None:
        if self.context.is_main:
            say(message)

    def execute(self) -> RunSummary:
        options, recipe, context = self.options, self.recipe, self.context
        _prepare_out_dir(self.run_dir, options, recipe, context)
        seed_everything(recipe.train.seed)
        use_compiled_kernels(recipe.train.fused_quantizers)
        if recipe.train.batch_size % context.world_size:
            raise MecqtkError(
                f"train.batch_size {recipe.train.batch_size} is the global batch and must divide "
                f"evenly over {context.world_size} processes"
            )
        num_classes, class_names = peek_num_classes(options.data)
        fit = self.fit_input(num_classes)
        model_kwargs = fit.model_kwargs if fit is not None else {}
        try:
            self.float_model = create_model(
                options.model, num_classes=num_classes, pretrained=options.pretrained,
                checkpoint=options.checkpoint, **model_kwargs,
            )
        except ModelError:
            if not model_kwargs or options.checkpoint is None:
                raise
            # weights made at the model's own size (position embeddings for 224 px) do not
            # fit the model built for the images: resize the images instead
            fit = fit_at_own_size(options.model, num_classes)
            self.say(f"{options.checkpoint} fits {options.model} at its own size only; "
                     f"images are resized to {fit.input_size[1]}x{fit.input_size[2]}")
            model_kwargs = {}
            self.float_model = create_model(
                options.model, num_classes=num_classes, pretrained=options.pretrained,
                checkpoint=options.checkpoint,
            )
        self.data = build_data(
            options.data, model=self.float_model,
            batch_size=recipe.train.batch_size // context.world_size,
            eval_batch_size=recipe.train.eval_batch_size, limit_train=options.limit_train,
            limit_val=options.limit_val, seed=recipe.train.seed, num_workers=options.workers,
            distributed=context.enabled, input_size=fit.input_size if fit is not None else None,
        )
        resume_state = load_checkpoint(self.run_dir.checkpoint) if options.resume else None
        if context.is_main and resume_state is None:
            self.run_dir.path.mkdir(parents=True, exist_ok=True)
            self.run_dir.write_recipe(recipe)
            self.run_dir.write_info(RunInfo(
                model=options.model, num_classes=num_classes, data=options.data,
                class_names=class_names, input_size=list(self.data.input_size),
                mean=list(self.data.mean), std=list(self.data.std),
                checkpoint_source=options.checkpoint, mecqtk_version=mecqtk.__version__,
                model_kwargs=model_kwargs,
            ))
        self.float_model.to(self.device)
        self.qmodel = prepare(self.float_model, recipe).to(self.device)
        if recipe.train.sync_bn and self.device.type != "cuda":
            raise MecqtkError("train.sync_bn: SyncBatchNorm needs CUDA devices; set it to false "
                              "for CPU runs")
        if recipe.train.sync_bn and context.enabled:
            self.qmodel = nn.SyncBatchNorm.convert_sync_batchnorm(self.qmodel)
        if recipe.train.channels_last:
            self.qmodel.to(memory_format=torch.channels_last)
        if resume_state is None:
            self.fp_top1 = self.evaluate_main(self.float_model, "eval float")
            self.say(f"float model: top-1 {self.fp_top1:.2f} %")
            self.calibrate()
            self.calibrated_top1 = self.evaluate_main(self.qmodel, "eval calibrated")
            self.say(f"quantized after calibration: top-1 {self.calibrated_top1:.2f} %")
        else:
            self.qmodel.load_state_dict(resume_state["state_dict"])
            self.fp_top1 = resume_state["fp_top1"]
            self.calibrated_top1 = resume_state["calibrated_top1"]
        self.setup_training()
        if resume_state is not None:
            self.restore(resume_state)
        elif recipe.train.epochs > 0:
            # the calibrated model is the first good checkpoint: a loss that turns NaN in the
            # first steps still leaves a run that `mecqtk export` and --resume can use
            self.save(0, 0, None)
        try:
            self.train()
        except Exception as err:
            self.record_training_failure(err)
            if isinstance(err, MecqtkError):
                raise
            raise IncompleteRunError(
                f"training failed: {one_line(err)} (traceback in "
                f"{self.run_dir.path / STAGE_ERROR_LOG.format(stage='train')})") from err
        return self.finish()

    def record_training_failure(self, err: Exception) -> None:
        """summary.json for a run that stopped in training (NaN loss, a step size gone bad,
        a bug): what failed and where, beside the last good checkpoint if an epoch finished."""
        if not self.context.is_main:
            return
        log_traceback(self.run_dir.path, "train", err)
        reason = one_line(err)
        self.run_dir.write_summary({
            "model": self.options.model, "recipe": self.recipe.name, "fp_top1": self.fp_top1,
            "calibrated_top1": self.calibrated_top1, "epochs": self.recipe.train.epochs,
            "epochs_finished": len(self.history), "step": self.global_step,
            "wall_seconds": round(time.perf_counter() - self.started, 1),
            "out": str(self.run_dir.path), "world_size": self.context.world_size,
            "train": {"status": "failed", "reason": reason},
            "export": {"status": "skipped", "reason": "training failed"},
            "report": {"status": "skipped", "reason": "training failed"},
        })

    def fit_input(self, num_classes: int) -> InputFit | None:
        """How the model meets small in-memory images: as they are, built at their size
        (``img_size``) or with the images resized. None for large images: they stream from
        disk through timm's transforms at the model's own size."""
        require_known_model(self.options.model)
        image_size = peek_image_size(self.options.data)
        if image_size is None or is_external(self.options.model):
            return None  # Hub models: built as they come, trying sizes would download them
        fit = fit_model_to_images(self.options.model, num_classes, image_size)
        if fit.how != "native":  # the common case goes without saying
            self.say(fit.describe(self.options.model, image_size))
        return fit

    def evaluate_main(self, model: nn.Module, title: str) -> float:
        """Top-1 on the validation set, computed on rank 0 and shared with the others."""
        top1 = float("nan")
        if self.context.is_main:
            with progress_bar(title, len(self.data.val_loader), self.show) as advance:
                top1, _ = evaluate(model, self.data.val_loader, self.device, advance)
        barrier(self.context)
        return top1

    def calibrate(self) -> None:
        batches = (images for images, _ in
                   itertools.islice(self.data.train_loader, self.recipe.quant.calibration.batches))
        calibrate(self.qmodel, batches)
        average_parameters(self.qmodel, self.context)

    def setup_training(self) -> None:
        recipe, device = self.recipe, self.device
        train = recipe.train
        self.steps_per_epoch = len(self.data.train_loader)
        self.student: nn.Module = self.qmodel
        if self.context.enabled:
            self.student = nn.parallel.DistributedDataParallel(
                self.qmodel, device_ids=[device.index] if device.type == "cuda" else None,
            )
        if train.compile_model:
            self.student = torch.compile(self.student)
        probe = next(iter(self.data.train_loader))[0][:16].to(device)
        # the second MEC view runs the plain module: DDP allows one forward per backward
        self.terms = build_loss_terms(recipe, self.float_model, self.qmodel, self.qmodel,
                                      self.steps_per_epoch, probe, device)
        self.optimizer = build_optimizer(self.qmodel, train.optimizer)
        extra = [p for term in self.terms for p in term.trainable.parameters()]
        if extra:
            self.optimizer.add_param_group({"params": extra, "weight_decay": 0.0})
        self.scheduler = build_scheduler(self.optimizer, train.schedule,
                                         train.epochs * self.steps_per_epoch, self.steps_per_epoch)
        scaler = None
        if train.amp == "fp16" and device.type == "cuda":
            scaler = torch.amp.GradScaler("cuda")
        self.step_config = TrainStep(
            model=self.student, optimizer=self.optimizer, scheduler=self.scheduler, device=device,
            amp=train.amp if device.type == "cuda" or train.amp == "bf16" else "none",
            scaler=scaler, label_smoothing=train.label_smoothing, grad_clip=train.grad_clip,
            channels_last=train.channels_last, extra_terms=self.terms,
        )
        self.start_epoch = 0
        self.global_step = 0
        self.epoch_stats: EpochStats | None = None
        self.resumed_from_step: int | None = None

    def state(self, epoch: int, step: int, stats: EpochStats | None) -> dict[str, Any]:
        """Everything needed to continue: ``epoch`` epochs are finished, ``step`` steps taken."""
        return {
            "format": FORMAT,
            "state_dict": self.qmodel.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.step_config.scaler.state_dict() if self.step_config.scaler else None,
            "terms": [term.trainable.state_dict() for term in self.terms],
            "term_rng": [term.generator.get_state() for term in self.terms
                         if hasattr(term, "generator")],
            "epoch": epoch,
            "step": step,
            "epoch_stats": None if stats is None else stats.state_dict(),
            "history": list(self.history),
            "rng": capture_rng(),
            "fp_top1": self.fp_top1,
            "calibrated_top1": self.calibrated_top1,
        }

    def save(self, epoch: int, step: int, stats: EpochStats | None) -> None:
        if self.context.is_main:
            atomic_torch_save(self.run_dir.checkpoint, self.state(epoch, step, stats))

    def restore(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.step_config.scaler is not None and state["scaler"] is not None:
            self.step_config.scaler.load_state_dict(state["scaler"])
        for term, term_state in zip(self.terms, state["terms"], strict=True):
            term.trainable.load_state_dict(term_state)
        generators = [t.generator for t in self.terms if hasattr(t, "generator")]
        for generator, rng in zip(generators, state["term_rng"], strict=True):
            generator.set_state(rng)
        restore_rng(state["rng"])
        self.start_epoch = state["epoch"]
        self.global_step = state["step"]
        self.history = list(state["history"])
        if state["epoch_stats"] is not None:
            self.epoch_stats = EpochStats(**state["epoch_stats"])
        self.resumed_from_step = self.global_step
        if self.context.is_main:
            # metrics.jsonl is rewritten from the checkpoint: no duplicate or missing epoch
            lines = "".join(json.dumps(r) + "\n" for r in self.history)
            atomic_write_text(self.run_dir.metrics, lines)
        self.say(f"resuming at epoch {self.start_epoch + 1}, step {self.global_step}")

    def train(self) -> None:
        recipe = self.recipe
        epochs = recipe.train.epochs
        every = recipe.train.checkpoint_every_steps
        self.quant_top1 = self.history[-1]["val_top1"] if self.history else self.calibrated_top1
        for epoch in range(self.start_epoch, epochs):
            epoch_start_step = epoch * self.steps_per_epoch
            done = self.global_step - epoch_start_step
            self.data.train_loader.set_epoch(epoch)
            bn_epoch_start(self.qmodel, epoch, recipe.quant.batchnorm.freeze_epoch)
            epoch_started = time.perf_counter()

            def after_step(step: int, stats: EpochStats, epoch: int = epoch) -> None:
                self.global_step = step
                if every and step % every == 0 and step % self.steps_per_epoch:
                    self.save(epoch, step, stats)

            with progress_bar(f"epoch {epoch + 1}/{epochs}", self.steps_per_epoch,
                              self.show) as advance:
                advance(done)
                stats = train_one_epoch(
                    self.step_config, self.data.train_loader, epoch=epoch,
                    start_step=epoch_start_step, stats=self.epoch_stats, skip_batches=done,
                    after_step=after_step, progress=advance,
                )
            if epoch == epochs - 1:
                self.snap_biases()
            self.epoch_stats = None
            stats = self.global_stats(stats)
            self.quant_top1 = self.evaluate_main(self.qmodel, "eval quantized")
            record = {
                "epoch": epoch + 1, "step": self.global_step, "train_loss": stats.loss,
                "train_top1": stats.top1, **{f"train_{k}": v for k, v in stats.terms.items()},
                "val_top1": self.quant_top1, "lr": self.optimizer.param_groups[0]["lr"],
                "epoch_seconds": round(time.perf_counter() - epoch_started, 2),
            }
            self.history.append(record)
            self.save(epoch + 1, self.global_step, None)
            if self.context.is_main:
                append_jsonl(self.run_dir.metrics, record)
            self.say(f"epoch {epoch + 1}: train loss {stats.loss:.4f}  "
                     f"quantized top-1 {self.quant_top1:.2f} %")
        if epochs == 0:
            if self.snap_biases():
                self.quant_top1 = self.evaluate_main(self.qmodel, "eval quantized")
            self.save(0, 0, None)

    def snap_biases(self) -> int:
        """Put biases on the int32 grid the integer export uses (a change below half a step),
        so the trained model and its ONNX file compute the same thing."""
        from mecqtk.export import snap_biases

        was_training = self.qmodel.training
        try:
            changed = snap_biases(self.qmodel.eval())
        except ExportError as err:
            # the same fault fails the export stage, which reports it once the trained run is
            # saved; stopping here would lose the run
            self.say(f"biases left off the int32 grid ({one_line(err)}); the export will fail")
            changed = 0
        finally:
            self.qmodel.train(was_training)
        return changed

    def global_stats(self, stats: EpochStats) -> EpochStats:
        """The epoch's sums over every rank's shard (the same numbers one process would log)."""
        keys = sorted(stats.term_sums)
        totals = sum_over_ranks(
            [stats.loss_sum, stats.correct, stats.seen, stats.steps]
            + [stats.term_sums[k] for k in keys], self.context)
        loss_sum, correct, seen, _ = totals[:4]
        # every rank weighted its terms by its own batch: sums add up; steps are per rank
        return EpochStats(loss_sum=loss_sum, correct=int(correct), seen=int(seen),
                          steps=stats.steps, term_sums=dict(zip(keys, totals[4:], strict=True)))

    def finish(self) -> RunSummary:
        """Write summary.json, export + verify, report: in an order where a failing export or
        report still leaves the summary and the checkpoint, then fail the command."""
        summary = RunSummary(
            model=self.options.model, recipe=self.recipe.name, fp_top1=self.fp_top1,
            quant_top1=self.quant_top1, epochs=self.recipe.train.epochs,
            wall_seconds=round(time.perf_counter() - self.started, 1),
            out=str(self.run_dir.path), calibrated_top1=self.calibrated_top1,
            resumed_from_step=self.resumed_from_step, world_size=self.context.world_size,
            history=self.history,
        )
        if not self.context.is_main:
            return summary
        # "pending" stays in summary.json only if the process dies inside that stage
        outcomes: dict[str, StageOutcome] = {
            "export": StageOutcome("pending") if self.options.export
            else StageOutcome("skipped", reason="--no-export"),
            "report": StageOutcome("pending") if self.options.report
            else StageOutcome("skipped", reason="--no-report"),
        }
        summary.stages = outcomes
        # written before the end stages run: a crash inside them leaves a summary
        self.run_dir.write_summary(summary.as_json())
        if self.options.export:
            outcomes["export"] = export_stage(self.run_dir.path, self.options.data,
                                              self.options.limit_val, self.show, self.say)
            self.run_dir.write_summary(summary.as_json())
        if self.options.report:
            outcomes["report"] = report_stage(self.run_dir.path, self.write_report)
            self.run_dir.write_summary(summary.as_json())
        message = failure_message(self.run_dir.path, outcomes)
        if message is not None:
            raise IncompleteRunError(message, summary)
        return summary

    def write_report(self) -> None:
        from mecqtk.report import ReportOptions, write_report

        self.say("writing the per-layer report (report.html, report.json)")
        write_report(self.run_dir.path, options=ReportOptions(
            data=self.options.data, n=self.options.report_images, device=str(self.device),
            show_progress=self.show,
        ))
