"""DaViT (Ding et al., "DaViT: Dual Attention Vision Transformers", ECCV 2022).

Same architecture and state-dict layout as timm's ``davit_*``: conv stem 7x7/4, stages of
(spatial window-attention block, channel-group-attention block) pairs, each with depthwise conv
position encodings before the attention and before the MLP, LayerNorm + 2x2/2 conv downsamples,
pooled-LayerNorm head. Spatial windows go through ``ops.window`` (no relative position bias);
padded tokens take part as keys, as in DaViT (``mask_padding=False``), so odd sizes match timm.
Inside a stage the maps stay channels-last, so the block's token <-> map switches are free views.
The checkpoint loader also reads the official dingmyu/davit layout (``RENAMES``).
"""
from functools import partial
from typing import Tuple

import torch
import torch.nn as nn
from timm.layers import DropPath, LayerNorm2d, Mlp, NormMlpClassifierHead

from ._builder import register_family
from ._features import Stage, StagedModelMixin
from ._registry import SWIN_DENSE, Dense, Family, variant
from ._renames import Rename, Renames
from .layers import drop_path_rates, trunc_normal_init
from .mixers import ChannelAttention, PartitionAttention
from .ops.window import pad_to_multiple

__all__ = ['DaVit']

_EPS = 1e-5


