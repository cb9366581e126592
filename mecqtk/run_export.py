"""Export and verification of a run folder (what `mecqtk export` / `mecqtk verify` call).

Layout: ``RUN_DIR/onnx-<format>/model.onnx`` with ``quant_manifest.json`` and ``verify.json``
beside it; ``-o FILE`` puts the model (and its manifest and verify.json) in FILE's folder.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from mecqtk.data import build_data
from mecqtk.errors import ExportError
from mecqtk.export.api import (
    EXPORT_FORMATS,
    METADATA_RUN,
    PROBE_IMAGES,
    ExportFormat,
    ExportResult,
    export_model,
    save_export,
)
from mecqtk.export.convert import convert
from mecqtk.export.manifest import Manifest, manifest_path_for, read_manifest, sha256_of
from mecqtk.export.session import load_onnx
from mecqtk.export.verify import DEFAULT_THRESHOLD_PCT, VerifyReport, compare
from mecqtk.io import atomic_write_json
from mecqtk.progress import progress_bar
from mecqtk.rundir import RunDir, load_quantized_model

MODEL_FILE = "model.onnx"
VERIFY_FILE = "verify.json"


def default_model_path(run_dir: str | Path, export_format: ExportFormat = "qcdq") -> Path:
    return Path(run_dir) / f"onnx-{export_format}" / MODEL_FILE


def export_run(
    run_dir: str | Path,
    export_format: ExportFormat = "qcdq",
    opset: int | None = None,
    out: str | Path | None = None,
    data: str | None = None,
) -> ExportResult:
    """Export the trained model of a run folder to ONNX, with its quant manifest beside it.

    The file is checked in onnxruntime against the model's deploy form before it is written
    (on 16 images of ``data`` when given, else on random inputs): a file that fails is never
    written (:class:`ExportError` names the first diverging tensor).

    Example:
        >>> result = export_run("runs/r20_w2a2", "packed")
        >>> result.model_path, result.file_bytes
    """
    if export_format not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {export_format!r}; use one of {EXPORT_FORMATS}")
    run_dir = Path(run_dir)
    gm, info, recipe = load_quantized_model(run_dir)
    source = {
        "run_dir": str(run_dir.resolve()), "model": info.model, "recipe": recipe.name,
        "num_classes": info.num_classes, "class_names": info.class_names,
        "mean": info.mean, "std": info.std,
    }
    probe = None
    if data is not None:
        bundle = build_data(data, model=gm, batch_size=PROBE_IMAGES, limit_train=1,
                            limit_val=PROBE_IMAGES, seed=0, input_size=info.input_size)
        if tuple(bundle.input_size) != tuple(info.input_size):
            raise ExportError(
                f"--data yields {tuple(bundle.input_size)} images but the model takes "
                f"{tuple(info.input_size)}"
            )
        probe = next(iter(bundle.val_loader))[0].float()
    model, manifest = export_model(
        gm, tuple(info.input_size), export_format, opset,
        metadata={METADATA_RUN: source["run_dir"], "mecqtk.model": info.model,
                  "mecqtk.recipe": recipe.name},
        probe=probe,
    )
    manifest.input.update(mean=info.mean, std=info.std)
    path = Path(out) if out is not None else default_model_path(run_dir, export_format)
    if path.suffix != ".onnx":
        raise ExportError(f"{path}: the output file name must end in .onnx")
    return save_export(model, manifest, path, source)


def _run_of(model_path: Path, model: onnx.ModelProto, manifest: Manifest) -> Path:
    """The run folder an ONNX file was exported from: manifest, then file metadata, then the
    folder above the file's folder (the default layout)."""
    candidates = [manifest.source.get("run_dir")]
    candidates += [p.value for p in model.metadata_props if p.key == METADATA_RUN]
    candidates.append(str(model_path.resolve().parent.parent))
    for candidate in candidates:
        if candidate and RunDir(candidate).holds_a_run():
            return Path(candidate)
    raise ExportError(
        f"{model_path}: cannot find the run folder it was exported from; pass --run RUN_DIR"
    )


def resolve_target(
    target: str | Path, run_dir: str | Path | None = None, export_format: ExportFormat = "qcdq"
) -> tuple[Path, Path]:
    """(ONNX file, run folder) for a run folder or an ONNX file; exports a missing default file."""
    target = Path(target)
    if target.is_dir():
        RunDir(target).require()
        model_path = default_model_path(target, export_format)
        checkpoint = RunDir(target).checkpoint
        if not model_path.is_file() or model_path.stat().st_mtime < checkpoint.stat().st_mtime:
            export_run(target, export_format)
        return model_path, target
    model = load_onnx(target)
    if run_dir is not None:
        RunDir(run_dir).require()
        return target, Path(run_dir)
    return target, _run_of(target, model, read_manifest(manifest_path_for(target)))


def verify_run(
    target: str | Path,
    data: str,
    n: int | None = None,
    *,
    threshold_pct: float = DEFAULT_THRESHOLD_PCT,
    run_dir: str | Path | None = None,
    export_format: ExportFormat = "qcdq",
    batch_size: int = 100,
    threads: int = 2,
    show_progress: bool = False,
) -> VerifyReport:
    """Verify an export against its run's PyTorch model on ``n`` real images of ``data``;
    writes ``verify.json`` beside the ONNX file.

    Example:
        >>> report = verify_run("runs/r20_w2a2", "imagefolder:../shared/data/cifar10-jpeg")
        >>> report.top1_agreement_pct >= 99.5
    """
    model_path, run = resolve_target(target, run_dir, export_format)
    model = load_onnx(model_path)
    manifest = read_manifest(manifest_path_for(model_path))
    if manifest.model_sha256 and manifest.model_sha256 != sha256_of(model_path):
        raise ExportError(
            f"{manifest_path_for(model_path)} describes another file than {model_path.name}; "
            "export again so model and manifest match"
        )
    gm, info, _ = load_quantized_model(run)
    bundle = build_data(data, model=gm, batch_size=batch_size, limit_train=1, limit_val=n,
                        seed=0, input_size=info.input_size)
    if tuple(bundle.input_size) != tuple(info.input_size):
        raise ExportError(
            f"--data yields {tuple(bundle.input_size)} images but the model was exported for "
            f"{tuple(info.input_size)}"
        )
    with progress_bar("verify", len(bundle.val_loader), show_progress) as advance:
        report = compare(gm, model, manifest, bundle.val_loader, threshold_pct=threshold_pct,
                         threads=threads, limit=n, progress=advance, deploy=convert(gm)[0])
    report.model_path = str(model_path)
    report.data = data
    atomic_write_json(model_path.parent / VERIFY_FILE, report.as_json())
    return report


def export_and_verify(
    run_dir: str | Path,
    data: str,
    *,
    export_format: ExportFormat = "qcdq",
    n: int | None = None,
    threshold_pct: float = DEFAULT_THRESHOLD_PCT,
    threads: int = 2,
    show_progress: bool = False,
) -> tuple[ExportResult, VerifyReport]:
    """Export a finished run and verify the file on ``data`` (the end of `mecqtk quantize`).

    Does not raise when agreement is below the threshold: check ``report.passed``.

    Example:
        >>> exported, report = export_and_verify("runs/r20_w2a2", "cifar10:~/data", n=2000)
    """
    exported = export_run(run_dir, export_format, data=data)
    report = verify_run(exported.model_path, data, n, threshold_pct=threshold_pct,
                        run_dir=run_dir, threads=threads, show_progress=show_progress)
    return exported, report
