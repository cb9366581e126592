"""The training stage of a quantize run: optimizer, schedule and loss terms around a calibrated
fake-quant model, the epochs, and checkpoints that resume to the same result.

Checkpoints are written atomically (rank 0 only) at every epoch end and every
``train.checkpoint_every_steps`` steps; :meth:`TrainingSession.restore` continues from one with
the same result an uninterrupted run would give.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

import mecqtk.export
from mecqtk.data import DataBundle
from mecqtk.errors import ExportError, one_line
from mecqtk.io import append_jsonl, atomic_torch_save, atomic_write_text
from mecqtk.progress import progress_bar, say
from mecqtk.quant.bn_fold import BatchNorm, bn_epoch_start
from mecqtk.quant.calibrate import reestimate_batchnorm
from mecqtk.recipe import Recipe
from mecqtk.train.checkpoint import FORMAT, capture_rng, restore_rng
from mecqtk.train.compiled import compile_student, compiles, graph_breaks
from mecqtk.train.distributed import DistContext, average_tensors, barrier, sum_over_ranks
from mecqtk.train.loop import EpochStats, TrainStep, evaluate, train_one_epoch
from mecqtk.train.optim import build_optimizer, build_scheduler
from mecqtk.train.terms import build_loss_terms


def evaluate_on_main(model: nn.Module, data: DataBundle, device: torch.device,
                     context: DistContext, title: str, show: bool) -> float:
    """Top-1 on the validation set, computed on rank 0 and shared with the others (the other
    ranks get NaN and wait)."""
    top1 = float("nan")
    if context.is_main:
        with progress_bar(title, len(data.val_loader), show) as advance:
            top1, _ = evaluate(model, data.val_loader, device, advance)
    barrier(context)
    return top1


class TrainingSession:
    """Trains ``qmodel`` (calibrated, or about to be restored from a checkpoint) as the recipe
    says; the float model is the teacher of MEC/KD terms. ``metrics`` and ``checkpoint`` are the
    run folder's files; only rank 0 writes them."""

    def __init__(self, recipe: Recipe, qmodel: fx.GraphModule, float_model: nn.Module,
                 data: DataBundle, device: torch.device, context: DistContext, *,
                 checkpoint: Path, metrics: Path, show: bool, scores: dict[str, float]) -> None:
        self.recipe, self.qmodel, self.data = recipe, qmodel, data
        self.device, self.context = device, context
        self.checkpoint, self.metrics, self.show = checkpoint, metrics, show
        self.scores = scores  # fp_top1 and calibrated_top1, kept in every checkpoint
        train = recipe.train
        self.steps_per_epoch = len(data.train_loader)
        student: nn.Module = qmodel
        if context.enabled:
            student = nn.parallel.DistributedDataParallel(
                qmodel, device_ids=[device.index] if device.type == "cuda" else None,
            )
        self.compiled = compiles(train.compile_model, device)
        if self.compiled:
            student = compile_student(student, train.compile_mode)
        probe = next(iter(data.train_loader))[0][:16].to(device)
        # the second MEC view runs the plain module: DDP allows one forward per backward
        self.terms = build_loss_terms(recipe, float_model, qmodel, qmodel,
                                      self.steps_per_epoch, probe, device)
        self.optimizer = build_optimizer(qmodel, train.optimizer)
        extra = [p for term in self.terms for p in term.trainable.parameters()]
        if extra:
            self.optimizer.add_param_group({"params": extra, "weight_decay": 0.0})
        self.scheduler = build_scheduler(self.optimizer, train.schedule,
                                         train.epochs * self.steps_per_epoch, self.steps_per_epoch)
        scaler = None
        if train.amp == "fp16" and device.type == "cuda":
            scaler = torch.amp.GradScaler("cuda")
        self.step_config = TrainStep(
            model=student, optimizer=self.optimizer, scheduler=self.scheduler, device=device,
            amp=train.amp if device.type == "cuda" or train.amp == "bf16" else "none",
            scaler=scaler, label_smoothing=train.label_smoothing, grad_clip=train.grad_clip,
            channels_last=train.channels_last, extra_terms=self.terms, compiled=self.compiled,
        )
        self.start_epoch = 0
        self.global_step = 0
        self.epoch_stats: EpochStats | None = None
        self.resumed_from_step: int | None = None
        self.history: list[dict[str, Any]] = []
        self.quant_top1 = scores["calibrated_top1"]

    def say(self, message: str) -> None:
        if self.context.is_main:
            say(message)

    def _generators(self) -> list[torch.Generator]:
        return [term.generator for term in self.terms if term.generator is not None]

    def state(self, epoch: int, step: int, stats: EpochStats | None) -> dict[str, Any]:
        """Everything needed to continue: ``epoch`` epochs are finished, ``step`` steps taken."""
        return {
            "format": FORMAT,
            "state_dict": self.qmodel.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.step_config.scaler.state_dict() if self.step_config.scaler else None,
            "terms": [term.trainable.state_dict() for term in self.terms],
            "term_rng": [generator.get_state() for generator in self._generators()],
            "epoch": epoch,
            "step": step,
            "epoch_stats": None if stats is None else stats.state_dict(),
            "history": list(self.history),
            "rng": capture_rng(),
            **self.scores,
        }

    def save(self, epoch: int, step: int, stats: EpochStats | None) -> None:
        if self.context.is_main:
            atomic_torch_save(self.checkpoint, self.state(epoch, step, stats))

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's ``state`` (its model weights are already loaded)."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.step_config.scaler is not None and state["scaler"] is not None:
            self.step_config.scaler.load_state_dict(state["scaler"])
        for term, term_state in zip(self.terms, state["terms"], strict=True):
            term.trainable.load_state_dict(term_state)
        for generator, rng in zip(self._generators(), state["term_rng"], strict=True):
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
            atomic_write_text(self.metrics, lines)
        self.say(f"resuming at epoch {self.start_epoch + 1}, step {self.global_step}")

    def evaluate(self) -> float:
        return evaluate_on_main(self.qmodel, self.data, self.device, self.context,
                                "eval quantized", self.show)

    def train(self) -> None:
        """The remaining epochs; after the last, biases go on the export's int32 grid."""
        recipe = self.recipe
        epochs = recipe.train.epochs
        every = recipe.train.checkpoint_every_steps
        self.quant_top1 = self.history[-1]["val_top1"] if self.history else self.quant_top1
        first_step = {"started": time.perf_counter(), "reported": not self.compiled}
        for epoch in range(self.start_epoch, epochs):
            epoch_start_step = epoch * self.steps_per_epoch
            done = self.global_step - epoch_start_step
            self.data.train_loader.set_epoch(epoch)
            bn_epoch_start(self.qmodel, epoch, recipe.quant.batchnorm.freeze_epoch)
            epoch_started = time.perf_counter()

            def after_step(step: int, stats: EpochStats, epoch: int = epoch) -> None:
                self.global_step = step
                if not first_step["reported"]:
                    # the first compiled step pays for compiling, once per process
                    first_step["reported"] = True
                    self.say(f"compiled the training step in "
                             f"{time.perf_counter() - first_step['started']:.1f} s "
                             f"({graph_breaks()} graph breaks)")
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
                self.reestimate_batchnorm()
                self.snap_biases()
            self.epoch_stats = None
            stats = self.global_stats(stats)
            self.quant_top1 = self.evaluate()
            record = {
                "epoch": epoch + 1, "step": self.global_step, "train_loss": stats.loss,
                "train_top1": stats.top1, **{f"train_{k}": v for k, v in stats.terms.items()},
                "val_top1": self.quant_top1, "lr": self.optimizer.param_groups[0]["lr"],
                "epoch_seconds": round(time.perf_counter() - epoch_started, 2),
            }
            self.history.append(record)
            self.save(epoch + 1, self.global_step, None)
            if self.context.is_main:
                append_jsonl(self.metrics, record)
            self.say(f"epoch {epoch + 1}: train loss {stats.loss:.4f}  "
                     f"quantized top-1 {self.quant_top1:.2f} %")
        if epochs == 0:
            if self.snap_biases():
                self.quant_top1 = self.evaluate()
            self.save(0, 0, None)

    def reestimate_batchnorm(self) -> None:
        """``train.bn_reestimate_batches``: BatchNorm statistics of the final quantized model."""
        batches = self.recipe.train.bn_reestimate_batches
        if not batches:
            return
        seen = reestimate_batchnorm(
            self.qmodel, (images for images, _ in itertools.islice(self.data.train_loader,
                                                                   batches)))
        # each rank saw its own shard; only the statistics differ between ranks
        average_tensors([t for m in self.qmodel.modules() if isinstance(m, BatchNorm)
                         for t in (m.running_mean, m.running_var) if t is not None],
                        self.context)
        self.say(f"re-estimated BatchNorm statistics over {seen} batches with the final "
                 "quantizers")

    def snap_biases(self) -> int:
        """Put biases on the int32 grid the integer export uses (a change below half a step),
        so the trained model and its ONNX file compute the same thing."""
        was_training = self.qmodel.training
        try:
            changed = mecqtk.export.snap_biases(self.qmodel.eval())
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
