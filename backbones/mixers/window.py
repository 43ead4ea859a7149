"""Multi-head attention inside windows of a channels-last map (block or grid partition).

Any H, W: the map is zero-padded at the bottom/right to the window multiple and, by default, padded
keys are masked out of the softmax (ops.window key_mask), so outputs at real positions do not
depend on how much padding a size needs; the output is cropped back. ``mask_padding=False`` keeps
the padded tokens as keys (their q/k/v are the qkv bias), as DaViT and L2ViT do.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import to_2tuple

from ..ops.window import (crop, pad_map, padded_size, padding_key_mask, partition, relative_position_index,
                        unpartition, window_attention)

from .base import OpMixer


class RelPosBiasTf(nn.Module):
    """Relative position bias with a (heads, 2*wh-1, 2*ww-1) table, TF MaxViT layout:
    bias[h, q, k] = table[h, k_row - q_row + wh - 1, k_col - q_col + ww - 1]."""

    def __init__(self, window_size: Tuple[int, int], num_heads: int):
        super().__init__()
        self.window_size = to_2tuple(window_size)
        wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_heads, 2 * wh - 1, 2 * ww - 1))
        nn.init.normal_(self.relative_position_bias_table, std=.02)
        self.register_buffer('index', relative_position_index(self.window_size), persistent=False)

    def get_bias(self) -> torch.Tensor:
        """(heads, N, N)."""
        return self.relative_position_bias_table.flatten(1)[:, self.index]


class PartitionAttention(OpMixer):
    """qkv -> window attention (+ relative position bias) -> proj, on (B, H, W, C) maps.

    ``head_first=False`` is the TF channel order of the fused qkv projection: [q | k | v] each
    split into heads (timm's ``maxvit_*_tf``)."""
    op = 'window'

    def __init__(self, dim: int, window_size: Tuple[int, int], partition: str = 'block', dim_head: int = 32,
                 bias: bool = True, rel_pos: bool = True, mask_padding: bool = True, attn_drop: float = 0.,
                 proj_drop: float = 0.):
        super().__init__()
        if dim % dim_head:
            raise ValueError(f'dim {dim} is not divisible by head dim {dim_head}')
        if partition not in ('block', 'grid'):
            raise ValueError(f"partition must be 'block' or 'grid', got {partition!r}")
        self.num_heads = dim // dim_head
        self.dim_head = dim_head
        self.window_size = to_2tuple(window_size)
        self.partition = partition
        self.mask_padding = mask_padding
        self.qkv = nn.Linear(dim, dim * 3, bias=bias)
        self.rel_pos = RelPosBiasTf(self.window_size, self.num_heads) if rel_pos else None
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
        B, H, W, C = x.shape
        ws = self.window_size
        Hp, Wp = padded_size((H, W), ws)
        xw = partition(pad_map(x, ws), ws, self.partition)                     # (B*nW, N, C)
        Bw, N, _ = xw.shape
        q, k, v = self.qkv(xw).view(Bw, N, 3, self.num_heads, self.dim_head).permute(2, 0, 3, 1, 4)
        mask = padding_key_mask((H, W), ws, self.partition, device=x.device) if self.mask_padding else None
        bias = self.rel_pos.get_bias() if self.rel_pos is not None else None
        if self.training and self.attn_drop > 0:
            raise NotImplementedError('attention dropout is not supported by the window op')
        o = window_attention(q, k, v, bias=bias, key_mask=mask, backend=self.op_backend(backend))   # (B*nW, h, N, D)
        o = self.proj_drop(self.proj(o.transpose(1, 2).reshape(Bw, N, C)))
        o = unpartition(o, ws, (Hp, Wp), self.partition)
        return crop(o, (H, W))
