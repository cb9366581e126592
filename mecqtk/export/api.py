"""Public export entry points: a GraphModule (or a run folder) to an ONNX file + quant manifest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import onnx
import onnx.checker
import onnx.shape_inference
import torch
import torch.fx as fx

from mecqtk.errors import ExportError
from mecqtk.export.convert import convert
from mecqtk.export.integer_kernels import IntegerAdd, IntegerRegrid
from mecqtk.export.manifest import Manifest, manifest_path_for, sha256_of
from mecqtk.export.onnx_export import (
    activation_entries,
    compact_metadata,
    float_adds_of_codes,
    float_biases_outside,
    global_average_pools,
    hold_requantized_codes,
    pack_weights,
    quantizer_twins,
    requantize_by_adding_zero,
    torch_onnx_export,
    weight_entries,
)
from mecqtk.export.verify import LayerAgreement, VerifyReport, _CodeRecorder, compare
from mecqtk.graph.introspect import activation_quantizers
from mecqtk.io import atomic_write_bytes
from mecqtk.quant.modules import QuantizedLayer

ExportFormat = Literal["qcdq", "packed"]
EXPORT_FORMATS: tuple[str, ...] = ("qcdq", "packed")

DEFAULT_OPSET = 21
MIN_OPSET = 13
# Cast from INT2 (packed 2-bit weights) exists from opset 25 on.
PACKED_INT2_OPSET = 25

METADATA_FORMAT = "mecqtk.format"
METADATA_RUN = "mecqtk.run_dir"


@dataclass
class ExportResult:
    """What `mecqtk export` wrote."""

    model_path: Path
    manifest_path: Path
    export_format: str
    opset: int
    file_bytes: int
    quantized_tensors: int
    nodes: int


def default_opset(gm: fx.GraphModule, export_format: ExportFormat) -> int:
    """21 (INT4 storage, integer Clip), or 25 when a packed export stores 2-bit weights."""
    if export_format == "packed" and any(
        m.weight_quantizer.bits <= 2 for m in gm.modules() if isinstance(m, QuantizedLayer)
    ):
        return PACKED_INT2_OPSET
    return DEFAULT_OPSET


def check_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx.checker's full check (which runs strict shape inference); returns the inferred model."""
    try:
        onnx.checker.check_model(model, full_check=True)
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        first_line = str(err).splitlines()[0]
        raise ExportError(f"exported graph fails the ONNX checker: {first_line}") from err


# The self-check's tolerance. onnxruntime accumulates integer convolutions exactly and PyTorch in
# float, so a value at a rounding boundary can land one code apart, and that one code spreads
# through later layers. So the first activation whose codes differ may differ by one step on at
# most SELF_CHECK_CODES_PCT of its values; a wrong translation shows there as larger or more
# differences (tested). Top-1 on 16 probe inputs is a coarse bound (one flip is 6 %; an
# untrained model's logits are near-tied: 2 of 16 flipped on a random vit_tiny with one code
# apart at the first divergence); `mecqtk verify` applies the 99 % bound on real images.
SELF_CHECK_TOP1_PCT = 75.0
SELF_CHECK_CODES_PCT = 0.5
PROBE_IMAGES = 16


