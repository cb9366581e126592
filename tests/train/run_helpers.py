"""Running `mecqtk quantize` in a subprocess on a small real slice (shared by run-level tests)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def quantize_command(shared_dir: Path, recipe: Path, out: Path, *extra: str) -> list[str]:
    """cifar_resnet20 from the shared checkpoint on 320 training / 100 validation images."""
    return [
        sys.executable, "-m", "mecqtk", "quantize", "--model", "cifar_resnet20",
        "--checkpoint", str(shared_dir / "data/weights/cifar-resnet/resnet20-12fca82f.th"),
        "--recipe", str(recipe), "--data", f"imagefolder:{shared_dir / 'data/cifar10-jpeg'}",
        "--limit-train", "320", "--limit-val", "100", "--out", str(out),
        "--no-progress", "--no-report", "--no-export", *extra,
    ]


def quantize_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
