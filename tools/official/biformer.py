"""BiFormer (rayleizhu/BiFormer, models/biformer.py + ops/bra_legacy.py).

The official classification model (auto_pad=False) asserts that every routing stage's map is a multiple
of its n_win = 7 region grid, i.e. inputs that are multiples of 16 * 7 = 112: the fixtures use 112x112 and
224x112 (regions of 4x4 / 8x4 tokens in stage 1, one token per region in stage 3). The reduced config keeps
the released hyper-parameters that shape the computation: n_win 7, top-k 1 / 4 / 16 (routing to several
regions in stages 2 and 3), the stage-4 global attention with LePE and its 8 heads, the qk_dim ** -0.5
scale, mlp ratio 3; widths and depths are cut, and head_dim 16 gives two heads already in stage 1.
"""
import sys

REPO = 'rayleizhu/BiFormer'
WRAPPER = 'model'     # the release files hold {'model': state_dict, ...}; the official loader reads 'model'

# the released BiFormer-T settings (models/biformer.py: biformer_tiny) that the fixtures keep
_RELEASED = dict(n_win=7, kv_downsample_mode='identity', kv_per_wins=[-1, -1, -1, -1], topks=[1, 4, 16, -2],
                 side_dwconv=5, before_attn_dwconv=3, layer_scale_init_value=-1, mlp_ratios=[3, 3, 3, 3],
                 param_routing=False, diff_routing=False, soft_routing=False, pre_norm=True, pe=None)
_DIMS = [32, 32, 64, 64]
FIXTURES = {
    'biformer_tiny_r': dict(
        zoo='mz_biformer_tiny',
        zoo_kwargs=dict(depths=[1, 1, 2, 1], embed_dims=_DIMS, head_dim=16, num_classes=16),
        official_kwargs=dict(depth=[1, 1, 2, 1], embed_dim=_DIMS, qk_dims=_DIMS, head_dim=16, num_classes=16),
        sizes=[(112, 112), (224, 112)], batch=2),
}


def build_official(repo: str, official_kwargs: dict, size: tuple):
    if any(s % 112 for s in size):
        raise ValueError(f'the official BiFormer (auto_pad=False) takes sides that are multiples of 112, got {size}')
    if repo not in sys.path:
        sys.path.insert(0, repo)
    from models.biformer import BiFormer
    return BiFormer(**{**_RELEASED, **official_kwargs})


VARIANTS = {v: f'mz_biformer_{v}' for v in ('tiny', 'small', 'base')}


def build_variant(repo: str, variant: str, size: tuple):
    """The released architecture ``biformer_<variant>``; at sizes its classification setting refuses (not
    multiples of 112) with the official dense-task padding (auto_pad=True), which the zoo always applies."""
    if repo not in sys.path:
        sys.path.insert(0, repo)
    from models import biformer
    return getattr(biformer, f'biformer_{variant}')(auto_pad=any(s % 112 for s in size))
