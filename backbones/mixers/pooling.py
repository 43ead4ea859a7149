"""PoolFormer's token mixer: average pooling minus identity."""
import torch
import torch.nn as nn

from ..ops._dispatch import records_grad, symbolic


def box_sum(x: torch.Tensor, k: int) -> torch.Tensor:
    """Sum over a k x k window (k odd, zero padding) as separable shifted adds: on CPU several
    times faster than avg_pool2d on NCHW maps, and the same numbers up to summation order."""
    return _BoxSum.apply(x, k) if records_grad(x) else _box_sum(x, k)


def _box_sum(x: torch.Tensor, k: int) -> torch.Tensor:
    r = k // 2
    rows = x.clone()
    for d in range(1, r + 1):
        rows[..., d:] += x[..., :-d]
        rows[..., :-d] += x[..., d:]
    out = rows.clone()
    for d in range(1, r + 1):
        out[..., d:, :] += rows[..., :-d, :]
        out[..., :-d, :] += rows[..., d:, :]
    return out


class _BoxSum(torch.autograd.Function):
    """A centred window sum with zero padding is its own adjoint: the gradient is the box sum of the incoming
    gradient. Autograd through the in-place shifted adds instead kept a copy per add (PoolFormer-S12's training
    step: 532 copies, 12% of its time on CPU)."""

    @staticmethod
    def forward(ctx, x, k):
        ctx.k = k
        return _box_sum(x, k)

    @staticmethod
    def backward(ctx, g):
        return _box_sum(g.contiguous(), ctx.k), None


class Pooling(nn.Module):
    """``avgpool_k(x) - x`` with borders averaged over in-image positions only
    (count_include_pad=False), as PoolFormer defines it. Parameter-free."""

    def __init__(self, pool_size: int = 3):
        super().__init__()
        if pool_size % 2 != 1:
            raise ValueError(f'pool_size must be odd, got {pool_size}')
        self.pool_size = pool_size
        self._count = {}

    def _inv_count(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.shape[-2], x.shape[-1], x.device, x.dtype)
        static = not symbolic(*key[:2])     # (symbolic in a dynamic-size export: in the graph, uncached)
        inv = self._count.get(key) if static else None
        if inv is None:
            # (outside inference mode: a cached inference tensor would fail every later training step, "Inference
            # tensors cannot be saved for backward")
            with torch.inference_mode(False):
                inv = box_sum(torch.ones((1, 1) + key[:2], device=x.device, dtype=x.dtype), self.pool_size).reciprocal()
            if static:
                self._count[key] = inv
        return inv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return box_sum(x, self.pool_size) * self._inv_count(x) - x
