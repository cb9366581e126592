"""`mecqtk export` and `mecqtk verify` through click's CliRunner."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
from click.testing import CliRunner

from mecqtk.cli import main
from mecqtk.export.manifest import MANIFEST_NAME, read_manifest, sha256_of
from mecqtk.quant.quantizers import FakeQuantizer
from mecqtk.rundir import load_quantized_model


def _invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def _activation_quantizers(run) -> int:
    gm, _, _ = load_quantized_model(run)
    modules = dict(gm.named_modules())
    return sum(1 for n in gm.graph.nodes
               if n.op == "call_module" and isinstance(modules[n.target], FakeQuantizer))


def test_export_writes_model_and_manifest(w2a2_run):
    result = _invoke("export", w2a2_run)
    assert result.exit_code == 0, result.output
    model_path = w2a2_run / "onnx-qcdq" / "model.onnx"
    manifest = read_manifest(model_path.parent / MANIFEST_NAME)
    assert manifest.model_sha256 == sha256_of(model_path)
    assert manifest.source["model"] == "cifar_resnet20" and manifest.export_format == "qcdq"
    assert manifest.input["shape"] == ["N", 3, 32, 32]
    onnx.checker.check_model(onnx.load(str(model_path)), full_check=True)
    # 19 convs + 1 linear, and one activation entry per activation quantizer of the model
    assert sum(e.role == "weight" for e in manifest.tensors) == 20
    assert sum(e.role == "activation" for e in manifest.tensors) == _activation_quantizers(w2a2_run)


def test_packed_two_bit_file_is_much_smaller(w2a2_run, tmp_path):
    sizes = {}
    for export_format in ("qcdq", "packed"):
        out = tmp_path / f"{export_format}.onnx"
        result = _invoke("export", w2a2_run, "--format", export_format, "-o", out, "--json")
        assert result.exit_code == 0, result.output
        line = json.loads(result.output.strip().splitlines()[-1])
        assert line["model_path"] == str(out) and line["export_format"] == export_format
        sizes[export_format] = out.stat().st_size
    # 2-bit weights in INT2 take a quarter of their int8 bytes (first/last layers stay 8-bit):
    # the packed file is smaller by three quarters of the qcdq file's 2-bit weight bytes
    qcdq = onnx.load(str(tmp_path / "qcdq.onnx"))
    manifest = read_manifest(tmp_path / MANIFEST_NAME)  # the packed file's, written last
    two_bit = {e.layer for e in manifest.tensors if e.role == "weight" and e.bits == 2}
    int8_bytes = sum(len(t.raw_data) for t in qcdq.graph.initializer
                     if t.name.removesuffix(".weight_codes") in two_bit)
    assert int8_bytes > 0.8 * sizes["qcdq"] / 2
    assert sizes["qcdq"] - sizes["packed"] >= 0.7 * int8_bytes  # less the Cast/Mul nodes
    assert sizes["packed"] < 0.45 * sizes["qcdq"]


def test_export_run_without_checkpoint_is_a_clear_error(w8a8_run, tmp_path):
    broken = tmp_path / "no_checkpoint"
    shutil.copytree(w8a8_run, broken)
    (broken / "checkpoint.pt").unlink()
    result = _invoke("export", broken)
    assert result.exit_code == 2
    assert "error:" in result.output and "checkpoint.pt" in result.output
    assert "Traceback" not in result.output


def test_export_refuses_bad_options(w2a2_run, tmp_path):
    result = _invoke("export", w2a2_run, "--format", "packed", "--opset", "21")
    assert result.exit_code == 2 and "opset 25" in result.output
    result = _invoke("export", w2a2_run, "-o", tmp_path / "model.txt")
    assert result.exit_code == 2 and "must end in .onnx" in result.output
    result = _invoke("export", tmp_path / "nowhere")
    assert result.exit_code == 2 and "no such run folder" in result.output


def test_verify_rejects_a_file_that_is_not_onnx(tmp_path):
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    result = _invoke("verify", fake, "--data", "imagefolder:unused")
    assert result.exit_code == 2
    assert "not an ONNX model" in result.output and "Traceback" not in result.output
    result = _invoke("verify", tmp_path / "missing.onnx", "--data", "imagefolder:unused")
    assert result.exit_code == 2 and "no such ONNX file" in result.output


@pytest.fixture
def cifar_data(shared_dir) -> str:
    return f"imagefolder:{shared_dir / 'data' / 'cifar10-jpeg'}"


def test_verify_run_folder_on_real_images(w8a8_run, cifar_data):
    result = _invoke("verify", w8a8_run, "--data", cifar_data, "--n", 60, "--threads", 1)
    assert result.exit_code == 0, result.output
    report = json.loads((w8a8_run / "onnx-qcdq" / "verify.json").read_text())
    assert report["n"] == 60
    assert report["top1_agreement_pct"] == 100.0
    assert report["onnx_top1_pct"] == report["torch_top1_pct"]
    assert 0 <= report["max_rel_logit_diff"] < 0.05
    assert report["diagnostic_matches_deployed"] is True
    assert len(report["layers"]) == _activation_quantizers(w8a8_run)
    assert "top-1 agreement 100.00 %" in result.output


def test_verify_fails_below_threshold(w8a8_run, cifar_data, tmp_path):
    """A corrupted export (one layer's weight codes negated) must fail verification."""
    assert _invoke("export", w8a8_run, "-o", tmp_path / "model.onnx").exit_code == 0
    model = onnx.load(str(tmp_path / "model.onnx"))
    weight = next(t for t in model.graph.initializer if t.name == "conv1.weight_codes")
    codes = -onnx.numpy_helper.to_array(weight).astype("int16")
    weight.CopyFrom(onnx.numpy_helper.from_array(codes.clip(-128, 127).astype("int8"),
                                                 weight.name))
    onnx.save(model, str(tmp_path / "model.onnx"))
    manifest = read_manifest(tmp_path / MANIFEST_NAME)
    stale = _invoke("verify", tmp_path / "model.onnx", "--data", cifar_data, "--n", 20)
    assert stale.exit_code == 2 and "describes another file" in stale.output
    manifest.model_sha256 = sha256_of(tmp_path / "model.onnx")
    manifest.write(tmp_path / MANIFEST_NAME)
    result = _invoke("verify", tmp_path / "model.onnx", "--run", w8a8_run, "--data", cifar_data,
                     "--n", 40, "--threads", 1)
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output and "first diverging layer: aq_act1" in result.output
    report = json.loads((tmp_path / "verify.json").read_text())
    assert report["passed"] is False and report["first_diverging_layer"] == "aq_act1"


def test_export_checks_the_file_on_real_images_when_given_data(w2a2_run, cifar_data, tmp_path):
    out = tmp_path / "model.onnx"
    result = _invoke("export", w2a2_run, "-o", out, "--data", cifar_data)
    assert result.exit_code == 0, result.output
    check = read_manifest(tmp_path / MANIFEST_NAME).self_check
    assert check["probe"] == "images" and check["n"] == 16
    assert check["top1_agreement_pct"] >= 75.0 and check["max_rel_logit_diff"] < 0.5
