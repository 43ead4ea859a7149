"""NAT and DiNAT (Hassani et al., "Neighborhood Attention Transformer", CVPR 2023; Hassani & Shi, "Dilated
Neighborhood Attention Transformer", 2022).

Hyper-parameters and the release layout are those of SHI-Labs/Neighborhood-Attention-Transformer
(classification/nat.py, dinat.py): a tokenizer of two 3x3/2 convs (no norm or activation between them) and a
LayerNorm, then four stages of pre-norm blocks (LayerNorm eps 1e-5)
    x += [gamma1 *] NeighborhoodAttention(norm1 x);  x += [gamma2 *] Mlp(norm2 x)
with 7x7 neighbourhoods (``mixers.NeighborhoodAttention``: NATTEN's windows shifted inward at the borders,
a relative-position bias), head dim 32, an MLP of ratio 3 (mini, tiny) or 2; stages 2-4 start with a 3x3/2
conv (no bias) + LayerNorm (the official model puts it at the end of the previous stage; the features are the
same: the official dense backbones take each stage's output before it). Head: LayerNorm, global average pool,
linear. DiNAT is the same model with per-block dilations (``dilations[stage][block]``): even blocks 1, odd
blocks the stage map over the kernel at the training size (8 / 4 / 2 / 1 at 224); its dense-task configs use
larger ones for 800x1333 and 512x512 inputs (the family record's recipe).

Any input size: the tokenizer's convs take any size (ceil), and each attention zero-pads a map side shorter
than kernel x dilation to that length and crops back (NATTEN's module up to 0.15; NATTEN 0.17 refuses those
maps, so there the official model only runs sizes whose every stage fits kernel x dilation).

Inside a stage the maps are NHWC; stage outputs are NCHW views of them. ``checkpoint_filter_fn`` reads the
official release files (plain state dicts: ``patch_embed``, ``levels.{i}.blocks.{j}``,
``levels.{i}.downsample``, ``norm``, ``head``) and the zoo's.
"""
from typing import Optional, Sequence

import torch
import torch.nn as nn
from timm.layers import ClassifierHead, DropPath, LayerNorm2d, Mlp

from ._builder import register_family
from ._features import Stage, StagedModelMixin
from ._registry import Dense, Family, Release, variant
from ._renames import Rename, Renames
from .layers import drop_path_rates, trunc_normal_init
from .mixers.neighborhood import NeighborhoodAttention

__all__ = ['NAT', 'DiNAT']


class NATBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, kernel_size: int = 7, dilation: int = 1, mlp_ratio: float = 3.,
                 qkv_bias: bool = True, drop: float = 0., drop_path: float = 0., layer_scale: Optional[float] = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = NeighborhoodAttention(dim, num_heads, kernel_size, dilation, qkv_bias, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        self.layer_scale = layer_scale is not None
        if self.layer_scale:
            self.gamma1 = nn.Parameter(layer_scale * torch.ones(dim))
            self.gamma2 = nn.Parameter(layer_scale * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.layer_scale:
            x = x + self.drop_path(self.attn(self.norm1(x)))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        x = x + self.drop_path(self.gamma1 * self.attn(self.norm1(x)))
        return x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x)))


class Tokenizer(nn.Module):
    """3x3/2 conv to dim / 2, 3x3/2 conv to dim, LayerNorm; NCHW in, NHWC out (official ``patch_embed``)."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(in_chans, dim // 2, 3, 2, 1), nn.Conv2d(dim // 2, dim, 3, 2, 1))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class Downsample(nn.Module):
    """3x3/2 conv without bias, LayerNorm; NCHW in, NHWC out (official ``levels.{i}.downsample``)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.reduction = nn.Conv2d(in_dim, dim, 3, 2, 1, bias=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x).permute(0, 2, 3, 1))


