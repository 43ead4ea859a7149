"""BiFormer's token mixers (Zhu et al., "BiFormer: Vision Transformer with Bi-Level Routing Attention",
CVPR 2023), on (B, H, W, C) maps of any size.

``BiLevelRoutingAttention`` (stages 1-3): the map is split into a fixed n_win x n_win grid of regions
(``ops.routing.to_regions``: zero-padded at the bottom/right to a multiple of n_win first, as the
official ``auto_pad``); every region routes to the ``topk`` regions whose mean key best matches its
mean query (all heads' channels together, no gradient), and each of its queries attends in one softmax
to the tokens of those regions (``ops.routing.bilevel_routing_attention``). A 5x5 depthwise conv of
the values over the whole (padded) map (LePE) is added before the output projection.

Padded tokens are not masked, exactly as the official model with ``auto_pad=True``: their input is zero
after the block's LayerNorm, so their q / k / v are the projection's bias; they count in the region
means used for routing, take part as keys and values of the regions they fall in, and their values
enter the LePE conv of their in-map neighbours. The output is cropped back to H x W. At sizes the
official classification model accepts (every stage a multiple of n_win) nothing is padded.

Scales are the official ones: routing and token attention both use qk_dim ** -0.5 of the FULL qk width
(not of a head's), ``GlobalAttentionLePE`` (stage 4) head_dim ** -0.5.
"""
from typing import Optional

import torch
import torch.nn as nn

from ..ops.routing import bilevel_routing_attention, from_regions, to_regions
from ..ops.window import crop, padded_size, window_attention

from .base import OpMixer

__all__ = ['BiLevelRoutingAttention', 'GlobalAttentionLePE']


class BiLevelRoutingAttention(OpMixer):
    """qkv (one Linear, dim -> [q (qk_dim) | k (qk_dim) | v (dim)]) -> routed attention in regions ->
    + LePE(v) -> proj. Official keys: ``qkv.qkv`` (here ``qkv``), ``lepe``, ``wo`` (here ``proj``)."""
    op = 'routing'

    def __init__(self, dim: int, num_heads: int, n_win: int = 7, qk_dim: Optional[int] = None, topk: int = 4,
                 side_dwconv: int = 5, qk_scale: Optional[float] = None):
        super().__init__()
        qk_dim = qk_dim or dim
        if qk_dim % num_heads or dim % num_heads:
            raise ValueError(f'qk_dim {qk_dim} and dim {dim} must be divisible by num_heads {num_heads}')
        if not isinstance(topk, int) or not 1 <= topk <= n_win * n_win:
            raise ValueError(f'topk must be an int in [1, n_win ** 2 = {n_win * n_win}], got {topk!r}')
        self.dim, self.qk_dim, self.num_heads, self.n_win, self.topk = dim, qk_dim, num_heads, n_win, topk
        self.scale = qk_scale or qk_dim ** -0.5       # the full qk width, as the official model
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, 1, side_dwconv // 2, groups=dim) if side_dwconv > 0 else None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
        B, H, W, C = x.shape
        h, qk = self.num_heads, self.qk_dim
        n = self.n_win
        # pad the normed input (zeros: padded tokens project to the qkv bias), then project
        qkv = self.qkv(to_regions(x, n))                                    # (B, R, T, 2 qk + C)
        R, T = qkv.shape[1:3]
        q, k, v = qkv.split([qk, qk, C], dim=-1)
        # (B, heads, R, T, D) views of the fused projection
        q = q.unflatten(-1, (h, qk // h)).permute(0, 3, 1, 2, 4)
        k = k.unflatten(-1, (h, qk // h)).permute(0, 3, 1, 2, 4)
        vh = v.unflatten(-1, (h, C // h)).permute(0, 3, 1, 2, 4)
        # (B, heads, R, T, C / heads)
        o = bilevel_routing_attention(q, k, vh, self.topk, self.scale, self.op_backend(backend))
        o = from_regions(o.permute(0, 2, 3, 1, 4).reshape(B, R, T, C), n, (H, W))
        if self.lepe is not None:
            # LePE over the whole padded value map (zero padding only at its border), cropped
            Hp, Wp = padded_size((H, W), (n, n))
            vmap = from_regions(v, n, (Hp, Wp)).permute(0, 3, 1, 2)
            lepe = self.lepe(vmap).permute(0, 2, 3, 1)
            o = o + crop(lepe, (H, W))
        return self.proj(o)


class GlobalAttentionLePE(OpMixer):
    """Stage 4 (official ``AttentionLePE``, topk = -2): multi-head attention over the whole map (the window
    op with one window) with a depthwise conv of the block's normed input x (not of v) added before the
    projection. qkv without bias; the official default of 8 heads (not dim / 32). ``side_dwconv=0``: no LePE
    (official ``Attention``, topk = -1)."""
    op = 'window'

    def __init__(self, dim: int, num_heads: int = 8, side_dwconv: int = 5, qkv_bias: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, 1, side_dwconv // 2, groups=dim) if side_dwconv > 0 else None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
        B, H, W, C = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).view(B, H * W, 3, h, C // h).permute(2, 0, 3, 1, 4)        # (B, heads, N, D) each
        o = window_attention(q, k, v, backend=self.op_backend(backend)).transpose(1, 2).reshape(B, H, W, C)
        if self.lepe is not None:
            o = o + self.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj(o)
