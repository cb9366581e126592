"""Top-1 of the bundled recipes on real CIFAR-10 under one identical training budget.

Starting from the shared ResNet-20 checkpoint: a full-precision fine-tune on the JPEG training
set (the FP reference), then from that fine-tuned model W4A4 LSQ, W2A2 LSQ, W2A2 LSQ + MEC and
W2A2 LSQ + MEC with K experts (and, on request, the W2A2 rows with knowledge distillation). Every
quantized run gets the same train section (epochs, batch, optimizer, lr schedule) and, per seed,
the same seed; only the quant/mec/distill sections differ. Each run is a `mecqtk quantize`
subprocess with its own run folder, so a killed benchmark resumes where it stopped.

Prints a table (mean ± half the range over the seeds) and writes it, with the command and the
wall time, between markers in docs/benchmarks.md.

Example (the default budget: 2 FP epochs, then 1 epoch per variant and seed):
    python tools/bench_accuracy.py
Side by side (after the FP fine-tune, the variant runs share the machine) and, at any time, the
table of what has finished so far (unfinished runs marked):
    python tools/bench_accuracy.py --parallel 4
    python tools/bench_accuracy.py --parallel 4 --table-only --no-doc
On a GPU, a longer budget:
    python tools/bench_accuracy.py --device cuda --fp-epochs 10 --epochs 30 --seeds 0,1,2 \
        --out runs/bench_gpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]

# The one training budget every quantized variant gets (epochs and seed are set per run).
TRAIN = {
    "batch_size": 128,
    "optimizer": {"name": "sgd", "lr": 0.02, "momentum": 0.9, "nesterov": True,
                  "weight_decay": 0.00005},
    "schedule": {"name": "cosine", "warmup_epochs": 0.2},
}
FP_RECIPE = {
    "name": "fp_finetune",
    "description": "full-precision fine-tune: every layer and junction left in float",
    "quant": {"rules": [{"match": {"name": "*"}, "skip": True}], "residual": {"enabled": False}},
    "train": {**TRAIN, "optimizer": {**TRAIN["optimizer"], "weight_decay": 0.0001}},
}
KD = {"enabled": True}


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    recipe: str
    changes: dict[str, Any] = field(default_factory=dict)


VARIANTS = {
    v.key: v for v in (
        Variant("w4a4_lsq", "W4A4 LSQ", "w4a4_lsq.yaml"),
        Variant("w2a2_lsq", "W2A2 LSQ", "w2a2_lsq.yaml"),
        Variant("w2a2_mec", "W2A2 LSQ + MEC + BN re-estimation + KD (w2a2_mec.yaml)",
                "w2a2_mec.yaml"),
        Variant("w2a2_mec_nokd", "W2A2 LSQ + MEC + BN re-estimation", "w2a2_mec.yaml",
                {"distill": {"enabled": False}}),
        Variant("w2a2_mec_k4", "w2a2_mec.yaml with K=4 experts", "w2a2_mec.yaml",
                {"mec": {"experts": 4}}),
        Variant("w2a2_lsq_kd", "W2A2 LSQ + KD", "w2a2_lsq.yaml", {"distill": KD}),
        Variant("w2a2_lsq_bnre", "W2A2 LSQ + BN re-estimation (100 batches)", "w2a2_lsq.yaml",
                {"train": {"bn_reestimate_batches": 100}}),
        Variant("w2a2_lsq_damp", "W2A2 LSQ + oscillation dampening (1e-3)", "w2a2_lsq.yaml",
                {"train": {"oscillation_dampening": 0.001}}),
        Variant("w2a2_lsq_damp1e4", "W2A2 LSQ + oscillation dampening (1e-4)", "w2a2_lsq.yaml",
                {"train": {"oscillation_dampening": 0.0001}}),
        Variant("w2a2_lsq_bits4", "W2A2 LSQ + bit-width schedule (4-bit for 0.25 epoch)",
                "w2a2_lsq.yaml", {"train": {"bit_schedule": {"start_bits": 4,
                                                            "start_epochs": 0.25}}}),
        Variant("w2a2_lsq_freeze", "W2A2 LSQ + oscillation freezing (0.02)", "w2a2_lsq.yaml",
                {"train": {"oscillation_freezing": 0.02}}),
        Variant("w2a2_mec_nokd_taps", "W2A2 LSQ + MEC on pooled + stage taps + BN re-estimation",
                "w2a2_mec.yaml", {"distill": {"enabled": False},
                                  "mec": {"extra_taps": [{"tap": "stages", "weight": 0.25}]}}),
        # The MEC ablation (--variants with --section mec_ablation): one change each.
        Variant("w2a2_mec_nomec", "w2a2_mec.yaml without MEC (LSQ + BN re-estimation + KD)",
                "w2a2_mec.yaml", {"mec": {"enabled": False}}),
        Variant("w2a2_mec_g0.1", "MEC, gamma 0.1", "w2a2_mec.yaml", {"mec": {"weight": 0.1}}),
        Variant("w2a2_mec_g2", "MEC, gamma 2", "w2a2_mec.yaml", {"mec": {"weight": 2.0}}),
        Variant("w2a2_mec_eps16", "MEC, eps2 16 (d/4)", "w2a2_mec.yaml", {"mec": {"eps2": 16.0}}),
        Variant("w2a2_mec_self", "MEC, self view", "w2a2_mec.yaml", {"mec": {"view": "self"}}),
        Variant("w2a2_mec_aug", "MEC, augmented view", "w2a2_mec.yaml",
                {"mec": {"view": "augmented"}}),
        Variant("w2a2_mec_grouped4", "MEC, 4 channel groups", "w2a2_mec.yaml",
                {"mec": {"experts": 4, "expert_form": "grouped"}}),
        Variant("w2a2_mec_proj128", "MEC, projector 128", "w2a2_mec.yaml",
                {"mec": {"projector": 128}}),
        Variant("w2a2_mec_exact", "MEC, exact logdet", "w2a2_mec.yaml", {"mec": {"order": None}}),
    )
}
DEFAULT_VARIANTS = "w4a4_lsq,w2a2_lsq,w2a2_lsq_bnre,w2a2_lsq_kd,w2a2_mec_nokd,w2a2_mec"


def shared_dir() -> Path:
    override = os.environ.get("MECQTK_SHARED")
    return Path(override) if override else REPO.parent / "shared"


def merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        out[key] = merged(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def variant_recipe(variant: Variant, epochs: int, seed: int) -> dict[str, Any]:
    recipe = yaml.safe_load((REPO / "recipes" / variant.recipe).read_text())
    recipe = merged(recipe, variant.changes)
    recipe["name"] = variant.key
    # the one budget (epochs, batch, optimizer, schedule, seed) over the recipe's own train
    # section, so the training tools a recipe ships (w2a2_mec.yaml's BatchNorm re-estimation)
    # stay on in its row, and a variant's changes on top
    recipe["train"] = {**recipe.get("train", {}), **TRAIN, **variant.changes.get("train", {}),
                       "epochs": epochs, "seed": seed}
    return recipe


def quantize_command(name: str, recipe: dict[str, Any], checkpoint: Path,
                     args: argparse.Namespace) -> list[str]:
    """The `mecqtk quantize` command of one run (resuming its folder if a checkpoint is there);
    writes the run's recipe file."""
    folder = args.out / name
    recipe_file = args.out / "recipes" / f"{name}.yaml"
    recipe_file.parent.mkdir(parents=True, exist_ok=True)
    recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
    command = [
        sys.executable, "-m", "mecqtk", "quantize", "--model", args.model,
        "--checkpoint", str(checkpoint), "--recipe", str(recipe_file),
        "--data", f"imagefolder:{args.data}", "--out", str(folder), "--device", args.device,
        "--no-report", "--no-export",
    ]
    if args.limit_train:
        command += ["--limit-train", str(args.limit_train)]
    if (folder / "checkpoint.pt").is_file():
        command.append("--resume")
    return command


