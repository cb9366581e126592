"""CIFAR ResNets (He et al. 2016, section 4.2) registered in timm's model registry.

The network is a 3x3 stem plus three stages of basic blocks at 16, 32 and 64 channels. Where a
block changes shape, its shortcut has no parameters ("option A"): it keeps every second pixel and
zero-pads the new channels equally on both sides. Module names match the widely shared CIFAR
checkpoints (``conv1``, ``bn1``, ``layer{1,2,3}.{i}.conv{1,2}``, ``layer{1,2,3}.{i}.bn{1,2}``,
``linear``), so their state dicts load without renaming.

Importing this module registers ``cifar_resnet20``, ``cifar_resnet32``, ``cifar_resnet44`` and
``cifar_resnet56``; afterwards ``timm.create_model("cifar_resnet20", num_classes=10)`` builds them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import create_classifier
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

__all__ = ["BasicBlock", "ChannelPadShortcut", "CifarResNet"]

STAGE_WIDTHS = (16, 32, 64)


class ChannelPadShortcut(nn.Module):
    """Parameter-free shortcut: subsample spatially, then zero-pad channels on both sides."""

    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        extra = out_chs - in_chs
        self.stride = stride
        self.pad_front = extra // 2
        self.pad_back = extra - extra // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU()
        if stride != 1 or in_chs != out_chs:
            self.shortcut: nn.Module = ChannelPadShortcut(in_chs, out_chs, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs with timm's classifier interface.

    Args:
        blocks_per_stage: n, the number of basic blocks in each of the three stages.
        num_classes: Classifier outputs; 0 removes the classifier (``linear`` becomes Identity).
        in_chans: Input channels.
        global_pool: timm pooling type (``"avg"``, ``"max"``, ``"avgmax"``, ...).
        drop_rate: Dropout before the classifier.
    """

    def __init__(
        self,
        blocks_per_stage: int,
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = STAGE_WIDTHS[-1]

        self.conv1 = nn.Conv2d(in_chans, STAGE_WIDTHS[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0])
        self.act1 = nn.ReLU()
        in_chs = STAGE_WIDTHS[0]
        self.feature_info = [{"num_chs": in_chs, "reduction": 1, "module": "act1"}]
        for stage_idx, width in enumerate(STAGE_WIDTHS):
            stride = 1 if stage_idx == 0 else 2
            blocks = [BasicBlock(in_chs, width, stride)]
            blocks += [BasicBlock(width, width) for _ in range(blocks_per_stage - 1)]
            self.add_module(f"layer{stage_idx + 1}", nn.Sequential(*blocks))
            in_chs = width
            self.feature_info.append(
                {"num_chs": width, "reduction": 2**stage_idx, "module": f"layer{stage_idx + 1}"}
            )
        self.global_pool, self.linear = create_classifier(
            self.num_features, num_classes, pool_type=global_pool
        )
        self.apply(_init_weights)

    def get_classifier(self) -> nn.Module:
        return self.linear

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (and optionally the pooling) with freshly initialised ones."""
        self.num_classes = num_classes
        pool_type = global_pool if global_pool is not None else self.global_pool.pool_type
        self.global_pool, self.linear = create_classifier(
            self.num_features, num_classes, pool_type=pool_type
        )
        self.linear.apply(_init_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        return self.layer3(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.linear(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(module: nn.Module) -> None:
    # The original CIFAR ResNet code initialises every conv and linear weight with Kaiming normal
    # (fan_in, ReLU gain); biases and BatchNorm keep PyTorch's defaults.
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1",
        "classifier": "linear",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        name: _cfg()
        for name in ("cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56")
    }
)


def _create(variant: str, blocks_per_stage: int, pretrained: bool, **kwargs: Any) -> CifarResNet:
    return build_model_with_cfg(
        CifarResNet,
        variant,
        pretrained,
        blocks_per_stage=blocks_per_stage,
        feature_cfg={"out_indices": tuple(range(1 + len(STAGE_WIDTHS)))},
        **kwargs,
    )


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-20 for CIFAR (3 blocks per stage, 0.27 M parameters)."""
    return _create("cifar_resnet20", 3, pretrained, **kwargs)


@register_model
def cifar_resnet32(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-32 for CIFAR (5 blocks per stage, 0.46 M parameters)."""
    return _create("cifar_resnet32", 5, pretrained, **kwargs)


@register_model
def cifar_resnet44(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-44 for CIFAR (7 blocks per stage, 0.66 M parameters)."""
    return _create("cifar_resnet44", 7, pretrained, **kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-56 for CIFAR (9 blocks per stage, 0.85 M parameters)."""
    return _create("cifar_resnet56", 9, pretrained, **kwargs)
