"""mecqtk: quantization-aware training at 2-8 bits for timm models.

Example:
    >>> import timm, mecqtk
    >>> qmodel = mecqtk.prepare(timm.create_model("resnet18"), mecqtk.load_recipe("w2a2_lsq"))
"""

from mecqtk.qat import prepare
from mecqtk.quant.calibrate import calibrate
from mecqtk.recipe import Recipe, load_recipe

__version__ = "0.2.0"

__all__ = ["Recipe", "__version__", "calibrate", "load_recipe", "prepare"]
