import math

import pytest
import torch

from mecqtk.export.deploy_eval import float_layer_outputs
from mecqtk.quant import Mode
from mecqtk.report import ReportOptions, build_report
from mecqtk.report.build import find_checkpoint, load_images
from mecqtk.report.collect import collect
from mecqtk.report.metrics import sqnr_db
from mecqtk.report.sites import find_sites, quantizer_modes
from mecqtk.rundir import load_quantized_model


def test_sites_follow_the_graph_with_their_input_quantizers(w2a2_run):
    qmodel, _, _ = load_quantized_model(w2a2_run)
    sites = find_sites(qmodel)
    assert [s.name for s in sites][:3] == ["conv1", "layer1.0.conv1", "layer1.0.conv2"]
    assert sites[-1].name == "linear" and len(sites) == 20
    assert all(s.input_quantizer is not None and s.input_name.startswith("aq_") for s in sites)
    assert [s.weight_quantizer.bits for s in sites] == [8] + [2] * 18 + [8]


def test_hook_measurements_equal_direct_ones(w2a2_run, data_spec):
    # One batch measured by the hooks must equal the same quantities computed by hand.
    qmodel, _, _ = load_quantized_model(w2a2_run)
    sites = find_sites(qmodel)
    batches = load_images(data_spec, qmodel, 20)
    assert len(batches) == 1
    collected = collect(qmodel, sites, batches)
    site = next(s for s in sites if s.name == "layer2.0.conv2")
    captured = {}
    handle = site.input_quantizer.register_forward_hook(
        lambda m, args, out: captured.update(x=args[0], xq=out))
    layer_handle = site.layer.register_forward_hook(
        lambda m, args, out: captured.update(y=out))
    images = batches[0][0]
    # the report measures each layer's own output (BatchNorm not folded into it)
    with torch.no_grad(), float_layer_outputs(qmodel):
        qmodel(images)
        handle.remove()
        layer_handle.remove()
        own = site.layer.layer(captured["x"])
        with quantizer_modes(qmodel, Mode.BYPASS):
            bypass_capture = {}
            h = site.layer.register_forward_hook(lambda m, a, out: bypass_capture.update(y=out))
            qmodel(images)
            h.remove()
    stats = next(entry for entry in collected.layers if entry.name == "layer2.0.conv2")
    assert stats.input.sqnr_db == pytest.approx(sqnr_db(captured["x"], captured["xq"]), rel=1e-9)
    assert stats.local_sqnr_db == pytest.approx(sqnr_db(own, captured["y"]), rel=1e-9)
    assert stats.output_sqnr_bypass_db == pytest.approx(
        sqnr_db(bypass_capture["y"], captured["y"]), rel=1e-9)
    # no float model given: the bypassed model is the reference
    assert stats.output_sqnr_db == stats.output_sqnr_bypass_db
    assert sum(stats.input.histogram) == captured["x"].numel()


def test_w2a2_report_on_real_images(w2a2_report, report_images):
    report = w2a2_report
    assert report.images == report_images
    assert report.reference.kind == "float_checkpoint"
    by_name = {entry.name: entry for entry in report.layers}
    # the 8-bit first layer adds far less error than any 2-bit layer
    assert by_name["conv1"].local_sqnr_db > 30
    assert by_name["conv1"].weight.sqnr_db > 35
    two_bit = [e for e in report.layers if e.weight.bits == 2]
    assert len(two_bit) == 18
    for entry in two_bit:
        # per-channel 2-bit weights of a trained net: a few dB, far from 8-bit quality
        assert 3 < entry.weight.sqnr_db < 12
        assert entry.weight.levels_total == 4 and entry.weight.levels_used >= 3
        assert 0 < entry.weight.entropy_bits <= 2
        assert 0 <= entry.input.clip_ratio < 0.5
        assert entry.local_sqnr_db < by_name["conv1"].local_sqnr_db
    # no training happened: the bypassed model is the float model up to the bias snapping
    # quantize does for the export (each bias moves by under half an int32 step), so the two
    # references give nearly the same scores and accumulated errors
    assert report.float_score.top1 == pytest.approx(report.bypass_score.top1, abs=1.0)
    assert report.float_score.loss == pytest.approx(report.bypass_score.loss, rel=1e-2)
    for entry in report.layers:
        assert entry.output_sqnr_db == pytest.approx(entry.output_sqnr_bypass_db, abs=0.5)
    # the accumulated error only grows through the first block
    assert by_name["conv1"].output_sqnr_db > by_name["layer1.0.conv2"].output_sqnr_db


def test_run_without_float_checkpoint_uses_the_bypassed_model(w4a4_random_run, data_spec):
    report = build_report(w4a4_random_run, ReportOptions(data=data_spec, n=20,
                                                         show_progress=False))
    assert report.reference.kind == "bypass"
    assert "bypassed" in report.reference.detail
    assert report.float_score == report.bypass_score
    assert [e.weight.bits for e in report.layers] == [8] + [4] * 18 + [8]
    for entry in report.layers:
        assert entry.output_sqnr_db == entry.output_sqnr_bypass_db
    # ranking without sensitivity: by the layer's own error, worst first
    ranked = [report.layer(name).local_sqnr_db for name in report.ranking]
    assert ranked == sorted(ranked, key=lambda v: (math.isnan(v), v))
    assert report.ranking_by == "local_sqnr_db"


def test_a_relative_checkpoint_is_found_from_where_the_run_was_started(tmp_path):
    run = tmp_path / "project" / "runs" / "r1"
    run.mkdir(parents=True)
    weights = tmp_path / "project" / "weights" / "fp.th"
    weights.parent.mkdir()
    weights.write_bytes(b"x")
    assert find_checkpoint("weights/fp.th", run) == weights
    assert find_checkpoint(str(weights), run) == weights
    assert find_checkpoint("weights/missing.th", run) is None
