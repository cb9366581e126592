"""`mecqtk quantize`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from mecqtk.cli.render import render_summary
from mecqtk.errors import IncompleteRunError

if TYPE_CHECKING:
    from mecqtk.outcome import RunSummary


def without_nproc(argv: list[str]) -> list[str]:
    """The command line minus its ``--nproc N`` (torchrun starts the processes instead)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


@click.command("quantize")
@click.option("--model", required=True, help="timm model name, e.g. resnet18 or cifar_resnet20.")
@click.option("--recipe", required=True,
              help="Recipe YAML path, or the name of a bundled recipe (w4a4_lsq.yaml).")
@click.option("--data", required=True,
              help="imagefolder:PATH (train/ and val/ or test/) or cifar10:PATH.")
@click.option("--checkpoint", type=click.Path(dir_okay=False),
              help="Full-precision weights to start from (state_dict or {'state_dict': ...}).")
@click.option("--pretrained", is_flag=True, help="Start from timm's pretrained weights (online).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run folder [default: runs/<model>_<recipe>].")
@click.option("--epochs", type=click.IntRange(min=0), help="Override the recipe's train.epochs.")
@click.option("--batch-size", type=click.IntRange(min=1),
              help="Override the recipe's train.batch_size (e.g. when a large input size does "
                   "not fit in memory at the recipe's batch).")
@click.option("--limit-train", type=click.IntRange(min=1), help="Class-balanced training subset.")
@click.option("--limit-val", type=click.IntRange(min=1), help="Class-balanced evaluation subset.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="Where to train; auto: cuda when a GPU is available.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Data-loading worker processes.")
@click.option("--force", is_flag=True, help="Replace a run already in --out.")
@click.option("--resume", is_flag=True,
              help="Continue the interrupted run in --out from its last checkpoint.")
@click.option("--nproc", type=click.IntRange(min=1), default=None,
              help="Train on N processes (DistributedDataParallel through torchrun).")
@click.option("--no-progress", is_flag=True, help="No progress bars (logs stay line by line).")
@click.option("--no-report", is_flag=True, help="Skip the per-layer report at the end.")
@click.option("--no-export", is_flag=True,
              help="Skip the integer ONNX export and its onnxruntime check at the end.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON line.")
def quantize_command(model, recipe, data, checkpoint, pretrained, out, epochs, batch_size,
                     limit_train, limit_val, device, workers, force, resume, nproc, no_progress,
                     no_report, no_export, as_json) -> None:
    """Quantize MODEL as RECIPE says, train it on DATA, and write a run folder.

    Ends by exporting integer ONNX and checking it with onnxruntime. Exits with status 1 when
    that file agrees with the trained model on under 99 % of top-1 decisions, or the export or
    report fails; summary.json and the checkpoint are written either way.

    \b
    Example:
      mecqtk quantize --model cifar_resnet20 \\
          --checkpoint ../shared/data/weights/cifar-resnet/resnet20-12fca82f.th \\
          --recipe w4a4_lsq.yaml --data imagefolder:../shared/data/cifar10-jpeg \\
          --epochs 1 --out runs/r20_w4a4
    """
    from mecqtk.run import QuantizeOptions, quantize
    from mecqtk.train.distributed import launched_by_torchrun, torchrun_command

    if nproc is not None and nproc > 1 and not launched_by_torchrun():
        sys.exit(subprocess.call(torchrun_command(nproc, without_nproc(sys.argv[1:]))))
    if out is None:
        out = Path("runs") / f"{model}_{Path(recipe).stem}"
    options = QuantizeOptions(
        model=model, recipe=recipe, data=data, out=out, checkpoint=checkpoint,
        pretrained=pretrained, epochs=epochs, batch_size=batch_size, limit_train=limit_train,
        limit_val=limit_val,
        device=device, force=force, resume=resume, workers=workers,
        show_progress=not no_progress, report=not no_report, export=not no_export,
    )
    try:
        summary = quantize(options)
    except IncompleteRunError as err:
        # the run trained and its folder is complete: show it, then fail with err's one line
        if err.summary is not None:
            _render(err.summary, as_json)
        raise
    _render(summary, as_json)


def _render(summary: RunSummary, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(summary.as_json()))
    else:
        render_summary(summary)
