"""Run an exported model in onnxruntime and the fake-quantized PyTorch model on the same images,
and compare logits, top-1 and the integer codes of every quantized activation.

Per-layer code agreement locates a divergence: the first layer (in graph order) whose codes
differ is where the two computations part, and every later difference may be inherited.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.fx as fx
from torch import nn

from mecqtk.errors import ExportError
from mecqtk.export.manifest import Manifest, TensorEntry
from mecqtk.export.session import make_session, with_code_outputs
from mecqtk.export.snap import bias_grids

# A file that agrees with the trained model on fewer top-1 decisions than this (in percent) is
# not deployable: the default of `mecqtk verify` and of the export stage of `mecqtk quantize`.
DEFAULT_THRESHOLD_PCT = 99.0
# A bias further than this (in accumulator units) from its int32 grid was not snapped.
OFF_GRID_UNITS = 0.05


@dataclass
class LayerAgreement:
    """How often one activation's integer codes differ between onnxruntime and PyTorch."""

    layer: str
    bits: int
    codes: int = 0
    differing: int = 0
    max_abs_diff: int = 0
    sum_abs_diff: int = 0

    @property
    def differing_pct(self) -> float:
        return 100.0 * self.differing / max(self.codes, 1)

    @property
    def mean_abs_diff(self) -> float:
        """Mean code distance over the codes that differ (1.0: all differences are +-1)."""
        return self.sum_abs_diff / max(self.differing, 1)

    def add(self, onnx_codes: np.ndarray, torch_codes: np.ndarray) -> None:
        diff = np.abs(onnx_codes.astype(np.int64) - torch_codes.astype(np.int64))
        self.codes += diff.size
        self.differing += int(np.count_nonzero(diff))
        self.max_abs_diff = max(self.max_abs_diff, int(diff.max(initial=0)))
        self.sum_abs_diff += int(diff.sum())


@dataclass
class VerifyReport:
    """The outcome of one verification; ``as_json`` is what verify.json holds."""

    n: int
    top1_agreement_pct: float
    onnx_top1_pct: float
    torch_top1_pct: float
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    median_logit_range: float
    max_rel_logit_diff: float
    threshold_pct: float
    first_diverging_layer: str | None
    layers: list[LayerAgreement]
    diagnostic_matches_deployed: bool
    seconds: float
    off_grid_bias_layers: int = 0
    deploy_top1_agreement_pct: float | None = None
    model_deploy_top1_agreement_pct: float | None = None
    model_path: str = ""
    data: str = ""
    environment: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.top1_agreement_pct >= self.threshold_pct

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["passed"] = self.passed
        data["layers"] = [
            {**asdict(layer), "differing_pct": layer.differing_pct,
             "mean_abs_diff": layer.mean_abs_diff}
            for layer in self.layers
        ]
        return data


# Integer codes of all watched layers held at once per side: about 256 MB as onnxruntime's
# uint8 codes, 1 GB as the PyTorch side's int32.
CODE_ELEMENTS_PER_PASS = 256 * 2**20


class _CodeRecorder:
    """Runs the model and keeps the integer codes of the first call of each watched quantizer
    (a FakeQuantizer of the trained model or a FrozenQuantizer of its deploy form)."""

    def __init__(self, model: nn.Module, watched: set[str]) -> None:
        self.model = model
        self.watched = watched
        self.codes: dict[str, np.ndarray] = {}

    def run(self, images: torch.Tensor) -> torch.Tensor:
        self.codes = {}
        handles = []
        for name, module in self.model.named_modules():
            if name in self.watched:
                handles.append(module.register_forward_hook(self._hook(name)))
        try:
            return self.model(images)
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if name not in self.codes:
                self.codes[name] = module.codes(args[0]).cpu().numpy()
        return record


@dataclass
class _Totals:
    n: int = 0
    agree: int = 0
    onnx_correct: int = 0
    torch_correct: int = 0
    max_abs: float = 0.0
    sum_abs: float = 0.0
    logits_seen: int = 0
    max_rel: float = 0.0
    ranges: list[np.ndarray] = field(default_factory=list)

    def add(self, onnx_logits: np.ndarray, torch_logits: np.ndarray, labels: np.ndarray) -> None:
        onnx_top, torch_top = onnx_logits.argmax(1), torch_logits.argmax(1)
        self.n += len(labels)
        self.agree += int((onnx_top == torch_top).sum())
        self.onnx_correct += int((onnx_top == labels).sum())
        self.torch_correct += int((torch_top == labels).sum())
        diff = np.abs(onnx_logits.astype(np.float64) - torch_logits.astype(np.float64))
        self.max_abs = max(self.max_abs, float(diff.max()))
        self.sum_abs += float(diff.sum())
        self.logits_seen += diff.size
        span = torch_logits.max(1).astype(np.float64) - torch_logits.min(1)
        self.ranges.append(span)
        self.max_rel = max(self.max_rel, float((diff.max(1) / np.maximum(span, 1e-12)).max()))