def run_outcome(folder: Path) -> dict[str, Any] | None:
    """What a run folder holds: its summary when finished, else the epochs it has logged
    (``partial``), or None before its first epoch."""
    per_epoch = []
    metrics = folder / "metrics.jsonl"
    if metrics.is_file():
        per_epoch = [json.loads(line)["val_top1"] for line in metrics.read_text().splitlines()
                     if line.strip()]
    summary = folder / "summary.json"
    if summary.is_file():
        return {**json.loads(summary.read_text()), "per_epoch": per_epoch, "partial": False}
    if not per_epoch:
        return None
    seconds = sum(json.loads(line).get("epoch_seconds", 0.0)
                  for line in metrics.read_text().splitlines() if line.strip())
    return {"quant_top1": per_epoch[-1], "wall_seconds": seconds, "per_epoch": per_epoch,
            "partial": True}


def run_quantize(name: str, recipe: dict[str, Any], checkpoint: Path, args: argparse.Namespace,
                 console: Console, threads: int | None = None) -> dict[str, Any] | None:
    """One `mecqtk quantize` run; its outcome (reused when the run already finished). With
    ``threads`` (runs side by side) the run's output goes to ``run.log`` in its folder and a
    failed run is reported, not raised."""
    folder = args.out / name
    done = run_outcome(folder)
    if done is not None and not done["partial"]:
        console.print(f"[dim]{name}: finished earlier, reusing {folder / 'summary.json'}[/]")
        return done
    if args.table_only:
        return done
    command = quantize_command(name, recipe, checkpoint, args)
    if threads is None:
        console.rule(f"{name}")
        subprocess.run(command, check=True, cwd=REPO)
        return run_outcome(folder)
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    console.print(f"{name}: started ({threads} threads, log {folder / 'run.log'})")
    with open(folder / "run.log", "a") as log:
        code = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                              check=False).returncode
    outcome = run_outcome(folder)
    console.print(f"{name}: {'finished' if code == 0 else f'failed (exit {code})'}")
    return outcome


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    half_range = (max(values) - min(values)) / 2
    return f"{statistics.mean(values):.2f} ± {half_range:.2f}"


