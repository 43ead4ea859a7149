"""Linear attention written out in its similarity form: the (N x N) matrix q_n . k_m, its row sums
as the normaliser (clamped from below), then the weighted sum of values scaled by the per-head
temperature. O(N^2) memory: the test oracle, not a path for large maps. Half-precision inputs are
computed in float32 (as the other backends do)."""
from typing import Optional

import torch


def linear_attention(q, k, v, temperature: Optional[torch.Tensor] = None, clamp_min: float = 100.) -> torch.Tensor:
    """Explicit (N x N) similarities, row sums, clamp (oracle; O(N^2) memory)."""
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    sim = torch.matmul(q, k.transpose(-2, -1))                  # (B, heads, N, N), >= 0 for feature-mapped q, k
    den = sim.sum(-1, keepdim=True).clamp_min(clamp_min)       # (B, heads, N, 1)
    out = torch.matmul(sim, v)
    if temperature is not None:
        out = out * temperature.reshape(1, -1, 1, 1).to(out.dtype)
    return (out / den).to(dtype)
