"""The run folder: what `mecqtk quantize` writes, and how later commands read it back."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import yaml

import mecqtk
from mecqtk.errors import MecqtkError, ModelError
from mecqtk.io import atomic_write_json, atomic_write_text
from mecqtk.models import create_model
from mecqtk.qat import prepare
from mecqtk.recipe import Recipe, dump_recipe, recipe_from_dict

RECIPE = "recipe.yaml"
INFO = "run.json"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
# Full tracebacks of failed stages go here, in the run folder, for bug reports.
STAGE_ERROR_LOG = "{stage}-error.log"
# What a finished run holds besides its recipe and info: --force removes these before starting
# again (the run's own files only, never anything else in the folder).
RUN_OUTPUTS = (CHECKPOINT, METRICS, SUMMARY, INFO, RECIPE, "report.json", "report.html",
               "suggested_recipe.yaml",
               *(STAGE_ERROR_LOG.format(stage=s) for s in ("train", "export", "report")))
RUN_OUTPUT_FOLDERS = ("report", "export", "onnx-qcdq", "onnx-packed")


@dataclass
class RunInfo:
    """How the model of a run is rebuilt: everything besides the recipe and the weights."""

    model: str
    num_classes: int
    data: str
    class_names: list[str] = field(default_factory=list)
    input_size: list[int] = field(default_factory=lambda: [3, 32, 32])
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    checkpoint_source: str | None = None
    mecqtk_version: str = ""
    # extra timm constructor arguments the model was built with ({"img_size": 32})
    model_kwargs: dict[str, Any] = field(default_factory=dict)


class RunDir:
    """Paths and readers/writers of one run folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    def holds_a_run(self) -> bool:
        return any((self.path / name).exists() for name in (CHECKPOINT, SUMMARY, METRICS, INFO))

    def write_recipe(self, recipe: Recipe) -> None:
        atomic_write_text(self.path / RECIPE, dump_recipe(recipe))

    def write_info(self, info: RunInfo) -> None:
        atomic_write_json(self.path / INFO, asdict(info))

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.path / SUMMARY, summary)

    def read_recipe(self) -> Recipe:
        return recipe_from_dict(yaml.safe_load((self.path / RECIPE).read_text()))

    def read_info(self) -> RunInfo:
        return RunInfo(**json.loads((self.path / INFO).read_text()))

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line]

    def prepare(self, recipe: Recipe, *, resume: bool, force: bool, is_main: bool) -> None:
        """Check the folder can take this run: ``resume`` needs the interrupted run's recipe,
        a folder holding a run needs ``force`` (whose outputs are removed then, by rank 0)."""
        if resume:
            self.require()
            if (self.path / RECIPE).read_text() != dump_recipe(recipe):
                raise MecqtkError(
                    f"{self.path}: --resume needs the same recipe and --epochs as the interrupted "
                    "run (see its recipe.yaml); use --force to start a new run there"
                )
            return
        if self.holds_a_run() and not force:
            raise MecqtkError(
                f"{self.path} already holds a run; pass --resume to continue it, --force to "
                "replace it, or choose another --out"
            )
        if is_main and force:
            for name in RUN_OUTPUTS:
                (self.path / name).unlink(missing_ok=True)
            for extra in RUN_OUTPUT_FOLDERS:
                shutil.rmtree(self.path / extra, ignore_errors=True)

    def require(self) -> None:
        """Raise a one-line error unless this folder holds a finished or resumable run."""
        if not self.path.is_dir():
            raise MecqtkError(f"{self.path}: no such run folder")
        missing = [n for n in (RECIPE, INFO, CHECKPOINT) if not (self.path / n).is_file()]
        if missing:
            raise MecqtkError(
                f"{self.path}: not a mecqtk run folder (missing {', '.join(missing)}); "
                "give the --out folder of a `mecqtk quantize` run"
            )


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a run checkpoint safely (weights_only) onto the CPU, with a one-line error if broken."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"{path}: checkpoint not found") from None
    except Exception as err:
        reason = type(err).__name__
        raise ModelError(f"{path}: corrupt or truncated checkpoint ({reason})") from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise ModelError(f"{path}: not a mecqtk checkpoint (no state_dict)")
    return state


def load_quantized_model(
    run: str | Path, device: str | torch.device = "cpu"
) -> tuple[fx.GraphModule, RunInfo, Recipe]:
    """Rebuild the trained fake-quantized model of a run folder.

    Example:
        >>> qmodel, info, recipe = load_quantized_model("runs/r20_w4a4")
    """
    run_dir = RunDir(run)
    run_dir.require()
    info = run_dir.read_info()
    recipe = run_dir.read_recipe()
    model = create_model(info.model, num_classes=info.num_classes, **info.model_kwargs)
    qmodel = prepare(model, recipe)
    state = load_checkpoint(run_dir.checkpoint)
    try:
        qmodel.load_state_dict(state["state_dict"])
    except RuntimeError as err:
        # quantizer layouts change between releases (cifar_resnet20's shortcuts after 0.1.0)
        older = (f" (the run was made by mecqtk {info.mecqtk_version}, this is "
                 f"{mecqtk.__version__}: train it again, or export it with that version)"
                 if info.mecqtk_version and info.mecqtk_version != mecqtk.__version__ else "")
        raise ModelError(
            f"{run_dir.checkpoint}: does not fit {info.model} with this recipe{older}: "
            f"{str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err}"
        ) from None
    return qmodel.to(device).eval(), info, recipe
