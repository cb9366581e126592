"""Coverage table: timm models x recipes -> traced / quantized / forward-backward / trains / time.

Usage (from the repository root):
    python tools/coverage.py                 # the 25 models of issue 3, W2A2 + W4A4
    python tools/coverage.py --only --native-size convnext_nano beit_base_patch16_224
    python tools/coverage.py poolformer_s12  # the 25 plus extra names

The 25 run at the small inputs of ``tools/zoo.py`` unless ``--native-size``; extra names and
``--native-size`` run exactly as ``mecqtk doctor --model NAME`` does (default input size).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mecqtk.doctor import DEFAULT_STEPS, DoctorResult, check_model, doctor  # noqa: E402
from zoo import COVERAGE_MODELS, small_model  # noqa: E402


def run_one(name: str, recipe: str, native: bool, steps: int) -> DoctorResult:
    if native or name not in COVERAGE_MODELS:
        return doctor(name, recipe, steps=steps)
    start = time.perf_counter()
    model, size = small_model(name)
    result = check_model(model, recipe, input_size=size, name=name, steps=steps)
    return DoctorResult(**{**result.__dict__, "seconds": time.perf_counter() - start})


def _cell(flag: bool) -> str:
    return "[green]yes[/green]" if flag else "[red]no[/red]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="extra timm model names")
    parser.add_argument("--only", action="store_true", help="run only the names given")
    parser.add_argument("--native-size", action="store_true",
                        help="every model at its default input size (as mecqtk doctor)")
    parser.add_argument("--recipes", default="w2a2_lsq.yaml,w4a4_lsq.yaml")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"optimizer steps per model (default {DEFAULT_STEPS})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", type=Path, help="also write every result as JSON lines here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = list(args.models) if args.only else [*COVERAGE_MODELS, *args.models]
    recipes = args.recipes.split(",")
    console = Console()
    table = Table(title="mecqtk coverage")
    for column in ("model", "recipe", "traced", "quantized", "fwd+bwd", "trains", "last loss",
                   "min step", "ok", "s", "notes"):
        table.add_column(column)
    passed = 0
    wall = time.perf_counter()
    sink = args.json.open("w") if args.json else None
    for name in names:
        for recipe in recipes:
            result = run_one(name, recipe, args.native_size, args.steps)
            passed += result.ok
            notes = []
            if result.auto_leaves:
                notes.append("kept whole: " + ", ".join(result.auto_leaves))
            if result.float_layers:
                notes.append("float: " + ", ".join(f["name"] for f in result.float_layers[:3]))
            if result.not_run:
                notes.append("not run: " + ", ".join(result.not_run[:3]))
            if result.error:
                notes.append(result.error[:120])
            if result.train_error:
                notes.append(result.train_error[:120])
            trained = result.train_error is None and len(result.losses) == result.steps
            table.add_row(name, result.recipe, _cell(result.traced),
                          f"{result.layers_quantized}/{result.layers_total}",
                          _cell(result.forward_ok and result.backward_ok), _cell(trained),
                          f"{result.losses[-1]:.3g}" if result.losses else "–",
                          "–" if result.smallest_step is None else f"{result.smallest_step:.2g}",
                          _cell(result.ok),
                          f"{result.seconds:.1f}", "; ".join(notes))
            console.print(f"{name} {result.recipe}: {'ok' if result.ok else 'FAILED'} "
                          f"({result.seconds:.1f} s)", highlight=False)
            if sink:
                sink.write(json.dumps(result.as_json()) + "\n")
                sink.flush()
    console.print(table)
    total = len(names) * len(recipes)
    console.print(f"{passed}/{total} passed in {time.perf_counter() - wall:.0f} s wall time "
                  f"({args.threads} torch thread(s))")
    return 0 if passed == total else 1


if __name__ == "__main__":
    sys.exit(main())
