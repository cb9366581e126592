"""mecqtk side by side with PyTorch's own QAT (PT2E, torch.ao FX) and Brevitas on the same models.

For every tool and model: coverage (prepare a QAT model -> one training step with a finite loss
-> convert/export to ONNX -> onnxruntime runs the file; the first failing stage and why), the
median training-step time as a ratio to the float model's (batch 128, same SGD optimizer, FP and
QAT steps interleaved so machine load hits both alike), and ONNX parity: the tool's fake-quant
model in eval mode against onnxruntime running its exported file, on real CIFAR-10 test images
(max |delta logit|, top-1 agreement, and both top-1 accuracies).

Tools (peers are optional: `pip install -e ".[peers]"`; a missing one gives a "not installed"
row, never a crash):
  mecqtk   prepare() + calibrate() with a W8A8 recipe (as the peers) and w4a4_lsq.yaml (first and
           last layer 8-bit), snap_biases() before evaluation, its own integer ONNX export (qcdq);
           fake-quant kernels compiled as `mecqtk quantize` does (--eager: not).
  pt2e     torch.export + prepare_qat_pt2e with the X86InductorQuantizer's default QAT config
           (per-channel int8 weights, uint8 activations), convert_pt2e, torch.onnx.export. From
           torchao (torchao.quantization.pt2e) when installed, else torch.ao.quantization.
  fx       torch.ao.quantization prepare_qat_fx with get_default_qat_qconfig_mapping("x86"),
           convert_fx, torch.onnx.export.
  brevitas preprocess_for_quantize + quantize (graph mode; its default maps with per-channel
           weights), calibration_mode, export_onnx_qcdq.
  Peers run at every width of --peer-bits (default 8,4): below 8 bits, their default config on
  the narrower integer grid for every layer; the notes then count the QuantizeLinear nodes whose
  codes the ONNX file really keeps below 8 bits (a Clip or a 4/2-bit type).
  Where torch.onnx's default (dynamo) exporter fails, the deprecated TorchScript exporter is
  tried and the note says so.

Models: cifar_resnet20/32/44/56 load the shared checkpoints. Other timm models (no hub access)
are trained from scratch for --fp-steps full-precision steps first, so their predictions depend
on the image; they run at 32x32 (the zoo's own small size for the few that need more).

Examples (from the repository root, with the shared folder at ../shared or $MECQTK_SHARED):
    python tools/bench_peers.py --markdown peers.md --json peers.json
    python tools/bench_peers.py --threads 1   # busy machine: ~6 min on 2 shared cores
    python tools/bench_peers.py --models zoo --peer-bits 8 --warmup 1 --steps 3 --fp-steps 0
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib
import importlib.util
import io
import json
import logging
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

TOOLS_DIR = Path(__file__).resolve().parent
REPO = TOOLS_DIR.parent
for _path in (str(REPO), str(TOOLS_DIR)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import timm  # noqa: E402
from bench_ort import W8A8, shared_dir, trained_looking  # noqa: E402

from mecqtk.data import build_data  # noqa: E402
from mecqtk.export import export_model, snap_biases  # noqa: E402
from mecqtk.models import load_checkpoint_weights  # noqa: E402
from mecqtk.qat import prepare as mecqtk_prepare  # noqa: E402
from mecqtk.quant.arith import use_compiled_kernels  # noqa: E402
from mecqtk.quant.calibrate import calibrate as mecqtk_calibrate  # noqa: E402
from mecqtk.recipe import load_recipe, recipe_from_dict  # noqa: E402
from zoo import COVERAGE_MODELS  # noqa: E402

DEFAULT_MODELS = "cifar_resnet20,resnet18"
DEFAULT_TOOLS = "mecqtk,pt2e,fx,brevitas"
STAGES = ("prepare", "train", "export", "ort")
EXPORT_BATCH = 32  # ONNX files are exported (and run) at this batch size
INSTALL_HINT = 'pip install -e ".[peers]"'


@dataclass
class Row:
    tool: str
    model: str
    bits: str
    status: str = "ok"  # ok | failed | not installed | skipped
    stages: dict[str, bool] = field(default_factory=dict)
    failed_stage: str | None = None
    error: str = ""
    notes: list[str] = field(default_factory=list)
    input_size: int = 32
    loss: float | None = None
    fp_step_s: float | None = None
    qat_step_s: float | None = None
    step_ratio: float | None = None
    fp_times: list[float] = field(default_factory=list)  # the timed steps, seconds
    qat_times: list[float] = field(default_factory=list)
    prepare_s: float | None = None
    export_s: float | None = None
    onnx_mb: float | None = None
    max_abs_dlogit: float | None = None
    mean_abs_dlogit: float | None = None
    logit_absmax: float | None = None
    max_rel_dlogit: float | None = None  # max over images of max |Δ| / that image's logit range
    fq_vs_converted: float | None = None  # the tool's own converted PyTorch model vs FQ
    converted_vs_ort: float | None = None  # that converted model vs onnxruntime
    top1_agree: float | None = None
    fq_top1: float | None = None
    ort_top1: float | None = None
    fp_top1: float | None = None


class StageError(Exception):
    """A stage failed; ``reason`` is the short text for the table."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def short_reason(err: BaseException, limit: int = 150) -> str:
    """One informative line for an exception (torch.export's long reports: their summary line)."""
    text = _ANSI.sub("", str(err))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "## Exception summary" in lines:
        after = lines[lines.index("## Exception summary") + 1:]
        lines = after or lines
    line = re.sub(r"<class '(?:[\w]+\.)*(\w+)'>", r"\1", lines[0]) if lines else ""
    reason = f"{type(err).__name__}: {line}" if line else type(err).__name__
    return reason if len(reason) <= limit else reason[: limit - 1] + "…"


