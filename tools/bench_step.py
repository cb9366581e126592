"""Median training-step time of float, QAT and QAT+MEC configurations, as ratios to float.

A configuration is ``[model/]variant[+flag...]``:

- variants: ``fp`` (float), ``w4a4`` / ``w2a2`` (mecqtk LSQ recipes), ``fx_w8a8`` (torch.ao's
  FX QAT with the x86 default qconfig, fused fake-quant kernels: the tool mecqtk replaces), and
  the MEC variants of ``w2a2`` (``qat_lsq`` is ``w2a2``; ``qat_lsq_mec``, ``..._k4``, ...);
- flags: ``compile`` (torch.compile of the whole model, as ``train.compile_model`` does),
  ``cudagraphs`` (compile with mode reduce-overhead), ``bf16`` (autocast), ``cl``
  (channels_last), ``eager`` (mecqtk's fake-quant without its separately compiled kernels),
  ``dynamo`` (those kernels called through ``torch.compile``'s per-call wrappers, as before
  ``quant/precompiled.py``).

Without ``model/``, a configuration runs for every ``--models``. All configurations of a model
are built in one process and their timed steps interleaved (one step of each in turn), so a
change in machine load hits all alike. Each batch size of ``--batch`` gets its own table; the
default adds batch 2, where per-call overhead decides the step time as launches do on a GPU.
Each row also counts what one step dispatches (``torch.profiler``): CUDA kernels on a GPU, aten
operators on a CPU. Ratios are to the same model's
``fp`` configuration with the same ``bf16``/``cl`` flags and no compile (what users compare a QAT
step with), and to ``fp+compile`` with those flags when it was measured.

``--parallel`` runs each configuration and batch in its own process: all build and compile at
once, then wait for each other and take turns for the timed steps (a GPU measures one at a
time, and no compile competes for the CPU while it does); use it where compiling many
configurations one after another would take too long.

Example:
    python tools/bench_step.py                       # resnet18 and cifar_resnet20, CPU
    python tools/bench_step.py --models resnet18 --configs fp fx_w8a8 w4a4 w2a2 qat_lsq_mec
    python tools/bench_step.py --device cuda --size 224 --batch 64 --models resnet18 resnet50 \\
        --configs fp fp+compile fx_w8a8 w4a4 w4a4+compile w2a2+compile --parallel
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import statistics
import subprocess
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
from mecqtk.train.compiled import compile_student, graph_breaks
from mecqtk.train.loop import TrainStep, train_one_epoch
from mecqtk.train.terms import build_loss_terms

# variant -> (recipe, MEC term); None: the float model
VARIANTS: dict[str, tuple[str, MECConfig] | None] = {
    "fp": None,
    "w4a4": ("w4a4_lsq", MECConfig(enabled=False)),
    "w2a2": ("w2a2_lsq", MECConfig(enabled=False)),
    "qat_lsq": ("w2a2_lsq", MECConfig(enabled=False)),
    "qat_lsq_mec": ("w2a2_lsq", MECConfig(enabled=True, view="self")),
    "qat_lsq_mec_k4": ("w2a2_lsq", MECConfig(enabled=True, view="self", experts=4)),
    "qat_lsq_mec_teacher": ("w2a2_lsq", MECConfig(enabled=True, view="teacher")),
    "qat_lsq_mec_teacher_k4": ("w2a2_lsq", MECConfig(enabled=True, view="teacher", experts=4)),
    "fx_w8a8": None,
}
FLAGS = ("compile", "cudagraphs", "bf16", "cl", "eager", "dynamo")
CPU_DEFAULT = ["fp", "qat_lsq", "qat_lsq_mec", "qat_lsq_mec_k4", "qat_lsq_mec_teacher",
               "qat_lsq_mec_teacher_k4"]


@dataclasses.dataclass(frozen=True)
class Config:
    model: str
    variant: str
    flags: frozenset[str]

    @classmethod
    def parse(cls, text: str, model: str) -> Config:
        if "/" in text:
            model, text = text.split("/", 1)
        variant, *flags = text.split("+")
        if variant not in VARIANTS:
            raise SystemExit(f"unknown variant {variant!r}; use one of {', '.join(VARIANTS)}")
        unknown = set(flags) - set(FLAGS)
        if unknown:
            raise SystemExit(f"unknown flag(s) {sorted(unknown)}; use {', '.join(FLAGS)}")
        return cls(model, variant, frozenset(flags))

    @property
    def name(self) -> str:
        return "+".join([self.variant, *[f for f in FLAGS if f in self.flags]])

    def reference(self, compiled: bool) -> str:
        """The float configuration this one is compared with: the same precision and memory
        format, eager or compiled."""
        flags = [f for f in FLAGS if f in self.flags and f in ("bf16", "cl")]
        return "+".join(["fp", *(["compile"] if compiled else []), *flags])


def _fx_qat(model: torch.nn.Module, images: torch.Tensor) -> torch.nn.Module:
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    # timm zero-initialises the last BatchNorm of each residual block; torch.ao's fused observer
    # turns an all-zero tensor into NaN (torch 2.14: a NaN loss at the first step). A tiny gamma
    # changes no step time.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d) and not module.weight.any():
                module.weight.fill_(1e-3)
    return prepare_qat_fx(model.train(), get_default_qat_qconfig_mapping("x86"), (images,))


def build_step(config: Config, batch: int, size: int, device: torch.device) -> tuple[TrainStep,
                                                                                      list]:
    torch.manual_seed(0)
    float_model = create_model(config.model, num_classes=10).to(device)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    terms: list = []
    setting = VARIANTS[config.variant]
    if config.variant == "fx_w8a8":
        model = _fx_qat(float_model, images)
    elif setting is None:
        model = float_model
    else:
        recipe_name, mec = setting
        recipe = dataclasses.replace(load_recipe(recipe_name), mec=mec)
        model = prepare(float_model, recipe).to(device)
        calibrate(model, [images])
        terms = build_loss_terms(recipe, float_model, model, model, 100, images[:8], device)
    if "cl" in config.flags:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, OptimizerConfig(lr=0.001))
    for term in terms:
        params = list(term.trainable.parameters())
        if params:
            optimizer.add_param_group({"params": params, "weight_decay": 0.0})
    scheduler = build_scheduler(optimizer, ScheduleConfig(name="constant"), 1000, 100)
    if "cudagraphs" in config.flags:
        model = compile_student(model, "reduce-overhead")
    elif "compile" in config.flags:
        model = compile_student(model, "default")
    step = TrainStep(model=model, optimizer=optimizer, scheduler=scheduler, device=device,
                     amp="bf16" if "bf16" in config.flags else "none",
                     channels_last="cl" in config.flags, extra_terms=terms)
    return step, [(images, labels)]


@contextlib.contextmanager
def turn(turns: Path | None, expected: int, wait_s: float = 360.0):
    """Wait until ``expected`` processes are ready (at most ``wait_s``: a slow compile must not
    stall the others forever), then hold the lock while timing."""
    if turns is None:
        yield
        return
    (turns / f"{os.getpid()}.ready").touch()
    deadline = time.monotonic() + wait_s
    while (len(list(turns.glob("*.ready"))) + len(list(turns.glob("*.failed"))) < expected
           and time.monotonic() < deadline):
        time.sleep(0.5)
    with open(turns / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@dataclasses.dataclass
class Subject:
    """One configuration built and ready to step."""

    config: Config
    step: TrainStep
    batches: list
    compiled_kernels: bool
    steps_done: int = 0
    warmup_s: float = 0.0
    graph_breaks: int = 0

    def run(self, count: int) -> None:
        use_compiled_kernels(self.compiled_kernels, direct="dynamo" not in self.config.flags)
        train_one_epoch(self.step, self.batches * count, epoch=0, start_step=self.steps_done)
        self.steps_done += count


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ops_per_step(subject: Subject, device: torch.device) -> int:
    """Kernels one training step launches on a GPU, or, on a CPU (the proxy for launch
    overhead), the aten operators it dispatches from outside any other aten operator."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        subject.run(1)
        _sync(device)
    events = prof.events()
    if device.type == "cuda":
        return sum(1 for e in events if e.device_type == DeviceType.CUDA)
    return sum(1 for e in events if e.name.startswith("aten::") and not (
        e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::")))


def measure(configs: list[Config], batch: int, size: int, steps: int, warmup: int,
            device: torch.device, turns: Path | None = None, expected: int = 1) -> list[dict]:
    """Build every configuration, warm each up, then time their steps interleaved (one step
    of each in turn, as tools/bench_peers.py does), so that a change in machine load hits all
    alike; then count each one's operators per step."""
    subjects = []
    for config in configs:
        breaks_before = graph_breaks()
        compiled_kernels = use_compiled_kernels("eager" not in config.flags,
                                                direct="dynamo" not in config.flags)
        step, batches = build_step(config, batch, size, device)
        subject = Subject(config, step, batches, compiled_kernels)
        started = time.perf_counter()
        subject.run(warmup)
        _sync(device)
        subject.warmup_s = time.perf_counter() - started
        subject.graph_breaks = graph_breaks() - breaks_before
        subjects.append(subject)
    times: dict[int, list[float]] = {id(s): [] for s in subjects}
    with turn(turns, expected):
        for _ in range(steps):
            for subject in subjects:
                _sync(device)
                start = time.perf_counter()
                subject.run(1)
                _sync(device)
                times[id(subject)].append(time.perf_counter() - start)
    results = []
    for subject in subjects:
        measured = times[id(subject)]
        results.append({"model": subject.config.model, "config": subject.config.name,
                        "batch": batch, "median_s": statistics.median(measured),
                        "min_s": min(measured), "max_s": max(measured),
                        "warmup_s": round(subject.warmup_s, 2),
                        "graph_breaks": subject.graph_breaks,
                        "ops": ops_per_step(subject, device)})
    return results


def run_parallel(configs: list[Config], args: argparse.Namespace) -> list[dict]:
    """One process per configuration and batch size (see the module docstring)."""
    turns = Path(args.turns_dir or f"/tmp/bench_step_turns.{os.getpid()}")
    turns.mkdir(parents=True, exist_ok=True)
    for stale in [*turns.glob("*.ready"), *turns.glob("*.failed"), *turns.glob("*.jsonl")]:
        stale.unlink()
    jobs = [(config, batch) for batch in args.batch for config in configs]
    threads = max(1, (os.cpu_count() or 2) // len(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "TORCHINDUCTOR_COMPILE_THREADS": str(max(1, threads))}
    procs = []
    for config, batch in jobs:
        command = [sys.executable, __file__, "--one", f"{config.model}/{config.name}",
                   "--batch", str(batch), "--size", str(args.size), "--steps",
                   str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
                   "--turns-dir", str(turns), "--expect", str(len(jobs))]
        procs.append((config, batch, subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                                      stderr=subprocess.PIPE, text=True)))
    results = []
    for config, batch, proc in procs:
        out, err = proc.communicate()
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if proc.returncode == 0 and lines:
            results.append(json.loads(lines[-1]))
        else:
            (turns / f"{proc.pid}.failed").touch()
            tail = err.strip().splitlines()[-1:] or ["no output"]
            results.append({"model": config.model, "config": config.name, "batch": batch,
                            "error": tail[0][:200]})
    return results


def table(results: list[dict], title: str, ops_label: str) -> Table:
    out = Table(title=title)
    for column in ("model", "configuration", "median ms", "min-max ms", "x fp", "x fp (min)",
                   "x fp+compile", "x QAT-LSQ", ops_label, "warm-up s", "graph breaks"):
        out.add_column(column, justify="left" if column in ("model", "configuration")
                       else "right")
    by_name = {(r["model"], r["config"]): r for r in results if "median_s" in r}
    for r in results:
        if "median_s" not in r:
            out.add_row(r["model"], r["config"], "failed: " + r["error"], *[""] * 8)
            continue
        config = Config.parse(r["config"], r["model"])
        ratios = []
        for compiled in (False, True):
            ref = by_name.get((r["model"], config.reference(compiled)))
            ratios.append(f"{r['median_s'] / ref['median_s']:.2f}" if ref else "-")
            if not compiled:
                # fastest against fastest: on a shared machine the least disturbed steps
                ratios.append(f"{r['min_s'] / ref['min_s']:.2f}" if ref else "-")
        # the MEC variants against plain LSQ QAT with the same flags
        lsq = by_name.get((r["model"], r["config"].replace(config.variant, "qat_lsq", 1)))
        ratios.append(f"{r['median_s'] / lsq['median_s']:.3f}"
                      if lsq and config.variant.startswith("qat_lsq_") else "-")
        out.add_row(r["model"], r["config"], f"{1000 * r['median_s']:.1f}",
                    f"{1000 * r['min_s']:.1f}-{1000 * r['max_s']:.1f}", *ratios,
                    str(r["ops"]), f"{r['warmup_s']:.1f}", str(r["graph_breaks"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18", "cifar_resnet20"])
    parser.add_argument("--configs", nargs="+", default=CPU_DEFAULT,
                        help="[model/]variant[+flag...] (see above)")
    parser.add_argument("--batch", type=int, nargs="+", default=[128, 2],
                        help="batch sizes, one table each (the small one is overhead-bound)")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=7,
                        help="timed steps of each configuration (median reported)")
    parser.add_argument("--warmup", type=int, default=15,
                        help="untimed steps first (kernels and compiled models build on first use)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--parallel", action="store_true",
                        help="one process per configuration and batch; warm up together, time "
                             "in turns (default: one process per model and batch, steps "
                             "interleaved)")
    parser.add_argument("--json", action="store_true", help="last line: one JSON list")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--turns-dir", help=argparse.SUPPRESS)
    parser.add_argument("--expect", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.one:
        config = Config.parse(args.one, "")
        turns = Path(args.turns_dir) if args.turns_dir else None
        line = json.dumps(measure([config], args.batch[0], args.size, args.steps, args.warmup,
                                  device, turns, args.expect)[0])
        if turns is not None:  # kept even if the parent is stopped before it prints
            with open(turns / "results.jsonl", "a") as results:
                results.write(line + "\n")
        print(line)
        return
    configs = []
    for text in args.configs:
        for model in ([None] if "/" in text else args.models):
            configs.append(Config.parse(text, model or ""))
    if args.parallel:
        results = run_parallel(configs, args)
    else:
        results = []
        for batch in args.batch:
            for model in dict.fromkeys(c.model for c in configs):
                results += measure([c for c in configs if c.model == model], batch, args.size,
                                   args.steps, args.warmup, device)
    # wide enough for every column also when the output is a file or a pipe
    console = Console(stderr=args.json, width=max(Console().width, 150))
    ops_label = "kernels/step" if device.type == "cuda" else "aten ops/step"
    for batch in args.batch:
        console.print(table([r for r in results if r["batch"] == batch],
                            f"median step time, batch {batch} at {args.size}x{args.size}, "
                            f"{device}, torch {torch.__version__}", ops_label))
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
