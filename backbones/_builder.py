"""How every family registers (``register_family``) and builds (``create_model``): timm's builder for the
model, the zoo's one loading path (mixzoo._pretrained -> mixzoo._weights) for its weights."""
import sys

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from . import _pretrained
from ._registry import Family, ModelInfo, add_family
from ._weights import load_state_dict, prepare_state_dict, read_checkpoint, unwrap_state_dict
from .layers import use_fast_layers
from .mixers import set_backend


def register_family(fam: Family, module: str) -> Family:
    """Register every variant of ``fam`` in timm, with entrypoints, ``default_cfgs`` and
    ``checkpoint_filter_fn`` defined in ``module`` (the family's file, so timm lists them under it),
    and in the zoo's MODELS / FAMILIES. Returns the record."""
    fam = add_family(fam)
    mod = sys.modules[module]
    mod.default_cfgs = generate_default_cfgs({
        f'{v.name}.{v.tag}' if v.tag else v.name: base_cfg(**{**fam.cfg, **v.cfg}) for v in fam.variants})

    def checkpoint_filter_fn(state_dict, model):
        """timm's hook: a checkpoint in any layout the family reads -> the model's keys, matched."""
        return prepare_state_dict(unwrap_state_dict(state_dict), model, fam)
    mod.checkpoint_filter_fn = checkpoint_filter_fn
    for v in fam.variants:
        entrypoint = _entrypoint(fam, v)
        entrypoint.__name__ = entrypoint.__qualname__ = v.name
        entrypoint.__module__ = module
        entrypoint.__doc__ = v.doc or f'{fam.cls.__name__} {v.name[3:]} ({v.reference}).'
        setattr(mod, v.name, register_model(entrypoint))
    return fam


def _entrypoint(fam: Family, v: ModelInfo):
    def entrypoint(pretrained: bool = False, **kwargs):
        return create_model(fam, v.name, pretrained, **{**v.arch, **kwargs})
    return entrypoint


def create_model(fam: Family, variant: str, pretrained: bool = False, checkpoint_entry: str = 'model', **kwargs):
    """Build ``variant`` of the family record ``fam`` with timm's build_model_with_cfg.

    ``pretrained=True``: the weights are ``pretrained_cfg_overlay``'s ``state_dict`` / ``file`` / ``url`` /
    ``hf_hub_id``, else the release file found or downloaded by ``_pretrained.resolve``; read by the safe
    reader (``checkpoint_entry`` picks 'model' or, where the release keeps one, 'model_ema') and loaded by
    ``_weights.load_state_dict`` (renames, transform, one match that names every mismatch; timm's rules for
    a classifier of another class count and the first conv). ``features_only`` goes through
    ``forward_intermediates`` (timm's getter feature class); ``device`` / ``dtype`` go to the model class;
    ``backend`` forces op backends (mixers.set_backend); linears run on oneDNN on CPU for inference."""
    if checkpoint_entry not in fam.checkpoint_entries:
        raise ValueError(f'{variant}: checkpoint_entry must be one of {fam.checkpoint_entries}, '
                         f'got {checkpoint_entry!r}')
    backend = kwargs.pop('backend', None)
    overlay = dict(kwargs.pop('pretrained_cfg_overlay', None) or {})
    weights, source = None, None
    if pretrained:
        weights = overlay.pop('state_dict', None)
        if weights is not None:
            weights, source = unwrap_state_dict(weights, prefer=checkpoint_entry), 'the given state dict'
        else:
            tag = kwargs.get('pretrained_cfg') if isinstance(kwargs.get('pretrained_cfg'), str) else None
            source = overlay.pop('file', None) or _pretrained.resolve(
                variant, tag, url=overlay.pop('url', None), hf_hub_id=overlay.pop('hf_hub_id', None))
            weights = read_checkpoint(str(source), prefer=checkpoint_entry)
    model = build_model_with_cfg(
        fam.cls, variant, False, pretrained_cfg_overlay=overlay,
        feature_cfg=dict(feature_cls='getter', out_indices=kwargs.pop('out_indices', fam.out_indices)), **kwargs)
    inner = getattr(model, 'model', model)     # (features_only: timm's wrapper around the pruned model)
    if weights is not None:
        load_state_dict(inner, weights, fam)
        for m in {id(m): m for m in (model, inner)}.values():
            m.pretrained_cfg = {**m.pretrained_cfg, 'file': str(source), 'state_dict': None,
                                'checkpoint_entry': checkpoint_entry}
            m.default_cfg = m.pretrained_cfg
    if backend is not None:
        set_backend(model, backend)
    return use_fast_layers(model)


def base_cfg(**kwargs) -> dict:
    """The pretrained-cfg fields every family shares (ImageNet-1k, bicubic, ImageNet mean/std, the
    zoo's 32x32 minimum input); families pass their own input size, crop, first conv, classifier."""
    return {'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
            'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
            'min_input_size': (3, 32, 32), 'license': 'apache-2.0', **kwargs}
