"""L2ViT's linear global attention: qkv -> ReLU feature map on q and k -> ``ops.linear_attention``
(per-head temperature on K^T V, normaliser clamped at 100) -> proj, over every token of the map.
Parameter names are the official ones (``temperature`` (heads, 1, 1), ``qkv``, ``proj``)."""
from typing import Optional

import torch
import torch.nn as nn

from ..ops.linear import linear_attention

from .base import OpMixer


class LinearAttention(OpMixer):
    op = 'linear'

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, clamp_min: float = 100.,
                 proj_drop: float = 0.):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not divisible by {num_heads} heads')
        self.num_heads = num_heads
        self.clamp_min = clamp_min
        head_dim = dim // num_heads
        self.temperature = nn.Parameter(torch.full((num_heads, 1, 1), head_dim ** -0.5))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
        """x: (B, N, C) tokens -> (B, N, C)."""
        B, N, C = x.shape
        qkv = self.qkv(x)
        qkv[..., :2 * C].relu_()      # the feature map on q and k, in place (the projection's output is ours)
        q, k, v = qkv.view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        o = linear_attention(q, k, v, self.temperature, self.clamp_min, backend=self.op_backend(backend))
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(B, N, C)))
