"""Tiny real runs for the report tests: cifar_resnet20, calibrated on real CIFAR-10, no training."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mecqtk.recipe import load_recipe
from mecqtk.recipe.validate import to_data

REPORT_IMAGES = 20


def _tiny_recipe(folder: Path, bundled: str) -> Path:
    """A bundled recipe, shrunk: no epochs, one small calibration batch, eager kernels."""
    data = to_data(load_recipe(bundled))
    data["name"] = f"{Path(bundled).stem}_tiny"
    data["quant"]["calibration"] = {"batches": 1}
    data["train"].update(epochs=0, batch_size=50, eval_batch_size=50, fused_quantizers=False)
    path = folder / f"{Path(bundled).stem}_tiny.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _make_run(shared_dir: Path, out: Path, bundled: str, from_checkpoint: bool) -> Path:
    from mecqtk.run import QuantizeOptions, quantize

    checkpoint = shared_dir / "data" / "weights" / "cifar-resnet" / "resnet20-12fca82f.th"
    quantize(QuantizeOptions(
        model="cifar_resnet20", recipe=str(_tiny_recipe(out.parent, bundled)),
        data=f"imagefolder:{shared_dir / 'data' / 'cifar10-jpeg'}", out=out,
        checkpoint=str(checkpoint) if from_checkpoint else None,
        limit_train=50, limit_val=50, device="cpu", show_progress=False,
        export=False, report=False,  # the tests build their own reports; export is tested elsewhere
    ))
    return out


@pytest.fixture(scope="session")
def report_images() -> int:
    return REPORT_IMAGES


@pytest.fixture(scope="session")
def data_spec(shared_dir: Path) -> str:
    return f"imagefolder:{shared_dir / 'data' / 'cifar10-jpeg'}"


@pytest.fixture(scope="session")
def w2a2_run(shared_dir: Path, tmp_path_factory) -> Path:
    """W2A2 LSQ, started from the shared float checkpoint (float reference available)."""
    folder = tmp_path_factory.mktemp("runs")
    return _make_run(shared_dir, folder / "w2a2", "w2a2_lsq.yaml", from_checkpoint=True)


@pytest.fixture(scope="session")
def w4a4_random_run(shared_dir: Path, tmp_path_factory) -> Path:
    """W4A4 LSQ from random init: no float checkpoint, so the bypassed model is the reference."""
    folder = tmp_path_factory.mktemp("runs")
    return _make_run(shared_dir, folder / "w4a4", "w4a4_lsq.yaml", from_checkpoint=False)


@pytest.fixture(scope="session")
def w2a2_report(w2a2_run: Path, w4a4_random_run: Path, data_spec: str):
    """The W2A2 run's report with every section: sensitivity, and comparison with W4A4."""
    from mecqtk.report import ReportOptions, build_report

    return build_report(w2a2_run, ReportOptions(
        data=data_spec, n=REPORT_IMAGES, sensitivity=True, raise_top=3,
        compare=w4a4_random_run, show_progress=False))
