"""HaloNets (Vaswani et al., "Scaling Local Self-Attention for Parameter Efficient Visual Backbones",
CVPR 2021) as timm defines them: halonet26t, sehalonet33ts, halonet50ts, halonet_h1.

A compact ResNet-style definition (stem -> 4 stages of bottleneck / halo-attention blocks -> optional
final 1x1 conv -> pooled linear head) whose state dict has timm's keys (``stages.{i}.{j}.*``);
timm's generic ByobNet machinery is not ported. Halo attention goes through ``ops.halo`` with timm's
border behaviour (zero keys outside the map, ``border='zero_pad'``); any input size runs (the op
pads to the block multiple), where timm needs multiples of 8 x 32 = 256.
"""
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import BatchNormAct2d, ClassifierHead, DropPath, SEModule, make_divisible
from timm.models import checkpoint_seq

from ._builder import register_family
from ._features import StagedModelMixin
from ._registry import Dense, Family, Release, variant
from .layers import FoldedConvNormAct as ConvNormAct
from .layers import drop_path_rates
from .mixers import HaloAttention

__all__ = ['HaloNet']


@dataclass
class HaloStage:
    types: str                  # one letter per block: 'b' bottleneck, 'a' halo-attention block
    out_chs: int
    stride: int
    bottle_ratio: float = 0.25
    num_heads: Optional[int] = None   # overrides the model's halo heads for this stage


@dataclass
class HaloCfg:
    stages: Tuple[HaloStage, ...]
    stem: str = 'tiered'        # 'tiered' (3x3 x3) or '7x7'
    stem_pool: bool = True
    act: str = 'relu'
    se: bool = False            # SE after the 3x3 of bottlenecks
    final_chs: int = 0          # 1x1 conv before the head (0: none)
    block_size: int = 8
    halo_size: int = 3
    num_heads: int = 8
    extra: Dict = field(default_factory=dict)


def _act(name: str):
    return {'relu': nn.ReLU, 'silu': nn.SiLU}[name]


