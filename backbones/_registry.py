"""The one record of each family: what the zoo knows about it, declared once at the end of its file.

``register_family(Family(...), __name__)`` (mixzoo._builder) registers every variant in timm and here
(``MODELS``, ``FAMILIES``). Everything else reads the record: the builder (class, out_indices), the
checkpoint loader (renames / transform), the downloads (release files), the tests (reference model,
sizes, slow marks, published and official figures), tools/benchmark.py and the generated files
(checkpoints/manifest.json, configs/, the README's model table: ``python tools/generate.py``).
This module holds data and lookups only: it imports neither the builder nor the loader.
"""
import difflib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ._renames import Renames


@dataclass(frozen=True)
class Release:
    """A checkpoint file the authors publish themselves (outside timm's hub), in their layout."""
    url: str
    file: Optional[str] = None        # the name it is kept under (default: the URL's last part)
    tag: str = 'in1k'                 # the pretrained tag it is a source of
    layout: str = 'official'
    sha256: Optional[str] = None      # where the authors state one (downloads are checked against it)

    @property
    def filename(self) -> str:
        return self.file or self.url.rsplit('/', 1)[-1]


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
    release: Optional[Release] = None       # the authors' own file (timm references: a second source)
    doc: str = ''

    @property
    def reference_kind(self) -> str:
        return self.reference.split(':', 1)[0]

    @property
    def reference_name(self) -> str:
        return self.reference.split(':', 1)[1]


def variant(name: str, reference: str, published: Tuple = (None, None, None), **kw) -> ModelInfo:
    """A variant of the family being declared (its family name is filled in by register_family)."""
    params_m, gmacs, top1 = published
    return ModelInfo(name, '', reference, params_m, gmacs, top1, **kw)


@dataclass(frozen=True)
class Dense:
    """A family's detection / segmentation recipe: tools/generate.py writes configs/mmdet and configs/mmseg
    from it (mmdet's / mmseg's own base configs, the zoo backbone, the recipe's optimizer and schedule).

    ``variants``: (zoo name, short name used in config file names); the first variant's configs are the base
    of the others'. ``det`` / ``seg``: ``optimizer`` (AdamW kwargs; absent = the mm base schedule's SGD),
    ``no_decay`` (paramwise custom_keys), ``norm_eval``, ``backbone`` (adapter options for that task), and
    for ``seg`` ``poly_power`` and ``warmup`` (iterations). ``methods``: per-method overrides of those
    ('mask-rcnn', 'retinanet', 'upernet', 'fpn'). ``drop_path``: per task ('det' / 'seg') or method, one
    rate per variant. ``published``: {(short name, method): the authors' published figure}. ``configs``: the
    methods that get configs (those with an official recipe, where the family has some but not all)."""
    variants: Tuple[Tuple[str, str], ...]
    note: str                                        # where the recipe comes from
    backbone: Dict = field(default_factory=dict)     # MixZooBackbone options of every config
    det: Dict = field(default_factory=dict)
    seg: Dict = field(default_factory=dict)
    methods: Dict = field(default_factory=dict)
    drop_path: Dict = field(default_factory=dict)
    published: Dict = field(default_factory=dict)
    configs: Tuple[str, ...] = ('mask-rcnn', 'retinanet', 'upernet', 'fpn')


# Swin's dense-task settings (AdamW, no decay on norms / relative-position tables, a LayerNorm per output),
# the recipe of the families without official dense configs of their own
_SWIN_NO_DECAY = {'norm': dict(decay_mult=0.0), 'rel_pos': dict(decay_mult=0.0),
                  'relative_position': dict(decay_mult=0.0)}
SWIN_DENSE = dict(
    backbone=dict(out_norm='ln'),
    drop_path=dict(det=(0.2, 0.3), seg=(0.3, 0.3)),
    det=dict(optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05), no_decay=_SWIN_NO_DECAY),
    seg=dict(optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01), no_decay=_SWIN_NO_DECAY,
             poly_power=1.0, warmup=1500))


@dataclass(frozen=True)
class Family:
    name: str
    cls: type
    variants: Sequence[ModelInfo]
    cfg: Dict                                   # pretrained-cfg fields of every variant (mixzoo._builder.base_cfg)
    out_indices: Tuple[int, ...] = (0, 1, 2, 3)  # default features_only taps (feature_info indices)
    renames: Optional[Renames] = None           # release layout -> zoo keys, where names are all that differ
    transform: Optional[Callable] = None        # (state_dict, model) -> state_dict: reshapes/resizes after renames
    second_size: Callable[[int], Tuple[int, int]] = lambda s: (193, 257)   # the tests' second input size
    num_stages: int = 4
    checkpoint_entries: Tuple[str, ...] = ('model',)   # entries of a training checkpoint one can load
    dense: Optional[Dense] = None               # detection / segmentation recipe

    @property
    def official(self) -> bool:
        return self.variants[0].reference.startswith('official:')


MODELS: Dict[str, ModelInfo] = {}
FAMILIES: Dict[str, Family] = {}


def add_family(fam: Family) -> Family:
    """The record with its variants stamped with the family name, entered in MODELS and FAMILIES."""
    variants = tuple(ModelInfo(**{**v.__dict__, 'family': fam.name}) for v in fam.variants)
    fam = Family(**{**fam.__dict__, 'variants': variants})
    for v in variants:
        MODELS[v.name] = v
    FAMILIES[fam.name] = fam
    return fam


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
