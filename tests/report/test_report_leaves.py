"""The report measures every quantized layer of a model whose layers sit inside leaf modules:
those of the graphs traced inside leaves and the eager layers that leaf code calls directly."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from mecqtk.graph import graph_modules
from mecqtk.graph.meta import graph_info
from mecqtk.graph.quant_plan import quant_report
from mecqtk.qat import prepare
from mecqtk.quant.calibrate import calibrate
from mecqtk.recipe import load_recipe
from mecqtk.report.build import load_images
from mecqtk.report.collect import collect
from mecqtk.report.sensitivity import suggest_recipe
from mecqtk.report.sites import find_sites


@pytest.fixture(scope="module")
def mobilevit():
    """mobilevit_xxs: its transformer blocks are leaves (nested graphs) and run some of their
    convs from their own eager forward."""
    torch.manual_seed(0)
    model = timm.create_model("mobilevit_xxs", num_classes=10).eval()
    qmodel = prepare(model, load_recipe("w4a4_lsq.yaml")).eval()
    return model, qmodel


def test_sites_cover_nested_graphs_and_eager_layers(mobilevit):
    model, qmodel = mobilevit
    nested = [name for name, _ in graph_modules(qmodel) if name]
    eager = {f"{prefix}.{name}" if prefix else name
             for prefix, gm in graph_modules(qmodel) for name in graph_info(gm).eager_layers}
    assert len(nested) == 18 and len(eager) == 3  # what makes this model the test case
    sites = find_sites(qmodel)
    report = quant_report(model, qmodel)
    assert [s.name for s in sites] == [r.name for r in report.layers if r.quantized]
    assert len(sites) == report.layers_total == 72
    by_name = {s.name: s for s in sites}
    for name in eager:
        assert by_name[name].input_name == f"{name}.input_quantizer"
        assert by_name[name].input_quantizer is qmodel.get_submodule(f"{name}.input_quantizer")
    inside = [s for s in sites if any(s.name.startswith(f"{n}.") for n in nested)]
    assert len(inside) == 45  # with the 3 eager layers: the 48 a top-graph-only walk misses
    for site in inside:  # input quantizers of nested graphs are named from the top model
        assert qmodel.get_submodule(site.input_name) is site.input_quantizer


def test_every_layer_inside_leaves_is_measured(mobilevit, data_spec):
    model, qmodel = mobilevit
    batches = load_images(data_spec, model, 4)
    assert sum(len(labels) for _, labels in batches) == 4
    calibrate(qmodel, (images for images, _ in batches))
    sites = find_sites(qmodel)
    collected = collect(qmodel, sites, batches, float_model=model)
    assert [layer.name for layer in collected.layers] == [s.name for s in sites]
    for layer in collected.layers:
        assert layer.input is not None and layer.input.levels_used > 1, layer.name
        assert math.isfinite(layer.local_sqnr_db) and layer.local_sqnr_db > 5, layer.name
        assert math.isfinite(layer.output_sqnr_db), layer.name


def test_suggested_recipe_raises_layers_inside_leaves(mobilevit):
    model, qmodel = mobilevit
    sites = find_sites(qmodel)
    eager = next(s.name for s in sites if s.input_name.endswith(".input_quantizer"))
    nested = next(s.name for s in sites if ".transformer." in s.name)
    recipe = load_recipe("w4a4_lsq.yaml")
    mixed, raised = suggest_recipe(recipe, sites, [eager, nested], raise_top=2)
    assert raised == {eager: 8, nested: 8}
    bits = {s.name: (s.weight_quantizer.bits, s.input_quantizer.bits)
            for s in find_sites(prepare(model, mixed))}
    assert bits[eager] == bits[nested] == (8, 8)
    assert sum(b == (8, 8) for b in bits.values()) == 2 + sum(
        (s.weight_quantizer.bits, s.input_quantizer.bits) == (8, 8) for s in sites)
