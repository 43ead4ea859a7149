"""TransNeXt (Shi, "TransNeXt: Robust Foveal Visual Perception for Vision Transformers", CVPR 2024).

Hyper-parameters and the official release layout are those of DaiShiResearch/TransNeXt
(../shared/OFFICIAL-FACTS.md): overlapping patch embeds (7x7/4, then 3x3/2, each + LayerNorm eps
1e-5), pre-norm blocks (LayerNorm eps 1e-6) of aggregated attention (stages 1-3) or global attention
(stage 4) and a convolutional GLU MLP, a LayerNorm closing each stage, mean-pooled linear head.
The mixers (``backbones/mixers/aggregated.py``) compute every resolution-dependent term for the actual
map, so any input size runs (the official model is tied to the one square size it was built for).
Inside a stage the maps are NHWC; stage outputs are NCHW views of them.
The checkpoint loader reads the official layout (``RENAMES``: (``patch_embed{i}``, ``block{i}.{j}``, ``norm{i}``,
``head``) and the zoo's.

Checked against the official code (tests/fixtures, tools/official/transnext.py): logits equal the official
model's with the same weights; parameter counts and state-dict keys are the official ones.
"""
from typing import Tuple

import torch
import torch.nn as nn
from timm.layers import ClassifierHead, DropPath

from ._builder import register_family
from ._features import Stage, StagedModelMixin
from ._registry import SWIN_DENSE, Dense, Family, Release, variant
from ._renames import Rename, Renames
from .layers import _hooked, conv_act_forward, drop_path_rates, trunc_normal_init
from .mixers.aggregated import AggregatedAttention, GlobalAttention
from .ops._dispatch import records_grad
from .ops._onednn import linear

__all__ = ['TransNeXt']


class DWConv(nn.Module):
    """Depthwise 3x3 conv on an NHWC map (official key: ``dwconv.dwconv``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class ConvGLU(nn.Module):
    """fc1 -> (x, gate) halves; fc2(GELU(dwconv(x)) * gate); hidden = int(2 * dim * ratio / 3)."""

    def __init__(self, dim: int, mlp_ratio: float, drop: float = 0.):
        super().__init__()
        hidden = int(2 * int(dim * mlp_ratio) / 3)
        self.fc1 = nn.Linear(dim, hidden * 2)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fc1's two halves as two products: each half a dense map (the halves of one product are strided views,
        # which the depthwise conv copied first); the product a fresh map where nothing keeps h for a backward
        if _hooked(self.fc1):   # (a hook on fc1 sees its call)
            x, gate = self.fc1(x).chunk(2, dim=-1)
        else:
            n, w, b = self.fc2.in_features, self.fc1.weight, self.fc1.bias
            x, gate = linear(x, w[:n], None if b is None else b[:n]), linear(x, w[n:], None if b is None else b[n:])
        conv = self.dwconv.dwconv   # GELU(dwconv) as one oneDNN convolution where it runs on oneDNN (inference)
        h = conv_act_forward(conv, x.permute(0, 3, 1, 2), conv.weight, conv.bias, self.act).permute(0, 2, 3, 1)
        h = h.mul_(gate) if not records_grad(h, gate) and h.dtype == gate.dtype else h * gate
        return self.drop(self.fc2(self.drop(h)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int, pretrain_hw: Tuple[int, int],
                 qkv_bias: bool = True, drop: float = 0., drop_path: float = 0.):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if sr_ratio > 1:
            self.attn = AggregatedAttention(dim, num_heads, sr_ratio, 3, qkv_bias, pretrain_hw, proj_drop=drop)
        else:
            self.attn = GlobalAttention(dim, num_heads, qkv_bias, pretrain_hw, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ConvGLU(dim, mlp_ratio, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Overlapping conv (padding k // 2, so any size gives ceil(H / stride)) + LayerNorm; NCHW -> NHWC."""

    def __init__(self, in_chs: int, dim: int, kernel: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chs, dim, kernel, stride, kernel // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class TransNeXtStage(Stage):
    """Patch embed -> blocks (NHWC) -> LayerNorm, returned as an NCHW view."""

    def __init__(self, blocks, downsample: PatchEmbed, dim: int):
        super().__init__(blocks, downsample)
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x)).permute(0, 3, 1, 2)


