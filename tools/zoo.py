"""The timm models mecqtk's graph rewriting is tested on, with small inputs they accept.

Used by the coverage and export tests (tests/graph/test_coverage.py, tests/export/) and by the
coverage and benchmark tools here; not part of the library, which names no model. Tools import it
as ``zoo`` (a script's own folder is on its path), tests too (tests/conftest.py puts tools/ on
the path). A small input keeps a forward and backward pass on a CPU to seconds; models whose size
is fixed at construction get it as ``img_size``.
"""

from __future__ import annotations

from typing import Any

import timm
from torch import nn

# The 25 architectures of issue 3, and (create_model keyword arguments, square input side).
COVERAGE_MODELS: dict[str, tuple[dict[str, Any], int]] = {
    "resnet18": ({}, 32),
    "resnet50": ({}, 32),
    "resnet18d": ({}, 32),
    "mobilenetv2_100": ({}, 32),
    "mobilenetv3_small_100": ({}, 32),
    "efficientnet_b0": ({}, 32),
    "regnetx_002": ({}, 32),
    "convnext_atto": ({}, 32),
    "vit_tiny_patch16_224": ({"img_size": 32}, 32),
    "deit_tiny_patch16_224": ({"img_size": 32}, 32),
    "swin_tiny_patch4_window7_224": ({"img_size": 32}, 32),
    "mixer_s16_224": ({"img_size": 32}, 32),
    "ghostnet_100": ({}, 32),
    "densenet121": ({}, 32),
    "dla34": ({}, 32),
    "res2net50_26w_4s": ({}, 32),
    "levit_128s": ({"img_size": 32}, 32),
    "mobilevit_xxs": ({}, 32),
    "efficientformer_l1": ({}, 224),  # attention biases fixed to a 7x7 final grid
    "repvgg_a0": ({}, 32),
    "tf_efficientnet_b0": ({}, 32),
    "hrnet_w18_small": ({}, 32),
    "inception_v3": ({}, 96),  # its stem and reductions need at least 75 pixels
    "cspresnet50": ({}, 32),
    "rexnet_100": ({}, 32),
}


# Architectures held out of development: none of the 25 above, no special cases in the code.
# The "further timm architectures" checks of tools/export_coverage.py and tools/train_coverage.py
# (``--models further``) run them as a new user would, fitted to CIFAR's 32-px images.
FURTHER_MODELS: tuple[str, ...] = (
    "mnasnet_100", "lcnet_050", "semnasnet_075", "fbnetc_100", "tinynet_e", "hardcorenas_a",
    "mobileone_s0", "ese_vovnet19b_dw", "resnext26ts", "dpn68", "nf_resnet26",
    "repghostnet_050", "hgnetv2_b0", "fastvit_t8", "edgenext_xx_small", "poolformer_s12",
    "mixnet_s", "regnety_002", "skresnet18", "rexnetr_100", "convnextv2_atto",
    "mobilenetv4_conv_small", "efficientvit_m0", "pit_ti_224", "pvt_v2_b0",
    "xcit_nano_12_p16_224", "deit_tiny_distilled_patch16_224", "tiny_vit_5m_224",
)


def small_model(name: str) -> tuple[nn.Module, tuple[int, int, int]]:
    """A randomly initialised ``name`` and the (small) input size to check it with; models not
    in :data:`COVERAGE_MODELS` come at their own default input size."""
    kwargs, side = COVERAGE_MODELS.get(name, ({}, None))
    model = timm.create_model(name, pretrained=False, **kwargs)
    if side is None:
        return model, tuple(model.pretrained_cfg["input_size"])
    return model, (3, side, side)
