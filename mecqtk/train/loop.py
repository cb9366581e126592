"""One training epoch and one evaluation pass: small functions the run composes."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mecqtk.errors import MecqtkError

# Extra loss terms (MEC, distillation) plug in here: they get the batch, the logits and the global
# step and return named scalar tensors that are added to the task loss ("log_*" are only logged).
LossTerm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], dict[str, torch.Tensor]]


class NonFiniteLossError(MecqtkError):
    """The loss became NaN or inf."""


@dataclass
class EpochStats:
    loss: float
    top1: float
    steps: int
    terms: dict[str, float]


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
        logits = model(images)
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
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    *,
    epoch: int,
    start_step: int = 0,
    label_smoothing: float = 0.0,
    grad_clip: float | None = None,
    extra_terms: list[LossTerm] = (),
    progress: Callable[[int], None] | None = None,
) -> EpochStats:
    """Train for one pass over ``loader``; raise NonFiniteLossError naming the step on NaN/inf."""
    model.train()
    loss_sum = correct = seen = steps = 0
    term_sums: dict[str, float] = {}
    for step, (images, labels) in enumerate(loader):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = model(images)
        task = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        terms = {"ce": task}
        for term in extra_terms:
            terms.update(term(images, labels, logits, start_step + step))
        loss = sum(v for k, v in terms.items() if not k.startswith("log_"))
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(
                f"loss is {loss_value} at epoch {epoch} step {step}; lower the learning rate "
                "(train.optimizer.lr) or raise the bits; the last good checkpoint is kept"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        batch = labels.numel()
        loss_sum += loss_value * batch
        correct += (logits.argmax(dim=1) == labels).sum().item()
        seen += batch
        steps += 1
        for key, value in terms.items():
            term_sums[key] = term_sums.get(key, 0.0) + value.item() * batch
        if progress is not None:
            progress(1)
    if seen == 0:
        raise MecqtkError("training data is empty")
    return EpochStats(
        loss=loss_sum / seen,
        top1=100.0 * correct / seen,
        steps=steps,
        terms={k: v / seen for k, v in term_sums.items()},
    )
