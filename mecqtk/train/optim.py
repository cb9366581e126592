"""Optimizer with parameter groups for QAT, and per-step learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from mecqtk.quant.quantizers import FakeQuantizer
from mecqtk.recipe.schema import OptimizerConfig, ScheduleConfig


def parameter_groups(model: nn.Module, config: OptimizerConfig) -> list[dict]:
    """Weights decay; biases and norm parameters do not; quantizer step sizes and offsets get
    their own learning-rate multiplier and weight decay (``quantizer_lr_scale``,
    ``quantizer_weight_decay``, default none: decaying a step shrinks the range)."""
    quantizer_params = {id(p) for m in model.modules() if isinstance(m, FakeQuantizer)
                        for p in m.parameters(recurse=False)}
    decay, no_decay, quant = [], [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if id(param) in quantizer_params:
            quant.append(param)
        elif param.dim() <= 1:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": quant, "weight_decay": config.quantizer_weight_decay,
         "lr": config.lr * config.quantizer_lr_scale},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, config: OptimizerConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config)
    # foreach (one call per group and operation, not per parameter) on every device: torch
    # picks it on CUDA only, and a QAT model adds a learned step per quantizer to the
    # parameters, each a per-parameter call of its own on a CPU
    if config.name == "sgd":
        return torch.optim.SGD(
            groups, lr=config.lr, momentum=config.momentum,
            nesterov=config.nesterov and config.momentum > 0, foreach=True,
        )
    return torch.optim.AdamW(groups, lr=config.lr, foreach=True)


def lr_factor(
    config: ScheduleConfig, total_steps: int, steps_per_epoch: int
) -> Callable[[int], float]:
    """The multiplier of the base learning rate at each optimizer step."""
    warmup = round(config.warmup_epochs * steps_per_epoch)
    total = max(total_steps, 1)

    def factor(step: int) -> float:
        if config.name == "onecycle":
            # linear ramp over the first 30 % (or the warm-up, if given), cosine down to zero
            ramp = warmup or max(1, round(0.3 * total))
            if step < ramp:
                return 0.04 + 0.96 * step / ramp
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - ramp) / max(1, total - ramp))))
        if step < warmup:
            return (step + 1) / warmup
        if config.name == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if config.name == "step":
            return config.step_gamma ** (step // (config.step_epochs * steps_per_epoch))
        return 1.0

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: ScheduleConfig, total_steps: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(config, total_steps, steps_per_epoch)
    )