def row_label(row: dict[str, Any]) -> str:
    """A row's label; an unfinished row says how many epochs each of its runs has done."""
    if not row["partial"]:
        return row["label"]
    return f"{row['label']} (unfinished: {', '.join(f'{len(e)} ep' for e in row['per_epoch'])})"


def markdown(rows: list[dict[str, Any]], command: str, wall: float, args: argparse.Namespace,
             seeds: list[int]) -> str:
    fp = rows[0]
    lines = [
        f"Command: `{command}`",
        "",
        f"Budget: full-precision fine-tune of {fp['epochs']} epoch(s) from the shared "
        f"checkpoint, then {args.epochs} epoch(s) per quantized variant from that fine-tuned "
        f"model, batch {TRAIN['batch_size']}, SGD lr {TRAIN['optimizer']['lr']} cosine, "
        f"seeds {', '.join(map(str, seeds))} (± is half the range over seeds); training images: "
        f"{args.limit_train or 'all 50,000'}; top-1 on the 10,000 test images. Device: "
        f"{args.device} ({os.cpu_count()} CPU cores, {platform.machine()}). "
        f"Run time {wall / 60:.1f} min: the sum of the runs' wall times, so a resumed or "
        "re-printed benchmark reports what its runs took.",
        "",
        "| variant | top-1 % | vs FP (pt) | per-seed top-1 | minutes per run |",
        "|---|---:|---:|---|---:|",
        f"| FP fine-tune (reference) | {fp['top1'][0]:.2f} | — | — | "
        f"{fp['minutes'][0]:.1f} |",
    ]
    for row in rows[1:]:
        delta = statistics.mean(row["top1"]) - fp["top1"][0]
        lines.append(
            f"| {row_label(row)} | {spread(row['top1'])} | {delta:+.2f} | "
            f"{', '.join(f'{v:.2f}' for v in row['top1'])} | "
            f"{statistics.mean(row['minutes']):.1f} |"
        )
    return "\n".join(lines)


