"""Window attention on torch SDPA (fused flash/efficient kernels on CPU and GPU).

Bias and key mask are folded into one additive mask broadcast over batch and windows, so no
per-window copy of the bias is made."""
from typing import Optional

import torch
import torch.nn.functional as F


def window_attention(q, k, v, bias: Optional[torch.Tensor] = None, key_mask: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None) -> torch.Tensor:
    mask = None if bias is None else bias.to(q.dtype)
    if key_mask is not None:
        M = key_mask.shape[0]
        neg = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~key_mask, float('-inf'))
        neg = neg[:, None, None, :]                                   # (M, 1, 1, N)
        mask = neg if mask is None else mask[None] + neg               # (M, heads, N, N)
        q, k, v = (t.unflatten(0, (-1, M)) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).flatten(0, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
