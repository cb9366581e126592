"""Per-layer quantization error audit of a run: terminal table, report.json and report.html.

Example:
    >>> from mecqtk.report import ReportOptions, write_report
    >>> options = ReportOptions(sensitivity=True)
    >>> written = write_report("runs/r20_w2a2", options=options)  # doctest: +SKIP
"""

from mecqtk.report.build import (
    REPORT_HTML,
    REPORT_JSON,
    ReportOptions,
    WrittenReport,
    build_report,
    write_report,
)
from mecqtk.report.jsonfile import SUGGESTED_RECIPE_FILE, read_report_json, report_to_json
from mecqtk.report.result import Report

__all__ = [
    "REPORT_HTML",
    "REPORT_JSON",
    "SUGGESTED_RECIPE_FILE",
    "Report",
    "ReportOptions",
    "WrittenReport",
    "build_report",
    "read_report_json",
    "report_to_json",
    "write_report",
]
