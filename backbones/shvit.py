"""SHViT (Yun & Ro, "SHViT: Single-Head Vision Transformer with Memory Efficient Macro Design", CVPR 2024).

Same architecture and state-dict layout as timm's ``shvit_s*``: a 16x conv stem, three stages of
[residual dw-conv, optional single-head attention on a channel subset, residual FFN] blocks,
PatchMerging downsamples wrapped in dw-conv/FFN residuals, BN + linear head. Every conv is a
bias-free ConvNorm whose BN is folded on the fly in eval; ``model.fuse()`` makes that permanent
(plain convs / linear, residual dw-convs folded into one kernel) with equal logits.
``checkpoint_filter_fn`` also reads the official ysj9909/SHViT release layout (``blocks1..3``).
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import SEModule, SelectAdaptivePool2d, trunc_normal_

from ._builder import register_family
from ._features import Stage, StagedModelMixin
from ._registry import Dense, Family, Release, variant
from ._renames import Rename, Renames
from .layers import ConvNorm, Linear, Residual, fuse_modules
from .mixers import SingleHeadAttention

__all__ = ['SHViT']


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.pw1 = ConvNorm(dim, hidden)
        self.act = nn.ReLU(inplace=True)
        self.pw2 = ConvNorm(hidden, dim, bn_weight_init=0.)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw2(self.act(self.pw1(x)))


class PatchMerging(nn.Module):
    """1x1 expand x4 -> ReLU -> dw 3x3/2 -> ReLU -> SE -> 1x1 project."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        hid = dim * 4
        self.conv1 = ConvNorm(dim, hid)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = ConvNorm(hid, hid, 3, 2, 1, groups=hid)
        self.act2 = nn.ReLU(inplace=True)
        self.se = SEModule(hid, rd_ratio=0.25)
        self.conv3 = ConvNorm(hid, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.se(self.act2(self.conv2(self.act1(self.conv1(x))))))


class SHViTBlock(nn.Module):
    def __init__(self, dim: int, qk_dim: int, pdim: int, attn: bool):
        super().__init__()
        self.conv = Residual(ConvNorm(dim, dim, 3, 1, 1, groups=dim, bn_weight_init=0.))
        self.mixer = Residual(SingleHeadAttention(dim, qk_dim, pdim)) if attn else nn.Identity()
        self.ffn = Residual(FFN(dim, dim * 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.mixer(self.conv(x)))


def _downsample(prev: int, dim: int) -> nn.Module:
    return nn.Sequential(
        Residual(ConvNorm(prev, prev, 3, 1, 1, groups=prev)), Residual(FFN(prev, prev * 2)),
        PatchMerging(prev, dim),
        Residual(ConvNorm(dim, dim, 3, 1, 1, groups=dim)), Residual(FFN(dim, dim * 2)))


class NormLinear(nn.Module):
    """BatchNorm1d -> Linear (keys ``bn``, ``l``)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(in_features)
        self.l = nn.Linear(in_features, out_features)
        trunc_normal_(self.l.weight, std=.02)
        nn.init.zeros_(self.l.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l(self.bn(x))

    @torch.no_grad()
    def fuse(self) -> nn.Linear:
        bn = self.bn.eval()
        s = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        t = bn.bias - bn.running_mean * s
        m = Linear(self.l.in_features, self.l.out_features, device=s.device, dtype=s.dtype)
        m.weight.copy_(self.l.weight * s[None])
        m.bias.copy_(self.l.weight @ t + self.l.bias)
        return m


def _global_pool(pool_type: str, num_classes: int) -> SelectAdaptivePool2d:
    """Flattened pooled vectors; with pooling off ('') the unpooled (B, C, H, W) map, as timm's SHViT."""
    pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=bool(pool_type))
    if pool.feat_mult() != 1:
        raise ValueError(f"SHViT's head (BatchNorm1d + Linear over num_features) cannot take global_pool="
                         f"{pool_type!r}, which changes the pooled width; use 'avg', 'max', 'avgmax' or ''")
    if not pool_type and num_classes > 0:
        raise ValueError(f"SHViT's classifier takes pooled vectors: global_pool='' needs num_classes=0 "
                         f"(got {num_classes}); set a pooling ('avg') to keep a classifier")
    return pool


