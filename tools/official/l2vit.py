"""L2ViT (ChuanyangZheng/L2ViT, classification/models/l2vit.py).

The official model takes any input size (it pads the image to a multiple of 4 before the stem, each
downsample's input to even sides, and each window attention's map to a multiple of 7 without masking the
padded tokens), so one build serves every fixture size. The reduced configuration keeps two blocks per
stage, so every stage has both kinds (LWA window block at even index, LGA linear-attention block at odd
index), the released stem (conv stem), block type and mlp ratio 4; widths of 32 keep the file small
(stage 4 has two heads: per-head temperatures). With the fixture's random weights the linear attention's
normaliser is clamped at 100 in every row of stages 2-4, in no row of stage 1 at 104x120 and in 28% of
them at 66x90: both regimes and their mix are compared.
Sizes: 104x120 pads every window map (26x30 -> 28x35 ...) and the later downsamples (13x15 -> 14x16);
66x90 also pads the image before the stem (-> 68x92).
"""
import importlib.util
import sys
from pathlib import Path

REPO = 'ChuanyangZheng/L2ViT'
WRAPPER = 'model'     # L2ViT-*-checkpoint-best-ema.pth: {'model', 'model_ema', 'optimizer', 'epoch', 'scaler', 'args'}

_REDUCED = dict(depths=[2, 2, 2, 2], dims=[32, 32, 32, 32], num_heads=[1, 1, 1, 2], num_classes=16)
FIXTURES = {
    'l2vit_tiny_r': dict(zoo='mz_l2vit_tiny', zoo_kwargs=dict(_REDUCED), official_kwargs=dict(_REDUCED),
                         sizes=[(104, 120), (66, 90)], batch=2),
}


def _module(repo: str):
    """classification/models/l2vit.py loaded by path (its package __init__ only re-exports it)."""
    name = 'l2vit_official'
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(repo) / 'classification' / 'models' / 'l2vit.py')
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod          # timm's @register_model looks the module up there
        spec.loader.exec_module(mod)
    return sys.modules[name]


def build_official(repo: str, official_kwargs: dict, size: tuple):
    kw = dict(official_kwargs)
    kw['mlp_ratio'] = [4.] * len(kw['dims'])
    return _module(repo).L2ViT(block_type='mix_local_enhanced_vit', conv_stem=True, **kw)


VARIANTS = {v: f'mz_l2vit_{v}' for v in ('tiny', 'small', 'base')}


def build_variant(repo: str, variant: str, size: tuple):
    """The released architecture ``L2ViT_<Variant>`` (any input size)."""
    return getattr(_module(repo), f'L2ViT_{variant.capitalize()}')()
