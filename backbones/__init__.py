"""mixzoo backbones. Importing this package registers every zoo model into timm (``mz_*``)."""
from . import biformer, davit, halonet, l2vit, maxvit, poolformer, shvit, transnext  # noqa: F401  (registration side effects)
from ._registry import MODELS, ModelInfo, families, list_models  # noqa: F401

__all__ = ['list_models', 'families', 'MODELS', 'ModelInfo']
