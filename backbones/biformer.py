"""BiFormer (Zhu et al., "BiFormer: Vision Transformer with Bi-Level Routing Attention", CVPR 2023).

Hyper-parameters and the official release layout are those of rayleizhu/BiFormer (models/biformer.py,
../shared/OFFICIAL-FACTS.md): a two-conv stem (3x3/2 conv, BN, GELU, 3x3/2 conv, BN) and 3x3/2 conv + BN
downsamples; blocks of a 3x3 depthwise conv position embedding, then pre-norm (LayerNorm eps 1e-6)
bi-level routing attention (stages 1-3, top-k 1 / 4 / 16 of a 7 x 7 region grid) or global attention
with LePE (stage 4, 8 heads, qkv without bias), and a ratio-3 GELU MLP; a BatchNorm2d on the last map,
global average pool, linear head. Mixers: ``backbones/mixers/routing.py``.

Any input size: every routing stage pads its map at the bottom/right to a multiple of the region grid
(n_win) and crops back, with the official ``auto_pad`` semantics: the zero padding is applied after
norm1, padded tokens are not masked (their q / k / v are the qkv bias; they enter the region means that
routing ranks, take part as keys / values, and feed the LePE conv of their in-map neighbours). At sizes
the official classification model accepts (sides that are multiples of 16 * n_win, 112 with n_win = 7:
112, 224, 336, 224x336; the official model asserts otherwise) nothing is padded and the logits are the
official ones.
The official dense-task backbones use n_win 16 (detection) / 8 (segmentation) with auto_pad: pass
``n_win=``.

Inside a stage the maps are NHWC; stage outputs are NCHW views of them. ``checkpoint_filter_fn`` reads
the official release layout (``{'model': sd}``; ``downsample_layers.{i}``, ``stages.{i}.{j}``, ``norm``,
``head``) and the zoo's. From a training checkpoint holding ``model`` and ``model_ema`` the zoo loads
``model``, as the official loader does, unless ``checkpoint_entry='model_ema'`` is passed.
"""
from typing import Sequence, Union

import torch
import torch.nn as nn
from timm.layers import ClassifierHead, DropPath, Mlp

from ._builder import register_family
from ._features import Stage, StagedModelMixin
from ._registry import SWIN_DENSE, Dense, Family, Release, variant
from ._renames import Rename, Renames
from .layers import drop_path_rates, trunc_normal_init
from .mixers.routing import BiLevelRoutingAttention, GlobalAttentionLePE

__all__ = ['BiFormer']


class Block(nn.Module):
    """x + dwconv3x3(x); x + attn(norm1(x)); x + mlp(norm2(x)), on NHWC maps. ``topk`` > 0: bi-level
    routing attention; -2: global attention with LePE; -1: global attention (the official codes)."""

    def __init__(self, dim: int, num_heads: int, qk_dim: int, topk: int, n_win: int = 7, mlp_ratio: float = 3.,
                 side_dwconv: int = 5, global_heads: int = 8, drop_path: float = 0.):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if topk > 0:
            self.attn = BiLevelRoutingAttention(dim, num_heads, n_win, qk_dim, topk, side_dwconv)
        elif topk in (-1, -2):
            self.attn = GlobalAttentionLePE(dim, global_heads, side_dwconv if topk == -2 else 0)
        else:
            raise ValueError(f'topk {topk} is not supported (> 0: routing attention, -1 / -2: global attention '
                             f'without / with LePE)')
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(mlp_ratio * dim), act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class BiFormerStage(Stage):
    """Downsample (NCHW in) -> blocks on NHWC -> NCHW view out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).permute(0, 3, 1, 2)


class _ToNHWC(nn.Sequential):
    """An nn.Sequential of NCHW layers (official keys by index) whose output is returned NHWC."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).permute(0, 2, 3, 1)