class SHViT(StagedModelMixin, nn.Module):
    def __init__(
            self,
            embed_dim: Tuple[int, ...] = (128, 256, 384),
            partial_dim: Tuple[int, ...] = (32, 64, 96),
            depth: Tuple[int, ...] = (1, 2, 3),
            types: Tuple[str, ...] = ('s', 's', 's'),
            qk_dim: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        c = embed_dim[0]
        self.patch_embed = nn.Sequential(
            ConvNorm(in_chans, c // 8, 3, 2, 1), nn.ReLU(True), ConvNorm(c // 8, c // 4, 3, 2, 1), nn.ReLU(True),
            ConvNorm(c // 4, c // 2, 3, 2, 1), nn.ReLU(True), ConvNorm(c // 2, c, 3, 2, 1))
        stages, self.feature_info, prev = [], [], c
        for i, (dim, pdim, d, t) in enumerate(zip(embed_dim, partial_dim, depth, types)):
            blocks = [SHViTBlock(dim, qk_dim, pdim, t == 's') for _ in range(d)]
            stages.append(Stage(blocks, _downsample(prev, dim) if prev != dim else None))
            self.feature_info.append(dict(num_chs=dim, reduction=2 ** (i + 4), module=f'stages.{i}'))
            prev = dim
        self.stages = nn.Sequential(*stages)
        self.norm = nn.Identity()
        self.num_features = self.head_hidden_size = embed_dim[-1]
        self.global_pool = _global_pool(global_pool, num_classes)
        self.head = NormLinear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    @property
    def stem(self):
        return self.patch_embed

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r'^patch_embed', blocks=r'^stages\.(\d+)' if coarse else [
            (r'^stages\.(\d+)\.downsample', (0,)), (r'^stages\.(\d+)\.blocks\.(\d+)', None)])

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.l if isinstance(self.head, NormLinear) else self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None, reset_other: bool = False):
        pool = _global_pool(self.global_pool.pool_type if global_pool is None else global_pool, num_classes)
        self.num_classes, self.global_pool = num_classes, pool.train(self.training)
        # the new head follows the model's mode, as timm's (its BatchNorm1d would otherwise use batch statistics)
        head = NormLinear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.head = head.train(self.training)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate > 0.:
            x = nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.head(x)

    @torch.no_grad()
    def fuse(self) -> 'SHViT':
        """Fold every BatchNorm into its conv / the head's linear (inference only; irreversible)."""
        self.eval()
        return fuse_modules(self)

    reparameterize = fuse


# ysj9909/SHViT's release names -> timm's: blocks1.j is stage 0's block j; in blocks2/3 entries 0..2 are the
# downsample (0: residuals before the merge -> downsample.0/1, 1: PatchMerging -> downsample.2, 2: residuals
# after it -> downsample.3/4) and entries j >= 3 the stage's block j - 3
RENAMES = Renames([
    Rename('blocks1.{j}.', 'stages.0.blocks.{j}.'),
    Rename('blocks{s+1}.2.{d}.', 'stages.{s}.downsample.{d+3}.'),
    Rename('blocks{s+1}.1.', 'stages.{s}.downsample.2.'),
    Rename('blocks{s+1}.0.{d}.', 'stages.{s}.downsample.{d}.'),
    Rename('blocks{s+1}.{j+3}.', 'stages.{s}.blocks.{j}.'),
])


def _conv_weights_4d(state_dict: Dict[str, torch.Tensor], model: SHViT) -> Dict[str, torch.Tensor]:
    """Some release tensors store 1x1 conv weights 2-D."""
    own = model.state_dict()
    return {k: v[:, :, None, None] if k in own and v.ndim == 2 and own[k].ndim == 4 else v
            for k, v in state_dict.items()}


_ARCH = {
    's1': dict(embed_dim=(128, 224, 320), depth=(2, 4, 5), partial_dim=(32, 48, 68)),
    's2': dict(embed_dim=(128, 308, 448), depth=(2, 4, 5), partial_dim=(32, 66, 96)),
    's3': dict(embed_dim=(192, 352, 448), depth=(3, 5, 5), partial_dim=(48, 75, 96)),
    's4': dict(embed_dim=(224, 336, 448), depth=(4, 7, 6), partial_dim=(48, 72, 96)),
}
# published: params M, GMACs (at 224; S4 at 256), top-1
_PUBLISHED = {'s1': (6.3, 0.241, 72.8), 's2': (11.4, 0.366, 75.2), 's3': (14.2, 0.601, 77.4), 's4': (16.5, 0.986, 79.4)}

# no dense config in the official repository: AdamW 2e-4 as PoolFormer; outputs at strides 16-64, so anchors /
# RoI strides follow (mixzoo's config generator reads them from the adapter)
DENSE = Dense(
    variants=(('mz_shvit_s1', 'shvit-s1'), ('mz_shvit_s4', 'shvit-s4')),
    det=dict(optimizer=dict(type='AdamW', lr=2e-4, weight_decay=1e-4), norm_eval=True),
    seg=dict(optimizer=dict(type='AdamW', lr=2e-4, weight_decay=1e-4), poly_power=0.9, warmup=0),
    note='no dense config in this repo: AdamW 2e-4 as PoolFormer; outputs at strides 16-64, so '
         'anchors/RoI strides follow')
_RELEASE = 'https://github.com/ysj9909/SHViT/releases/download/v1.0'

FAMILY = register_family(Family(
    'shvit', SHViT, cfg=dict(pool_size=(4, 4), crop_pct=0.875, first_conv='patch_embed.0.c', classifier='head.l',
                             license='mit'),
    renames=RENAMES, transform=_conv_weights_4d, out_indices=(0, 1, 2), num_stages=3, dense=DENSE,
    variants=[variant(f'mz_shvit_{n}', f'timm:shvit_{n}', _PUBLISHED[n], arch=dict(arch, types=('i', 's', 's')),
                      img_size=256 if n == 's4' else 224, cfg=dict(input_size=(3, 256, 256)) if n == 's4' else {},
                      slow=n in ('s3', 's4'), release=Release(f'{_RELEASE}/shvit_{n}.pth'))
              for n, arch in _ARCH.items()]), __name__)
