"""`mecqtk report` as library calls: measure a run (build_report) and write its files."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from mecqtk.data import build_data
from mecqtk.errors import MecqtkError
from mecqtk.io import atomic_write_text
from mecqtk.models import create_model
from mecqtk.progress import progress_bar, say
from mecqtk.qat import prepare
from mecqtk.quant.calibrate import calibrate
from mecqtk.recipe import Recipe, dump_recipe
from mecqtk.report.collect import Batch, collect
from mecqtk.report.compare import compare_reports
from mecqtk.report.html import render_html
from mecqtk.report.jsonfile import SUGGESTED_RECIPE_FILE, dumps
from mecqtk.report.result import LayerStats, Reference, Report
from mecqtk.report.sensitivity import sensitivity_report
from mecqtk.report.sites import find_sites
from mecqtk.rundir import RunInfo, load_quantized_model

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
DEFAULT_IMAGES = 500
# Every layer's float and bypassed outputs of a batch are held until the quantized pass reaches
# that layer, so batches are sized by input values: 100 CIFAR images, 13 at 224x224.
MAX_BATCH = 100
INPUT_VALUES_PER_BATCH = 2_000_000


@dataclass(frozen=True)
class ReportOptions:
    """What to measure, besides the run folder.

    Attributes:
        data: Data spec (``imagefolder:PATH`` / ``cifar10:PATH``); None: the run's own.
        n: Number of validation images (a fixed class-balanced subset).
        sensitivity: Also quantize one layer at a time / all but one, and suggest a recipe.
        raise_top: How many of the most costly layers the suggested recipe raises.
        compare: Another run folder to compare with, measured on the same images.
        device: ``cpu``, ``cuda`` or a torch device string.
        show_progress: Status lines and progress bars on stderr.
    """

    data: str | None = None
    n: int = DEFAULT_IMAGES
    sensitivity: bool = False
    raise_top: int = 3
    compare: str | Path | None = None
    device: str = "cpu"
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.n < 1:
            raise MecqtkError(f"n must be at least 1 image, got {self.n}")
        if self.raise_top < 0:
            raise MecqtkError(f"raise_top must be 0 or more, got {self.raise_top}")


@dataclass
class WrittenReport:
    report: Report
    files: list[Path] = field(default_factory=list)


def find_checkpoint(source: str, run_dir: str | Path) -> Path | None:
    """The run's float checkpoint: as recorded, or relative to where the run was started.

    A relative path was relative to the directory `mecqtk quantize` ran in, usually the parent
    of the runs/ folder (``runs/<name>`` -> two levels up from the run folder).
    """
    path = Path(source)
    candidates = [path]
    if not path.is_absolute():
        run_path = Path(run_dir).resolve()
        candidates += [run_path.parent.parent / path, run_path.parent / path]
    return next((c for c in candidates if c.is_file()), None)


def float_reference(info: RunInfo, run_dir: str | Path,
                    device: str) -> tuple[nn.Module | None, Reference]:
    """The float model the run started from, or None (then the bypassed model) and why."""
    source = info.checkpoint_source
    if source is None:
        return None, Reference("bypass", (
            "the run started without a float checkpoint (random init or timm pretrained "
            "weights), so the float reference is the run's trained weights with every "
            "quantizer bypassed"))
    path = find_checkpoint(source, run_dir)
    if path is None:
        return None, Reference("bypass", (
            f"the run's float checkpoint {source} is not found from here, so the float "
            "reference is the run's trained weights with every quantizer bypassed"))
    model = create_model(info.model, num_classes=info.num_classes, checkpoint=path,
                         **info.model_kwargs)
    return model.to(device).eval(), Reference(
        "float_checkpoint", f"the full-precision model the run started from ({source})")


def load_images(spec: str, model: nn.Module, n: int,
                input_size: tuple[int, ...] | list[int] = (3, 32, 32)) -> list[Batch]:
    """A fixed class-balanced subset of ``n`` validation images, preprocessed for ``model``."""
    batch_size = max(1, min(MAX_BATCH, INPUT_VALUES_PER_BATCH // math.prod(input_size)))
    data = build_data(spec, model=model, batch_size=batch_size, limit_train=n, limit_val=n,
                      seed=0, input_size=input_size)
    return list(data.val_loader)


def sensitivity_subject(
    qmodel: fx.GraphModule, float_model: nn.Module | None, recipe: Recipe, spec: str,
    device: torch.device, input_size: Sequence[int] | None = None,
) -> tuple[fx.GraphModule, Reference]:
    """The model whose layers the sensitivity analysis probes, and a note saying which.

    With the run's float checkpoint: that model quantized by the run's recipe and calibrated
    the way `mecqtk quantize` calibrates it, i.e. where a new run with the suggested recipe
    starts. Without one: the trained run itself.
    """
    if float_model is None:
        return qmodel, Reference("trained_run", (
            "no float checkpoint: the trained run itself is probed; its weights are co-adapted "
            "with their quantizers, so keeping a layer float can cost accuracy"))
    subject = prepare(float_model, recipe).to(device).eval()
    calibration = recipe.quant.calibration.batches
    data = build_data(spec, model=float_model, batch_size=recipe.train.batch_size,
                      limit_train=calibration * recipe.train.batch_size, limit_val=1,
                      seed=recipe.train.seed, input_size=input_size)
    calibrate(subject, (images for images, _ in itertools.islice(data.train_loader,
                                                                 calibration)))
    return subject.eval(), Reference("float_checkpoint_calibrated", (
        "the float model the run started from, quantized by the run's recipe and calibrated "
        f"on {calibration} training batches, as a new run with the suggested recipe starts"))


def _rank_by_local_error(layers: list[LayerStats]) -> list[str]:
    def key(entry: LayerStats) -> tuple[bool, float]:
        value = entry.local_sqnr_db
        return (math.isnan(value), value)
    return [entry.name for entry in sorted(layers, key=key)]


def build_report(run_dir: str | Path, options: ReportOptions | None = None) -> Report:
    """Measure every quantized layer of a run on real images.

    Example:
        >>> report = build_report("runs/r20_w2a2", ReportOptions(n=500))  # doctest: +SKIP
        >>> report.ranking[:3]  # doctest: +SKIP
        ['layer3.0.conv1', 'layer2.0.conv1', 'layer3.1.conv2']
    """
    options = options or ReportOptions()
    device = torch.device(options.device)
    qmodel, info, recipe = load_quantized_model(run_dir, device)
    spec = options.data or info.data
    batches = load_images(spec, qmodel, options.n, info.input_size)
    images = sum(labels.numel() for _, labels in batches)
    float_model, reference = float_reference(info, run_dir, options.device)
    sites = find_sites(qmodel)
    if options.show_progress:
        say(f"report: {len(sites)} quantized layers of {run_dir} on {images} images")
    collected = collect(qmodel, sites, batches, float_model, device)
    report = Report(
        run=str(run_dir), model=info.model, recipe=recipe.name, data=spec, images=images,
        reference=reference, quantized_score=collected.quantized_score,
        float_score=collected.float_score, bypass_score=collected.bypass_score,
        layers=collected.layers, ranking_by="local_sqnr_db",
        ranking=_rank_by_local_error(collected.layers), samples=collected.samples,
    )
    if options.sensitivity:
        subject, about = sensitivity_subject(qmodel, float_model, recipe, spec, device,
                                             info.input_size)
        with progress_bar("sensitivity", len(sites), options.show_progress) as advance:
            report.sensitivity, report.ranking = sensitivity_report(
                subject, about, batches, recipe, raise_top=options.raise_top, device=device,
                progress=advance)
        report.ranking_by = "sensitivity"
    if options.compare is not None:
        other = build_report(options.compare, ReportOptions(
            data=spec, n=options.n, device=options.device, show_progress=options.show_progress))
        report.comparison = compare_reports(report, other)
    return report


def write_report(run_dir: str | Path, data: str | None = None, n: int = DEFAULT_IMAGES,
                 options: ReportOptions | None = None) -> WrittenReport:
    """Measure a run and write report.json, report.html (and suggested_recipe.yaml) into it.

    ``data`` and ``n`` are shortcuts for the same fields of ``options``.

    Example:
        >>> written = write_report("runs/r20_w2a2", "imagefolder:../shared/data/cifar10-jpeg",
        ...                        n=500)  # doctest: +SKIP
        >>> [p.name for p in written.files]  # doctest: +SKIP
        ['report.json', 'report.html']
    """
    if options is None:
        options = ReportOptions(data=data, n=n)
    report = build_report(run_dir, options)
    folder = Path(run_dir)
    files = [folder / REPORT_JSON, folder / REPORT_HTML]
    atomic_write_text(files[0], dumps(report))
    atomic_write_text(files[1], render_html(report))
    if report.sensitivity is not None:
        files.append(folder / SUGGESTED_RECIPE_FILE)
        atomic_write_text(files[-1], dump_recipe(report.sensitivity.suggested_recipe))
    return WrittenReport(report, files)
