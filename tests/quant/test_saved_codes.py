"""Quantizer outputs saved for backward as integer codes: the same gradients, less memory."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import mecqtk.quant.saved_codes as saved_codes
from mecqtk import calibrate, load_recipe, prepare


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                         nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def _gradients(model: nn.Module, x: torch.Tensor, codes: bool) -> list[torch.Tensor]:
    # a copy: a training forward moves the tracked 8-bit steps and the BatchNorm statistics
    model = copy.deepcopy(model)
    if codes:
        with saved_codes.codes_for_backward():
            loss = model(x).logsumexp(1).mean()
    else:
        loss = model(x).logsumexp(1).mean()
    loss.backward()
    return [p.grad for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("recipe", ["w4a4_lsq", "w2a2_lsq"])
def test_codes_for_backward_gives_the_same_gradients_from_int8_codes(recipe, monkeypatch):
    torch.manual_seed(0)
    model = prepare(_net(), load_recipe(recipe))
    x = torch.randn(4, 3, 12, 12)
    calibrate(model, [x])
    model.train()
    packed: list[torch.Tensor] = []
    original = saved_codes._pack

    def recording(tensor: torch.Tensor) -> object:
        result = original(tensor)
        if not isinstance(result, torch.Tensor):
            packed.append(result[0])
        return result

    plain = _gradients(model, x, codes=False)
    assert not packed and saved_codes._grids is None
    monkeypatch.setattr(saved_codes, "_pack", recording)
    coded = _gradients(model, x, codes=True)
    assert saved_codes._grids is None  # the block restores the inactive state
    assert len(plain) == len(coded) > 0
    for a, b in zip(plain, coded, strict=True):
        assert torch.equal(a, b)  # bit for bit
    # the second conv's and the Linear's quantized inputs were kept as codes: the conv's 4-bit
    # or 2-bit activations in int8, the last layer's 8-bit unsigned input in uint8. The weights
    # were not (their float32 tensor is kept: as codes they would save little and cost a
    # decoding pass per step), nor the image, whose 8-bit quantizer has no learned step.
    dtypes = {t.dim(): t.dtype for t in packed}
    assert len(packed) == 2 and dtypes == {4: torch.int8, 2: torch.uint8}
    assert all(t.shape[0] == 4 for t in packed)


def test_zero_point_grids_are_saved_in_one_byte_and_give_the_same_gradients(monkeypatch):
    """LSQ+ activations (a learned zero point) keep their grid integers q, not q - z (which a
    learned zero point moves anywhere in [-255, 255] on an 8-bit grid): uint8 on unsigned grids,
    decoded with the zero point by the forward's own subtraction."""
    torch.manual_seed(0)
    recipe = load_recipe("w4a4_lsq")
    activation = dataclasses.replace(recipe.quant.activation, quantizer="lsq_plus",
                                     signed="unsigned")
    recipe = dataclasses.replace(recipe, quant=dataclasses.replace(recipe.quant,
                                                                   activation=activation))
    model = prepare(_net(), recipe)
    x = torch.randn(4, 3, 12, 12)
    calibrate(model, [x])
    model.train()
    with torch.no_grad():  # zero points inside the grid, not at its edge
        for name, p in model.named_parameters():
            if name.endswith("offset"):
                p.fill_(5.0)
    packed: list[torch.Tensor] = []
    original = saved_codes._pack

    def recording(tensor: torch.Tensor) -> object:
        result = original(tensor)
        if not isinstance(result, torch.Tensor):
            packed.append(result)
        return result

    plain = _gradients(model, x, codes=False)
    monkeypatch.setattr(saved_codes, "_pack", recording)
    coded = _gradients(model, x, codes=True)
    assert len(plain) == len(coded) > 0
    for a, b in zip(plain, coded, strict=True):
        assert torch.equal(a, b)
    # the conv's 4-bit input on [0, 15] and the Linear's 8-bit one on [0, 255]
    dtypes = {grid.dim(): grid.dtype for grid, *_ in packed}
    assert len(packed) == 2 and dtypes == {4: torch.int8, 2: torch.uint8}
    assert all(zero_point is not None for _, _, zero_point, *_ in packed)
    grid, _, zero_point, *_ = next(p for p in packed if p[0].dim() == 4)
    assert float(zero_point.max()) == 5.0 and int(grid.min()) >= 0 and int(grid.max()) <= 15
