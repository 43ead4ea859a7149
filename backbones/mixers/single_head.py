"""SHViT's single-head self-attention on a channel subset (SHSA)."""
import torch
import torch.nn as nn
from timm.layers import GroupNorm1

from ..layers import ConvNorm
from ..ops._attention import attention


class SingleHeadAttention(nn.Module):
    """The first ``pdim`` channels: GroupNorm -> 1x1 ConvNorm to [q (qk_dim) | k (qk_dim) | v (pdim)]
    -> one softmax attention over all H*W tokens (torch SDPA); the other channels pass untouched;
    then ReLU -> 1x1 ConvNorm over all channels (``proj.1``)."""

    def __init__(self, dim: int, qk_dim: int, pdim: int):
        super().__init__()
        self.dim, self.qk_dim, self.pdim = dim, qk_dim, pdim
        self.scale = qk_dim ** -0.5
        self.pre_norm = GroupNorm1(pdim)
        self.qkv = ConvNorm(pdim, qk_dim * 2 + pdim)
        self.proj = nn.Sequential(nn.ReLU(inplace=True), ConvNorm(dim, dim, bn_weight_init=0.))   # on a fresh cat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        x1, x2 = torch.split(x, [self.pdim, self.dim - self.pdim], dim=1)
        q, k, v = torch.split(self.qkv(self.pre_norm(x1)).flatten(2), [self.qk_dim, self.qk_dim, self.pdim], dim=1)
        o = attention(q.transpose(1, 2)[:, None], k.transpose(1, 2)[:, None], v.transpose(1, 2)[:, None],
                      scale=self.scale)   # (B, 1, N, pdim)
        x1 = o[:, 0].transpose(1, 2).reshape(B, self.pdim, H, W)
        return self.proj(torch.cat([x1, x2], dim=1))
