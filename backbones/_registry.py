"""What the zoo knows about each registered model beyond timm's pretrained cfg: its family, the
reference it must match, and the published figures (../shared/REFERENCE.md) it is checked against."""
from dataclasses import dataclass
from typing import Dict, List, Optional


@dataclass(frozen=True)
class ModelInfo:
    name: str                        # zoo name, mz_*
    family: str
    reference: str                   # 'timm:<name>' or 'official:<repo>'
    params_m: Optional[float] = None  # published parameter count (M), 1000 classes
    gmacs: Optional[float] = None     # published GMACs at the published resolution
    top1: Optional[float] = None      # published ImageNet-1k top-1
    img_size: int = 224
    build_only: bool = False          # too large to run in CI tests (built and counted only)


MODELS: Dict[str, ModelInfo] = {}


def add(name: str, family: str, reference: str, params_m=None, gmacs=None, top1=None, img_size=224,
        build_only=False) -> None:
    MODELS[name] = ModelInfo(name, family, reference, params_m, gmacs, top1, img_size, build_only)


def list_models(family: Optional[str] = None) -> List[str]:
    return [n for n, m in MODELS.items() if family is None or m.family == family]


def families() -> List[str]:
    return sorted({m.family for m in MODELS.values()})
