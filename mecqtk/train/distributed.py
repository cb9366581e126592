"""DistributedDataParallel through torchrun: process-group set-up and rank-aware helpers.

mecqtk never launches processes itself beyond handing the command to torchrun
(``mecqtk quantize --nproc N`` is ``torchrun --nproc_per_node=N -m mecqtk quantize ...``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def init_distributed(device: torch.device) -> DistContext:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); a no-op otherwise."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistContext()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=local_rank)


def device_for(device: torch.device, context: DistContext) -> torch.device:
    if device.type == "cuda" and context.enabled:
        return torch.device("cuda", context.local_rank)
    return device


@torch.no_grad()
def average_parameters(module: nn.Module, context: DistContext) -> None:
    """Average every parameter and floating buffer over ranks (used after calibration, so every
    rank starts from step sizes computed on all ranks' calibration data)."""
    average_tensors([*module.parameters(), *module.buffers()], context)


def average_tensors(tensors: list[torch.Tensor], context: DistContext) -> None:
    """Average each floating tensor of ``tensors`` over ranks, in place."""
    if not context.enabled:
        return
    for tensor in tensors:
        if tensor.is_floating_point():
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor.div_(context.world_size)


def barrier(context: DistContext) -> None:
    if context.enabled:
        dist.barrier()


def broadcast_object(value: object, context: DistContext) -> object:
    if not context.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(context: DistContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The torchrun command line that runs ``mecqtk <argv>`` in ``nproc`` processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "mecqtk", *argv]


def sum_over_ranks(values: list[float], context: DistContext) -> list[float]:
    """Element-wise sum of a list of numbers over ranks (float64, so counts stay exact)."""
    if not context.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()