class TransNeXt(StagedModelMixin, nn.Module):
    def __init__(
            self,
            depths: Tuple[int, ...] = (2, 2, 15, 2),
            embed_dims: Tuple[int, ...] = (48, 96, 192, 384),
            num_heads: Tuple[int, ...] = (2, 4, 8, 16),
            mlp_ratios: Tuple[float, ...] = (8, 8, 4, 4),
            sr_ratios: Tuple[int, ...] = (8, 4, 2, 1),
            pretrain_size: int = 224,
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
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.grad_checkpointing = False
        self.stem = nn.Identity()
        dpr = drop_path_rates(drop_path_rate, depths)
        stages, self.feature_info, prev = [], [], in_chans
        for i, (depth, dim) in enumerate(zip(depths, embed_dims)):
            pre = pretrain_size // 2 ** (i + 2)     # the CPB coordinates are normalised by this grid
            blocks = [Block(dim, num_heads[i], mlp_ratios[i], sr_ratios[i], (pre, pre), qkv_bias, drop_rate,
                            dpr[i][j]) for j in range(depth)]
            embed = PatchEmbed(prev, dim, 7, 4) if i == 0 else PatchEmbed(prev, dim, 3, 2)
            stages.append(TransNeXtStage(blocks, embed, dim))
            self.feature_info.append(dict(num_chs=dim, reduction=2 ** (i + 2), module=f'stages.{i}'))
            prev = dim
        self.stages = nn.Sequential(*stages)
        self.norm = nn.Identity()
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.apply(trunc_normal_init(nn.Linear))

    @torch.jit.ignore
    def no_weight_decay(self):
        return {n for n, _ in self.named_parameters()
                if n.endswith(('query_embedding', 'relative_pos_bias_local', 'learnable_tokens', 'learnable_bias',
                               'temperature'))}


# DaiShiResearch/TransNeXt's names (a plain state dict) -> the zoo's
RENAMES = Renames([
    Rename('patch_embed{s+1}.', 'stages.{s}.downsample.'), Rename('block{s+1}.', 'stages.{s}.blocks.'),
    Rename('norm{s+1}.', 'stages.{s}.norm.'), Rename('head.', 'head.fc.'),
])

_ARCH = {
    'micro': dict(depths=(2, 2, 15, 2), embed_dims=(48, 96, 192, 384), num_heads=(2, 4, 8, 16)),
    'tiny': dict(depths=(2, 2, 15, 2), embed_dims=(72, 144, 288, 576), num_heads=(3, 6, 12, 24)),
    'small': dict(depths=(5, 5, 22, 5), embed_dims=(72, 144, 288, 576), num_heads=(3, 6, 12, 24)),
    'base': dict(depths=(5, 5, 23, 5), embed_dims=(96, 192, 384, 768), num_heads=(4, 8, 16, 32)),
}
_PUBLISHED = {'micro': (12.8, 2.7, 82.5), 'tiny': (28.2, 5.7, 84.0), 'small': (49.7, 10.3, 84.7),
              'base': (89.7, 18.4, 84.8)}
# parameter count and state-dict size measured with the official code (../shared/OFFICIAL-FACTS.md), 1000 classes
_OFFICIAL = {'micro': (12_809_304, 617), 'tiny': (28_258_960, 617), 'small': (49_741_564, 1054),
             'base': (89_721_496, 1083)}

# the authors' HuggingFace release files: a plain state dict in the official layout
_HF = 'https://huggingface.co/DaiShiResearch/transnext-{0}-224-1k/resolve/main/transnext_{0}_224_1k.pth'
# published: the official repository's README (Mask R-CNN 1x box AP, UperNet 160k mIoU)
DENSE = Dense(
    variants=(('mz_transnext_tiny', 'transnext-tiny'), ('mz_transnext_small', 'transnext-small')),
    **{**SWIN_DENSE, 'backbone': dict()},      # its stages already end in a LayerNorm (the official dense outputs)
    note="Swin's recipe (the official TransNeXt dense configs could not be read here)",
    published={('transnext-tiny', 'mask-rcnn'): '49.9 AP', ('transnext-small', 'mask-rcnn'): '51.1 AP',
               ('transnext-tiny', 'upernet'): '51.1 mIoU', ('transnext-small', 'upernet'): '52.2 mIoU'})

FAMILY = register_family(Family(
    'transnext', TransNeXt, cfg=dict(crop_pct=0.875, first_conv='stages.0.downsample.proj', classifier='head.fc'),
    renames=RENAMES, dense=DENSE,
    variants=[variant(f'mz_transnext_{a}', 'official:DaiShiResearch/TransNeXt', _PUBLISHED[a], arch=arch,
                      build_only=a in ('small', 'base'), official_params=_OFFICIAL[a][0],
                      official_keys=_OFFICIAL[a][1], release=Release(_HF.format(a)))
              for a, arch in _ARCH.items()]), __name__)
