"""Window attention, written out: explicit scores, bias, key mask, softmax. The test oracle."""
from typing import Optional

import torch


def window_attention(q, k, v, bias: Optional[torch.Tensor] = None, key_mask: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None) -> torch.Tensor:
    """Explicit scores / softmax (oracle)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q * scale, k.transpose(-2, -1))            # (B', heads, N, N)
    if bias is not None:
        s = s + bias.to(s.dtype)
    if key_mask is not None:
        M, N = key_mask.shape
        s = s.unflatten(0, (-1, M)).masked_fill(~key_mask[None, :, None, None, :], float('-inf')).flatten(0, 1)
    # half-precision logits are normalised in fp32; fp32/fp64 stay as they are
    p = torch.softmax(s.float() if s.dtype in (torch.float16, torch.bfloat16) else s, dim=-1).to(v.dtype)
    return torch.matmul(p, v)
