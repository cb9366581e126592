"""Small quantized models and run folders for the export tests (built in well under a second)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from mecqtk.io import atomic_torch_save
from mecqtk.qat import prepare
from mecqtk.quant.calibrate import calibrate
from mecqtk.recipe import recipe_from_dict
from mecqtk.rundir import RunDir, RunInfo

INPUT_SHAPE = (3, 16, 16)


class PlainNet(nn.Module):
    """Convs without bias or BatchNorm: every integer accumulation is exact on both sides."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.conv3 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(16, 10, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))


class ResidualNet(nn.Module):
    """Conv-BN-ReLU, a residual Add, an option-A shortcut (slice + channel pad), a Concat, max
    pooling, ``view(x.size(0), -1)`` and a Linear with bias: the ops CNN exports need."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=True)
        self.bn3 = nn.BatchNorm2d(16)
        self.branch = nn.Conv2d(16, 8, 1, bias=True)
        self.pool = nn.MaxPool2d(2)
        self.head_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn2(self.conv2(x)))
        shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))
        x = F.relu(self.bn3(self.conv3(x)) + shortcut)
        x = torch.cat([x, F.relu(self.branch(x))], dim=1)
        x = self.head_pool(self.pool(x))
        return self.fc(x.view(x.size(0), -1))


def randomize_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-looking BatchNorm statistics, with some negative and one zero gamma per layer."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                c = bn.num_features
                bn.weight.copy_(torch.randn(c, generator=generator) * 0.6 + 0.6)
                bn.weight[0] = 0.0
                bn.bias.copy_(torch.randn(c, generator=generator) * 0.3)
                bn.running_mean.copy_(torch.randn(c, generator=generator) * 0.3)
                bn.running_var.copy_(torch.rand(c, generator=generator) + 0.3)
            if isinstance(bn, nn.Conv2d | nn.Linear) and bn.bias is not None:
                bn.bias.copy_(torch.randn(bn.bias.shape, generator=generator) * 0.2)
    return model


def recipe(weight_bits: int, activation_bits: int, first_last_bits: int | None = 8):
    rules = []
    if first_last_bits is not None:
        rules = [{"match": {"position": p}, "weight": {"bits": first_last_bits},
                  "activation": {"bits": first_last_bits}} for p in ("first", "last")]
    return recipe_from_dict({
        "name": f"w{weight_bits}a{activation_bits}",
        "quant": {
            "weight": {"bits": weight_bits, "granularity": "per_channel"},
            "activation": {"bits": activation_bits},
            "rules": rules,
        },
    })


def quantized(model: nn.Module, weight_bits: int, activation_bits: int, seed: int = 0,
              first_last_bits: int | None = 8) -> fx.GraphModule:
    """``model`` prepared, calibrated on random images and put in eval mode."""
    torch.manual_seed(seed)
    gm = prepare(model, recipe(weight_bits, activation_bits, first_last_bits))
    calibrate(gm, [torch.randn(16, *INPUT_SHAPE)])
    return gm.eval()


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, *INPUT_SHAPE, generator=torch.Generator().manual_seed(seed))


def write_run(folder: Path, model_name: str, recipe_dict_bits: tuple[int, int],
              input_size: tuple[int, int, int] = (3, 32, 32)) -> Path:
    """A run folder as `mecqtk quantize` leaves it (calibrated on random data, not trained)."""
    from mecqtk.export import snap_biases
    from mecqtk.models import create_model

    torch.manual_seed(0)
    model = randomize_batchnorms(create_model(model_name, num_classes=10))
    rec = recipe(*recipe_dict_bits)
    gm = prepare(model, rec)
    calibrate(gm, [torch.randn(8, *input_size)])
    snap_biases(gm.eval())  # as `mecqtk quantize` ends
    run = RunDir(folder)
    folder.mkdir(parents=True, exist_ok=True)
    run.write_recipe(rec)
    run.write_info(RunInfo(model=model_name, num_classes=10, data="imagefolder:unused",
                           class_names=[str(i) for i in range(10)],
                           input_size=list(input_size),
                           mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]))
    atomic_torch_save(run.checkpoint, {"format": 1, "state_dict": gm.state_dict()})
    return folder
