"""Normalisations compute in float64 in eval mode (the file's LayerNormalization(double)) and in
float32 in training, without moving their parameters."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from export_nets import recipe
from torch import nn

from mecqtk.export.float64_norms import NormInFloat64
from mecqtk.qat import prepare
from mecqtk.quant.calibrate import calibrate


class _Normed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.group = nn.GroupNorm(2, 8)
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.weight = nn.Parameter(torch.rand(16) + 0.5)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.group(self.conv(x)).flatten(2).transpose(1, 2)
        x = self.norm(self.fc1(x))
        x = F.layer_norm(x, (16,), self.weight, None, 1e-6)
        return self.fc2(x).mean(1)


def test_norms_run_in_float64_in_eval_and_float32_in_training(one_torch_thread):
    torch.manual_seed(0)
    model = _Normed()
    gm = prepare(model, recipe(4, 4))
    wrapped = [m for m in gm.modules() if isinstance(m, NormInFloat64)]
    assert len(wrapped) == 3  # the GroupNorm, the LayerNorm module and the F.layer_norm call
    # the norms' parameters stay where the model registered them: same state dict keys
    assert {k for k in gm.state_dict() if k.startswith(("group.", "norm.", "weight"))} == {
        "group.weight", "group.bias", "norm.weight", "norm.bias", "weight"}
    x = torch.randn(64, 8, 16) * 3 + 1
    layer_norm = wrapped[1]
    assert layer_norm.norm is gm.get_submodule("norm")
    layer_norm.train()
    assert torch.equal(layer_norm(x), gm.get_submodule("norm")(x))
    layer_norm.eval()
    wide = F.layer_norm(x.double(), (16,), layer_norm.norm.weight.double(),
                        layer_norm.norm.bias.double()).float()
    out = layer_norm(x)
    assert out.dtype == torch.float32 and torch.equal(out, wide)
    assert not torch.equal(out, gm.get_submodule("norm")(x))  # float32 rounds differently
    calibrate(gm, [torch.randn(4, 3, 8, 8)])
    gm.eval()
    assert gm(torch.randn(2, 3, 8, 8)).dtype == torch.float32
