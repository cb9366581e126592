"""Loss terms added to the task loss: MEC (docs/mec.md), knowledge distillation and oscillation
dampening (and oscillation freezing, which rides along as a term, see mecqtk.train.freezing).

A term is called once per step with the batch, the student's logits and the global step, and
returns named scalars; names starting with ``log_`` are logged but not added to the loss.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from mecqtk.mec import MECSchedule, MixtureCodingLength, coding_length, grouped_mec_loss, mec_loss
from mecqtk.quant.modules import QuantizedLayer
from mecqtk.recipe.schema import DistillConfig, MECConfig, Recipe
from mecqtk.train.bit_schedule import BitSchedule
from mecqtk.train.freezing import OscillationFreezer
from mecqtk.train.loop import LossTerm
from mecqtk.train.taps import (
    POOLED,
    STAGES,
    FeatureTap,
    attach_tap,
    classifier_input,
    find_node,
    rows,
    stage_modules,
    stage_output,
)
from mecqtk.train.teacher import Teacher


def gather_rows(z: torch.Tensor, with_grad: bool) -> torch.Tensor:
    """All ranks' rows, so the coding length sees the global batch (gradient flows back to each
    rank's own rows when ``with_grad``)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z
    if with_grad:
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(z), dim=0)
    parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, z.contiguous())
    return torch.cat(parts, dim=0)


