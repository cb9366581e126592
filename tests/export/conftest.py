"""Fixtures of the export tests; the models themselves live in export_nets.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from export_nets import PlainNet, ResidualNet, randomize_batchnorms, write_run
from torch import nn


@pytest.fixture
def residual_net() -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorms(ResidualNet())


@pytest.fixture
def plain_net() -> nn.Module:
    torch.manual_seed(0)
    return PlainNet()


@pytest.fixture(scope="module")
def w8a8_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_run(tmp_path_factory.mktemp("runs") / "r20_w8a8", "cifar_resnet20", (8, 8))


@pytest.fixture(scope="module")
def w2a2_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_run(tmp_path_factory.mktemp("runs") / "r20_w2a2", "cifar_resnet20", (2, 2))
