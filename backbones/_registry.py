"""The one record of each family: what the zoo knows about it, declared once in the family's file.

``register_family(Family(...), __name__)`` registers every variant in timm (an entrypoint per variant,
its pretrained cfgs) and in the zoo (``MODELS``, ``FAMILIES``). Everything else reads the record: the
builder (class, out_indices), the checkpoint loader (renames / filter), the tests (reference model,
sizes, slow marks, published and official figures), tools/benchmark.py, tools/manifest.py and
tools/gen_configs.py.
"""
import difflib
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ._renames import Renames


@dataclass(frozen=True)
class ModelInfo:
    """One registered variant."""
    name: str                         # zoo name, mz_*
    family: str
    reference: str                    # 'timm:<name>' or 'official:<repo>'
    params_m: Optional[float] = None  # published parameter count (M), 1000 classes
    gmacs: Optional[float] = None     # published GMACs at the published resolution
    top1: Optional[float] = None      # published ImageNet-1k top-1
    img_size: int = 224
    build_only: bool = False          # too large to run in CI tests (built and counted only)
    arch: Dict = field(default_factory=dict)     # constructor kwargs of the variant
    tag: str = 'in1k'                 # pretrained tag of its release weights
    cfg: Dict = field(default_factory=dict)      # pretrained-cfg fields beyond the family's
    slow: bool = False                # its CI tests carry the `slow` mark
    gmacs_tol: float = 0.02           # published GMACs tolerance (where the paper counts differently)
    official_params: Optional[int] = None   # measured with the official code (official-reference families)
    official_keys: Optional[int] = None     # size of the official state dict
    doc: str = ''


def variant(name: str, reference: str, published: Tuple = (None, None, None), **kw) -> ModelInfo:
    """A variant of the family being declared (its family name is filled in by register_family)."""
    params_m, gmacs, top1 = published
    return ModelInfo(name, '', reference, params_m, gmacs, top1, **kw)


@dataclass(frozen=True)
class Family:
    name: str
    cls: type
    variants: Sequence[ModelInfo]
    cfg: Dict                                   # pretrained-cfg fields of every variant (backbones._builder.base_cfg)
    out_indices: Tuple[int, ...] = (0, 1, 2, 3)  # default features_only taps (feature_info indices)
    renames: Optional[Renames] = None           # release layout -> zoo keys, where names are all that differ
    transform: Optional[Callable] = None        # (state_dict, model) -> state_dict: reshapes/resizes after renames
    second_size: Callable[[int], Tuple[int, int]] = lambda s: (193, 257)   # the tests' second input size
    num_stages: int = 4
    checkpoint_entries: Tuple[str, ...] = ('model',)   # entries of a training checkpoint one can load

    @property
    def official(self) -> bool:
        return self.variants[0].reference.startswith('official:')

    def filter(self, state_dict, model):
        """timm's ``checkpoint_filter_fn``: any layout the family reads -> the model's, matched."""
        from ._weights import prepare_state_dict
        return prepare_state_dict(state_dict, model, self)


MODELS: Dict[str, ModelInfo] = {}
FAMILIES: Dict[str, Family] = {}


def register_family(fam: Family, module: str) -> Family:
    """Register every variant of ``fam`` in timm (entrypoints defined in ``module``, the family's file, so
    timm lists them under it) and in the zoo."""
    from timm.models import generate_default_cfgs, register_model

    from ._builder import base_cfg, create_model
    mod = sys.modules[module]
    variants = [ModelInfo(**{**v.__dict__, 'family': fam.name}) for v in fam.variants]
    fam = Family(**{**fam.__dict__, 'variants': tuple(variants)})
    mod.default_cfgs = generate_default_cfgs({
        f'{v.name}.{v.tag}' if v.tag else v.name: base_cfg(**{**fam.cfg, **v.cfg}) for v in variants})
    for v in variants:
        entrypoint = _entrypoint(fam, v, create_model)
        entrypoint.__name__ = entrypoint.__qualname__ = v.name
        entrypoint.__module__ = module
        entrypoint.__doc__ = v.doc or f'{fam.cls.__name__} {v.name[3:]} ({v.reference}).'
        setattr(mod, v.name, register_model(entrypoint))
        MODELS[v.name] = v
    FAMILIES[fam.name] = fam
    return fam


def _entrypoint(fam: Family, v: ModelInfo, create_model):
    def entrypoint(pretrained: bool = False, **kwargs):
        return create_model(fam, v.name, pretrained, **{**v.arch, **kwargs})
    return entrypoint


def family_of(model_or_name) -> Family:
    """The family record of a zoo model (instance, or name with an optional .tag)."""
    if isinstance(model_or_name, str):
        return FAMILIES[MODELS[check_model_name(model_or_name)].family]
    for fam in FAMILIES.values():
        if type(model_or_name) is fam.cls:
            return fam
    raise TypeError(f'{type(model_or_name).__name__} is not a zoo model (families: {", ".join(FAMILIES)})')


def check_model_name(name: str) -> str:
    """``name`` without its pretrained tag, if it is a zoo model; else a ValueError with close matches."""
    base = name.split('.', 1)[0]
    if base in MODELS:
        return base
    close = difflib.get_close_matches(base, list(MODELS), n=5, cutoff=0.5)
    hint = f'; did you mean {", ".join(close)}?' if close else ''
    raise ValueError(f'unknown model {name!r}{hint} (not one of the {len(MODELS)} zoo models, '
                     f'mixzoo.list_models())')


def list_models(family: Optional[str] = None) -> List[str]:
    return [n for n, m in MODELS.items() if family is None or m.family == family]


def families() -> List[str]:
    return sorted(FAMILIES)
