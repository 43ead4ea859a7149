"""PoolFormer's token mixer: average pooling minus identity."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class Pooling(nn.Module):
    """``avgpool_k(x) - x`` with borders averaged over in-image positions only
    (count_include_pad=False), as PoolFormer defines it. Parameter-free."""

    def __init__(self, pool_size: int = 3):
        super().__init__()
        self.pool_size = pool_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.pool_size
        return F.avg_pool2d(x, k, 1, k // 2, count_include_pad=False) - x
