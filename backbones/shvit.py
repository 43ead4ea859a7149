"""SHViT (Yun & Ro, "SHViT: Single-Head Vision Transformer with Memory Efficient Macro Design", CVPR 2024).

Same architecture and state-dict layout as timm's ``shvit_s*``: a 16x conv stem, three stages of
[residual dw-conv, optional single-head attention on a channel subset, residual FFN] blocks,
PatchMerging downsamples wrapped in dw-conv/FFN residuals, BN + linear head. Every conv is a
bias-free ConvNorm whose BN is folded on the fly in eval; ``model.fuse()`` makes that permanent
(plain convs / linear, residual dw-convs folded into one kernel) with equal logits.
``checkpoint_filter_fn`` also reads the official ysj9909/SHViT release layout (``blocks1..3``).
"""
import re
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import SEModule, SelectAdaptivePool2d, trunc_normal_
from timm.models import generate_default_cfgs, register_model

from . import _registry
from ._builder import base_cfg, create_model
from ._features import Stage, StagedModelMixin
from ._weights import match_state_dict, unwrap_state_dict
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
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
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

    @torch.jit.ignore
    def no_weight_decay(self):
        return set()

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None, reset_other: bool = False):
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.head = NormLinear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

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


def _official_to_timm(k: str) -> str:
    """ysj9909/SHViT names -> timm's: blocks1.j -> stages.0.blocks.j; blocks{2,3}.{0,1,2} -> the
    stage's downsample (pre-merge residuals, PatchMerging, post-merge residuals); blocks{2,3}.{j>=3}
    -> stages.{1,2}.blocks.{j-3}."""
    m = re.match(r'blocks([123])\.(\d+)\.(.*)', k)
    if not m:
        return k
    s, j, rest = int(m.group(1)) - 1, int(m.group(2)), m.group(3)
    if s == 0:
        return f'stages.0.blocks.{j}.{rest}'
    if j == 0:   # Sequential(Residual(dw), Residual(FFN)) before the merge
        return f'stages.{s}.downsample.' + re.sub(r'^(\d)\.', lambda g: f'{int(g.group(1))}.', rest)
    if j == 1:
        return f'stages.{s}.downsample.2.{rest}'
    if j == 2:   # Sequential(Residual(dw), Residual(FFN)) after the merge -> downsample.3 / .4
        return f'stages.{s}.downsample.' + re.sub(r'^(\d)\.', lambda g: f'{int(g.group(1)) + 3}.', rest)
    return f'stages.{s}.blocks.{j - 3}.{rest}'


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: SHViT) -> Dict[str, torch.Tensor]:
    """timm's layout passes through; the official release (``{'model': ...}``, ``blocks1..3`` names,
    some 1x1 conv weights stored 2-D) is renamed and reshaped to it."""
    state_dict = unwrap_state_dict(state_dict)
    own = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        k = _official_to_timm(k)
        if k in own and v.ndim == 2 and own[k].ndim == 4:
            v = v[:, :, None, None]
        out[k] = v
    return match_state_dict(out, model)


def _create_shvit(variant: str, pretrained: bool = False, **kwargs) -> SHViT:
    return create_model(SHViT, variant, pretrained, checkpoint_filter_fn, (0, 1, 2), **kwargs)


def _cfg(**kwargs):
    return base_cfg(**{'pool_size': (4, 4), 'crop_pct': 0.875, 'first_conv': 'patch_embed.0.c', 'classifier': 'head.l',
                       'license': 'mit', **kwargs})


default_cfgs = generate_default_cfgs({
    'mz_shvit_s1.in1k': _cfg(), 'mz_shvit_s2.in1k': _cfg(), 'mz_shvit_s3.in1k': _cfg(),
    'mz_shvit_s4.in1k': _cfg(input_size=(3, 256, 256), pool_size=(4, 4)),
})

_ARCH = {
    's1': dict(embed_dim=(128, 224, 320), depth=(2, 4, 5), partial_dim=(32, 48, 68)),
    's2': dict(embed_dim=(128, 308, 448), depth=(2, 4, 5), partial_dim=(32, 66, 96)),
    's3': dict(embed_dim=(192, 352, 448), depth=(3, 5, 5), partial_dim=(48, 75, 96)),
    's4': dict(embed_dim=(224, 336, 448), depth=(4, 7, 6), partial_dim=(48, 72, 96)),
}


@register_model
def mz_shvit_s1(pretrained=False, **kwargs) -> SHViT:
    return _create_shvit('mz_shvit_s1', pretrained, **dict(_ARCH['s1'], types=('i', 's', 's'), **kwargs))


@register_model
def mz_shvit_s2(pretrained=False, **kwargs) -> SHViT:
    return _create_shvit('mz_shvit_s2', pretrained, **dict(_ARCH['s2'], types=('i', 's', 's'), **kwargs))


@register_model
def mz_shvit_s3(pretrained=False, **kwargs) -> SHViT:
    return _create_shvit('mz_shvit_s3', pretrained, **dict(_ARCH['s3'], types=('i', 's', 's'), **kwargs))


@register_model
def mz_shvit_s4(pretrained=False, **kwargs) -> SHViT:
    return _create_shvit('mz_shvit_s4', pretrained, **dict(_ARCH['s4'], types=('i', 's', 's'), **kwargs))


# published: params M, GMACs (at 224; S4 at 256), top-1
for _n, _p, _g, _t in (('s1', 6.3, 0.241, 72.8), ('s2', 11.4, 0.366, 75.2), ('s3', 14.2, 0.601, 77.4),
                       ('s4', 16.5, 0.986, 79.4)):
    _registry.add(f'mz_shvit_{_n}', 'shvit', f'timm:shvit_{_n}', _p, _g, _t, img_size=256 if _n == 's4' else 224)