class ConvPosEnc(nn.Module):
    """x + depthwise 3x3 conv(x)."""

    def __init__(self, dim: int, k: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, k, 1, k // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(x)


class _DualBlock(nn.Module):
    """cpe1 -> x + attn(norm1 x) -> cpe2 -> x + mlp(norm2 x), on NCHW maps (attention on NHWC views)."""

    def __init__(self, dim: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.cpe1 = ConvPosEnc(dim)
        self.norm1 = nn.LayerNorm(dim, eps=_EPS)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.cpe2 = ConvPosEnc(dim)
        self.norm2 = nn.LayerNorm(dim, eps=_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def _mix(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.cpe1(x).permute(0, 2, 3, 1)
        t = t + self.drop_path1(self._mix(self.norm1(t)))
        t = self.cpe2(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        t = t + self.drop_path2(self.mlp(self.norm2(t)))
        return t.permute(0, 3, 1, 2)


class SpatialBlock(_DualBlock):
    def __init__(self, dim: int, num_heads: int, window_size: int = 7, mlp_ratio: float = 4.,
                 qkv_bias: bool = True, drop_path: float = 0.):
        super().__init__(dim, mlp_ratio, drop_path)
        self.attn = PartitionAttention(dim, (window_size, window_size), 'block', dim_head=dim // num_heads,
                                       bias=qkv_bias, rel_pos=False, mask_padding=False)

    def _mix(self, t: torch.Tensor) -> torch.Tensor:
        return self.attn(t)


class ChannelBlock(_DualBlock):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4., qkv_bias: bool = True,
                 drop_path: float = 0.):
        super().__init__(dim, mlp_ratio, drop_path)
        self.attn = ChannelAttention(dim, num_heads, qkv_bias)

    def _mix(self, t: torch.Tensor) -> torch.Tensor:
        B, H, W, C = t.shape
        return self.attn(t.reshape(B, H * W, C)).view(B, H, W, C)


class Stem(nn.Module):
    """Pad right/bottom to a multiple of 4, conv 7x7/4, LayerNorm."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 7, 4, 3)
        self.norm = LayerNorm2d(out_chs, eps=_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(pad_to_multiple(x, (4, 4), (2, 3))))


class Downsample(nn.Module):
    """LayerNorm, pad right/bottom to even, conv 2x2/2."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.norm = LayerNorm2d(in_chs, eps=_EPS)
        self.conv = nn.Conv2d(in_chs, out_chs, 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(pad_to_multiple(self.norm(x), (2, 2), (2, 3)))


class DaVit(StagedModelMixin, nn.Module):
    def __init__(
            self,
            depths: Tuple[int, ...] = (1, 1, 3, 1),
            embed_dims: Tuple[int, ...] = (96, 192, 384, 768),
            num_heads: Tuple[int, ...] = (3, 6, 12, 24),
            window_size: int = 7,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = embed_dims[-1]
        self.grad_checkpointing = False
        self.stem = Stem(in_chans, embed_dims[0])
        dpr = drop_path_rates(drop_path_rate, depths)
        stages, self.feature_info, prev = [], [], embed_dims[0]
        for i, (depth, dim, heads) in enumerate(zip(depths, embed_dims, num_heads)):
            blocks = [nn.Sequential(SpatialBlock(dim, heads, window_size, mlp_ratio, qkv_bias, dpr[i][j]),
                                    ChannelBlock(dim, heads, mlp_ratio, qkv_bias, dpr[i][j])) for j in range(depth)]
            stages.append(Stage(blocks, Downsample(prev, dim) if i > 0 else None))
            self.feature_info.append(dict(num_chs=dim, reduction=2 ** (i + 2), module=f'stages.{i}'))
            prev = dim
        self.stages = nn.Sequential(*stages)
        self.norm = nn.Identity()
        self.head = NormMlpClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                          norm_layer=partial(LayerNorm2d, eps=_EPS))
        self.head_hidden_size = self.head.num_features
        self.apply(trunc_normal_init(nn.Linear))


# dingmyu/davit's release names -> timm's (which the zoo keeps)
RENAMES = Renames([
    Rename('patch_embeds.0.proj.', 'stem.conv.'), Rename('patch_embeds.0.norm.', 'stem.norm.'),
    Rename('patch_embeds.{i}.proj.', 'stages.{i}.downsample.conv.'),
    Rename('patch_embeds.{i}.norm.', 'stages.{i}.downsample.norm.'),
    Rename('main_blocks.{i}.', 'stages.{i}.blocks.'), Rename('norms.', 'head.norm.'), Rename('head.', 'head.fc.'),
    Rename('.cpe.{c}.', '.cpe{c+1}.'),
])

_ARCH = {
    'tiny': dict(depths=(1, 1, 3, 1), embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24)),
    'small': dict(depths=(1, 1, 9, 1), embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24)),
    'base': dict(depths=(1, 1, 9, 1), embed_dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32)),
    'large': dict(depths=(1, 1, 9, 1), embed_dims=(192, 384, 768, 1536), num_heads=(6, 12, 24, 48)),
    'huge': dict(depths=(1, 1, 9, 1), embed_dims=(256, 512, 1024, 2048), num_heads=(8, 16, 32, 64)),
    'giant': dict(depths=(1, 1, 12, 3), embed_dims=(384, 768, 1536, 3072), num_heads=(12, 24, 48, 96)),
}
_PUBLISHED = {'tiny': (28.3, 4.5, 82.8), 'small': (49.7, 8.8, 84.2), 'base': (87.9, 15.5, 84.6)}

# Swin's dense-task recipe, which the DaViT paper follows; published: the paper's COCO / ADE20K tables
DENSE = Dense(
    variants=(('mz_davit_tiny', 'davit-tiny'), ('mz_davit_small', 'davit-small')), **SWIN_DENSE,
    note="Swin's dense-task recipe, which the DaViT paper follows",
    published={('davit-tiny', 'retinanet'): '44.0 AP', ('davit-small', 'retinanet'): '46.0 AP',
               ('davit-tiny', 'mask-rcnn'): '45.0 / 41.1', ('davit-small', 'mask-rcnn'): '47.7 / 42.9',
               ('davit-tiny', 'upernet'): '46.3 mIoU', ('davit-small', 'upernet'): '48.8 mIoU'})

FAMILY = register_family(Family(
    'davit', DaVit, cfg=dict(crop_pct=0.95, first_conv='stem.conv', classifier='head.fc'), renames=RENAMES,
    dense=DENSE,
    variants=[variant(f'mz_davit_{a}', f'timm:davit_{a}', _PUBLISHED.get(a, (None,) * 3), arch=arch,
                      tag='msft_in1k' if a in _PUBLISHED else '', build_only=a not in ('tiny', 'small'),
                      slow=a == 'small')
              for a, arch in _ARCH.items()]), __name__)
