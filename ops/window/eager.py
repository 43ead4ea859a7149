"""Window attention on torch SDPA (fused flash/efficient kernels on CPU and GPU; CPU inference on chunked
matmuls where this CPU measured them faster: ``ops._attention``).

Bias and key mask are folded into one additive mask broadcast over batch and windows, so no
per-window copy of the bias is made."""
from typing import Optional

import torch

from .._attention import attention


def window_attention(q, k, v, bias: Optional[torch.Tensor] = None, key_mask: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None) -> torch.Tensor:
    """torch SDPA with one broadcast additive mask."""
    Bp, H, N, _ = q.shape
    mask = None if bias is None else bias.to(q.dtype)
    if key_mask is not None:
        M = key_mask.shape[0]
        neg = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~key_mask, float('-inf'))
        neg = neg[:, None, None, :]                                    # (M, 1, 1, N)
        mask = neg if mask is None else mask[None] + neg                # (M, heads|1, N, N)
        # one mask per window of the batch (the fused kernels take 4-D masks only)
        mask = mask.expand(Bp // M, M, H, N, N).reshape(Bp, H, N, N)
    elif mask is not None:
        # a 4-D expanded view (no copy) lets CPU SDPA use its flash kernel instead of the math path
        mask = mask.expand(Bp, H, N, N)
    return attention(q, k, v, mask, scale)
