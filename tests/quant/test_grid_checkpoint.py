"""A checkpoint remembers each quantizer's integer grid and is refused on another one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mecqtk
from mecqtk.recipe import recipe_from_dict


def _model() -> torch.fx.GraphModule:
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1))
    return mecqtk.prepare(net, recipe_from_dict({
        "name": "w4a4", "quant": {"weight": {"bits": 4}, "activation": {"bits": 4}}}))


def test_state_dict_round_trips_with_the_grids():
    source, target = _model(), _model()
    grids = {k: v for k, v in source.state_dict().items() if k.endswith(".grid")}
    assert sorted(tuple(v.tolist()) for v in grids.values()).count((0.0, 255.0)) == 1
    # (first and last layers at 8 bits: the post-ReLU input of the last is unsigned)
    target.load_state_dict(source.state_dict())


def test_a_checkpoint_trained_on_another_grid_is_refused():
    # an older mecqtk did not prove timm's BatchNormAct2d(ReLU) non-negative: its checkpoints
    # hold signed steps for what is now an unsigned grid
    state = _model().state_dict()
    unsigned = next(k for k, v in state.items() if k.endswith(".grid") and v[0] == 0)
    state[unsigned] = torch.tensor([-128.0, 127.0])
    with pytest.raises(RuntimeError, match=r"aq__1 was trained on the integer grid "
                                           r"\[-128, 127\]; this model builds \[0, 255\]"):
        _model().load_state_dict(state)