def second_view(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Another augmentation of a normalised batch: random shift by up to ``pad`` pixels (zero,
    i.e. mean-colour, border) and random horizontal flip, per sample."""
    n, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
    flip = torch.rand(n, generator=generator) < 0.5
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    return torch.where(flip.view(n, 1, 1, 1).to(out.device), out.flip(3), out)


class MECTerm:
    """gamma * MEC loss between student features and the chosen second view.

    Holds trainable parts (projector, mixture gate) in ``trainable``: they go to the optimizer
    and into checkpoints. The student is referenced, not owned. ``extra_taps`` add a plain MEC
    loss per tapped place (each stage output, or named nodes), each with its own weight relative
    to the main tap's, so the coding length of the whole representation is spread, not only that
    of the pooled features; ``float_model`` names the stages (timm's ``feature_info``).
    """

    def __init__(
        self,
        config: MECConfig,
        student: nn.Module,
        student_graph: fx.GraphModule,
        teacher: Teacher | None,
        steps_per_epoch: int,
        probe: torch.Tensor,
        seed: int = 0,
        float_model: nn.Module | None = None,
    ) -> None:
        self.config = config
        self.student = student
        self.student_tap = self._tap(student_graph)
        self.teacher = teacher
        self.teacher_tap: FeatureTap | None = None
        if config.view == "teacher":
            if teacher is None:
                raise ValueError("mec.view 'teacher' needs the float teacher")
            self.teacher_tap = self._tap(teacher.graph)
        # (relative weight, student tap, teacher tap or None) per extra place
        self.extra: list[tuple[float, FeatureTap, FeatureTap | None]] = []
        for extra in config.extra_taps:
            for find in self._extra_places(extra.tap, float_model):
                self.extra.append((
                    extra.weight,
                    attach_tap(student_graph, find(student_graph)),
                    attach_tap(teacher.graph, find(teacher.graph))
                    if config.view == "teacher" and teacher is not None else None,
                ))
        with torch.no_grad():
            was_training = student_graph.training
            student_graph.eval()
            student_graph(probe)
            student_graph.train(was_training)
        dim = rows(self.student_tap.value).shape[1]
        self.projector = nn.Linear(dim, config.projector) if config.projector else None
        self.dim = config.projector or dim
        self.eps2 = config.eps2 if config.eps2 is not None else float(self.dim)
        self.mixture = (
            MixtureCodingLength(config.experts, self.dim, eps2=self.eps2, order=config.order)
            if config.experts > 1 and config.expert_form == "mixture" else None
        )
        self.schedule = MECSchedule(
            gamma=config.weight,
            gamma_warmup_steps=round(config.weight_warmup_epochs * steps_per_epoch),
            lam_warmup_steps=round(config.lam_warmup_epochs * steps_per_epoch),
        )
        self.generator = torch.Generator().manual_seed(seed)
        self.trainable = nn.ModuleDict()
        if self.projector is not None:
            self.trainable["projector"] = self.projector
        if self.mixture is not None:
            self.trainable["mixture"] = self.mixture
        self.trainable.to(probe.device)

    def _tap(self, gm: fx.GraphModule) -> FeatureTap:
        tap = self.config.tap
        return attach_tap(gm, classifier_input(gm) if tap == POOLED else find_node(gm, tap))

    @staticmethod
    def _extra_places(tap: str, float_model: nn.Module | None):
        """One node finder per place an extra tap names (the same place in student and teacher)."""
        if tap == STAGES:
            if float_model is None:
                raise ValueError("mec.extra_taps 'stages' needs the float model")
            return [lambda gm, m=m: stage_output(gm, m) for m in stage_modules(float_model)]
        if tap == POOLED:
            return [classifier_input]
        return [lambda gm: find_node(gm, tap)]

    def _extra_loss(self, z1s: list[torch.Tensor], lam_scale: float) -> torch.Tensor:
        """Sum of the extra taps' weighted MEC losses; their second view is read here."""
        total = torch.zeros((), device=z1s[0].device) if z1s else torch.zeros(())
        for (weight, student_tap, teacher_tap), z1 in zip(self.extra, z1s, strict=True):
            z2: torch.Tensor | None = None
            if teacher_tap is not None:
                assert teacher_tap.value is not None
                z2 = gather_rows(rows(teacher_tap.value).detach(), with_grad=False)
            elif self.config.view == "augmented":
                assert student_tap.value is not None
                z2 = gather_rows(rows(student_tap.value), with_grad=True)
            z1 = gather_rows(z1, with_grad=True)
            total = total + weight * mec_loss(z1, z2, eps2=float(z1.shape[1]),
                                              order=self.config.order, lam_scale=lam_scale)
        return total

    def features(self, tap: FeatureTap) -> torch.Tensor:
        assert tap.value is not None, "the tapped model has not run on this batch"
        z = rows(tap.value)
        return self.projector(z) if self.projector is not None else z

    def loss(self, z1: torch.Tensor, z2: torch.Tensor | None, lam_scale: float) -> torch.Tensor:
        config = self.config
        if self.mixture is not None:
            return self.mixture.loss(z1, z2, lam_scale=lam_scale)
        if config.experts > 1:
            return grouped_mec_loss(z1, z2, eps2=self.eps2, groups=config.experts,
                                    order=config.order, lam_scale=lam_scale)
        return mec_loss(z1, z2, eps2=self.eps2, order=config.order, lam_scale=lam_scale)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor,
                 step: int) -> dict[str, torch.Tensor]:
        z1 = self.features(self.student_tap)
        # the extra taps' student rows, read before an augmented second pass overwrites them
        extra_z1 = [rows(tap.value) for _, tap, _ in self.extra]  # type: ignore[arg-type]
        z2: torch.Tensor | None = None
        if self.config.view == "teacher":
            assert self.teacher is not None and self.teacher_tap is not None
            self.teacher(images)
            z2 = self.features(self.teacher_tap).detach() if self.projector is None else \
                self.features(self.teacher_tap)
        elif self.config.view == "augmented":
            self.student(second_view(images, self.generator))
            z2 = self.features(self.student_tap)
        z1 = gather_rows(z1, with_grad=True)
        if z2 is not None:
            z2 = gather_rows(z2, with_grad=z2.requires_grad)
        lam_scale = self.schedule.lam_scale(step)
        loss = self.loss(z1, z2, lam_scale)
        with torch.no_grad():
            length = coding_length(z1.detach(), None if z2 is None else z2.detach(),
                                   eps2=self.eps2, order=self.config.order)
        out = {
            "mec": self.schedule.weight(step) * loss,
            "log_mec_loss": loss.detach(),
            "log_coding_length_per_sample": length / z1.shape[0],
        }
        if self.extra:
            extra = self._extra_loss(extra_z1, lam_scale)
            out["mec_taps"] = self.schedule.weight(step) * extra
            out["log_mec_taps_loss"] = extra.detach()
        return out


class DistillTerm:
    """weight * T^2 * KL(teacher || student) on logits softened by temperature T."""

    def __init__(self, config: DistillConfig, teacher: Teacher) -> None:
        self.config = config
        self.teacher = teacher
        self.trainable = nn.ModuleDict()  # nothing of its own to train: the teacher is frozen
        self.generator: torch.Generator | None = None  # draws nothing at random

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor,
                step: int) -> dict[str, torch.Tensor]:
        t = self.config.temperature
        target = F.log_softmax(self.teacher(images) / t, dim=1)
        kl = F.kl_div(F.log_softmax(logits / t, dim=1), target, log_target=True,
                      reduction="batchmean")
        return {"kd": self.config.weight * t * t * kl}


