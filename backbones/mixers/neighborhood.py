"""NAT's / DiNAT's token mixer (Hassani et al., "Neighborhood Attention Transformer", "Dilated Neighborhood
Attention Transformer"), NATTEN's ``NeighborhoodAttention2D``, on NHWC maps, for any map size.

qkv -> every query attends to a kernel x kernel window of keys ``dilation`` apart, shifted inward at the
map borders so it stays kernel x kernel (``ops.neighborhood``, border 'shift'), with a relative-position
bias (heads, 2k-1, 2k-1) -> proj. Queries are scaled by head_dim ** -0.5.

A map side shorter than kernel x dilation is zero-padded at the bottom / right to that length before qkv
and the output cropped back: the padded tokens are not masked (their keys and values are the qkv bias),
as NATTEN's module did up to 0.15, with which the official dense-task models were trained (NATTEN 0.17
refuses such maps; where it runs, nothing is padded and the two agree).
"""
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from ..ops import neighborhood_attention
from ..ops.window import crop, pad_end_to

from .base import OpMixer


class NeighborhoodAttention(OpMixer):
    op = 'neighborhood'

    def __init__(self, dim: int, num_heads: int, kernel_size: int = 7, dilation: int = 1, qkv_bias: bool = True,
                 proj_drop: float = 0.):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} must be a multiple of num_heads {num_heads}')
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.kernel_size, self.dilation = kernel_size, dilation
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.rpb = nn.Parameter(trunc_normal_(torch.empty(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1),
                                              std=.02))
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
        B, H, W, C = x.shape
        x = self._pad_to_span(x)
        Hp, Wp = x.shape[1:3]
        q, k, v = self.qkv(x).view(B, Hp, Wp, 3, self.num_heads, self.head_dim).permute(3, 0, 4, 1, 2, 5).unbind(0)
        o = neighborhood_attention(q, k, v, self.kernel_size, self.dilation, rpb=self.rpb.to(q.dtype),
                                   scale=self.scale, border='shift', backend=self.op_backend(backend))
        o = crop(o.permute(0, 2, 3, 1, 4).reshape(B, Hp, Wp, C), (H, W))
        return self.proj_drop(self.proj(o))

    def _pad_to_span(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad a map smaller than the kernel's span (kernel x dilation) at the bottom / right up to it (the
        padded tokens are keys of the border queries, as in NATTEN's NAT)."""
        span = self.kernel_size * self.dilation
        return pad_end_to(x, [torch.sym_max(n, span) for n in x.shape[1:3]], (1, 2), (span - 1, span - 1))
