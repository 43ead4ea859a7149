"""L2ViT (Zheng et al., "The Linear Attention Resurrection in Vision Transformer").

Hyper-parameters, block order and the release layout are those of ChuanyangZheng/L2ViT
(classification/models/l2vit.py; ../shared/OFFICIAL-FACTS.md). A convolutional stem (3x3/2 conv, BN,
ReLU, 3x3/2 conv, BN) + LayerNorm, then four stages, each a 2x2/2 conv after a LayerNorm (stages 2-4)
and blocks alternating
  LWA (even index): x += dwconv3x3(x); x += WindowAttn(norm1 x); x += dwconv3x3(x); x += Mlp(norm2 x)
  LGA (odd index):  x += dwconv3x3(x); x += LinearAttn(norm1 x); x += LCM(norm3 x); x += Mlp(norm2 x)
with non-shifted 7x7 windows (``mixers.PartitionAttention``; the map is zero-padded after norm1 and the
padded tokens are NOT masked: they take part as keys/values, as in the official code), ReLU linear
attention with a per-head temperature and the normaliser clamped at 100 (``mixers.LinearAttention``,
``ops.linear``) and the local concentration module dw7x7 -> GELU -> BN -> dw7x7. Every LayerNorm has eps
1e-5, there is no layer scale (the official blocks ignore ``layer_scale_init_value``). Head: LayerNorm on
the tokens, mean, linear. Any input size: the image is zero-padded at the right/bottom to a multiple of
4 before the stem and each downsample's input to even sides after its LayerNorm, as officially.

Inside a stage the maps are NHWC; stage outputs are NCHW views of them.
``checkpoint_filter_fn`` reads the official layout (``downsample_layers``, ``stages.{i}.{j}``, ``norm``,
``head``) and the zoo's. The release files hold ``model`` and ``model_ema``; like the official evaluation,
the zoo loads ``model`` unless ``checkpoint_entry='model_ema'`` is passed to ``timm.create_model``.
"""
from typing import Tuple

import torch
import torch.nn as nn
from timm.layers import ClassifierHead, DropPath, LayerNorm2d, Mlp

from .ops._dispatch import records_grad, tracing
from .ops.window import pad_to_multiple

from ._builder import register_family
from ._features import Stage, StagedModelMixin
from ._registry import Dense, Family, Release, variant
from ._renames import Rename, Renames
from .layers import FoldedConvNormAct, drop_path_rates, trunc_normal_init
from .mixers.linear import LinearAttention
from .mixers.window import PartitionAttention

__all__ = ['L2ViT']

ENTRIES = ('model', 'model_ema')


def _nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


def _residual(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + y, summed in place in y when y is a fresh dense branch output of the same dtype (every branch here
    ends in a conv / linear / dropout whose backward does not need its output): one activation-sized
    allocation less per residual, which on CPU costs page faults. A cropped (padded) window output or a
    mixed-precision branch takes the plain sum."""
    return y.add_(x) if y.dtype == x.dtype and y.is_contiguous() else x + y


class GELU(nn.GELU):
    """nn.GELU, applied in place where nothing needs its input for a backward (inference: the MLP's
    hidden map is its largest activation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tracing() or records_grad(x):
            return super().forward(x)
        return torch.ops.aten.gelu_(x)


class ConvPosEnc(nn.Module):
    """Conditional position encoding: x + dwconv3x3(x) on an NHWC map (official key ``proj``)."""

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _residual(x, _nhwc(self.proj(_nchw(x))))


class LocalConcentration(nn.Module):
    """LCM: dw7x7 -> GELU -> BatchNorm -> dw7x7 on an NHWC map (official keys ``conv1``, ``bn``, ``conv2``).
    The BN sits between two padded convs, so it is not folded (zero padding after it is not its shift)."""

    def __init__(self, dim: int, kernel_size: int = 7):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.act = GELU()
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _nhwc(self.conv2(self.bn(self.act(self.conv1(_nchw(x))))))


class LWABlock(nn.Module):
    """Local window attention block (even block index)."""

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, mlp_ratio: float = 4., drop_path: float = 0.):
        super().__init__()
        self.cpe = nn.ModuleList([ConvPosEnc(dim), ConvPosEnc(dim)])
        self.norm1 = nn.LayerNorm(dim)
        self.attn = PartitionAttention(dim, window_size, 'block', dim_head=dim // num_heads, bias=True, rel_pos=False,
                                       mask_padding=False)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=GELU)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cpe[0](x)
        x = _residual(x, self.drop_path(self.attn(self.norm1(x))))
        x = self.cpe[1](x)
        return _residual(x, self.drop_path(self.mlp(self.norm2(x))))


