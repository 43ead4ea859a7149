"""TransNeXt (DaiShiResearch/TransNeXt, classification/transnext.py, PyTorch-native aggregated attention).

The official model is tied to the one square size it is built for (img_size; the CPB coordinates are
normalised by pretrain_size), so it is built per fixture size with pretrain_size=224, as the official
multi-scale evaluation does; the zoo computes the same terms for whatever map it gets. Reduced widths and
depths keep the files small; every stage keeps its kind of attention (aggregated 3x3 + pooled in 1-3,
global in 4) and the released hyper-parameters (mlp ratios 8-8-4-4, sr ratios 8-4-2-1, qkv bias, LN eps 1e-6).
"""
import contextlib
import io
import sys

REPO = 'DaiShiResearch/TransNeXt'
WRAPPER = None     # the HF release files are plain state dicts

_SHARED = dict(mlp_ratios=[8, 8, 4, 4], num_classes=16)
FIXTURES = {
    # micro's head dim (24) and qkv layout, one block per stage but two in stage 3
    'transnext_micro_r': dict(
        zoo='mz_transnext_micro',
        zoo_kwargs=dict(depths=[1, 1, 2, 1], embed_dims=[24, 48, 48, 72], num_heads=[1, 2, 2, 3], num_classes=16),
        official_kwargs=dict(depths=[1, 1, 2, 1], embed_dims=[24, 48, 48, 72], num_heads=[1, 2, 2, 3], **_SHARED),
        sizes=[(224, 224), (96, 96)], batch=1),
    # tiny's three heads in stage 1, two blocks in the first stage, at 64 (1x1 map at stage 4) and 160
    'transnext_tiny_r': dict(
        zoo='mz_transnext_tiny',
        zoo_kwargs=dict(depths=[2, 1, 1, 1], embed_dims=[36, 48, 48, 64], num_heads=[3, 4, 4, 4], num_classes=16),
        official_kwargs=dict(depths=[2, 1, 1, 1], embed_dims=[36, 48, 48, 64], num_heads=[3, 4, 4, 4], **_SHARED),
        sizes=[(64, 64), (160, 160)], batch=2),
}


def _official_module(repo: str):
    path = f'{repo}/classification'
    if path not in sys.path:
        sys.path.insert(0, path)
    with contextlib.redirect_stdout(io.StringIO()):      # it prints which attention it loaded
        import transnext
    return transnext


def build_official(repo: str, official_kwargs: dict, size: tuple):
    import torch.nn as nn
    from functools import partial
    if size[0] != size[1]:
        raise ValueError(f'the official TransNeXt takes square inputs only, got {size}')
    return _official_module(repo).TransNeXt(
        img_size=size[0], pretrain_size=224, window_size=[3, 3, 3, None], patch_size=4, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), sr_ratios=[8, 4, 2, 1], **official_kwargs)


VARIANTS = {v: f'mz_transnext_{v}' for v in ('micro', 'tiny', 'small', 'base')}


def build_variant(repo: str, variant: str, size: tuple):
    """The released architecture ``transnext_<variant>`` built for ``size`` (pretrain size 224)."""
    return getattr(_official_module(repo), f'transnext_{variant}')(img_size=size[0], pretrain_size=224)
