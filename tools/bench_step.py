"""Median training-step time of FP, QAT-LSQ and QAT-LSQ+MEC variants, as ratios to FP.

Example:
    python tools/bench_step.py                       # resnet18 and cifar_resnet20, CPU
    python tools/bench_step.py --models resnet18 --steps 8 --json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mecqtk import calibrate, load_recipe, prepare
from mecqtk.models import create_model
from mecqtk.quant.arith import use_compiled_kernels
from mecqtk.recipe import MECConfig, OptimizerConfig, ScheduleConfig
from mecqtk.train import build_optimizer, build_scheduler
from mecqtk.train.loop import TrainStep, train_one_epoch
from mecqtk.train.terms import build_loss_terms

VARIANTS = {
    "fp": None,
    "qat_lsq": MECConfig(enabled=False),
    "qat_lsq_mec": MECConfig(enabled=True, view="self"),
    "qat_lsq_mec_k4": MECConfig(enabled=True, view="self", experts=4),
    "qat_lsq_mec_teacher": MECConfig(enabled=True, view="teacher"),
    "qat_lsq_mec_teacher_k4": MECConfig(enabled=True, view="teacher", experts=4),
}


def step_times(model_name: str, variant: str, batch: int, size: int, steps: int,
               warmup: int, device: torch.device) -> list[float]:
    torch.manual_seed(0)
    float_model = create_model(model_name, num_classes=10).to(device)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    recipe = load_recipe("w2a2_lsq")
    mec = VARIANTS[variant]
    terms: list = []
    if mec is None:
        model = float_model
    else:
        recipe = dataclasses.replace(recipe, mec=mec)
        model = prepare(float_model, recipe).to(device)
        calibrate(model, [images])
        terms = build_loss_terms(recipe, float_model, model, model, 100, images[:8], device)
    optimizer = build_optimizer(model, OptimizerConfig(lr=0.001))
    for term in terms:
        params = list(term.trainable.parameters())
        if params:
            optimizer.add_param_group({"params": params, "weight_decay": 0.0})
    scheduler = build_scheduler(optimizer, ScheduleConfig(name="constant"), 1000, 100)
    config = TrainStep(model=model, optimizer=optimizer, scheduler=scheduler, device=device,
                       extra_terms=terms)
    stamps: list[float] = []

    def after_step(step: int, stats) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    start = time.perf_counter()
    train_one_epoch(config, [(images, labels)] * (warmup + steps + 1), epoch=0, start_step=0,
                    after_step=after_step)
    deltas = [b - a for a, b in zip([start, *stamps], stamps, strict=False)]
    return deltas[warmup + 1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18", "cifar_resnet20"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=7, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=15,
                        help="untimed steps first (fake-quant kernels compile on first use)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--eager", action="store_true", help="eager fake-quant kernels")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = parser.parse_args()
    device = torch.device(args.device)
    use_compiled_kernels(not args.eager)
    results: dict[str, dict[str, float]] = {}
    console = Console(stderr=args.json)
    table = Table(title=f"median step time, batch {args.batch} at {args.size}x{args.size}, "
                        f"{device}, {torch.get_num_threads()} threads")
    table.add_column("model")
    table.add_column("variant")
    table.add_column("median s", justify="right")
    table.add_column("min-max s", justify="right")
    table.add_column("x FP", justify="right")
    table.add_column("x QAT-LSQ", justify="right")
    for model_name in args.models:
        results[model_name] = {}
        for variant in args.variants:
            times = step_times(model_name, variant, args.batch, args.size, args.steps,
                               args.warmup, device)
            median = statistics.median(times)
            results[model_name][variant] = median
            fp = results[model_name].get("fp")
            lsq = results[model_name].get("qat_lsq")
            table.add_row(model_name, variant, f"{median:.4f}",
                          f"{min(times):.3f}-{max(times):.3f}",
                          f"{median / fp:.2f}" if fp else "-",
                          f"{median / lsq:.3f}" if lsq and variant != "fp" else "-")
    console.print(table)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
