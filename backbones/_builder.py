"""One way every family builds a model through timm's builder."""
from timm.models import build_model_with_cfg

from . import _pretrained


def create_model(cls, variant: str, pretrained: bool, filter_fn, default_out_indices, **kwargs):
    """timm's build_model_with_cfg with the zoo's conventions: the local weights lookup for
    ``pretrained=True``, the family's checkpoint filter, and ``features_only`` through
    ``forward_intermediates`` (timm's getter feature class)."""
    _pretrained.resolve(variant, pretrained, kwargs)
    return build_model_with_cfg(
        cls, variant, pretrained, pretrained_filter_fn=filter_fn,
        feature_cfg=dict(feature_cls='getter', out_indices=kwargs.pop('out_indices', default_out_indices)), **kwargs)