class Bottleneck(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int, bottle_ratio: float, act, se: bool, drop_path: float):
        super().__init__()
        mid = make_divisible(out_chs * bottle_ratio)
        self.shortcut = _shortcut(in_chs, out_chs, stride, act)
        self.conv1_1x1 = ConvNormAct(in_chs, mid, 1, act_layer=act)
        self.conv2_kxk = ConvNormAct(mid, mid, 3, stride=stride, act_layer=act)
        self.attn = SEModule(mid, rd_ratio=1. / 16) if se else nn.Identity()
        self.conv3_1x1 = ConvNormAct(mid, out_chs, 1, apply_act=False)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.act = act(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3_1x1(self.attn(self.conv2_kxk(self.conv1_1x1(x))))
        return _residual(self.act, self.drop_path(y), self.shortcut(x))


class HaloBlock(nn.Module):
    """1x1 reduce -> halo attention (strided queries when downsampling) -> BN-act -> 1x1 expand."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, bottle_ratio: float, act, drop_path: float,
                 num_heads: int, block_size: int, halo_size: int):
        super().__init__()
        mid = make_divisible(out_chs * bottle_ratio)
        self.shortcut = _shortcut(in_chs, out_chs, stride, act)
        self.conv1_1x1 = ConvNormAct(in_chs, mid, 1, act_layer=act)
        self.self_attn = HaloAttention(mid, mid, stride=stride, num_heads=num_heads, block_size=block_size,
                                       halo_size=halo_size)
        self.post_attn = BatchNormAct2d(mid, act_layer=act)
        self.conv3_1x1 = ConvNormAct(mid, out_chs, 1, apply_act=False)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.act = act(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3_1x1(self.post_attn(self.self_attn(self.conv1_1x1(x))))
        return _residual(self.act, self.drop_path(y), self.shortcut(x))


def _residual(act: nn.Module, y: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
    """act(y + shortcut), adding in place into ``y`` (a fresh block output nothing else holds): at
    256 input the stage-1 maps are 32 MB, and a new tensor per add costs page faults on CPU. Mixed
    dtypes (autocast) keep the out-of-place sum and its type promotion."""
    return act(y.add_(shortcut) if y.dtype == shortcut.dtype else y + shortcut)


def _shortcut(in_chs: int, out_chs: int, stride: int, act) -> nn.Module:
    if in_chs == out_chs and stride == 1:
        return nn.Identity()
    return ConvNormAct(in_chs, out_chs, 1, stride=stride, apply_act=False)


class HaloStageModule(nn.Sequential):
    """Blocks directly under ``stages.{i}`` (timm's ByobNet keys), with gradient checkpointing."""

    def __init__(self, blocks):
        super().__init__(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self, x)
        return super().forward(x)


class Stem(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, kind: str, pool: bool, act):
        super().__init__()
        if kind == 'tiered':    # 3x3/2 -> 3x3 -> 3x3 (/2 when there is no pool)
            c1, c2 = 3 * out_chs // 8, out_chs // 2
            self.conv1 = ConvNormAct(in_chs, c1, 3, stride=2, act_layer=act)
            self.conv2 = ConvNormAct(c1, c2, 3, act_layer=act)
            self.conv3 = ConvNormAct(c2, out_chs, 3, stride=1 if pool else 2, act_layer=act)
        else:                   # 7x7/2
            self.conv1 = ConvNormAct(in_chs, out_chs, 7, stride=2, act_layer=act)
        self.pool = nn.MaxPool2d(3, 2, 1) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.children():
            x = m(x)
        return x


class HaloNet(StagedModelMixin, nn.Module):
    def __init__(self, cfg: HaloCfg, in_chans: int = 3, num_classes: int = 1000, global_pool: str = 'avg',
                 drop_rate: float = 0., drop_path_rate: float = 0., stem_chs: int = 64):
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.grad_checkpointing = False
        act = _act(cfg.act)
        self.stem = Stem(in_chans, stem_chs, cfg.stem, cfg.stem_pool, act)
        dpr = drop_path_rates(drop_path_rate, [len(s.types) for s in cfg.stages])
        stages, self.feature_info, prev, red = [], [], stem_chs, 4
        for i, s in enumerate(cfg.stages):
            blocks = []
            for j, t in enumerate(s.types):
                stride = s.stride if j == 0 else 1
                if t == 'b':
                    blocks.append(Bottleneck(prev, s.out_chs, stride, s.bottle_ratio, act, cfg.se, dpr[i][j]))
                else:
                    blocks.append(HaloBlock(prev, s.out_chs, stride, s.bottle_ratio, act, dpr[i][j],
                                            s.num_heads or cfg.num_heads, cfg.block_size, cfg.halo_size))
                prev = s.out_chs
            red *= s.stride
            stages.append(HaloStageModule(blocks))
            self.feature_info.append(dict(num_chs=s.out_chs, reduction=red, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self.final_conv = ConvNormAct(prev, cfg.final_chs, 1, act_layer=act) if cfg.final_chs else nn.Identity()
        self.num_features = cfg.final_chs or prev
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.head_hidden_size = self.head.num_features   # the pooled width, as timm's
        for n, m in self.named_modules():
            if isinstance(m, nn.Conv2d) and not n.endswith(('.q', '.kv')):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    @property
    def norm(self) -> nn.Module:
        """The final 1x1 conv plays the role of the final norm in the shared feature API."""
        return self.final_conv

    @norm.setter
    def norm(self, m: nn.Module) -> None:
        self.final_conv = m

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r'^stem', blocks=r'^stages\.(\d+)' if coarse else r'^stages\.(\d+)\.(\d+)')

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None, reset_other: bool = False):
        """timm's ByobNet semantics: the pooling is kept unless given, the new layers follow the model's mode,
        the pooled width (2x for 'catavgmax') is head_hidden_size. ``reset_other`` (the shared
        prune_intermediate_layers' call) also drops the final 1x1 conv, the slot of a final norm there."""
        self.num_classes = num_classes
        if reset_other:
            self.final_conv = nn.Identity()
            self.num_features = self.feature_info[-1]['num_chs']
        self.head.reset(num_classes, global_pool, in_features=self.num_features)
        self.head_hidden_size = self.head.num_features

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)


CFGS = {
    'halonet_h1': HaloCfg(stages=(HaloStage('aaa', 64, 1, 1.), HaloStage('aaa', 128, 2, 1.),
                                  HaloStage('a' * 10, 256, 2, 1.), HaloStage('aaa', 512, 2, 1.)),
                          stem='7x7', halo_size=3),
    'halonet26t': HaloCfg(stages=(HaloStage('bb', 256, 1), HaloStage('bb', 512, 2), HaloStage('ba', 1024, 2),
                                  HaloStage('aa', 2048, 2)), halo_size=2),
    'sehalonet33ts': HaloCfg(stages=(HaloStage('bb', 256, 1), HaloStage('bba', 512, 2), HaloStage('bba', 1024, 2),
                                     HaloStage('aa', 1536, 2, 0.333)),
                             stem_pool=False, act='silu', se=True, final_chs=1280, halo_size=3),
    'halonet50ts': HaloCfg(stages=(HaloStage('bbb', 256, 1), HaloStage('bbba', 512, 2, num_heads=4),
                                   HaloStage('bababa', 1024, 2), HaloStage('bab', 2048, 2)),
                           act='silu', halo_size=3),
}

# timm's halonet26t has published figures (12.5 M, 3.19 GMACs at 256, 79.1, timm results); the others none here
_PUBLISHED = {'halonet26t': (12.5, 3.19, 79.1)}
_TAGS = {'halonet_h1': 'untrained', 'halonet26t': 'a1h_in1k', 'sehalonet33ts': 'ra2_in1k', 'halonet50ts': 'a1h_in1k'}

# timm's layout (its ByobNet keys; the original rwightman release files are timm's): nothing to rename
# no official dense configs: mmdet's / mmseg's ResNet recipe (BN backbone, the mm base schedules' SGD)
DENSE = Dense(variants=(('mz_halonet26t', 'halonet26t'), ('mz_halonet50ts', 'halonet50ts')),
              backbone=dict(frozen_stages=1), det=dict(norm_eval=True),
              note="no official dense configs: mmdet's / mmseg's ResNet recipe (BN backbone)")

FAMILY = register_family(Family(
    'halonet', HaloNet, cfg=dict(input_size=(3, 256, 256), pool_size=(8, 8), crop_pct=0.95,
                                 first_conv='stem.conv1.conv', classifier='head.fc'),
    dense=DENSE, second_size=lambda s: (2 * s, s),     # timm's halo attention needs multiples of 8 x 32
    variants=[variant(f'mz_{n}', f'timm:{n}', _PUBLISHED.get(n, (None,) * 3), arch=dict(cfg=cfg), tag=_TAGS[n],
                      img_size=256, cfg=dict(crop_pct=0.94) if n in ('sehalonet33ts', 'halonet50ts') else {},
                      slow=n in ('halonet50ts', 'halonet_h1', 'sehalonet33ts'))
              for n, cfg in CFGS.items()]), __name__)
