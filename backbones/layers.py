"""Small blocks shared by the families that timm.layers does not provide as needed."""
import torch
import torch.nn as nn


class ChannelScale(nn.Module):
    """Per-channel learnable scale (layer scale) on NCHW maps; parameter named ``scale``
    (timm MetaFormer layout)."""

    def __init__(self, dim: int, init_value: float = 1e-5):
        super().__init__()
        self.scale = nn.Parameter(init_value * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(1, -1, 1, 1)