class DampeningTerm:
    """Oscillation dampening (Nagel et al., "Overcoming oscillations in quantization-aware
    training", ICML 2022): the summed squared distance, in step units, of every quantized weight
    from the value its code stands for, ``((clip(w) - Q(w)) / s)^2`` with ``Q(w)`` and ``s``
    held constant. At 2-3 bits a latent weight near a bin edge flips between two codes on
    successive steps (the straight-through gradient pushes it back and forth); pulling it toward
    its bin's centre stops that. The weight ramps from 0 to ``weight`` over training (cosine),
    as in the paper, so early training can still move weights between bins."""

    def __init__(self, weight: float, qmodel: nn.Module, total_steps: int) -> None:
        self.weight, self.total_steps = weight, max(total_steps, 1)
        self.layers = [m for m in qmodel.modules() if isinstance(m, QuantizedLayer)]
        self.trainable = nn.ModuleDict()  # nothing of its own to train
        self.generator: torch.Generator | None = None  # draws nothing at random

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor,
                 step: int) -> dict[str, torch.Tensor]:
        sums, count = [], 0
        for layer in self.layers:
            quantizer = layer.weight_quantizer
            w = layer.effective_weight()
            step_size = quantizer.broadcast(quantizer.step_size(), w).detach()
            codes = quantizer.codes(w).to(w.dtype)
            clipped = torch.clamp(w, quantizer.qmin * step_size, quantizer.qmax * step_size)
            sums.append(((clipped - codes * step_size) / step_size).square().sum())
            count += w.numel()
        ramp = 0.5 * (1.0 - math.cos(math.pi * min(step / self.total_steps, 1.0)))
        # a sum, as in the paper: each weight's own pull 2 * weight * distance / step does not
        # shrink with the size of the model
        total = torch.stack(sums).sum()
        return {"dampen": self.weight * ramp * total,
                "log_weight_bin_distance": total.detach() / max(count, 1)}


def build_loss_terms(recipe: Recipe, float_model: nn.Module, qmodel: fx.GraphModule,
                     student: nn.Module, steps_per_epoch: int, probe: torch.Tensor,
                     device: torch.device) -> list[LossTerm]:
    """The MEC and distillation terms the recipe asks for, sharing one frozen float teacher.

    Example:
        >>> terms = build_loss_terms(recipe, model, qmodel, qmodel, len(loader), probe, device)
    """
    needs_teacher = recipe.distill.enabled or (
        recipe.mec.enabled and recipe.mec.view == "teacher")
    teacher = Teacher(float_model, recipe.quant).to(device) if needs_teacher else None
    terms: list[LossTerm] = []
    if recipe.mec.enabled:
        terms.append(MECTerm(recipe.mec, student, qmodel, teacher, steps_per_epoch, probe,
                             seed=recipe.train.seed, float_model=float_model))
    if recipe.distill.enabled:
        assert teacher is not None
        terms.append(DistillTerm(recipe.distill, teacher))
    schedule = recipe.train.bit_schedule
    if schedule.start_bits is not None:
        terms.append(BitSchedule(schedule.start_bits,
                                 round(schedule.start_epochs * steps_per_epoch), qmodel))
    if recipe.train.oscillation_freezing > 0:
        terms.append(OscillationFreezer(recipe.train.oscillation_freezing, qmodel))
    if recipe.train.oscillation_dampening > 0:
        terms.append(DampeningTerm(recipe.train.oscillation_dampening, qmodel,
                                   recipe.train.epochs * steps_per_epoch))
    return terms