def write_section(doc: Path, body: str, name: str, title: str) -> None:
    """Replace the text between the section's markers (or append the section) without touching
    the rest of the page."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = doc.read_text() if doc.is_file() else "# Benchmarks\n"
    section = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + f"\n\n## {title}\n\n" + section + "\n"
    temporary = doc.with_suffix(".tmp")
    temporary.write_text(text)
    temporary.replace(doc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Example: python tools/bench_accuracy.py --epochs 2 --seeds 0,1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    shared = shared_dir()
    parser.add_argument("--model", default="cifar_resnet20")
    parser.add_argument("--checkpoint", type=Path,
                        default=shared / "data/weights/cifar-resnet/resnet20-12fca82f.th")
    parser.add_argument("--data", type=Path, default=shared / "data/cifar10-jpeg")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per quantized variant")
    parser.add_argument("--fp-epochs", type=int, default=2, help="epochs of the FP fine-tune")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds per variant")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--fp-run", type=Path, default=None,
                        help="reuse a finished fp_finetune run folder instead of fine-tuning")
    parser.add_argument("--limit-train", type=int, default=None,
                        help="train on a class-balanced subset (default: all images)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_accuracy")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks.md",
                        help="markdown file whose accuracy section is rewritten")
    parser.add_argument("--section", default="bench_accuracy",
                        help="name of the docs section the table replaces")
    parser.add_argument("--no-doc", action="store_true", help="only print the table")
    parser.add_argument("--parallel", type=int, default=1,
                        help="variant runs side by side (one process each, the CPU threads "
                             "split between them; on one GPU, several runs share it)")
    parser.add_argument("--table-only", action="store_true",
                        help="start nothing: the table of what the run folders hold now, "
                             "unfinished runs marked with the epochs they have done")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    for path, what in ((args.checkpoint, "checkpoint"), (args.data, "data folder")):
        if not path.exists():
            parser.error(f"{what} {path} not found (set MECQTK_SHARED or pass it)")
    console = Console(stderr=True)
    if args.fp_run is not None:
        fp = run_outcome(args.fp_run)
        fine_tuned = args.fp_run / "checkpoint.pt"
    else:
        fp_recipe = merged(FP_RECIPE, {"train": {"epochs": args.fp_epochs, "seed": seeds[0]}})
        fp = run_quantize("fp_finetune", fp_recipe, args.checkpoint, args, console)
        fine_tuned = args.out / "fp_finetune" / "checkpoint.pt"
    if fp is None or fp["partial"]:
        parser.error(f"the FP fine-tune has not finished ({args.out / 'fp_finetune'})")
    console.print(f"teacher of distillation and of MEC's teacher view: the FP fine-tune "
                  f"({fine_tuned}), top-1 {fp['quant_top1']:.2f} %")
    rows = [{"label": "FP fine-tune", "top1": [fp["quant_top1"]],
             "minutes": [fp["wall_seconds"] / 60], "epochs": fp["epochs"],
             "per_epoch": [fp.get("per_epoch", [])], "partial": False}]
    runs = [(key, seed) for key in args.variants.split(",") for seed in seeds]
    threads = max(1, (os.cpu_count() or 1) // args.parallel) if args.parallel > 1 else None
    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        futures = {run: pool.submit(run_quantize, f"{run[0]}_seed{run[1]}",
                                    variant_recipe(VARIANTS[run[0]], args.epochs, run[1]),
                                    fine_tuned, args, console, threads) for run in runs}
        outcomes = {run: future.result() for run, future in futures.items()}
    for key in args.variants.split(","):
        results = [r for seed in seeds if (r := outcomes[(key, seed)]) is not None]
        if not results:
            continue
        rows.append({"label": VARIANTS[key].label, "top1": [r["quant_top1"] for r in results],
                     "minutes": [r["wall_seconds"] / 60 for r in results],
                     "per_epoch": [r["per_epoch"] for r in results],
                     "partial": any(r["partial"] for r in results)})
    # Summed over runs rather than timed here: runs finished earlier are reused, not redone.
    timed = rows[1:] if args.fp_run is not None else rows  # a reused FP run is not this run's
    wall = 60 * sum(sum(row["minutes"]) for row in timed)

    table = Table(title=f"{args.model} on CIFAR-10 (top-1 %, {args.epochs} epochs per variant)")
    for column in ("variant", "top-1 %", "per seed", "min/run"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for row in rows:
        table.add_row(row_label(row), spread(row["top1"]),
                      ", ".join(f"{v:.2f}" for v in row["top1"]),
                      f"{statistics.mean(row['minutes']):.1f}")
    Console().print(table)
    command = "python tools/bench_accuracy.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    body = markdown(rows, command.strip(), wall, args, seeds)
    (args.out / "bench_accuracy.json").write_text(json.dumps(
        {"rows": rows, "wall_seconds": wall, "epochs": args.epochs, "seeds": seeds}, indent=2))
    if any(row["partial"] for row in rows):
        console.print("unfinished runs: docs not rewritten")
    elif not args.no_doc:
        write_section(args.doc, body, args.section, f"Accuracy: CIFAR-10, {args.model}")
        console.print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