@contextlib.contextmanager
def quiet():
    """Silence warnings and the exporters' progress prints (stdout/stderr) inside the block."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), \
            contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        yield


# ---------------------------------------------------------------------------------------------
# tools


@dataclass
class Tool:
    """One QAT tool: how to build, evaluate and export a QAT model.

    ``prepare(model, example, calibration_batches)`` returns a QAT model in training mode,
    calibrated by the tool's own mechanism; ``to_eval(qmodel)`` freezes it for inference;
    ``export(qmodel, example, path)`` writes an ONNX file and returns notes (fallbacks used)
    and the converted PyTorch model where the tool makes one (None otherwise).
    """

    name: str
    bits: str
    version: str
    prepare: Callable[[nn.Module, torch.Tensor, list[torch.Tensor]], nn.Module]
    to_eval: Callable[[nn.Module], None]
    export: Callable[[nn.Module, torch.Tensor, Path], tuple[list[str], nn.Module | None]]
    sub8bit: str = ""


def _onnx_export(module: nn.Module, example: torch.Tensor, path: Path) -> list[str]:
    """torch.onnx.export with torch's default (dynamo) exporter, then the TorchScript one."""
    try:
        with quiet():
            torch.onnx.export(module, (example,), str(path), dynamo=True, verbose=False,
                              input_names=["input"], output_names=["logits"])
        return []
    except Exception as dynamo_err:  # every failure is a result here
        first = short_reason(dynamo_err, 110)
    try:
        with quiet():
            torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=17,
                              input_names=["input"], output_names=["logits"])
    except Exception as legacy_err:
        raise StageError("export", f"dynamo exporter: {first}; TorchScript exporter: "
                                   f"{short_reason(legacy_err, 110)}") from legacy_err
    return [f"torch.onnx.export's default (dynamo) exporter fails ({first}); the deprecated "
            f"TorchScript exporter (dynamo=False) works"]


def _to_eval(model: nn.Module) -> None:
    model.eval()


def _disable_observers(model: nn.Module) -> None:
    for module in model.modules():
        if module is not model and callable(getattr(module, "disable_observer", None)):
            module.disable_observer()


def mecqtk_tool(label: str, recipe_name: str | None) -> Tool:
    recipe = recipe_from_dict(W8A8) if recipe_name is None else load_recipe(recipe_name)

    def prepare(model: nn.Module, example: torch.Tensor, batches: list[torch.Tensor]):
        gm = mecqtk_prepare(model, recipe)
        mecqtk_calibrate(gm, batches)
        return gm.train()

    def to_eval(gm: nn.Module) -> None:
        snap_biases(gm.eval())  # its documented step after training, before evaluation

    def export(gm: nn.Module, example: torch.Tensor, path: Path):
        onnx_model, _ = export_model(gm, tuple(example.shape[1:]), "qcdq")  # type: ignore
        path.write_bytes(onnx_model.SerializeToString())
        return [], None

    from mecqtk import __version__ as version
    return Tool("mecqtk", label, f"mecqtk {version}", prepare, to_eval, export,
                sub8bit="2-8 bit training; ONNX at 2-8 bits (qcdq int8 containers, or packed "
                        "INT4/INT2 weights)")


