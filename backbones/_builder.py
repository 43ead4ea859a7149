"""One way every family builds a model: timm's builder, fed by the zoo's one checkpoint path."""
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg

from . import _pretrained
from ._weights import read_checkpoint
from .layers import use_onednn_linears
from .mixers import set_backend

# a pretrained-cfg overlay naming its own source that timm fetches itself (the zoo reads files and URLs)
_TIMM_SOURCES = ('hf_hub_id',)


def create_model(fam, variant: str, pretrained: bool = False, checkpoint_entry: str = 'model', **kwargs):
    """Build ``variant`` of the family record ``fam`` with timm's build_model_with_cfg.

    ``pretrained=True``: the weights file is ``pretrained_cfg_overlay['file']`` or the release file found
    (or downloaded) by ``_pretrained.resolve``; it is read by the zoo's safe reader (``checkpoint_entry``
    picks 'model' or, where the release keeps one, 'model_ema'), then timm's loader runs the family's
    ``prepare_state_dict`` (renames, transforms, one match that names every mismatch) and adapts the
    classifier / first conv as it does for timm's own models. ``features_only`` goes through
    ``forward_intermediates`` (timm's getter feature class); linears run on oneDNN on CPU for inference."""
    if checkpoint_entry not in fam.checkpoint_entries:
        raise ValueError(f'{variant}: checkpoint_entry must be one of {fam.checkpoint_entries}, '
                         f'got {checkpoint_entry!r}')
    backend = kwargs.pop('backend', None)   # op backend(s) of every mixer: mixers.set_backend
    path = None
    if pretrained:
        overlay = dict(kwargs.pop('pretrained_cfg_overlay', None) or {})
        if overlay.get('state_dict') is None and not any(overlay.get(k) for k in _TIMM_SOURCES):
            tag = kwargs.get('pretrained_cfg') if isinstance(kwargs.get('pretrained_cfg'), str) else None
            path = overlay.pop('file', None) or _pretrained.resolve(variant, tag, url=overlay.pop('url', None))
            overlay['state_dict'] = read_checkpoint(str(path), prefer=checkpoint_entry)
        kwargs['pretrained_cfg_overlay'] = overlay
    model = build_model_with_cfg(
        fam.cls, variant, pretrained, pretrained_filter_fn=fam.filter,
        feature_cfg=dict(feature_cls='getter', out_indices=kwargs.pop('out_indices', fam.out_indices)), **kwargs)
    if path is not None:   # no second reference to the weights in the cfg; say where they came from
        for m in {id(m): m for m in (model, getattr(model, 'model', None)) if m is not None}.values():
            cfg = getattr(m, 'pretrained_cfg', None)
            if isinstance(cfg, dict):
                cfg.update(state_dict=None, file=str(path), checkpoint_entry=checkpoint_entry)
    if backend is not None:
        set_backend(model, backend)
    return use_onednn_linears(model)


def base_cfg(**kwargs) -> dict:
    """The pretrained-cfg fields every family shares (ImageNet-1k, bicubic, ImageNet mean/std, the
    zoo's 32x32 minimum input); families pass their own input size, crop, first conv, classifier."""
    return {'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
            'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
            'min_input_size': (3, 32, 32), 'license': 'apache-2.0', **kwargs}
