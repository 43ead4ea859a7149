"""One way every family builds a model through timm's builder."""
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg

from . import _pretrained
from .layers import use_onednn_linears


def create_model(cls, variant: str, pretrained: bool, filter_fn, default_out_indices, **kwargs):
    """timm's build_model_with_cfg with the zoo's conventions: the local weights lookup for
    ``pretrained=True``, the family's checkpoint filter, and ``features_only`` through
    ``forward_intermediates`` (timm's getter feature class); linear layers run on oneDNN on CPU
    (``layers.linear``)."""
    _pretrained.resolve(variant, pretrained, kwargs)
    return use_onednn_linears(build_model_with_cfg(
        cls, variant, pretrained, pretrained_filter_fn=filter_fn,
        feature_cfg=dict(feature_cls='getter', out_indices=kwargs.pop('out_indices', default_out_indices)), **kwargs))


def base_cfg(**kwargs) -> dict:
    """The pretrained-cfg fields every family shares (ImageNet-1k, bicubic, ImageNet mean/std, the
    zoo's 32x32 minimum input); families pass their own input size, crop, first conv, classifier."""
    return {'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
            'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
            'min_input_size': (3, 32, 32), 'license': 'apache-2.0', **kwargs}
