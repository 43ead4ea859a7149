"""mixzoo: vision backbones on shared token-mixer ops. ``import mixzoo`` registers every ``mz_*`` model in
timm; ``mixzoo.ops`` holds the ops (``python -m mixzoo.ops info``), ``mixzoo.mm`` the mmdet / mmseg adapter."""
from importlib import metadata as _metadata

from . import biformer, davit, halonet, l2vit, maxvit, nat, poolformer, shvit, transnext  # noqa: F401  (registration)
from ._registry import FAMILIES, MODELS, Family, ModelInfo, check_model_name, families, family_of, list_models  # noqa: F401,E501

__version__ = _metadata.version('mixzoo')   # (setup.py's)
__all__ = ['list_models', 'families', 'family_of', 'check_model_name', 'MODELS', 'FAMILIES', 'ModelInfo', 'Family']
