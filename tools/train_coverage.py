"""The user's path over the zoo: `mecqtk quantize` from timm's initialisation, a few steps.

Each model x recipe is one `mecqtk quantize` process (as a user runs it) on the shared CIFAR-10;
the table says whether training reached its end with a finite loss, the mean training loss of the
last epoch and the smallest learned step size in the checkpoint. Without ``--export`` the runs skip
export and report; with it they are the user's whole command, and the table adds its exit code and
the export outcome summary.json records (verified or failed, top-1 agreement of the ONNX file with
the trained model). A finished run folder is reused, so the tool resumes after a kill.

Usage (from the repository root):
    python tools/train_coverage.py                        # the 25 zoo models, W4A4 + W2A2
    python tools/train_coverage.py --models mnasnet_100 lcnet_050 --recipes w2a2_lsq.yaml
    python tools/train_coverage.py --export --out runs/user_path --json runs/user_path.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from zoo import COVERAGE_MODELS, FURTHER_MODELS  # noqa: E402


def smallest_learned_step(checkpoint: Path) -> float | None:
    """The smallest value of any learned quantizer step in a run's checkpoint: a ``*.scale``
    beside a ``*.step_floor`` (a quantizer's; timm's LayerScale ``gamma`` is also called
    ``scale`` in some families, poolformer's, and may be negative)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    weights = state.get("state_dict", state)
    steps = [t.min().item() for k, t in weights.items()
             if k.endswith(".scale") and k.removesuffix(".scale") + ".step_floor" in weights
             and torch.is_tensor(t) and t.numel()]
    return min(steps) if steps else None


def run_one(model: str, recipe: str, data: str, out: Path, extra: list[str],
            export: bool = False) -> dict:
    summary_path = out / "summary.json"
    exit_path = out / "exit_code.txt"  # this tool's record of the finished command
    started = time.perf_counter()
    if not summary_path.exists() or not exit_path.exists():
        skip = [] if export else ["--no-export", "--no-report"]
        command = [sys.executable, "-m", "mecqtk", "quantize", "--model", model, "--recipe",
                   recipe, "--data", data, "--out", str(out), *skip, "--no-progress", "--force",
                   *extra]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if not summary_path.exists():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return {"model": model, "recipe": recipe, "trained": False, "reason": last[:160],
                    "exit_code": done.returncode, "seconds": time.perf_counter() - started}
        exit_path.write_text(f"{done.returncode}\n")
    summary = json.loads(summary_path.read_text())
    exported = summary.get("export") or {}
    train = summary.get("train", {"status": "finished"})
    history = summary.get("history") or []
    metrics = out / "metrics.jsonl"
    if not history and metrics.exists():
        history = [json.loads(line) for line in metrics.read_text().splitlines() if line]
    trained = train.get("status") != "failed" and len(history) == summary.get("epochs")
    checkpoint = out / "checkpoint.pt"
    return {
        "model": model, "recipe": recipe, "trained": trained,
        "final_loss": history[-1]["train_loss"] if history else None,
        "val_top1": history[-1]["val_top1"] if history else None,
        "smallest_step": smallest_learned_step(checkpoint) if checkpoint.exists() else None,
        "reason": train.get("reason") or exported.get("reason"),
        "seconds": summary.get("wall_seconds"),
        "exit_code": int(exit_path.read_text()),
        "export": exported.get("status"),
        "top1_agreement_pct": exported.get("top1_agreement_pct"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(COVERAGE_MODELS),
                        help="timm names, or 'further' for the held-out list of zoo.py")
    parser.add_argument("--recipes", default="w4a4_lsq.yaml,w2a2_lsq.yaml")
    parser.add_argument("--data", default=f"imagefolder:{REPO.parent / 'shared/data/cifar10-jpeg'}")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "train_coverage")
    parser.add_argument("--json", type=Path, help="also write every row as JSON lines here")
    parser.add_argument("--export", action="store_true",
                        help="run the whole command: export + verify + report as well")
    parser.add_argument("extra", nargs=argparse.REMAINDER,
                        help="after --: more quantize options (default: --epochs 1 "
                             "--limit-train 512 --limit-val 256)")
    args = parser.parse_args(argv)
    extra = [a for a in args.extra if a != "--"] or [
        "--epochs", "1", "--limit-train", "512", "--limit-val", "256"]
    console = Console()
    rows = []
    wall = time.perf_counter()
    sink = args.json.open("a") if args.json else None
    models = list(FURTHER_MODELS) if args.models == ["further"] else args.models
    for recipe in args.recipes.split(","):
        for model in models:
            row = run_one(model, recipe, args.data, args.out / f"{model}_{Path(recipe).stem}",
                          extra, export=args.export)
            rows.append(row)
            console.print(f"{model} {recipe}: {'trained' if row['trained'] else 'FAILED'} "
                          f"exit {row.get('exit_code')} export {row.get('export')} "
                          f"{row.get('top1_agreement_pct')} {row.get('reason') or ''}",
                          highlight=False)
            if sink:
                sink.write(json.dumps(row) + "\n")
                sink.flush()
    table = Table(title="mecqtk quantize from timm's initialisation")
    for column in ("model", "recipe", "trained", "final loss", "val top-1", "smallest step",
                   "exit", "export", "top-1 agree %", "s", "reason"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["model"], row["recipe"],
                      "[green]yes[/green]" if row["trained"] else "[red]no[/red]",
                      "–" if row.get("final_loss") is None else f"{row['final_loss']:.3f}",
                      "–" if row.get("val_top1") is None else f"{row['val_top1']:.1f}",
                      "–" if row.get("smallest_step") is None else f"{row['smallest_step']:.2g}",
                      str(row.get("exit_code", "–")), row.get("export") or "–",
                      "–" if row.get("top1_agreement_pct") is None
                      else f"{row['top1_agreement_pct']:.1f}",
                      "–" if row.get("seconds") is None else f"{row['seconds']:.0f}",
                      row.get("reason") or "")
    console.print(table)
    passed = sum(row["trained"] for row in rows)
    console.print(f"{passed}/{len(rows)} trained in {time.perf_counter() - wall:.0f} s wall time")
    if args.export:
        verified = sum(row.get("exit_code") == 0 and row.get("export") == "verified"
                       for row in rows)
        console.print(f"{verified}/{len(rows)} exited 0 with a verified export")
        passed = min(passed, verified)
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
