"""PoolFormer (Yu et al., "MetaFormer Is Actually What You Need for Vision", CVPR 2022).

Same architecture and state-dict layout as timm's ``poolformer_*`` (MetaFormer v1 configs):
conv stem 7x7/4, stages of [GroupNorm -> pooling mixer -> layer scale] + [GroupNorm -> 1x1-conv MLP
-> layer scale] blocks, 3x3/2 conv downsamples, pooled LayerNorm + linear head.
The checkpoint loader also reads the original sail-sg/poolformer release layout (``RENAMES``).
"""
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, GroupNorm1, LayerNorm2d, Mlp, NormMlpClassifierHead

from ._builder import register_family
from ._features import Stage, StagedModelMixin
from ._registry import Dense, Family, Release, variant
from ._renames import Rename, Renames
from .layers import ChannelScale, conv_act_forward, drop_path_rates, trunc_normal_init
from .mixers import Pooling

__all__ = ['PoolFormer']


class PoolFormerBlock(nn.Module):
    def __init__(self, dim: int, pool_size: int = 3, mlp_ratio: float = 4., drop_path: float = 0.,
                 layer_scale_init_value: float = 1e-5, proj_drop: float = 0.):
        super().__init__()
        self.norm1 = GroupNorm1(dim)
        self.token_mixer = Pooling(pool_size)
        self.layer_scale1 = ChannelScale(dim, layer_scale_init_value)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = GroupNorm1(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop, use_conv=True)
        self.layer_scale2 = ChannelScale(dim, layer_scale_init_value)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.drop_path1, nn.Identity):
            # x + s * f(x) as one addcmul, and the second layer scale folded into fc2's weights
            s1 = self.layer_scale1.scale.view(1, -1, 1, 1)
            x = torch.addcmul(x, s1, self.token_mixer(self.norm1(x)))
            mlp, s2 = self.mlp, self.layer_scale2.scale
            h = mlp.drop1(conv_act_forward(mlp.fc1, self.norm2(x), mlp.fc1.weight, mlp.fc1.bias, mlp.act))
            return x + mlp.drop2(F.conv2d(h, mlp.fc2.weight * s2.view(-1, 1, 1, 1), mlp.fc2.bias * s2))
        x = x + self.drop_path1(self.layer_scale1(self.token_mixer(self.norm1(x))))
        x = x + self.drop_path2(self.layer_scale2(self.mlp(self.norm2(x))))
        return x


class Downsampling(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int, padding: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class PoolFormer(StagedModelMixin, nn.Module):
    def __init__(
            self,
            depths: Tuple[int, ...] = (2, 2, 6, 2),
            dims: Tuple[int, ...] = (64, 128, 320, 512),
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            pool_size: int = 3,
            mlp_ratio: float = 4.,
            layer_scale_init_value: float = 1e-5,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = dims[-1]
        self.grad_checkpointing = False
        self.stem = Downsampling(in_chans, dims[0], 7, 4, 2)
        dpr = drop_path_rates(drop_path_rate, depths)
        stages, self.feature_info = [], []
        prev = dims[0]
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            down = Downsampling(prev, dim, 3, 2, 1) if dim != prev else None
            blocks = [PoolFormerBlock(dim, pool_size, mlp_ratio, dpr[i][j], layer_scale_init_value, proj_drop_rate)
                      for j in range(depth)]
            stages.append(Stage(blocks, down))
            self.feature_info.append(dict(num_chs=dim, reduction=2 ** (i + 2), module=f'stages.{i}'))
            prev = dim
        self.stages = nn.Sequential(*stages)
        self.norm = nn.Identity()   # the final norm is the head's (applied after pooling)
        self.head = NormMlpClassifierHead(dims[-1], num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                          norm_layer=LayerNorm2d)
        self.apply(trunc_normal_init(nn.Conv2d, nn.Linear))


# sail-sg/poolformer's release names -> timm's: its ``network`` list alternates stages (even entries) and
# downsamples (odd entries)
RENAMES = Renames([
    Rename('patch_embed.proj.', 'stem.conv.'),
    Rename('network.{2*s-1}.proj.', 'stages.{s}.downsample.conv.'),
    Rename('network.{2*s}.', 'stages.{s}.blocks.'),
    Rename('norm.', 'head.norm.'), Rename('head.', 'head.fc.'),
    Rename('.layer_scale_{n}', '.layer_scale{n}.scale'),
])

_S, _M = (64, 128, 320, 512), (96, 192, 384, 768)
# name: depths, dims, layer-scale init, (published params M, GMACs, top-1)
_ARCH = {
    's12': ((2, 2, 6, 2), _S, 1e-5, (12, 1.8, 77.2)), 's24': ((4, 4, 12, 4), _S, 1e-5, (21, 3.4, 80.3)),
    's36': ((6, 6, 18, 6), _S, 1e-6, (31, 5.0, 81.4)), 'm36': ((6, 6, 18, 6), _M, 1e-6, (56, 8.8, 82.1)),
    'm48': ((8, 8, 24, 8), _M, 1e-6, (73, 11.6, 82.5)),
}

# sail-sg/poolformer's dense configs (AdamW 2e-4, wd 1e-4; its Semantic FPN: 40k iters x 32 images = 80k x 16
# here); published: the paper's COCO / ADE20K tables
DENSE = Dense(
    variants=(('mz_poolformer_s12', 'poolformer-s12'), ('mz_poolformer_s24', 'poolformer-s24')),
    backbone=dict(out_norm='gn'),   # the official dense backbones add GroupNorm(1) per output
    det=dict(optimizer=dict(type='AdamW', lr=2e-4, weight_decay=1e-4)),
    seg=dict(optimizer=dict(type='AdamW', lr=2e-4, weight_decay=1e-4), poly_power=0.9, warmup=0),
    note='sail-sg/poolformer dense configs (AdamW 2e-4, wd 1e-4; Semantic FPN there: 40k iters x 32 '
         'images = 80k x 16 here)',
    published={('poolformer-s12', 'retinanet'): '36.2 AP', ('poolformer-s24', 'retinanet'): '38.9 AP',
               ('poolformer-s12', 'mask-rcnn'): '37.3 AP / 34.6 mask AP',
               ('poolformer-s24', 'mask-rcnn'): '40.1 / 37.0',
               ('poolformer-s12', 'fpn'): '37.2 mIoU', ('poolformer-s24', 'fpn'): '40.3 mIoU'})
_SAIL = 'https://github.com/sail-sg/poolformer/releases/download/v1.0'   # the authors' release files

FAMILY = register_family(Family(
    'poolformer', PoolFormer, cfg=dict(crop_pct=0.9, first_conv='stem.conv', classifier='head.fc'), renames=RENAMES,
    dense=DENSE,
    variants=[variant(f'mz_poolformer_{n}', f'timm:poolformer_{n}', pub, tag='sail_in1k',
                      arch=dict(depths=d, dims=dims, layer_scale_init_value=ls),
                      cfg=dict(crop_pct=0.95) if n.startswith('m') else {},
                      build_only=n == 'm48', slow=n in ('s36', 'm36'),
                      release=Release(f'{_SAIL}/poolformer_{n}.pth.tar', tag='sail_in1k'))
              for n, (d, dims, ls, pub) in _ARCH.items()]), __name__)