class LGABlock(nn.Module):
    """Linear global attention block (odd block index); norm3 + LCM come before norm2 + MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4., drop_path: float = 0.):
        super().__init__()
        self.cpe = nn.ModuleList([ConvPosEnc(dim)])
        self.norm1 = nn.LayerNorm(dim)
        self.attn = LinearAttention(dim, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=GELU)
        self.norm3 = nn.LayerNorm(dim)
        self.local_mp = LocalConcentration(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cpe[0](x)
        B, H, W, C = x.shape
        x = _residual(x, self.drop_path(self.attn(self.norm1(x).reshape(B, H * W, C)).view(B, H, W, C)))
        x = _residual(x, self.drop_path(self.local_mp(self.norm3(x))))
        return _residual(x, self.drop_path(self.mlp(self.norm2(x))))


class Stem(nn.Module):
    """Pad to a multiple of 4, conv3x3/2 + BN + ReLU, conv3x3/2 + BN (folded in eval), LayerNorm; NCHW in,
    NCHW view of the NHWC result out."""

    def __init__(self, in_chs: int, dim: int):
        super().__init__()
        self.conv1 = FoldedConvNormAct(in_chs, dim // 2, 3, stride=2, padding=1, bias=True, act_layer=nn.ReLU)
        self.conv2 = FoldedConvNormAct(dim // 2, dim, 3, stride=2, padding=1, bias=True, apply_act=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _nchw(self.norm(_nhwc(self.conv2(self.conv1(pad_to_multiple(x, (4, 4), (2, 3)))))))


class Downsample(nn.Module):
    """LayerNorm over the input channels, zero pad to even sides, conv2x2/2; NHWC -> NHWC."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_chs)
        self.proj = nn.Conv2d(in_chs, out_chs, 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _nhwc(self.proj(_nchw(pad_to_multiple(self.norm(x), (2, 2), (1, 2)))))


class L2ViTStage(Stage):
    """(Downsample ->) blocks on NHWC; NCHW views in and out (so features and the mixin see NCHW)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _nchw(super().forward(_nhwc(x)))


class L2ViT(StagedModelMixin, nn.Module):
    # no_weight_decay: the mixin's, as the official training exempts only 1-D parameters and biases (its
    # (heads, 1, 1) temperatures are decayed)
    def __init__(
            self,
            depths: Tuple[int, ...] = (2, 2, 6, 2),
            dims: Tuple[int, ...] = (96, 192, 384, 768),
            num_heads: Tuple[int, ...] = (3, 6, 12, 24),
            mlp_ratio: float = 4.,
            window_size: int = 7,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
    ):
        super().__init__()
        if not len(depths) == len(dims) == len(num_heads):
            raise ValueError(f'depths {depths}, dims {dims} and num_heads {num_heads} must have one entry per stage')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = dims[-1]
        self.grad_checkpointing = False
        self.stem = Stem(in_chans, dims[0])
        dpr = drop_path_rates(drop_path_rate, depths)
        stages, self.feature_info = [], []
        for i, (depth, dim, heads) in enumerate(zip(depths, dims, num_heads)):
            blocks = [LWABlock(dim, heads, window_size, mlp_ratio, dpr[i][j]) if j % 2 == 0 else
                      LGABlock(dim, heads, mlp_ratio, dpr[i][j]) for j in range(depth)]
            stages.append(L2ViTStage(blocks, Downsample(dims[i - 1], dim) if i else None))
            self.feature_info.append(dict(num_chs=dim, reduction=2 ** (i + 2), module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self.norm = LayerNorm2d(self.num_features, eps=1e-5)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.apply(trunc_normal_init(nn.Linear, nn.Conv2d))


# ChuanyangZheng/L2ViT's names -> the zoo's: its conv stem is downsample_layers.0.proj.proj.{0,1,3,4} + .norm,
# the other downsamples downsample_layers.{i} (LayerNorm + 2x2 conv), blocks stages.{i}.{j}
RENAMES = Renames([
    Rename('downsample_layers.0.proj.proj.0.', 'stem.conv1.conv.'), Rename('downsample_layers.0.proj.proj.1.', 'stem.conv1.bn.'),
    Rename('downsample_layers.0.proj.proj.3.', 'stem.conv2.conv.'), Rename('downsample_layers.0.proj.proj.4.', 'stem.conv2.bn.'),
    Rename('downsample_layers.0.norm.', 'stem.norm.'), Rename('downsample_layers.{i}.', 'stages.{i}.downsample.'),
    Rename('stages.{i}.{j}.', 'stages.{i}.blocks.{j}.'), Rename('head.', 'head.fc.'),
])

_ARCH = {
    'tiny': dict(depths=(2, 2, 6, 2), dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24)),
    'small': dict(depths=(2, 2, 18, 2), dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24)),
    'base': dict(depths=(2, 2, 18, 2), dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32)),
}
_PUBLISHED = {'tiny': (29, 4.7, 83.1), 'small': (50, 9.0, 84.1), 'base': (89, 15.9, 84.4)}
# measured with the official code, 1000 classes: params, state-dict keys
_OFFICIAL = {'tiny': (28_596_781, 284), 'small': (50_199_157, 536), 'base': (88_577_188, 536)}

# the release files are training checkpoints {'model', 'model_ema', 'optimizer', ...}: 'model' is loaded (what the
# official evaluation reads) unless checkpoint_entry='model_ema'
# ChuanyangZheng/L2ViT's dense configs (AdamW, no decay exemptions; its multi-scale det train pipeline not
# copied); Semantic FPN, which it has no config for: UperNet's optimizer
DENSE = Dense(
    variants=(('mz_l2vit_tiny', 'l2vit-tiny'), ('mz_l2vit_small', 'l2vit-small')),
    backbone=dict(out_norm='ln'),   # the official dense backbone adds a LayerNorm per output (norm{i})
    drop_path=dict(det=(0.1, 0.1), seg=(0.3, 0.3)),
    det=dict(optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05)),
    seg=dict(optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01), poly_power=1.0,
             warmup=1500),
    note='ChuanyangZheng/L2ViT dense configs (AdamW, no decay exemptions; its multi-scale det train '
         "pipeline not copied); Semantic FPN, which it has no config for: UperNet's optimizer")
# GitHub release v1.0: {'model', 'model_ema', 'optimizer', ...}
_RELEASE = 'https://github.com/ChuanyangZheng/L2ViT/releases/download/v1.0/L2ViT-{}-checkpoint-best-ema.pth'

FAMILY = register_family(Family(
    'l2vit', L2ViT, cfg=dict(crop_pct=0.875, first_conv='stem.conv1.conv', classifier='head.fc'), renames=RENAMES,
    checkpoint_entries=ENTRIES, dense=DENSE,
    variants=[variant(f'mz_l2vit_{a}', 'official:ChuanyangZheng/L2ViT', _PUBLISHED[a], arch=arch,
                      build_only=a == 'base', slow=a == 'small', official_params=_OFFICIAL[a][0],
                      official_keys=_OFFICIAL[a][1], release=Release(_RELEASE.format(a.capitalize())))
              for a, arch in _ARCH.items()]), __name__)