def _grid(bits: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(unsigned activation range, signed weight range) of a ``bits``-wide code."""
    return (0, (1 << bits) - 1), (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)


def _label(bits: int) -> str:
    return "W8A8" if bits == 8 else f"W{bits}A{bits} all"


def pt2e_tool(bits: int = 8) -> Tool:
    """PT2E QAT: torchao's copy of the API when installed, else torch's own (older torch)."""
    try:
        import torchao
        from torchao.quantization.pt2e import (
            move_exported_model_to_eval,
            move_exported_model_to_train,
        )
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )
        version = f"torchao {torchao.__version__}"
    except ImportError as torchao_err:
        try:
            from torch.ao.quantization import (  # type: ignore[attr-defined]
                move_exported_model_to_eval,
                move_exported_model_to_train,
            )
            from torch.ao.quantization.quantize_pt2e import (  # type: ignore[import-not-found]
                convert_pt2e,
                prepare_qat_pt2e,
            )
            from torch.ao.quantization.quantizer.x86_inductor_quantizer import (  # type: ignore
                X86InductorQuantizer,
                get_default_x86_inductor_quantization_config,
            )
        except ImportError as torch_err:
            raise ImportError(
                f"torchao is not usable ({short_reason(torchao_err, 80)}) and torch "
                f"{torch.__version__} has no PT2E QAT of its own") from torch_err
        version = f"torch.ao (torch {torch.__version__})"

    def prepare(model: nn.Module, example: torch.Tensor, batches: list[torch.Tensor]):
        batch = torch.export.Dim.AUTO
        exported = torch.export.export(model.train(), (example,),
                                       dynamic_shapes=({0: batch},)).module()
        config = get_default_x86_inductor_quantization_config(is_qat=True)
        if bits != 8:  # the same config on a narrower integer grid
            (amin, amax), (wmin, wmax) = _grid(bits)
            act = dataclasses.replace(config.input_activation, quant_min=amin, quant_max=amax)
            weight = dataclasses.replace(config.weight, quant_min=wmin, quant_max=wmax)
            config = dataclasses.replace(config, input_activation=act, output_activation=act,
                                         weight=weight)
        quantizer = X86InductorQuantizer().set_global(config)
        qmodel = prepare_qat_pt2e(exported, quantizer)
        _observe(qmodel, batches, move_exported_model_to_eval)
        move_exported_model_to_train(qmodel)
        return qmodel

    def to_eval(qmodel: nn.Module) -> None:
        _disable_observers(qmodel)
        move_exported_model_to_eval(qmodel)

    def export(qmodel: nn.Module, example: torch.Tensor, path: Path):
        with quiet():
            converted = convert_pt2e(copy.deepcopy(qmodel))
        return _onnx_export(converted, example, path), converted

    return Tool("pt2e", _label(bits), version, prepare, to_eval, export,
                sub8bit="fake-quant at any quant_min/quant_max through a custom quantizer; "
                        "ONNX int8 containers only")


def _observe(qmodel: nn.Module, batches: list[torch.Tensor],
             to_eval: Callable[[nn.Module], Any] | None = None) -> None:
    """torch.ao calibration: forward passes with observers on (they observe in eval mode too)."""
    if to_eval is None:
        qmodel.eval()
    else:
        to_eval(qmodel)
    with torch.no_grad():
        for images in batches:
            qmodel(images)


def fx_tool(bits: int = 8) -> Tool:
    from torch.ao.nn.intrinsic.qat import freeze_bn_stats
    from torch.ao.quantization import (
        FusedMovingAvgObsFakeQuantize,
        MovingAverageMinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
        QConfig,
        get_default_qat_qconfig_mapping,
    )
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

    mapping = get_default_qat_qconfig_mapping("x86")
    if bits != 8:  # x86's default QAT qconfig on a narrower integer grid
        (amin, amax), (wmin, wmax) = _grid(bits)
        mapping.set_global(QConfig(
            activation=FusedMovingAvgObsFakeQuantize.with_args(
                observer=MovingAverageMinMaxObserver, quant_min=amin, quant_max=amax,
                dtype=torch.quint8),
            weight=FusedMovingAvgObsFakeQuantize.with_args(
                observer=MovingAveragePerChannelMinMaxObserver, quant_min=wmin, quant_max=wmax,
                dtype=torch.qint8, qscheme=torch.per_channel_symmetric)))

    def prepare(model: nn.Module, example: torch.Tensor, batches: list[torch.Tensor]):
        with quiet():
            qmodel = prepare_qat_fx(model.train(), mapping, (example,))
        _observe(qmodel, batches)
        return qmodel.train()

    def to_eval(qmodel: nn.Module) -> None:
        _disable_observers(qmodel)
        qmodel.apply(freeze_bn_stats)
        qmodel.eval()

    def export(qmodel: nn.Module, example: torch.Tensor, path: Path):
        with quiet():
            converted = convert_fx(copy.deepcopy(qmodel))
        return _onnx_export(converted, example, path), converted

    return Tool("fx", _label(bits), f"torch {torch.__version__}", prepare, to_eval, export,
                sub8bit="fake-quant at any quant_min/quant_max through a custom QConfig; "
                        "ONNX int8 containers only")


def brevitas_tool(bits: int = 8) -> Tool:
    import brevitas
    from brevitas.export import export_onnx_qcdq
    from brevitas.graph.calibrate import calibration_mode
    from brevitas.graph.quantize import (
        COMPUTE_LAYER_MAP,
        QUANT_ACT_MAP,
        QUANT_IDENTITY_MAP,
        preprocess_for_quantize,
        quantize,
    )
    from brevitas.quant import Int8WeightPerChannelFloat

    def narrow(quant):  # a Brevitas quantizer class at ``bits`` (unchanged at 8)
        return quant if bits == 8 else quant.let(bit_width=bits)

    def remap(table: dict, key: str, replace=None) -> dict:
        out = {}
        for layer, spec in table.items():
            if spec is None or key not in spec[1]:
                out[layer] = spec
            else:
                quant = replace or spec[1][key]
                out[layer] = (spec[0], {**spec[1], key: narrow(quant)})
        return out

    # its default maps, with per-channel instead of per-tensor weights
    layer_map = remap(COMPUTE_LAYER_MAP, "weight_quant", Int8WeightPerChannelFloat)
    act_map = remap(QUANT_ACT_MAP, "act_quant")
    identity_map = remap(QUANT_IDENTITY_MAP, "act_quant")

    def prepare(model: nn.Module, example: torch.Tensor, batches: list[torch.Tensor]):
        with quiet():
            qmodel = quantize(preprocess_for_quantize(model), compute_layer_map=layer_map,
                              quant_act_map=act_map, quant_identity_map=identity_map)
            qmodel.eval()
            with torch.no_grad(), calibration_mode(qmodel):
                for images in batches:
                    qmodel(images)
        return qmodel.train()

    def export(qmodel: nn.Module, example: torch.Tensor, path: Path):
        try:
            with quiet():
                export_onnx_qcdq(qmodel, args=example, export_path=str(path))
            return [], None
        except Exception as dynamo_err:
            first = short_reason(dynamo_err, 110)
        try:
            with quiet():
                export_onnx_qcdq(qmodel, args=example, export_path=str(path), dynamo=False)
        except Exception as legacy_err:
            raise StageError("export", f"dynamo exporter: {first}; TorchScript exporter: "
                                       f"{short_reason(legacy_err, 110)}") from legacy_err
        return [f"default (dynamo) QCDQ export fails ({first}); dynamo=False works"], None

    return Tool("brevitas", _label(bits), f"brevitas {brevitas.__version__}", prepare,
                _to_eval, export,
                sub8bit="any bit width (bit_width=...); QCDQ ONNX with Clip below 8 bits")


TOOL_FACTORIES: dict[str, tuple[str | None, Callable[[list[int]], list[Tool]]]] = {
    # name: (package that must be importable, factory of its variants for the peer bit widths)
    "mecqtk": (None, lambda bits: [mecqtk_tool("W8A8", None),
                                   mecqtk_tool("W4A4 1st/last 8", "w4a4_lsq.yaml")]),
    "pt2e": (None, lambda bits: [pt2e_tool(b) for b in bits]),
    "fx": (None, lambda bits: [fx_tool(b) for b in bits]),
    "brevitas": ("brevitas", lambda bits: [brevitas_tool(b) for b in bits]),
}


def load_tools(names: list[str], peer_bits: list[int]) -> tuple[list[Tool], list[Row]]:
    """The tools that import, and a row for each one that does not."""
    tools: list[Tool] = []
    missing: list[Row] = []
    for name in names:
        package, factory = TOOL_FACTORIES[name]
        if package and importlib.util.find_spec(package) is None:
            missing.append(Row(name, "-", "-", status="not installed",
                               error=f"{package} is not installed ({INSTALL_HINT})"))
            continue
        try:
            with quiet():
                tools += factory(peer_bits)
        except Exception as err:  # an unusable peer is a result
            status = "not installed" if isinstance(err, ImportError) else "import failed"
            missing.append(Row(name, "-", "-", status=status,
                               error=f"{short_reason(err, 240)} ({INSTALL_HINT})"))
    return tools, missing


# ---------------------------------------------------------------------------------------------
# models and data


@dataclass
class Subject:
    """A float model and the real images it is benchmarked with."""

    name: str
    model: nn.Module
    side: int
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    origin: str = ""
    fp_top1: float = 0.0


def build_model(name: str, size: int) -> tuple[nn.Module, int, str]:
    """The float model, its input side, and where its weights come from."""
    kwargs, side = COVERAGE_MODELS.get(name, ({}, size))
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    match = re.fullmatch(r"cifar_resnet(\d+)", name)
    if match:
        weights = sorted((shared_dir() / "data" / "weights" / "cifar-resnet").glob(
            f"resnet{match.group(1)}-*.th"))
        if weights:
            load_checkpoint_weights(model, weights[0])
            return model.train(), side, f"checkpoint {weights[0].name}"
    return model.train(), side, "random init"


def _resize(images: torch.Tensor, side: int) -> torch.Tensor:
    if images.shape[-1] == side:
        return images
    return F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)


def pretrain(model: nn.Module, loader, steps: int, side: int) -> None:
    """A short full-precision training from scratch (one-cycle SGD) so that the logits depend
    on the image: a randomly initialised network predicts one class for every input, which
    makes top-1 agreement meaningless."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=steps)
    model.train()
    done, epoch = 0, 0
    while done < steps:
        loader.set_epoch(epoch)
        for images, labels in loader:
            train_step(model, optimizer, _resize(images, side), labels)
            schedule.step()
            done += 1
            if done == steps:
                break
        epoch += 1


def build_subject(name: str, args: argparse.Namespace) -> Subject:
    model, side, origin = build_model(name, args.size)
    fp_steps = 0 if origin.startswith("checkpoint") else args.fp_steps
    data = build_data(f"imagefolder:{shared_dir() / 'data' / 'cifar10-jpeg'}", model=model,
                      batch_size=args.batch,
                      limit_train=min(50_000, max(fp_steps, 1) * args.batch),
                      limit_val=args.test_images, eval_batch_size=args.test_images, seed=0)
    if fp_steps:
        start = time.perf_counter()
        pretrain(model, data.train_loader, fp_steps, side)
        origin += (f", {fp_steps} FP training steps from scratch "
                   f"({time.perf_counter() - start:.0f} s)")
    elif not origin.startswith("checkpoint"):
        trained_looking(model).train()
        origin += ", trained-looking BatchNorm statistics"
    data.train_loader.set_epoch(10_000)  # the benchmark batch: a fresh shuffle
    train_images, train_labels = next(iter(data.train_loader))
    test_images, test_labels = next(iter(data.val_loader))
    subject = Subject(name, model, side, _resize(train_images, side), train_labels,
                      _resize(test_images, side), test_labels, origin=origin)
    subject.fp_top1 = top1(eval_logits(copy.deepcopy(model).eval(), subject.test_images),
                           test_labels)
    return subject


@torch.no_grad()
def eval_logits(model: nn.Module, images: torch.Tensor) -> np.ndarray:
    chunks = [model(images[i:i + EXPORT_BATCH]) for i in range(0, len(images), EXPORT_BATCH)]
    return torch.cat(chunks).float().numpy()


def ort_logits(path: Path, images: torch.Tensor, threads: int) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    chunks = [session.run(None, {name: images[i:i + EXPORT_BATCH].numpy()})[0]
              for i in range(0, len(images), EXPORT_BATCH)]
    return np.concatenate(chunks).astype(np.float32)


def narrow_quantize_nodes(path: Path) -> tuple[int, int]:
    """(QuantizeLinear nodes whose codes are held below 8 bits, all QuantizeLinear nodes): a
    narrower grid needs a Clip on the codes or a 4/2-bit output type; otherwise onnxruntime
    saturates at the full 8-bit range whatever grid the model trained on."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    narrow_types = {getattr(onnx.TensorProto, name) for name in ("INT4", "UINT4", "INT2", "UINT2")
                    if hasattr(onnx.TensorProto, name)}
    initializers = {init.name: init.data_type for init in graph.initializer}
    constants = {n.output[0]: n.attribute[0].t.data_type for n in graph.node
                 if n.op_type == "Constant" and n.attribute and n.attribute[0].HasField("t")}
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    quantize = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    narrowed = 0
    for node in quantize:
        zero_point = node.input[2] if len(node.input) > 2 else ""
        dtype = initializers.get(zero_point, constants.get(zero_point))
        if dtype in narrow_types or "Clip" in consumers.get(node.output[0], []):
            narrowed += 1
    return narrowed, len(quantize)


def top1(logits: np.ndarray, labels: torch.Tensor) -> float:
    return 100.0 * float((logits.argmax(1) == labels.numpy()).mean())


# ---------------------------------------------------------------------------------------------
# one (tool, model) row


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
               labels: torch.Tensor) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    return loss.detach()


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr,
                           momentum=0.9)


def interleaved_step_times(fp: nn.Module, qat: nn.Module, subject: Subject,
                           args: argparse.Namespace) -> tuple[list[float], list[float], bool]:
    """FP and QAT step seconds (alternating steps, after warm-up); whether every QAT loss
    stayed finite."""
    fp_opt, qat_opt = make_optimizer(fp, args.lr), make_optimizer(qat, args.lr)
    fp_times: list[float] = []
    qat_times: list[float] = []
    finite = True
    for step in range(args.warmup + args.steps):
        for model, optimizer, times in ((fp, fp_opt, fp_times), (qat, qat_opt, qat_times)):
            start = time.perf_counter()
            loss = train_step(model, optimizer, subject.train_images, subject.train_labels)
            elapsed = time.perf_counter() - start
            if step >= args.warmup:
                times.append(elapsed)
            if model is qat:
                finite &= bool(torch.isfinite(loss))
    return fp_times, qat_times, finite


def run_row(tool: Tool, subject: Subject, args: argparse.Namespace, folder: Path) -> Row:
    row = Row(tool.name, subject.name, tool.bits, input_size=subject.side,
              fp_top1=subject.fp_top1)
    stage = "prepare"
    try:
        example = subject.test_images[:EXPORT_BATCH]
        calibration = list(subject.train_images.split(EXPORT_BATCH))
        start = time.perf_counter()
        with quiet():
            qmodel = tool.prepare(copy.deepcopy(subject.model), example, calibration)
        row.prepare_s = time.perf_counter() - start
        row.stages[stage] = True

        stage = "train"
        torch.manual_seed(0)
        optimizer = make_optimizer(qmodel, args.lr)
        with quiet():
            loss = train_step(qmodel, optimizer, subject.train_images, subject.train_labels)
        row.loss = float(loss)
        if not math.isfinite(row.loss):
            raise StageError(stage, f"loss is {row.loss} at the first step")
        with quiet():
            fp_times, qat_times, finite = interleaved_step_times(
                copy.deepcopy(subject.model), qmodel, subject, args)
        row.fp_times = [round(t, 4) for t in fp_times]
        row.qat_times = [round(t, 4) for t in qat_times]
        row.fp_step_s, row.qat_step_s = statistics.median(fp_times), statistics.median(qat_times)
        row.step_ratio = row.qat_step_s / row.fp_step_s
        if not finite:
            row.notes.append("loss not finite in a later step")
        row.stages[stage] = True

        stage = "export"
        with quiet():
            tool.to_eval(qmodel)
            fq = eval_logits(qmodel, subject.test_images)
        stem = re.sub(r"\W+", "_", f"{subject.name}_{tool.name}_{tool.bits}")
        path = folder / f"{stem}.onnx"
        start = time.perf_counter()
        with quiet():
            notes, converted = tool.export(qmodel, example, path)
        row.notes += notes
        row.export_s = time.perf_counter() - start
        converted_logits = None
        if converted is not None:
            with quiet():
                converted_logits = eval_logits(converted, subject.test_images)
            row.fq_vs_converted = float(np.abs(converted_logits - fq).max())
        if row.bits != "W8A8":
            narrowed, total = narrow_quantize_nodes(path)
            row.notes.append(f"ONNX: {narrowed} of {total} QuantizeLinear narrowed below 8 bits")
        row.onnx_mb = path.stat().st_size / 1e6
        row.stages[stage] = True

        stage = "ort"
        with quiet():
            ort_out = ort_logits(path, subject.test_images, args.threads)
        row.stages[stage] = True
        if converted_logits is not None:
            row.converted_vs_ort = float(np.abs(converted_logits - ort_out).max())
    except Exception as err:  # a failure is a result
        if args.traceback:
            traceback.print_exception(err, file=sys.__stderr__)
        row.status = "failed"
        row.stages[stage] = False
        row.failed_stage = stage
        row.error = err.reason if isinstance(err, StageError) else short_reason(err)
        return row
    delta = np.abs(fq - ort_out)
    row.max_abs_dlogit = float(delta.max())
    row.mean_abs_dlogit = float(delta.mean())
    row.logit_absmax = float(np.abs(fq).max())
    spread = np.maximum(fq.max(1) - fq.min(1), 1e-12)
    row.max_rel_dlogit = float((delta.max(1) / spread).max())
    row.top1_agree = 100.0 * float((fq.argmax(1) == ort_out.argmax(1)).mean())
    row.fq_top1 = top1(fq, subject.test_labels)
    row.ort_top1 = top1(ort_out, subject.test_labels)
    return row


# ---------------------------------------------------------------------------------------------
# output


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _stage_cell(row: Row, stage: str) -> str:
    if row.status in ("not installed", "import failed"):
        return "-"
    if stage not in row.stages:
        return "·"
    return "ok" if row.stages[stage] else "FAIL"


def cells(row: Row) -> list[str]:
    note = row.error if row.status != "ok" else "; ".join(row.notes)
    if row.status in ("not installed", "import failed"):
        note = f"{row.status}: {row.error}"
    return [
        row.tool, row.model, row.bits,
        *(_stage_cell(row, stage) for stage in STAGES),
        _fmt(row.step_ratio, ".2f", "×"),
        _fmt(row.max_abs_dlogit, ".3g"), _fmt(row.max_rel_dlogit, ".3f"),
        _fmt(row.fq_vs_converted, ".3g"), _fmt(row.converted_vs_ort, ".3g"),
        _fmt(row.top1_agree, ".1f", " %"),
        _fmt(row.fq_top1, ".1f"), _fmt(row.ort_top1, ".1f"), _fmt(row.fp_top1, ".1f"),
        note,
    ]


HEADERS = ["tool", "model", "bits", "prepare", "train", "export", "ORT", "step × FP",
           "max |Δlogit|", "rel. Δ", "FQ vs conv.", "conv. vs ORT", "top-1 agree", "FQ top-1",
           "ORT top-1", "FP top-1", "notes"]


COLUMNS = (
    "Columns: stages ok / FAIL / · (not reached). `step × FP`: median QAT step time over the "
    "median FP step time. `max |Δlogit|`: largest logit difference between the fake-quant "
    "model in eval mode and onnxruntime running the exported file; `rel. Δ`: the largest "
    "per-image max |Δlogit| divided by that image's logit range. `FQ vs conv.` / `conv. vs "
    "ORT`: max |Δlogit| between the tool's own converted PyTorch model and the fake-quant model "
    "/ onnxruntime (tools that convert before exporting). Top-1 columns: "
    "accuracy on the same test images (FP: the float model before QAT).")


def environment(args: argparse.Namespace, tools: list[Tool]) -> dict[str, Any]:
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "timm": timm.__version__, "onnxruntime": ort.__version__}
    tool_versions: dict[str, str] = {}
    for tool in tools:
        tool_versions.setdefault(tool.name, tool.version)
    return {"versions": versions, "tools": tool_versions, "cpu_count": os.cpu_count(),
            "threads": args.threads, "batch": args.batch,
            "size": args.size, "warmup": args.warmup, "steps": args.steps, "lr": args.lr,
            "test_images": args.test_images, "fp_steps": args.fp_steps,
            "machine": platform.machine(), "models": {}}


def describe(env: dict[str, Any]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    tools = ", ".join(f"{k}: {v}" for k, v in env["tools"].items()) or "no tool ran"
    models = "; ".join(f"{name} at {m['input']}x{m['input']} ({m['weights']})"
                       for name, m in env["models"].items())
    return (f"{versions} ({tools}); {env['cpu_count']} CPUs. Models: {models}. Step time: "
            f"median of {env['steps']} interleaved FP/QAT steps after {env['warmup']} warm-up, "
            f"batch {env['batch']}, SGD(lr={env['lr']}, momentum 0.9), {env['threads']} torch "
            f"thread(s). Parity: fake-quant model (eval) vs onnxruntime on {env['test_images']} "
            f"CIFAR-10 test images.")


def markdown(rows: list[Row], env: dict[str, Any], tools: list[Tool]) -> str:
    lines = [describe(env), "", "| " + " | ".join(HEADERS) + " |",
             "|" + "|".join("---" if i < 3 or i == len(HEADERS) - 1 else ":-:" if i < 7
                            else "--:" for i in range(len(HEADERS))) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells(row)) + " |")
    lines += ["", COLUMNS]
    seen = set()
    lines += ["", "Below 8 bits:"]
    for tool in tools:
        if tool.name not in seen:
            seen.add(tool.name)
            lines.append(f"- {tool.name}: {tool.sub8bit}")
    return "\n".join(lines) + "\n"


def print_table(rows: list[Row], env: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="mecqtk vs peers: coverage, step time, ONNX parity", show_lines=False)
    for header in HEADERS:
        table.add_column(header, overflow="fold",
                         max_width=60 if header == "notes" else None)
    for row in rows:
        table.add_row(*cells(row))
    console = Console(width=200)
    console.print(table)
    console.print(describe(env), highlight=False)


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=DEFAULT_MODELS,
                        help=f"comma-separated timm names, or 'zoo' for the 25-model list "
                             f"(default {DEFAULT_MODELS})")
    parser.add_argument("--tools", default=DEFAULT_TOOLS,
                        help=f"comma-separated subset of {DEFAULT_TOOLS}")
    parser.add_argument("--batch", type=int, default=128, help="training batch (default 128)")
    parser.add_argument("--size", type=int, default=32,
                        help="input side for models without a zoo size (default 32)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps (default 5)")
    parser.add_argument("--steps", type=int, default=9, help="timed steps (default 9)")
    parser.add_argument("--lr", type=float, default=1e-3, help="SGD learning rate")
    parser.add_argument("--fp-steps", type=int, default=150,
                        help="full-precision training steps from scratch for models without "
                             "a checkpoint, so their predictions depend on the image "
                             "(0: random weights with trained-looking BatchNorm; default 150)")
    parser.add_argument("--test-images", type=int, default=256,
                        help="CIFAR-10 test images for parity (a multiple of 32; default 256)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch and onnxruntime intra-op threads (default 2; on a machine "
                             "shared with other jobs, 1 gives far steadier step times)")
    parser.add_argument("--peer-bits", default="8,4",
                        help="bit widths for the peers, e.g. 8,4 (below 8: their default QAT "
                             "config on a narrower grid, every layer; default 8,4)")
    parser.add_argument("--eager", action="store_true",
                        help="mecqtk's eager fake-quant kernels instead of the compiled ones")
    parser.add_argument("--json", type=Path, help="write environment and rows as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the table as markdown here")
    parser.add_argument("--keep", type=Path, help="keep the ONNX files in this folder")
    parser.add_argument("--traceback", action="store_true",
                        help="print the full traceback of every failure")
    args = parser.parse_args(argv)
    args.model_names = (list(COVERAGE_MODELS) if args.models == "zoo"
                        else [m.strip() for m in args.models.split(",") if m.strip()])
    try:
        args.bits_list = [int(b) for b in args.peer_bits.split(",")]
    except ValueError:
        parser.error(f"--peer-bits takes integers, got {args.peer_bits!r}")
    if not all(2 <= b <= 8 for b in args.bits_list):
        parser.error("--peer-bits must lie in 2..8")
    args.tool_names = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = sorted(set(args.tool_names) - set(TOOL_FACTORIES))
    if unknown:
        parser.error(f"unknown tool(s) {', '.join(unknown)}; choose from {DEFAULT_TOOLS}")
    if args.test_images % EXPORT_BATCH or args.test_images <= 0:
        parser.error(f"--test-images must be a positive multiple of {EXPORT_BATCH}")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("torch").setLevel(logging.ERROR)
    use_compiled_kernels(not args.eager)
    tools, rows = load_tools(args.tool_names, args.bits_list)
    if not tools:
        args.model_names = []
    env = environment(args, tools)
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.keep or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        for name in args.model_names:
            try:
                with quiet():
                    subject = build_subject(name, args)
            except Exception as err:
                for tool in tools:
                    rows.append(Row(tool.name, name, tool.bits, status="skipped",
                                    error=f"model: {short_reason(err)}"))
                continue
            env["models"][name] = {"weights": subject.origin, "input": subject.side,
                                   "fp_top1": subject.fp_top1}
            print(f"{name}: {subject.origin}; FP top-1 {subject.fp_top1:.1f} % on "
                  f"{args.test_images} test images", file=sys.stderr, flush=True)
            for tool in tools:
                start = time.perf_counter()
                row = run_row(tool, subject, args, folder)
                rows.append(row)
                print(f"{tool.name:9s} {tool.bits} {name:24s} {row.status:7s} "
                      f"{time.perf_counter() - start:6.1f} s  {row.error}",
                      file=sys.stderr, flush=True)
    env["wall_s"] = round(time.perf_counter() - wall, 1)
    tool_order = {name: i for i, name in enumerate(args.tool_names)}
    model_order = {name: i for i, name in enumerate(args.model_names)}
    rows.sort(key=lambda r: (model_order.get(r.model, len(model_order)),
                             tool_order.get(r.tool, len(tool_order))))
    print_table(rows, env)
    print(f"wall time {env['wall_s']:.0f} s", file=sys.stderr)
    if args.markdown:
        args.markdown.write_text(markdown(rows, env, tools))
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "rows": [asdict(r) for r in rows]},
                                        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
