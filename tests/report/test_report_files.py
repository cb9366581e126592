import base64
import dataclasses
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from mecqtk.errors import MecqtkError
from mecqtk.report import plots, read_report_json, report_to_json
from mecqtk.report.html import WORST_LAYERS_PLOTTED, render_html
from mecqtk.report.jsonfile import dumps

DOCS = Path(__file__).resolve().parents[2] / "docs" / "report.md"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _PageParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.rows, self.links, self.tags = [], 0, [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "tr":
            self.rows += 1
        for key in ("href", "src"):
            if key in attrs and not attrs[key].startswith("data:"):
                self.links.append(attrs[key])


def test_html_parses_and_embeds_every_figure(w2a2_report):
    page = render_html(w2a2_report)
    parser = _PageParser()
    parser.feed(page)
    parser.close()
    # SQNR chart, level usage, the worst layers' histograms, sensitivity and comparison charts
    assert len(parser.images) == 2 + WORST_LAYERS_PLOTTED + 1 + 1
    for source in parser.images:
        assert source.startswith("data:image/png;base64,")
        png = base64.b64decode(source.split(",", 1)[1], validate=True)
        assert png.startswith(PNG_MAGIC) and len(png) > 5000
    assert parser.links == []  # self-contained: nothing to fetch
    assert "script" not in parser.tags
    # ranking table + sensitivity table + comparison table, header row each
    layers = len(w2a2_report.layers)
    assert parser.rows == (layers + 1) + (layers + 1) + (layers + 1)
    for name in w2a2_report.ranking[:WORST_LAYERS_PLOTTED]:
        assert f"{name}: histograms" in page
    assert "float references differ (float_checkpoint here, bypass there)" in page


def _structure(value):
    """Keys (recursively) of a JSON value; lists by their first element."""
    if isinstance(value, dict):
        return {key: _structure(v) for key, v in value.items()}
    if isinstance(value, list):
        return [_structure(value[0])] if value and isinstance(value[0], (dict, list)) else []
    return None


def _documented_layout():
    blocks = re.findall(r"```json\n(.*?)```", DOCS.read_text(), flags=re.S)
    assert blocks, "docs/report.md must hold the JSON layout in a ```json block"
    return json.loads(blocks[0])


def test_json_layout_is_the_documented_one(w2a2_report):
    document = json.loads(dumps(w2a2_report),
                          parse_constant=lambda c: pytest.fail(f"non-JSON number {c}"))
    assert document == report_to_json(w2a2_report)
    assert (document["format"], document["version"]) == ("mecqtk-report", 1)
    documented = _documented_layout()
    assert _structure(document) == _structure(documented)
    # sections absent from a plain report are null, not missing
    assert set(document) == set(documented)


def test_json_values_match_the_report(w2a2_report):
    document = report_to_json(w2a2_report)
    assert document["ranking"] == {"by": "sensitivity", "layers": w2a2_report.ranking}
    assert [layer["name"] for layer in document["layers"]] == [
        entry.name for entry in w2a2_report.layers]
    first = document["layers"][1]
    entry = w2a2_report.layers[1]
    assert first["weight"]["sqnr_db"] == entry.weight.sqnr_db
    assert first["weight"]["levels"]["histogram"] == entry.weight.histogram
    assert sum(first["input"]["levels"]["histogram"]) > 0
    assert len(first["weight"]["levels"]["histogram"]) == first["weight"]["levels"]["total"] == 4
    raised = document["sensitivity"]["suggested_recipe"]["raised"]
    assert {r["name"]: r["bits"] for r in raised} == w2a2_report.sensitivity.raised
    deltas = {d["name"]: d["deltas"] for d in document["comparison"]["layers"]}
    assert deltas["layer1.0.conv1"]["weight_bits"] == 2 - 4


def test_read_report_json_checks_format_and_version(tmp_path, w2a2_report):
    path = tmp_path / "report.json"
    path.write_text(dumps(w2a2_report))
    assert read_report_json(path)["run"]["images"] == w2a2_report.images
    document = json.loads(path.read_text())
    document["version"] = 99
    path.write_text(json.dumps(document))
    with pytest.raises(MecqtkError, match="report version 99 is not 1"):
        read_report_json(path)
    path.write_text("{}")
    with pytest.raises(MecqtkError, match="not a mecqtk report"):
        read_report_json(path)


def test_histograms_of_a_diverged_layer_draw_the_finite_values_and_count_the_rest(w2a2_report):
    # a model whose activations overflowed (seen: mobilenetv2 after a bad step) still gets a page
    name = w2a2_report.ranking[0]
    samples = dataclasses.replace(w2a2_report.samples, inputs=dict(w2a2_report.samples.inputs))
    finite = samples.inputs[name]
    samples.inputs[name] = torch.cat([finite, torch.tensor([float("inf"), -float("inf"),
                                                            float("nan")])])
    report = dataclasses.replace(w2a2_report, samples=samples)
    png = plots.layer_histograms(report, name)
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    assert plots._finite(samples.inputs[name])[1] == 3
    assert plots._dropped_note(3) == "\n3 non-finite values not drawn"
    assert plots._dropped_note(0) == ""