class NATStage(Stage):
    """Downsample (NCHW in) -> blocks on NHWC -> NCHW view out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).permute(0, 3, 1, 2)


class NAT(StagedModelMixin, nn.Module):
    def __init__(
            self,
            depths: Sequence[int] = (3, 4, 6, 5),
            num_heads: Sequence[int] = (2, 4, 8, 16),
            embed_dim: int = 64,
            mlp_ratio: float = 3.,
            kernel_size: int = 7,
            dilations: Optional[Sequence[Sequence[int]]] = None,
            layer_scale: Optional[float] = None,
            qkv_bias: bool = True,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
    ):
        super().__init__()
        n = len(depths)
        if len(num_heads) != n:
            raise ValueError(f'depths {tuple(depths)} and num_heads {tuple(num_heads)} need one entry per stage')
        dilations = [[1] * d for d in depths] if dilations is None else [list(d) for d in dilations]
        if [len(d) for d in dilations] != list(depths):
            raise ValueError(f'dilations must give one dilation per block of each stage (depths {tuple(depths)}), '
                             f'got {dilations}')
        dims = [embed_dim * 2 ** i for i in range(n)]
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.kernel_size, self.dilations = kernel_size, dilations
        self.num_features = self.head_hidden_size = dims[-1]
        self.grad_checkpointing = False
        self.stem = nn.Identity()
        dpr = drop_path_rates(drop_path_rate, depths)
        stages, self.feature_info = [], []
        for i, depth in enumerate(depths):
            blocks = [NATBlock(dims[i], num_heads[i], kernel_size, dilations[i][j], mlp_ratio, qkv_bias, drop_rate,
                               dpr[i][j], layer_scale) for j in range(depth)]
            down = Tokenizer(in_chans, dims[0]) if i == 0 else Downsample(dims[i - 1], dims[i])
            stages.append(NATStage(blocks, down))
            self.feature_info.append(dict(num_chs=dims[i], reduction=2 ** (i + 2), module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self.norm = LayerNorm2d(self.num_features, eps=1e-5)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.apply(trunc_normal_init(nn.Linear))

    @torch.jit.ignore
    def no_weight_decay(self):
        # the official dense configs exempt the relative-position biases (custom_keys 'rpb')
        return {n for n, _ in self.named_parameters() if n.endswith('.rpb')}


class DiNAT(NAT):
    """NAT with per-block dilations (the official ``class DiNAT(NAT): pass``); its own class, so that a
    model tells its family record."""


# SHI-Labs' release names (plain state dicts) -> the zoo's: the official downsample ends stage i, the zoo's
# begins stage i + 1
RENAMES = Renames([
    Rename('patch_embed.', 'stages.0.downsample.'), Rename('levels.{i}.blocks.', 'stages.{i}.blocks.'),
    Rename('levels.{i}.downsample.', 'stages.{i+1}.downsample.'), Rename('head.', 'head.fc.'),
])
_CFG = dict(crop_pct=0.875, first_conv='stages.0.downsample.proj.0', classifier='head.fc', license='mit')
_REPO = 'official:SHI-Labs/Neighborhood-Attention-Transformer'

_ARCH = {
    'mini': dict(depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), embed_dim=64, mlp_ratio=3.),
    'tiny': dict(depths=(3, 4, 18, 5), num_heads=(2, 4, 8, 16), embed_dim=64, mlp_ratio=3.),
    'small': dict(depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24), embed_dim=96, mlp_ratio=2.),
    'base': dict(depths=(3, 4, 18, 5), num_heads=(4, 8, 16, 32), embed_dim=128, mlp_ratio=2.),
    'large': dict(depths=(3, 4, 18, 5), num_heads=(6, 12, 24, 48), embed_dim=192, mlp_ratio=2.),
}


def _alternate(*per_stage):
    """DiNAT's dilations: in each stage, dilation 1 on even blocks and the stage's own on odd ones."""
    return lambda depths: tuple(tuple(1 if j % 2 == 0 else d for j in range(n)) for n, d in zip(depths, per_stage))


_D224 = _alternate(8, 4, 2, 1)            # (the stage maps at 224 over the kernel: 56, 28, 14, 7 / 7)
# the official dense backbones (detection/configs/dinat, segmentation/configs/dinat): stage 3 cycles its dilations
_DET = ((1, 28, 1), (1, 7, 1, 14), (1, 3, 1, 5, 1, 7) * 3, (1, 3, 1, 3, 1))
_SEG = ((1, 16, 1), (1, 4, 1, 8), (1, 2, 1, 3, 1, 4) * 3, (1, 2, 1, 2, 1))

# published (classification/NAT.md, DiNAT.md): params M, GMACs at 224, top-1; DiNAT-L: ImageNet-22k pre-trained
_NAT_PUB = {'mini': (20, 2.7, 81.8), 'tiny': (28, 4.3, 83.2), 'small': (51, 7.8, 83.7), 'base': (90, 13.7, 84.3)}
_DINAT_PUB = {'mini': (20, 2.7, 81.8), 'tiny': (28, 4.3, 82.7), 'small': (51, 7.8, 83.8), 'base': (90, 13.7, 84.4),
              'large': (200, 30.6, 86.5)}
# layer scale 1e-5: NAT-S, NAT-B and DiNAT-B (not DiNAT-S, not DiNAT-L), as the official registry functions
_NAT_LS, _DINAT_LS = ('small', 'base'), ('base',)
# measured with the official code on natten 0.17.5, 1000 classes: parameters, state-dict keys
_NAT_OFFICIAL = {'mini': (19_984_174, 253), 'tiny': (27_901_582, 409), 'small': (50_743_297, 469),
                 'base': (89_769_652, 469)}
_DINAT_OFFICIAL = {'mini': (19_984_174, 253), 'tiny': (27_901_582, 409), 'small': (50_719_681, 409),
                   'base': (89_769_652, 469), 'large': (200_943_514, 409)}
# the release files (plain state dicts); DiNAT-L's is the ImageNet-22k model fine-tuned on ImageNet-1k at 224
_NAT_RELEASES = {a: Release(f'https://shi-labs.com/projects/nat/checkpoints/CLS/nat_{a}.pth') for a in _NAT_PUB}
_DINAT_RELEASES = {a: Release(f'https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/dinat_{a}_in1k_224.pth')
                   for a in _DINAT_PUB}
_DINAT_RELEASES['large'] = Release('https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/'
                                   'dinat_large_in22k_in1k_224.pth', tag='in22k_ft_in1k')

_NAT_NOTE = ("SHI-Labs' dense configs of NAT-T / DiNAT-T (AdamW, no decay on the relative-position biases and "
             "norms, a LayerNorm per output; Mask R-CNN there: 3x schedule with multi-scale training, here mmdet's "
             "1x base)")
_NO_DECAY = {'rpb': dict(decay_mult=0.0), 'norm': dict(decay_mult=0.0)}
_DENSE = dict(backbone=dict(out_norm='ln'), configs=('mask-rcnn', 'upernet'),
              det=dict(optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
                       no_decay=_NO_DECAY),
              seg=dict(optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01), no_decay=_NO_DECAY,
                       poly_power=1.0, warmup=1500),
              drop_path=dict(det=(0.2,), seg=(0.3,)), note=_NAT_NOTE)


def _variants(kind, published, layer_scaled, releases, official, dilations=None):
    return [variant(f'mz_{kind}_{a}', _REPO, pub,
                    arch=dict(_ARCH[a], layer_scale=1e-5 if a in layer_scaled else None,
                              **({'dilations': dilations(_ARCH[a]['depths'])} if dilations else {})),
                    build_only=a not in ('mini', 'tiny'), slow=a == 'tiny', tag=releases[a].tag,
                    official_params=official.get(a, (None, None))[0], official_keys=official.get(a, (None, None))[1],
                    release=releases[a])
            for a, pub in published.items()]


NAT_FAMILY = register_family(Family(
    'nat', NAT, cfg=_CFG, renames=RENAMES,
    dense=Dense(variants=(('mz_nat_tiny', 'nat-tiny'),), **_DENSE,
                published={('nat-tiny', 'mask-rcnn'): '47.7 / 42.6 (3x)', ('nat-tiny', 'upernet'): '47.1 mIoU'}),
    variants=_variants('nat', _NAT_PUB, _NAT_LS, _NAT_RELEASES, _NAT_OFFICIAL)), __name__)

DINAT_FAMILY = register_family(Family(
    'dinat', DiNAT, cfg=_CFG, renames=RENAMES,
    dense=Dense(variants=(('mz_dinat_tiny', 'dinat-tiny'),),
                **{**_DENSE, 'det': dict(_DENSE['det'], backbone=dict(dilations=_DET)),
                   'seg': dict(_DENSE['seg'], backbone=dict(dilations=_SEG))},
                published={('dinat-tiny', 'mask-rcnn'): '48.6 / 43.5 (3x)', ('dinat-tiny', 'upernet'): '47.8 mIoU'}),
    variants=_variants('dinat', _DINAT_PUB, _DINAT_LS, _DINAT_RELEASES, _DINAT_OFFICIAL, _D224)), __name__)