def probe_batch(input_shape: tuple[int, ...], n: int = PROBE_IMAGES) -> torch.Tensor:
    """Random inputs at the model's size (the probe when no images are given)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, *input_shape, generator=generator)


@torch.no_grad()
def check_convert(gm: torch.nn.Module, deploy: torch.nn.Module, probe: torch.Tensor) -> None:
    """The deploy form must quantize like the model it came from: the first activation whose
    codes differ may differ by one code on at most SELF_CHECK_CODES_PCT of its values (BatchNorm
    folding changes float rounding only)."""
    names = list(activation_quantizers(gm))
    fake, frozen = _CodeRecorder(gm, set(names)), _CodeRecorder(deploy, set(names))
    fake.run(probe)
    frozen.run(probe)
    for name in names:
        if name not in fake.codes or name not in frozen.codes:
            continue
        layer = LayerAgreement(name, 0)
        layer.add(frozen.codes[name], fake.codes[name])
        if not layer.differing:
            continue
        if layer.max_abs_diff > 1 or layer.differing_pct > SELF_CHECK_CODES_PCT:
            raise ExportError(
                f"the convert stage changed what the model computes: quantizer {name} differs "
                f"on {layer.differing_pct:.2f}% of its codes (by up to {layer.max_abs_diff})"
            )
        return


def self_check(deploy: torch.nn.Module, model: onnx.ModelProto, manifest: Manifest,
               probe: torch.Tensor, top1_pct: float = SELF_CHECK_TOP1_PCT) -> VerifyReport:
    """Run ``model`` in onnxruntime against the deploy form on ``probe``; raise
    :class:`ExportError` naming the first diverging tensor beyond the stated tolerance."""
    labels = torch.zeros(len(probe), dtype=torch.long)
    report = compare(deploy, model, manifest, [(probe, labels)], threshold_pct=top1_pct,
                     threads=1)
    first = next((layer for layer in report.layers if layer.differing), None)
    codes_bad = first is not None and (
        first.max_abs_diff > 1 or first.differing_pct > SELF_CHECK_CODES_PCT)
    if codes_bad or not report.passed:
        where = "no activation codes differ"
        if first is not None:
            entry = next(e for e in manifest.activations() if e.layer == first.layer)
            where = (f"first diverging tensor {entry.name} (quantizer {first.layer}, FX node "
                     f"{entry.notes.get('fx_node', first.layer)}): {first.differing_pct:.2f}% of "
                     f"its codes differ, by up to {first.max_abs_diff}")
        raise ExportError(
            f"the exported file does not compute what the model computes: top-1 agreement "
            f"{report.top1_agreement_pct:.1f}% on {report.n} probe inputs, {where}"
        )
    return report


@torch.no_grad()
def export_model(
    gm: fx.GraphModule,
    input_shape: tuple[int, ...],
    export_format: ExportFormat = "qcdq",
    opset: int | None = None,
    metadata: dict[str, str] | None = None,
    probe: torch.Tensor | None = None,
) -> tuple[onnx.ModelProto, Manifest]:
    """Convert a calibrated fake-quantized GraphModule to its deploy form, export it with
    ``torch.onnx.export`` and check the result in onnxruntime.

    Args:
        gm: The model from :func:`mecqtk.prepare` (calibrated or trained), in eval mode.
        input_shape: One input without the batch dimension, e.g. ``(3, 32, 32)``.
        export_format: ``qcdq`` (int8 containers) or ``packed`` (INT4/INT2 weight storage).
        opset: ONNX opset; None picks the lowest one the format needs (21 or 25).
        metadata: Extra model properties to store in the file.
        probe: Images for the self-check (default: 16 random inputs at ``input_shape``). The
            first diverging activation may differ by one code on at most 0.5 % of its values,
            and top-1 agreement must reach 75 %.

    Raises:
        ExportError: the model cannot be exported, or onnxruntime disagrees with the deploy form
            beyond the self-check's tolerance (the message names the first diverging tensor).

    Example:
        >>> model, manifest = export_model(qmodel.eval(), (3, 32, 32), "qcdq")
        >>> onnx.save(model, "model.onnx")
    """
    if export_format not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {export_format!r}; use one of {EXPORT_FORMATS}")
    if gm.training:
        raise ExportError("the model is in training mode; call .eval() before exporting")
    chosen = opset if opset is not None else default_opset(gm, export_format)
    if not MIN_OPSET <= chosen <= onnx.defs.onnx_opset_version():
        raise ExportError(
            f"opset {chosen} is outside {MIN_OPSET}..{onnx.defs.onnx_opset_version()}"
        )
    needed = default_opset(gm, export_format)
    if chosen < needed:
        raise ExportError(f"the {export_format} format of this model needs opset {needed} "
                          f"(2-bit weight storage), got {chosen}")
    deploy, _ = convert(gm)
    model = torch_onnx_export(deploy, tuple(input_shape), chosen)
    fx_names = {str(n.target): n.name for n in gm.graph.nodes if n.op == "call_module"}
    probe_inputs = probe if probe is not None else probe_batch(input_shape)
    check_convert(gm, deploy, probe_inputs)
    twins = quantizer_twins(deploy, probe_inputs[:2])
    tensors = activation_entries(model, deploy, fx_names, twins) + weight_entries(model, deploy)
    global_average_pools(model)
    # adds and requantizations the model computes as onnxruntime's QLinearAdd stay fusable
    float_adds_of_codes(model, {name for name, m in deploy.named_modules()
                                if isinstance(m, IntegerAdd) and m.emulates()})
    requantize_by_adding_zero(model, {m.target_name for m in deploy.modules()
                                      if isinstance(m, IntegerRegrid) and m.emulates()})
    float_biases_outside(model)
    hold_requantized_codes(model)
    compact_metadata(model)
    if export_format == "packed":
        pack_weights(model, tensors)
    props = {METADATA_FORMAT: export_format, **(metadata or {})}
    for key, value in props.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    model.doc_string = "exported by mecqtk"
    check_model(model)
    manifest = Manifest(
        export_format=export_format,
        opset=chosen,
        input={"name": "input", "shape": ["N", *input_shape]},
        outputs=[o.name for o in model.graph.output],
        tensors=tensors,
    )
    checked = self_check(deploy, model, manifest, probe_inputs)
    manifest.self_check = {
        "probe": "random" if probe is None else "images", "n": checked.n,
        "top1_agreement_pct": checked.top1_agreement_pct,
        "top1_threshold_pct": checked.threshold_pct,
        "max_rel_logit_diff": checked.max_rel_logit_diff,
        "first_diverging_tensor": checked.first_diverging_layer,
        "codes_tolerance": f"first diverging activation within 1 code on <= "
                           f"{SELF_CHECK_CODES_PCT} % of its values",
    }
    return model, manifest


def save_export(
    model: onnx.ModelProto, manifest: Manifest, path: str | Path, source: dict[str, Any]
) -> ExportResult:
    """Write ``model`` to ``path`` and the manifest beside it (``quant_manifest.json``)."""
    path = Path(path)
    atomic_write_bytes(path, model.SerializeToString())
    manifest.model_file = path.name
    manifest.model_sha256 = sha256_of(path)
    manifest.source = source
    manifest_path = manifest_path_for(path)
    manifest.write(manifest_path)
    return ExportResult(
        model_path=path,
        manifest_path=manifest_path,
        export_format=manifest.export_format,
        opset=manifest.opset,
        file_bytes=path.stat().st_size,
        quantized_tensors=len(manifest.tensors),
        nodes=len(model.graph.node),
    )
