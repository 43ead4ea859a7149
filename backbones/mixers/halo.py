"""Halo attention as a module (timm's HaloAttn layout: ``q``, ``kv``, ``pos_embed.{height,width}_rel``)."""
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import make_divisible, trunc_normal_

from ..ops.halo import halo_attention

from .base import OpMixer


class RelPosEmbed(nn.Module):
    """(2 * win - 1, dim_head) height and width relative embeddings."""

    def __init__(self, win: int, dim_head: int, scale: float):
        super().__init__()
        self.height_rel = nn.Parameter(torch.zeros(win * 2 - 1, dim_head))
        self.width_rel = nn.Parameter(torch.zeros(win * 2 - 1, dim_head))
        trunc_normal_(self.height_rel, std=scale)
        trunc_normal_(self.width_rel, std=scale)


class HaloAttention(OpMixer):
    """1x1 q (strided when the block downsamples) and kv projections, halo attention, optional 2x2
    average pool. ``border``: 'zero_pad' (timm / paper: zero keys outside the map take part) or 'mask'."""
    op = 'halo'

    def __init__(self, dim: int, dim_out: Optional[int] = None, stride: int = 1, num_heads: int = 8,
                 dim_head: Optional[int] = None, block_size: int = 8, halo_size: int = 3, qk_ratio: float = 1.,
                 qkv_bias: bool = False, avg_down: bool = False, border: str = 'zero_pad'):
        super().__init__()
        dim_out = dim_out or dim
        if dim_out % num_heads:
            raise ValueError(f'dim_out {dim_out} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.dim_head_qk = dim_head or make_divisible(dim_out * qk_ratio, divisor=8) // num_heads
        self.dim_head_v = dim_out // num_heads
        self.scale = self.dim_head_qk ** -0.5
        self.block_size, self.halo_size, self.border = block_size, halo_size, border
        use_pool = stride > 1 and (avg_down or block_size % stride != 0)
        self.block_stride = stride if stride > 1 and not use_pool else 1
        self.q = nn.Conv2d(dim, self.dim_head_qk * num_heads, 1, stride=self.block_stride, bias=qkv_bias)
        self.kv = nn.Conv2d(dim, (self.dim_head_qk + self.dim_head_v) * num_heads, 1, bias=qkv_bias)
        self.pos_embed = RelPosEmbed(block_size + 2 * halo_size, self.dim_head_qk, self.scale)
        self.pool = nn.AvgPool2d(2, 2) if use_pool else nn.Identity()
        std = dim ** -0.5
        trunc_normal_(self.q.weight, std=std)
        trunc_normal_(self.kv.weight, std=std)

    def forward(self, x: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
        B = x.shape[0]
        h, dqk = self.num_heads, self.dim_head_qk
        q = self.q(x)
        q = q.view(B, h, dqk, *q.shape[-2:])
        kv = self.kv(x)
        kv = kv.view(B, h, dqk + self.dim_head_v, *kv.shape[-2:])   # per head [k | v] channels
        o = halo_attention(q, kv[:, :, :dqk], kv[:, :, dqk:], self.block_size, self.halo_size,
                           self.pos_embed.height_rel, self.pos_embed.width_rel, self.scale, self.border,
                           self.op_backend(backend))
        return self.pool(o.reshape(B, h * self.dim_head_v, *o.shape[-2:]))
