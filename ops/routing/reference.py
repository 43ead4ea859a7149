"""Routed attention, written out: gather the routed regions' keys / values, explicit softmax. The test oracle."""
from typing import Optional

import torch


def gather_regions(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, heads, R, T, D) and (B, R, topk) -> (B, heads, R, topk * T, D): region r's routed regions' tokens,
    concatenated in idx order (a topk-fold copy; the fast backends avoid it)."""
    B, h, R, T, D = x.shape
    topk = idx.shape[-1]
    b = torch.arange(B, device=idx.device).view(B, 1, 1)
    g = x.permute(0, 2, 1, 3, 4)[b, idx]                       # (B, R, topk, heads, T, D)
    return g.permute(0, 3, 1, 2, 4, 5).reshape(B, h, R, topk * T, D)


def routed_attention(q, k, v, idx, scale: Optional[float] = None) -> torch.Tensor:
    """Gathers the topk routed regions' keys / values (a topk-fold copy), explicit softmax (oracle)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kg, vg = gather_regions(k, idx), gather_regions(v, idx)
    s = torch.matmul(q * scale, kg.transpose(-2, -1))          # (B, heads, R, T, topk * Tk)
    # half-precision logits are normalised in fp32; fp32/fp64 stay as they are
    p = torch.softmax(s.float() if s.dtype in (torch.float16, torch.bfloat16) else s, dim=-1).to(v.dtype)
    return torch.matmul(p, vg)