@torch.no_grad()
def compare(
    gm: nn.Module,
    model: onnx.ModelProto,
    manifest: Manifest,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    threshold_pct: float = DEFAULT_THRESHOLD_PCT,
    threads: int = 2,
    limit: int | None = None,
    progress: Callable[[], None] | None = None,
    deploy: nn.Module | None = None,
) -> VerifyReport:
    """Compare ``model`` in onnxruntime with ``gm`` on ``batches`` of (images, labels).

    Logits and top-1 come from the model as deployed; the integer codes come from a copy that
    also outputs them (``diagnostic_matches_deployed`` says whether their logits were identical
    on the first batch). ``progress`` is called once per batch. With ``deploy`` (the convert
    stage's output for ``gm``) the report also says how often onnxruntime agrees with the deploy
    form it was exported from, and how often the deploy form agrees with ``gm``: when the file
    misses the model but matches its deploy form, the difference comes from the convert stage's
    float arithmetic (BatchNorm folded into the weight scales, biases on the int32 grid).

    Example:
        >>> report = compare(qmodel, onnx.load("model.onnx"), manifest, loader, limit=1000)
        >>> report.top1_agreement_pct, report.first_diverging_layer
    """
    started = time.perf_counter()
    if gm.training or any(p.device.type != "cpu" for p in gm.parameters()):
        raise ExportError("compare() needs the PyTorch model on the CPU in eval mode")
    entries = manifest.activations()
    watched = {e.layer for e in entries}
    missing = watched - {name for name, _ in gm.named_modules()}
    if missing:
        raise ExportError(
            f"the ONNX file does not belong to this model (no quantizer {sorted(missing)[0]}); "
            "export it again from the run folder"
        )
    deployed = make_session(model, threads)
    diagnostic = make_session(with_code_outputs(model, manifest), threads)
    output_name = manifest.outputs[0]
    code_names = [e.onnx["codes"] for e in entries]
    layers = {e.layer: LayerAgreement(e.layer, e.bits) for e in entries}
    totals = _Totals()
    matches = True
    onnx_deploy_agree = model_deploy_agree = 0
    chunk: int | None = None  # images per pass, once one image's codes have been counted
    for index, (images, labels) in enumerate(batches):
        if limit is not None and totals.n >= limit:
            break
        if limit is not None:
            images, labels = images[: limit - totals.n], labels[: limit - totals.n]
        start = 0
        while start < len(images):
            # every watched layer's codes of a whole batch, on both sides, can exceed the
            # machine's memory (inception_v3 at 299 px: about 20 GB for 100 images)
            size = 1 if chunk is None else chunk
            part, part_labels = images[start:start + size], labels[start:start + size]
            start += len(part)
            feed = {"input": part.float().cpu().numpy()}
            onnx_logits = deployed.run([output_name], feed)[0]
            results = diagnostic.run([output_name, *code_names], feed)
            if chunk is None:
                per_image = sum(r.size for r in results[1:]) // max(len(part), 1)
                chunk = max(1, CODE_ELEMENTS_PER_PASS // max(per_image, 1))
            recorder = _CodeRecorder(gm, watched)
            torch_logits = recorder.run(part.float().cpu()).numpy()
            if index == 0 and start == len(part):
                matches = bool(np.array_equal(results[0], onnx_logits))
            if deploy is not None:
                deploy_top = deploy(part.float().cpu()).numpy().argmax(1)
                onnx_deploy_agree += int((onnx_logits.argmax(1) == deploy_top).sum())
                model_deploy_agree += int((torch_logits.argmax(1) == deploy_top).sum())
            totals.add(onnx_logits, torch_logits, part_labels.cpu().numpy())
            for entry, onnx_codes in zip(entries, results[1:], strict=True):
                _add_layer(layers[entry.layer], entry, onnx_codes, recorder.codes[entry.layer])
            del results, recorder
        if progress is not None:
            progress()
    if totals.n == 0:
        raise ExportError("verification saw no images; check --data and --n")
    ordered = [layers[e.layer] for e in entries]
    first = next((layer.layer for layer in ordered if layer.differing), None)
    return VerifyReport(
        n=totals.n,
        top1_agreement_pct=100.0 * totals.agree / totals.n,
        onnx_top1_pct=100.0 * totals.onnx_correct / totals.n,
        torch_top1_pct=100.0 * totals.torch_correct / totals.n,
        max_abs_logit_diff=totals.max_abs,
        mean_abs_logit_diff=totals.sum_abs / max(totals.logits_seen, 1),
        median_logit_range=float(np.median(np.concatenate(totals.ranges))),
        max_rel_logit_diff=totals.max_rel,
        threshold_pct=threshold_pct,
        first_diverging_layer=first,
        layers=ordered,
        diagnostic_matches_deployed=matches,
        seconds=time.perf_counter() - started,
        deploy_top1_agreement_pct=(None if deploy is None
                                   else 100.0 * onnx_deploy_agree / totals.n),
        model_deploy_top1_agreement_pct=(None if deploy is None
                                         else 100.0 * model_deploy_agree / totals.n),
        off_grid_bias_layers=(sum(g.off_grid_units > OFF_GRID_UNITS for g in bias_grids(gm))
                              if isinstance(gm, fx.GraphModule) else 0),
        environment={"onnxruntime": ort.__version__, "torch": torch.__version__,
                     "threads": threads},
    )


def _add_layer(layer: LayerAgreement, entry: TensorEntry, onnx_codes: np.ndarray,
               torch_codes: np.ndarray) -> None:
    logical = onnx_codes.astype(np.int64) - entry.storage_offset
    if logical.shape != torch_codes.shape:
        raise ExportError(
            f"{entry.layer}: ONNX codes have shape {logical.shape}, PyTorch {torch_codes.shape}"
        )
    layer.add(logical, torch_codes)
