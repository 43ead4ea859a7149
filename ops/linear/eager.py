"""Linear attention in O(N): per (batch, head) the state [t * K^T V | sum_n k_n] of shape (D, Dv + 1) is
built once, and one matmul of the queries with it gives the numerator and the normaliser together.

The key sum is appended to the small state rather than a ones column to V, which would copy V: at
L2ViT-T's shapes on CPU (one thread, CPU time) the two, and the official three-product form, are within
5% of each other; the op's share of the model is small either way. float16 inputs are computed in float32:
the state sums N products and would overflow float16 for large maps. bfloat16 has float32's range, and CPU and
GPU GEMMs accumulate its products in float32, so in inference bfloat16 stays bfloat16 (on CPUs with AVX512-BF16
/ AMX the products run on the bf16 units; an upcast would send them to the fp32 ones). With autograd bfloat16 is
computed in float32 too: the query gradient is a difference of the numerator's and the normaliser's terms, which
rounded to bfloat16 measured 0.36 max abs error against the float64 oracle, 4x the bf16 bound of the op tests."""
from typing import Optional

import torch

from .._dispatch import empty, records_grad


def linear_attention(q, k, v, temperature: Optional[torch.Tensor] = None, clamp_min: float = 100.) -> torch.Tensor:
    """Two batched matmuls: the (D, Dv + 1) state [t K^T V | sum k], then queries x state
    (numerator and normaliser in one product)."""
    dtype = q.dtype
    grad = records_grad(q, k, v, temperature)
    if dtype == torch.float16 or dtype == torch.bfloat16 and grad:
        q, k, v = q.float(), k.float(), v.float()
    Dv = v.shape[-1]
    kv = torch.matmul(k.transpose(-2, -1), v)                              # (B, heads, D, Dv)
    if temperature is not None:
        kv = kv * temperature.reshape(1, -1, 1, 1).to(kv.dtype)
    state = torch.cat([kv, k.sum(-2).unsqueeze(-1)], dim=-1)              # (B, heads, D, Dv + 1)
    o = torch.matmul(q, state)                                             # (B, heads, N, Dv + 1)
    if grad or dtype != o.dtype or torch.compiler.is_compiling():
        return (o[..., :Dv] / o[..., Dv:].clamp_min(clamp_min)).to(dtype)
    # eager inference (under compile `out=` is a graph break): the quotient written token-major (B, N, heads, Dv), returned as a (B, heads, N, Dv) view,
    # so the caller's transpose(1, 2).reshape(B, N, heads * Dv) costs no copy
    B, H, N, _ = q.shape
    out = empty((B, N, H, Dv), dtype=dtype, device=q.device).transpose(1, 2)
    return torch.div(o[..., :Dv], o[..., Dv:].clamp_min_(clamp_min), out=out)
