"""Checks the compiled QAT path on this machine's device (CUDA when present): the fake-quant
expression torch.compile fuses against the eager kernels, bit for bit, and a few SGD steps of
compiled and eager QAT models side by side.

On CUDA this answers what CPU tests cannot: whether inductor's GPU kernels (Triton's division,
fused casts) keep the codes ONNX computes.

Example:
    python tools/check_compiled.py                   # CUDA if present, else CPU
    python tools/check_compiled.py --models resnet18 --size 64 --steps 6
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mecqtk import calibrate, load_recipe, prepare
from mecqtk.models import create_model
from mecqtk.quant import arith
from mecqtk.quant.quantizers import keep_steps_valid
from mecqtk.train.compiled import compile_student, graph_breaks


def _cases(device: torch.device) -> dict[str, tuple]:
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    def scalar(value: float) -> torch.Tensor:
        return torch.tensor(value, device=device)

    per_channel = (torch.rand(256, 1, 1, 1, generator=g) * 0.2 + 0.01).to(device)
    return {
        "per-tensor u2": (rand(64, 64, 28, 28) * 3, scalar(0.37), None, (0, 3)),
        "per-channel s4": (rand(256, 128, 3, 3), per_channel, None, (-8, 7)),
        "zero point u8": (rand(64, 64, 28, 28), scalar(0.0131), scalar(100.0), (0, 255)),
    }


def _eager_fake_quantize(x, scale, zero_point, qmin, qmax, grad_scale):
    """The eager path (the autograd.Function around the kernels), without saved codes."""
    return arith._FakeQuantize.apply(x, scale, None, zero_point, qmin, qmax, None,
                                     grad_scale, None)[0]


def _run(fn, x, scale, zero_point, bounds):
    x = x.clone().requires_grad_(True)
    scale = scale.clone().requires_grad_(True)
    zero_point = None if zero_point is None else zero_point.clone().requires_grad_(True)
    out = fn(x, scale, zero_point, *bounds, 0.01)
    weights = torch.linspace(-1, 1, out.numel(), device=x.device).view_as(out)
    (out * weights).sum().backward()
    return out.detach(), x.grad, scale.grad


def check_kernels(device: torch.device) -> Table:
    arith.use_compiled_kernels(True)
    traced = torch.compile(arith._traceable_fake_quantize, fullgraph=True)
    table = Table(title=f"compiled fake-quant vs eager kernels, {device}")
    for column in ("case", "values", "differing values", "differing x grads",
                   "eager vs CPU values", "step grad rel. diff"):
        table.add_column(column, justify="left" if column == "case" else "right")
    for name, (x, scale, zero_point, bounds) in _cases(device).items():
        eager = _run(_eager_fake_quantize, x, scale, zero_point, bounds)
        fused = _run(traced, x, scale, zero_point, bounds)
        cpu = arith._forward_kernel(x.cpu(), scale.cpu(), None,
                                    None if zero_point is None else zero_point.cpu(), *bounds)[0]
        rel = (fused[2] - eager[2]).abs().max() / eager[2].abs().max()
        table.add_row(name, str(x.numel()), str(int((fused[0] != eager[0]).sum())),
                      str(int((fused[1] != eager[1]).sum())),
                      str(int((eager[0].cpu() != cpu).sum())), f"{float(rel):.1e}")
    return table


def check_training(models: list[str], size: int, steps: int, device: torch.device) -> Table:
    table = Table(title=f"{steps} SGD steps, eager vs compiled QAT model, {device}")
    for column in ("model", "recipe", "eager losses", "compiled losses", "graph breaks",
                   "compile s", "bf16 logits"):
        table.add_column(column)
    for model_name in models:
        for recipe_name in ("w4a4_lsq", "w2a2_lsq"):
            torch.manual_seed(0)
            qmodel = prepare(create_model(model_name, num_classes=10), load_recipe(recipe_name))
            qmodel = qmodel.to(device)
            x = torch.randn(32, 3, size, size, device=device)
            y = torch.randint(0, 10, (32,), device=device)
            calibrate(qmodel, [x])
            eager, plain = copy.deepcopy(qmodel).train(), copy.deepcopy(qmodel).train()
            compiled = compile_student(plain, "default")
            losses, seconds = {}, 0.0
            for label, model, params in (("eager", eager, eager), ("compiled", compiled, plain)):
                optimizer = torch.optim.SGD(params.parameters(), lr=0.01, momentum=0.9)
                losses[label] = []
                started = time.perf_counter()
                for _ in range(steps):
                    loss = F.cross_entropy(model(x), y)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    keep_steps_valid(params)
                    losses[label].append(loss.item())
                seconds = time.perf_counter() - started
            with torch.autocast(device.type, dtype=torch.bfloat16):
                dtype = compiled(x).dtype
            table.add_row(model_name, recipe_name, " ".join(f"{v:.4f}" for v in losses["eager"]),
                          " ".join(f"{v:.4f}" for v in losses["compiled"]), str(graph_breaks()),
                          f"{seconds:.1f}", str(dtype).replace("torch.", ""))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18", "cifar_resnet20"])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    console = Console()
    console.print(check_kernels(device))
    console.print(check_training(args.models, args.size, args.steps, device))


if __name__ == "__main__":
    main()
