"""MaxViT (Tu et al., "MaxViT: Multi-Axis Vision Transformer", ECCV 2022), TF-compatible variants.

Same architecture and state-dict layout as timm's ``maxvit_*_tf_*``: conv stem, stages of MaxViT
blocks = MBConv (+SE) -> block (window) attention + MLP -> grid attention + MLP, pooled
LayerNorm + tanh pre-logits head. Window and grid attention go through ``ops.window``.

Any input size: window / grid sizes are fixed by the config (img_size // 32: 7 at 224, 12 at 384,
16 at 512); each stage pads its map to the partition multiple, masks padded keys, crops back.
"""
import math
from functools import partial
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.layers import (BatchNormAct2d, DropPath, LayerNorm, LayerNorm2d, Mlp, NormMlpClassifierHead,
                         SEModule, create_conv2d, make_divisible, resize_rel_pos_bias_table,
                         to_2tuple)

from ._builder import register_family
from ._features import Stage, StagedModelMixin
from ._registry import SWIN_DENSE, Dense, Family, variant
from .layers import GELUTanh, bn_foldable, conv_act_forward, conv_bn_folded, conv_forward, drop_path_rates, pad_same
from .mixers import PartitionAttention

__all__ = ['MaxVit']

_BN_EPS = 1e-3     # TF BatchNorm epsilon
_LN_EPS = 1e-5
BnAct = partial(BatchNormAct2d, eps=_BN_EPS, act_layer=GELUTanh)


