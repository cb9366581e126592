"""Whether the training step runs through ``torch.compile``, and what compiling cost.

Compiled, the whole student model is one inductor program in which every fake-quantizer is
traced as plain elementwise ops (:func:`mecqtk.quant.arith.fake_quantize`) and fused into the
kernels around it: on a GPU a quantizer then costs no launch of its own. Eager, each quantizer
is one call into separately compiled kernels, which is cheap on a CPU and dominated by launches
on a GPU.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch._dynamo.utils import counters

CompileSetting = bool | Literal["auto"]


def compiles(setting: CompileSetting, device: torch.device) -> bool:
    """``train.compile_model`` resolved for ``device``: ``auto`` compiles on CUDA only (on a CPU
    the eager fused kernels are already nearly free and compiling a large model takes minutes).
    """
    return setting is True or (setting == "auto" and device.type == "cuda")


def compile_student(model: nn.Module, mode: str) -> nn.Module:
    """``torch.compile(model)`` with the recipe's mode (``default`` is inductor's default)."""
    # a frozen-BN epoch, eval of the teacher view and the last short batch each add a variant
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
    # a model (or a torch build) that cannot compile runs eagerly with a warning instead of
    # stopping the run: compiling is a speed-up, never a requirement
    torch._dynamo.config.suppress_errors = True
    return torch.compile(model, mode=None if mode == "default" else mode)


def graph_breaks() -> int:
    """Graph breaks dynamo took so far in this process (0: each compiled call is one graph)."""
    return sum(counters["graph_break"].values())
