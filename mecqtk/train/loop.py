"""One training epoch and one evaluation pass: small functions the run composes."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from mecqtk.errors import MecqtkError
from mecqtk.quant.quantizers import keep_steps_valid
from mecqtk.quant.saved_codes import codes_for_backward


class LossTerm(Protocol):
    """An extra loss term (MEC, distillation) added to the task loss.

    Called with the batch, the student's logits and the global step, it returns named scalar
    tensors that are added to the task loss (names starting with ``log_`` are only logged).
    ``trainable`` holds its own parameters (the optimizer trains them, checkpoints keep them);
    ``generator`` is the random stream it draws from, or None: checkpoints keep its state so a
    resumed run draws what an uninterrupted one would. A term may also have a
    ``before_step(images, step)`` method, called before each step's forward (the bit-width
    schedule), and an ``after_update()`` method, called after every optimizer step (oscillation
    freezing).
    """

    trainable: nn.Module
    generator: torch.Generator | None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor,
                 step: int) -> dict[str, torch.Tensor]: ...


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(MecqtkError):
    """The loss became NaN or inf."""


@dataclass
class EpochStats:
    """Running sums of one epoch; kept in mid-epoch checkpoints so a resumed epoch reports the
    same numbers as an uninterrupted one."""

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    steps: int = 0
    term_sums: dict[str, float] = field(default_factory=dict)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.seen, 1)

    @property
    def top1(self) -> float:
        return 100.0 * self.correct / max(self.seen, 1)

    @property
    def terms(self) -> dict[str, float]:
        return {k: v / max(self.seen, 1) for k, v in self.term_sums.items()}

    def state_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainStep:
    """Everything one optimizer step needs besides the batch."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    amp: str = "none"
    scaler: torch.amp.GradScaler | None = None
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    channels_last: bool = False
    extra_terms: list[LossTerm] = field(default_factory=list)
    compiled: bool = False  # torch.compile plans the saved tensors itself

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp == "none":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AMP_DTYPES[self.amp])

    def to_device(self, images: torch.Tensor, labels: torch.Tensor):
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels.to(self.device, non_blocking=True)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device,
             progress: Callable[[int], None] | None = None) -> tuple[float, float]:
    """(top-1 in percent, mean cross-entropy) of ``model`` over ``loader``."""
    was_training = model.training
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = model(images).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(dim=1) == labels).sum().item()
        total += labels.numel()
        if progress is not None:
            progress(1)
    model.train(was_training)
    if total == 0:
        raise MecqtkError("evaluation data is empty")
    return 100.0 * correct / total, loss_sum / total


def train_one_epoch(
    step_config: TrainStep,
    loader: Iterable,
    *,
    epoch: int,
    start_step: int,
    stats: EpochStats | None = None,
    skip_batches: int = 0,
    after_step: Callable[[int, EpochStats], None] | None = None,
    progress: Callable[..., None] | None = None,
) -> EpochStats:
    """Train one pass over ``loader``; raise NonFiniteLossError naming the step on NaN/inf.

    ``skip_batches`` batches are drawn and dropped first (resuming mid-epoch: the loader then
    continues with exactly the batches an uninterrupted run would see); ``stats`` carries their
    running sums. ``after_step(global_step, stats)`` runs after every optimizer step.
    """
    s = step_config
    s.model.train()
    stats = stats or EpochStats()
    for index, (images, labels) in enumerate(loader):
        if index < skip_batches:
            continue
        step = start_step + index
        images, labels = s.to_device(images, labels)
        for term in s.extra_terms:
            before_step = getattr(term, "before_step", None)
            if before_step is not None:
                before_step(images, step)
        # the quantizer outputs autograd keeps are stored as integer codes (eager only)
        saving = contextlib.nullcontext() if s.compiled else codes_for_backward()
        with s.autocast(), saving:
            logits = s.model(images)
            task = F.cross_entropy(logits.float(), labels, label_smoothing=s.label_smoothing)
            terms = {"ce": task}
            for term in s.extra_terms:
                terms.update(term(images, labels, logits, step))
        loss = sum(v for k, v in terms.items() if not k.startswith("log_"))
        s.optimizer.zero_grad(set_to_none=True)
        if s.scaler is not None:
            s.scaler.scale(loss).backward()
            s.scaler.unscale_(s.optimizer)
        else:
            loss.backward()
        if s.grad_clip is not None:
            nn.utils.clip_grad_norm_(s.model.parameters(), s.grad_clip)
        if s.scaler is not None:
            s.scaler.step(s.optimizer)
            s.scaler.update()
        else:
            s.optimizer.step()
        keep_steps_valid(s.model)
        for term in s.extra_terms:
            after_update = getattr(term, "after_update", None)
            if after_update is not None:
                after_update()
        s.scheduler.step()
        # read only now: the host waits for the GPU once per step, after the whole step is
        # queued (a bad update is never checkpointed: checkpoints come after this check)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(
                f"loss is {loss_value} at step {step} (epoch {epoch + 1}); training stopped "
                "and the last good checkpoint is kept; lower train.optimizer.lr or raise the bits"
            )
        batch = labels.numel()
        stats.loss_sum += loss_value * batch
        stats.correct += int((logits.argmax(dim=1) == labels).sum().item())
        stats.seen += batch
        stats.steps += 1
        for key, value in terms.items():
            stats.term_sums[key] = stats.term_sums.get(key, 0.0) + float(value.detach()) * batch
        if after_step is not None:
            after_step(step + 1, stats)
        if progress is not None:
            progress(1, loss=loss_value)
    if stats.seen == 0:
        raise MecqtkError("training data is empty")
    return stats
