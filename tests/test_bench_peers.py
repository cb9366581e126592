"""tools/bench_peers.py: mecqtk's own rows complete every stage; a missing peer is a row."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_peers.py"


def _load_tool():
    if "bench_peers" not in sys.modules:  # dataclasses look their module up while defined
        spec = importlib.util.spec_from_file_location("bench_peers", TOOL)
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_peers"] = module
        spec.loader.exec_module(module)
    return sys.modules["bench_peers"]


def test_mecqtk_rows_complete_and_missing_peer_is_reported(shared_dir, one_torch_thread,
                                                           monkeypatch, tmp_path):
    monkeypatch.setenv("MECQTK_SHARED", str(shared_dir))
    monkeypatch.setitem(sys.modules, "brevitas", None)  # as if not installed
    bench = _load_tool()
    out = tmp_path / "peers.json"
    assert bench.main(["--models", "cifar_resnet20", "--tools", "mecqtk,brevitas",
                       "--warmup", "0", "--steps", "1", "--test-images", "32",
                       "--threads", "1", "--eager", "--json", str(out)]) == 0
    rows = {(r["tool"], r["bits"]): r for r in json.loads(out.read_text())["rows"]}
    for bits in ("W8A8", "W4A4 1st/last 8"):
        row = rows[("mecqtk", bits)]
        assert row["status"] == "ok", row["error"]
        assert row["stages"] == dict.fromkeys(("prepare", "train", "export", "ort"), True)
        assert row["step_ratio"] > 0
        assert row["top1_agree"] >= 90.0
    w8 = rows[("mecqtk", "W8A8")]
    assert w8["max_abs_dlogit"] < 0.5 * w8["logit_absmax"]
    assert rows[("brevitas", "-")]["status"] == "not installed"
    assert "pip install" in rows[("brevitas", "-")]["error"]


def test_short_reason_names_the_cause():
    bench = _load_tool()
    err = RuntimeError("Failed to export.\n## Exception summary\n\n<class 'x.AttributeError'>: no")
    assert bench.short_reason(err) == "RuntimeError: AttributeError: no"
    with pytest.raises(SystemExit):
        bench.parse_args(["--tools", "nonsense"])
