"""mixzoo backbones. Importing this package registers every zoo model into timm (``mz_*``)."""
from . import biformer, davit, halonet, l2vit, maxvit, poolformer, shvit, transnext  # noqa: F401  (registration side effects)
from ._registry import FAMILIES, MODELS, Family, ModelInfo, check_model_name, families, family_of, list_models  # noqa: F401,E501

__all__ = ['list_models', 'families', 'family_of', 'check_model_name', 'MODELS', 'FAMILIES', 'ModelInfo', 'Family']
