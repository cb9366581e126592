"""The package's parts import each other in one direction (tools/import_graph.py)."""

from import_graph import build_graph, find_cycle, layers


def test_the_parts_of_mecqtk_form_no_cycle_and_hide_no_import():
    graph = build_graph()
    assert find_cycle(graph.edges) is None
    assert graph.function_level == []
    # the layering the code is written to: primitives below the graph passes, the graph below
    # export, the run stages on top
    order = {part: level for level, parts in enumerate(layers(graph.edges)) for part in parts}
    assert order["quant"] < order["graph"] < order["export"] < order["qat"] < order["run"]
    assert order["recipe"] < order["graph"]
    assert order["train"] < order["run"] and order["report"] < order["run"]


def test_a_cycle_and_a_function_level_import_are_found(tmp_path):
    package = tmp_path / "mecqtk"
    (package / "graph").mkdir(parents=True)
    (package / "export").mkdir()
    (package / "__init__.py").write_text("")
    (package / "graph" / "__init__.py").write_text(
        "def prepare():\n    from mecqtk.export import convert\n")
    (package / "export" / "__init__.py").write_text(
        "from typing import TYPE_CHECKING\nfrom mecqtk.graph import prepare\n"
        "if TYPE_CHECKING:\n    from mecqtk.run import Options\n")
    graph = build_graph(package)
    assert find_cycle(graph.edges) == ["export", "graph", "export"]
    assert graph.function_level == ["mecqtk/graph/__init__.py:2 imports mecqtk.export"]
    assert "run" not in graph.edges["export"]  # annotations only