class Downsample2d(nn.Module):
    """2x2/2 average pool ('same' padded as TF does) then an optional 1x1 expansion."""

    def __init__(self, dim: int, dim_out: int, bias: bool = True):
        super().__init__()
        self.expand = nn.Conv2d(dim, dim_out, 1, bias=bias) if dim != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (timm's AvgPool2dSame: zeros of the padding counted; pad_same also under symbolic sizes)
        return self.expand(F.avg_pool2d(pad_same(x, (2, 2), (2, 2)), 2, 2))


class MbConvBlock(nn.Module):
    """Pre-norm inverted bottleneck: BN -> 1x1 expand -> BN-GELU -> dw 3x3 (stride) -> BN-GELU -> SE -> 1x1."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, expand_ratio: float = 4.,
                 se_ratio: float = 0.25, drop_path: float = 0.):
        super().__init__()
        mid = make_divisible(out_chs * expand_ratio)
        self.shortcut = Downsample2d(in_chs, out_chs) if stride == 2 else nn.Identity()
        self.pre_norm = BnAct(in_chs, apply_act=False)
        self.conv1_1x1 = create_conv2d(in_chs, mid, 1)
        self.norm1 = BnAct(mid)
        self.conv2_kxk = create_conv2d(mid, mid, 3, stride=stride, groups=mid, padding='same')
        self.norm2 = BnAct(mid)
        self.se = SEModule(mid, rd_channels=int(se_ratio * out_chs), act_layer=nn.SiLU)
        self.conv3_1x1 = create_conv2d(mid, out_chs, 1, bias=True)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        if bn_foldable(x, self.pre_norm, self.norm1, self.norm2):
            # eval BatchNorms are affine: fold them into the convs (3 fewer passes over the map)
            x = conv_act_forward(self.conv1_1x1, x, *conv_bn_folded(self.conv1_1x1, self.norm1, self.pre_norm),
                                 self.norm1.act)
            x = conv_act_forward(self.conv2_kxk, x, *conv_bn_folded(self.conv2_kxk, self.norm2), self.norm2.act)
        else:
            x = self.norm1(self.conv1_1x1(self.pre_norm(x)))
            x = self.norm2(conv_forward(self.conv2_kxk, x, self.conv2_kxk.weight, self.conv2_kxk.bias))
        return self.drop_path(self.conv3_1x1(self.se(x))) + shortcut


class PartitionBlock(nn.Module):
    """Channels-last pre-norm transformer block whose mixer is block or grid window attention."""

    def __init__(self, dim: int, partition: str, window_size: Tuple[int, int], dim_head: int = 32,
                 mlp_ratio: float = 4., drop_path: float = 0., proj_drop: float = 0.):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=_LN_EPS)
        self.attn = PartitionAttention(dim, window_size, partition, dim_head=dim_head, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = LayerNorm(dim, eps=_LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=GELUTanh, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class MaxVitBlock(nn.Module):
    def __init__(self, dim: int, dim_out: int, stride: int, window_size: Tuple[int, int],
                 dim_head: int = 32, drop_path: float = 0., proj_drop: float = 0.):
        super().__init__()
        self.conv = MbConvBlock(dim, dim_out, stride, drop_path=drop_path)
        kw = dict(window_size=window_size, dim_head=dim_head, drop_path=drop_path, proj_drop=proj_drop)
        self.attn_block = PartitionBlock(dim_out, 'block', **kw)
        self.attn_grid = PartitionBlock(dim_out, 'grid', **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x).permute(0, 2, 3, 1)
        x = self.attn_grid(self.attn_block(x))
        return x.permute(0, 3, 1, 2)


class Stem(nn.Module):
    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.conv1 = create_conv2d(in_chs, out_chs, 3, stride=2, padding='same', bias=True)
        self.norm1 = BnAct(out_chs)
        self.conv2 = create_conv2d(out_chs, out_chs, 3, stride=1, padding='same', bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bn_foldable(x, self.norm1):
            x = conv_act_forward(self.conv1, x, *conv_bn_folded(self.conv1, self.norm1), self.norm1.act)
        else:
            x = self.norm1(conv_forward(self.conv1, x, self.conv1.weight, self.conv1.bias))
        return self.conv2(x)


class MaxVit(StagedModelMixin, nn.Module):
    stem_is_feature = True

    def __init__(
            self,
            embed_dim: Tuple[int, ...] = (64, 128, 256, 512),
            depths: Tuple[int, ...] = (2, 2, 5, 2),
            stem_width: int = 64,
            head_hidden_size: Optional[int] = 512,
            img_size: int = 224,
            window_size: Optional[int] = None,
            partition_ratio: int = 32,
            dim_head: int = 32,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
    ):
        super().__init__()
        img_size = to_2tuple(img_size)
        self.window_size = to_2tuple(window_size) if window_size else tuple(s // partition_ratio for s in img_size)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = embed_dim[-1]
        self.grad_checkpointing = False
        self.stem = Stem(in_chans, stem_width)
        self.feature_info = [dict(num_chs=stem_width, reduction=2, module='stem')]
        dpr = drop_path_rates(drop_path_rate, depths)
        stages, prev = [], stem_width
        for i, (depth, dim) in enumerate(zip(depths, embed_dim)):
            blocks = [MaxVitBlock(prev if j == 0 else dim, dim, 2 if j == 0 else 1, self.window_size,
                                  dim_head, dpr[i][j], proj_drop_rate) for j in range(depth)]
            stages.append(Stage(blocks))
            self.feature_info.append(dict(num_chs=dim, reduction=2 ** (i + 2), module=f'stages.{i}'))
            prev = dim
        self.stages = nn.Sequential(*stages)
        self.norm = nn.Identity()
        self.head = NormMlpClassifierHead(self.num_features, num_classes, hidden_size=head_hidden_size,
                                          pool_type=global_pool, drop_rate=drop_rate,
                                          norm_layer=partial(LayerNorm2d, eps=_LN_EPS))
        self.head_hidden_size = self.head.num_features
        for name, m in self.named_modules():
            _init_weights(m, name)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {k for k, _ in self.named_parameters() if 'relative_position_bias_table' in k}


def _init_weights(m: nn.Module, name: str) -> None:
    """timm's 'vit_eff' scheme: xavier-uniform linears (tiny MLP bias), EfficientNet-style convs."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.normal_(m.bias, std=1e-6) if '.mlp.' in f'.{name}.' else nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def _resize_tables(state_dict: Dict[str, torch.Tensor], model: MaxVit) -> Dict[str, torch.Tensor]:
    """timm's layout (the PyTorch port of the TF release) loads as is; relative position tables of
    another window size are resized to the model's, conv/linear weights reshaped where they differ."""
    own = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        if k.endswith('relative_position_bias_table') and k in own and v.shape != own[k].shape:
            wh, ww = (own[k].shape[-2] + 1) // 2, (own[k].shape[-1] + 1) // 2
            v = resize_rel_pos_bias_table(v, new_window_size=(wh, ww), new_bias_shape=own[k].shape)
        if k in own and v.ndim != own[k].ndim and v.numel() == own[k].numel():
            v = v.reshape(own[k].shape)
        out[k] = v
    return out


def _cfg(size: int) -> Dict:
    if size == 224:
        return dict(input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.95)
    return dict(input_size=(3, size, size), pool_size=(size // 32, size // 32), mean=IMAGENET_INCEPTION_MEAN,
                std=IMAGENET_INCEPTION_STD, crop_pct=1.0, crop_mode='squash')


_ARCH = {
    'tiny': dict(embed_dim=(64, 128, 256, 512), depths=(2, 2, 5, 2), stem_width=64, head_hidden_size=512),
    'small': dict(embed_dim=(96, 192, 384, 768), depths=(2, 2, 5, 2), stem_width=64, head_hidden_size=768),
    'base': dict(embed_dim=(96, 192, 384, 768), depths=(2, 6, 14, 2), stem_width=64, head_hidden_size=768),
    'large': dict(embed_dim=(128, 256, 512, 1024), depths=(2, 6, 14, 2), stem_width=128, head_hidden_size=1024),
}
# published (paper) figures at 224: params M, GMACs, top-1
_PUBLISHED = {'tiny': (31, 5.6, 83.62), 'small': (69, 11.7, 84.45), 'base': (120, 23.4, 84.95),
              'large': (212, 43.9, 85.17)}
# run in CI (the rest are built on the meta device and counted); the slow mark on the larger ones
_RUN = {('tiny', 224): False, ('tiny', 384): True, ('small', 224): True}

DENSE = Dense(variants=(('mz_maxvit_tiny_tf_224', 'maxvit-tiny'), ('mz_maxvit_small_tf_224', 'maxvit-small')),
              **SWIN_DENSE, note="no official dense configs: Swin's recipe")

FAMILY = register_family(Family(
    'maxvit', MaxVit, cfg=dict(first_conv='stem.conv1', classifier='head.fc'), transform=_resize_tables,
    out_indices=(0, 1, 2, 3, 4), dense=DENSE,
    second_size=lambda s: (2 * s, s),   # multiples of the window grid, 32 * window
    variants=[variant(f'mz_maxvit_{a}_tf_{s}', f'timm:maxvit_{a}_tf_{s}', _PUBLISHED[a] if s == 224 else (None,) * 3,
                      arch=dict(arch, img_size=s), img_size=s, cfg=_cfg(s), build_only=(a, s) not in _RUN,
                      slow=_RUN.get((a, s), False),
                      # timm's own model, counted the same way, gives 23.92 GMACs (zoo 23.90, paper 23.4): the
                      # gap is the paper's counting
                      gmacs_tol=0.025 if (a, s) == ('base', 224) else 0.02,
                      doc=f'MaxViT-{a[0].upper()} (TF weights layout), window/grid {s // 32} ({s}x{s} config).')
              for s in (224, 384, 512) for a, arch in _ARCH.items()]), __name__)
