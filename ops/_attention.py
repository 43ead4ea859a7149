"""Dense attention, ``softmax(q k^T * scale + mask) v``, for the zoo's CPU inference: torch SDPA, or batched
matmuls over chunks of the batch, whichever this CPU measured faster (``ops._cpu`` choices ``attention`` for
fp32 and ``attention_bf16``).

Why: torch's CPU flash kernel tiles each (batch, head) row block on its own; at the zoo's short sequences (7x7
windows, routed regions: 49-1024 keys) a batched GEMM over many heads at once keeps the matrix units busier.
Chunks of the batch whose fp32 logits fit in ~2 MB stay in cache (one large logits tensor would not: at 512
windows x 3 heads it was slower than SDPA). Measured on the CI machine (2-core AMD EPYC, AVX-512 + AVX512-BF16),
best of 6, q/k/v (windows, heads, 49, 32): fp32 (512, 3) 12.1 -> 8.2 ms, (128, 6) 6.0 -> 4.2, (8, 24) 1.36 ->
0.74; bf16 (512, 3) 14.7 -> 6.0 ms, (128, 6) 6.7 -> 2.9. Logits and softmax are fp32 (bf16 inputs: products
accumulated in fp32, rounded once to bf16, as an unfused bf16 attention does). Autograd, other devices, other
dtypes and traced graphs take SDPA (its fused backward)."""
from typing import Optional

import torch
import torch.nn.functional as F

from . import _cpu
from ._dispatch import records_grad, tracing

__all__ = ['attention', 'chunked', 'matmul_preferred']

_LOGITS_BYTES = 2 << 20
_CHOICE = {torch.float32: 'attention', torch.bfloat16: 'attention_bf16'}


def matmul_preferred(q: torch.Tensor) -> bool:
    """Whether this CPU measured batched matmuls faster than SDPA for ``q``'s dtype (CPU tensors only)."""
    return q.device.type == 'cpu' and q.dtype in _CHOICE and _cpu.choice(_CHOICE[q.dtype]) == 'matmul'


def _matmul_route(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> bool:
    if tracing() or q.dim() != 4:
        return False
    if mask is not None and not mask.is_floating_point():
        return False   # (a boolean mask: SDPA's)
    if records_grad(q, k, v, mask):
        return False
    return matmul_preferred(q)


def chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
            scale: Optional[float] = None) -> torch.Tensor:
    """The matmul route: q (B, H, T, D), k (B, H, L, D), v (B, H, L, Dv), mask broadcastable to (B, H, T, L)."""
    B, H, T, D = q.shape
    L = k.shape[-2]
    scale = D ** -0.5 if scale is None else scale
    n = max(1, _LOGITS_BYTES // (4 * H * T * L))
    per_batch = mask is not None and mask.dim() == 4 and mask.shape[0] == B > 1
    out = q.new_empty(B, H, T, v.shape[-1])
    for i in range(0, B, n):
        s = torch.matmul(q[i:i + n], k[i:i + n].transpose(-1, -2)).float().mul_(scale)
        if mask is not None:
            s.add_(mask[i:i + n] if per_batch else mask)
        out[i:i + n] = torch.matmul(torch.softmax(s, -1).to(v.dtype), v[i:i + n])
    return out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
              scale: Optional[float] = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)`` (additive float mask), on the route
    this CPU measured faster for inference."""
    if _matmul_route(q, k, v, mask):
        return chunked(q, k, v, mask, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


# measured on: window attention at stages 1-3 of a 7x7-window model at batch 2 (q, k, v as the mixers pass them:
# views of one qkv projection; the last with a relative-position bias), a routed block (BiFormer stage 2)
_SHAPES = ((128, 3, 49, 49), (32, 6, 49, 49), (8, 12, 49, 49), (16, 4, 64, 256))


def _measure(dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    cases = []
    for b, h, t, l in _SHAPES:
        q = torch.randn(b, t, h, 32, generator=g).to(dtype).transpose(1, 2)
        kv = torch.randn(b, l, 2, h, 32, generator=g).to(dtype).permute(2, 0, 3, 1, 4)
        cases.append((q, kv[0], kv[1], torch.randn(h, t, l, generator=g).to(dtype).expand(b, h, t, l)))
    return _cpu.interleaved({'matmul': lambda: [chunked(*c) for c in cases],
                             'sdpa': lambda: [F.scaled_dot_product_attention(*c) for c in cases]})


_cpu.register('attention', ('sdpa', 'matmul'), lambda: _measure(torch.float32),
              'fp32 CPU inference attention (window, routing, SHViT, TransNeXt): torch SDPA or chunked batched matmuls')
_cpu.register('attention_bf16', ('sdpa', 'matmul'), lambda: _measure(torch.bfloat16),
              'the same for bf16 inputs (autocast)')
