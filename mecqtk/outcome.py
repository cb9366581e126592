"""What a quantize run produced (:class:`RunSummary`, summary.json), and its end stages (export +
verify, report), run so that a failure in them never loses the trained run: each returns an
outcome that summary.json records, instead of raising past the code that writes the summary.

A failed stage still fails the command: :class:`IncompleteRunError` is raised after every file
of the run folder has been written, with one line naming what failed and how to retry.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn

import mecqtk.report
import mecqtk.run_export
from mecqtk.errors import IncompleteRunError, MecqtkError, one_line
from mecqtk.export.verify import DEFAULT_THRESHOLD_PCT
from mecqtk.io import atomic_write_text
from mecqtk.rundir import STAGE_ERROR_LOG, RunDir

if TYPE_CHECKING:
    import torch

Status = Literal["verified", "written", "failed", "skipped", "pending"]

@dataclass
class StageOutcome:
    """What happened to one end stage; ``as_json`` is its entry in summary.json.

    Attributes:
        status: ``verified`` (export checked by onnxruntime), ``written`` (report),
            ``failed``, ``skipped``, or ``pending`` (still running, or the process died in it).
        reason: One line saying why the stage failed or was skipped (None when it succeeded).
        failing_node: The FX node the failure is attributed to, when one is known.
        retry: The command that redoes this stage on the run folder.
        details: Numbers of a stage that ran (the ONNX path, top-1 agreement, ...).
    """

    status: Status
    reason: str | None = None
    failing_node: str | None = None
    retry: str | None = None
    details: dict[str, Any] | None = None

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    def as_json(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "details" and v is not None}
        return {**data, **(self.details or {})}


@dataclass
class RunSummary:
    """What `mecqtk quantize` reports and summary.json holds: scores, and each end stage's
    outcome."""

    model: str
    recipe: str
    fp_top1: float
    quant_top1: float
    epochs: int
    wall_seconds: float
    out: str
    calibrated_top1: float | None = None
    resumed_from_step: int | None = None
    world_size: int = 1
    history: list[dict[str, Any]] = field(default_factory=list)
    # "export" and "report": what the end stages did (verified / written / failed / skipped)
    stages: dict[str, StageOutcome] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        keys = ("model", "recipe", "fp_top1", "quant_top1", "epochs", "wall_seconds", "out",
                "calibrated_top1", "resumed_from_step", "world_size")
        return {**{k: getattr(self, k) for k in keys},
                **{stage: outcome.as_json() for stage, outcome in self.stages.items()}}


def export_stage(run_dir: Path, data: str, n: int | None, show_progress: bool,
                 say: Callable[[str], None],
                 threshold_pct: float = DEFAULT_THRESHOLD_PCT) -> StageOutcome:
    """Export the run to integer ONNX and verify it on ``n`` images of ``data``; never raises
    (besides KeyboardInterrupt): any error, and an agreement below ``threshold_pct``, is a
    ``failed`` outcome."""
    retry = f"mecqtk export {run_dir} && mecqtk verify {run_dir} --data {data}"
    say("exporting integer ONNX and verifying it with onnxruntime")
    try:
        exported, report = mecqtk.run_export.export_and_verify(
            run_dir, data, n=n, threshold_pct=threshold_pct, show_progress=show_progress)
    except Exception as err:  # any exporter bug must still leave a summary
        log_traceback(run_dir, "export", err)
        return StageOutcome("failed", reason=one_line(err),
                            failing_node=getattr(err, "node", None), retry=retry)
    details = {
        "onnx": str(exported.model_path),
        "top1_agreement_pct": report.top1_agreement_pct,
        "threshold_pct": threshold_pct,
        "onnx_top1_pct": report.onnx_top1_pct,
        "torch_top1_pct": report.torch_top1_pct,
        "max_abs_logit_diff": report.max_abs_logit_diff,
        "images": report.n,
        "deploy_top1_agreement_pct": report.deploy_top1_agreement_pct,
        "model_deploy_top1_agreement_pct": report.model_deploy_top1_agreement_pct,
    }
    say(f"ONNX {exported.model_path}: top-1 agreement {report.top1_agreement_pct:.2f} % "
        f"(needs {threshold_pct:g} %), onnx top-1 {report.onnx_top1_pct:.2f} %, "
        f"max |dlogit| {report.max_abs_logit_diff:.3g}")
    if report.top1_agreement_pct >= threshold_pct:
        return StageOutcome("verified", details=details)
    noise = ("" if report.deploy_top1_agreement_pct is None
             or report.model_deploy_top1_agreement_pct is None else
             f"; it agrees with its deploy form on {report.deploy_top1_agreement_pct:.2f} %, and "
             f"the deploy form (BN folded) with the trained model on "
             f"{report.model_deploy_top1_agreement_pct:.2f} %")
    return StageOutcome(
        "failed",
        reason=(f"the ONNX file agrees with the trained model on {report.top1_agreement_pct:.2f} "
                f"% of top-1 decisions (needs {threshold_pct:g} %){noise}"),
        failing_node=report.first_diverging_layer, retry=retry, details=details,
    )


def report_stage(run_dir: Path, write: Callable[[], None]) -> StageOutcome:
    """Run ``write`` (the per-layer report); any error is a ``failed`` outcome, not a raise."""
    try:
        write()
    except Exception as err:  # the summary must survive a report bug
        log_traceback(run_dir, "report", err)
        return StageOutcome("failed", reason=one_line(err), retry=f"mecqtk report {run_dir}")
    return StageOutcome("written")


def failure_message(run_dir: Path, outcomes: dict[str, StageOutcome]) -> str | None:
    """One line for the first failed stage (None when none failed)."""
    for stage, outcome in outcomes.items():
        if outcome.failed:
            where = f" at node {outcome.failing_node}" if outcome.failing_node else ""
            return (f"{stage} failed{where}: {outcome.reason}; the trained run is kept in "
                    f"{run_dir} (summary.json, checkpoint.pt); retry with `{outcome.retry}`")
    return None


def log_traceback(run_dir: Path, stage: str, err: BaseException) -> None:
    """Keep the full traceback of a failed stage in the run folder (``<stage>-error.log``)."""
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    with contextlib.suppress(OSError):  # a convenience; the summary still records the reason
        atomic_write_text(run_dir / STAGE_ERROR_LOG.format(stage=stage), text)


def end_stages(run_dir: RunDir, summary: RunSummary, *, data: str, limit_val: int | None,
               export: bool, report: bool, report_images: int, device: torch.device,
               show_progress: bool, say: Callable[[str], None]) -> None:
    """Export + verify, then report, recording each outcome in ``summary`` and summary.json in
    an order where a failing stage still leaves the summary and the checkpoint; then raise
    :class:`IncompleteRunError` if one failed."""
    # "pending" stays in summary.json only if the process dies inside that stage
    outcomes: dict[str, StageOutcome] = {
        "export": StageOutcome("pending") if export
        else StageOutcome("skipped", reason="--no-export"),
        "report": StageOutcome("pending") if report
        else StageOutcome("skipped", reason="--no-report"),
    }
    summary.stages = outcomes
    # written before the end stages run: a crash inside them leaves a summary
    run_dir.write_summary(summary.as_json())
    if export:
        outcomes["export"] = export_stage(run_dir.path, data, limit_val, show_progress, say)
        run_dir.write_summary(summary.as_json())
    if report:
        def write() -> None:
            say("writing the per-layer report (report.html, report.json)")
            mecqtk.report.write_report(run_dir.path, options=mecqtk.report.ReportOptions(
                data=data, n=report_images, device=str(device), show_progress=show_progress,
            ))

        outcomes["report"] = report_stage(run_dir.path, write)
        run_dir.write_summary(summary.as_json())
    message = failure_message(run_dir.path, outcomes)
    if message is not None:
        raise IncompleteRunError(message, summary)


def fail_training(err: Exception, run_dir: RunDir, is_main: bool,
                  facts: dict[str, Any]) -> NoReturn:
    """Record a run that stopped in training (NaN loss, a step size gone bad, a bug): its
    traceback, and summary.json with ``facts`` and what failed, beside the last good checkpoint.
    Then raise: ``err`` itself when it is a user error, else an :class:`IncompleteRunError`
    naming the log."""
    if is_main:
        log_traceback(run_dir.path, "train", err)
        run_dir.write_summary({
            **facts, "train": {"status": "failed", "reason": one_line(err)},
            "export": {"status": "skipped", "reason": "training failed"},
            "report": {"status": "skipped", "reason": "training failed"},
        })
    if isinstance(err, MecqtkError):
        raise err
    raise IncompleteRunError(
        f"training failed: {one_line(err)} (traceback in "
        f"{run_dir.path / STAGE_ERROR_LOG.format(stage='train')})") from err