def _stem(in_chans: int, dim: int) -> nn.Module:
    return _ToNHWC(nn.Conv2d(in_chans, dim // 2, 3, 2, 1), nn.BatchNorm2d(dim // 2), nn.GELU(),
                   nn.Conv2d(dim // 2, dim, 3, 2, 1), nn.BatchNorm2d(dim))


def _downsample(in_dim: int, dim: int) -> nn.Module:
    return _ToNHWC(nn.Conv2d(in_dim, dim, 3, 2, 1), nn.BatchNorm2d(dim))


def _per_stage(v, n: int, what: str) -> tuple:
    v = tuple(v) if isinstance(v, (tuple, list)) else (v,) * n
    if len(v) != n:
        raise ValueError(f'{what} must have one entry per stage ({n}), got {v}')
    return v


class BiFormer(StagedModelMixin, nn.Module):
    # no_weight_decay: the mixin's (biases and norms only): the official model lists {'pos_embed', 'cls_token'},
    # names of no parameter
    def __init__(
            self,
            depths: Sequence[int] = (2, 2, 8, 2),
            embed_dims: Sequence[int] = (64, 128, 256, 512),
            qk_dims: Sequence[int] = None,
            head_dim: int = 32,
            topks: Sequence[int] = (1, 4, 16, -2),
            n_win: int = 7,
            mlp_ratios: Union[float, Sequence[float]] = 3.,
            side_dwconv: int = 5,
            global_heads: int = 8,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
    ):
        super().__init__()
        n = len(depths)
        embed_dims = _per_stage(embed_dims, n, 'embed_dims')
        qk_dims = _per_stage(qk_dims if qk_dims is not None else embed_dims, n, 'qk_dims')
        topks = _per_stage(topks, n, 'topks')
        mlp_ratios = _per_stage(mlp_ratios, n, 'mlp_ratios')
        for qk in qk_dims:
            if qk % head_dim:
                raise ValueError(f'qk_dims {qk_dims} must be multiples of head_dim {head_dim}')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.n_win = n_win
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.grad_checkpointing = False
        self.stem = nn.Identity()
        dpr = drop_path_rates(drop_path_rate, depths)
        stages, self.feature_info, prev = [], [], in_chans
        for i, (depth, dim) in enumerate(zip(depths, embed_dims)):
            blocks = [Block(dim, qk_dims[i] // head_dim, qk_dims[i], topks[i], n_win, mlp_ratios[i], side_dwconv,
                            global_heads, dpr[i][j]) for j in range(depth)]
            down = _stem(prev, dim) if i == 0 else _downsample(prev, dim)
            stages.append(BiFormerStage(blocks, down))
            self.feature_info.append(dict(num_chs=dim, reduction=2 ** (i + 2), module=f'stages.{i}'))
            prev = dim
        self.stages = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(self.num_features)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.apply(trunc_normal_init(nn.Linear))


# rayleizhu/BiFormer's names (``{'model': sd}`` or plain) -> the zoo's; stage 4's global attention keeps
# attn.qkv / attn.proj, the routing stages name them attn.qkv.qkv / attn.wo
RENAMES = Renames([
    Rename('downsample_layers.{i}.', 'stages.{i}.downsample.'), Rename('stages.{i}.{j}.', 'stages.{i}.blocks.{j}.'),
    Rename('head.', 'head.fc.'),
    Rename('.attn.qkv.qkv.', '.attn.qkv.', scope=r'^stages\.[0-2]\.'),
    Rename('.attn.wo.', '.attn.proj.', scope=r'^stages\.[0-2]\.'),
    Rename('.mlp.0.', '.mlp.fc1.'), Rename('.mlp.3.', '.mlp.fc2.'),
])

_ARCH = {
    'tiny': dict(depths=(2, 2, 8, 2), embed_dims=(64, 128, 256, 512)),
    'small': dict(depths=(4, 4, 18, 4), embed_dims=(64, 128, 256, 512)),
    'base': dict(depths=(4, 4, 18, 4), embed_dims=(96, 192, 384, 768)),
}
_PUBLISHED = {'tiny': (13.1, 2.2, 81.4), 'small': (25.5, 4.5, 83.8), 'base': (56.8, 9.8, 84.3)}
_OFFICIAL = {'tiny': (13_142_760, 264), 'small': (25_536_232, 518), 'base': (56_804_968, 518)}   # measured, 1000 classes

# official evaluation (datasets.py): resize 256 bicubic, centre crop 224, ImageNet mean / std; the release files
# keep an EMA beside the weights (checkpoint_entry='model_ema'; 'model' is what the official loader reads)
# the OneDrive links of rayleizhu/BiFormer's README (models/biformer.py model_urls); the file name is the one its
# loader saves them under ({'model': state_dict, ...})
_ONEDRIVE = {'tiny': 's!AkBbczdRlZvChHEOoGkgwgQzEDlM', 'small': 's!AkBbczdRlZvChHDyM-x9KWRBZ832',
             'base': 's!AkBbczdRlZvChHI_XPhoadjaNxtO'}
# rayleizhu/BiFormer's dense configs of BiFormer-S (no official BiFormer-T ones: T takes S's); published: its
# detection / segmentation READMEs (S-FPN from semantic_segmentation/README.md; BiFormer-S only)
DENSE = Dense(
    variants=(('mz_biformer_tiny', 'biformer-tiny'), ('mz_biformer_small', 'biformer-small')),
    backbone=dict(out_norm='ln'),   # the official dense backbone adds a LayerNorm2d per output (extra_norms)
    drop_path={'det': (0.2, 0.2), 'upernet': (0.3, 0.3), 'fpn': (0.15, 0.15)},
    det=dict(SWIN_DENSE['det'], backbone=dict(n_win=16)),
    seg=dict(SWIN_DENSE['seg'], backbone=dict(n_win=8)),
    methods={'retinanet': dict(optimizer=dict(type='AdamW', lr=1e-4, weight_decay=1e-4), no_decay=None),
             'fpn': dict(optimizer=dict(type='AdamW', lr=2e-4, weight_decay=1e-4), no_decay=None,
                         poly_power=0.9, warmup=0)},
    note='rayleizhu/BiFormer dense configs of BiFormer-S (auto_pad, region grid n_win 16 for detection, 8 for '
         'segmentation; Mask R-CNN AdamW 1e-4 wd 0.05 no decay on norms, RetinaNet AdamW 1e-4 wd 1e-4, UperNet '
         'AdamW 6e-5 wd 0.01 poly 1.0 warmup 1500, S-FPN AdamW 2e-4 wd 1e-4 but poly 0.9 here where the '
         'official one is cosine with warmup; their fp16 not set)',
    published={('biformer-small', 'mask-rcnn'): '47.8 / 43.2', ('biformer-small', 'retinanet'): '45.9 AP',
               ('biformer-small', 'upernet'): '49.8 mIoU', ('biformer-small', 'fpn'): '48.9 mIoU'})

FAMILY = register_family(Family(
    'biformer', BiFormer, cfg=dict(crop_pct=0.875, first_conv='stages.0.downsample.0', classifier='head.fc'),
    renames=RENAMES, checkpoint_entries=('model', 'model_ema'), dense=DENSE,
    variants=[variant(f'mz_biformer_{a}', 'official:rayleizhu/BiFormer', _PUBLISHED[a], arch=arch,
                      build_only=a == 'base', slow=a == 'small', official_params=_OFFICIAL[a][0],
                      official_keys=_OFFICIAL[a][1],
                      release=Release(f'https://api.onedrive.com/v1.0/shares/{_ONEDRIVE[a]}/root/content',
                                      file=f'biformer_{a}_in1k.pth'))
              for a, arch in _ARCH.items()]), __name__)
