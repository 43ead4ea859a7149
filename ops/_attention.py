"""Dense attention, ``softmax(q k^T * scale + mask) v``, for the zoo's CPU inference: torch SDPA, batched matmuls
over chunks of the batch, or (fp32) the fused C kernel of ``_attention_cpu.c``, whichever this CPU measured
fastest (``ops._cpu`` choices ``attention`` for fp32 and ``attention_bf16``).

Why: torch's CPU flash kernel tiles each (batch, head) row block on its own; at the zoo's short sequences (7x7
windows, routed regions: 49-1024 keys) a batched GEMM over many heads at once keeps the matrix units busier.
Chunks of the batch whose fp32 logits fit in ~2 MB stay in cache (one large logits tensor would not: at 512
windows x 3 heads it was slower than SDPA). The C kernel goes further for fp32: per (batch, head) the packed keys
and values stay in cache and each block of query rows is products, mask, softmax and the value product in one
pass. Measured on the CI machine (2-core AMD EPYC, AVX-512 + AVX512-BF16), interleaved best of 6, q/k/v
(windows, heads, 49, 32) as the mixers pass them: fp32 (512, 3) SDPA 14.1, matmul 9.6, C 6.5 ms; (128, 6) 7.1,
5.0, 3.2 ms; (32, 12) with a relative-position bias 3.4, 2.6, 1.8 ms; bf16 (512, 3) 14.7 -> 6.0 ms (matmul),
(128, 6) 6.7 -> 2.9. Logits and softmax are fp32 (bf16 inputs: products accumulated in fp32, rounded once to
bf16, as an unfused bf16 attention does). Autograd, other devices, other dtypes and traced graphs take SDPA (its
fused backward)."""
import ctypes
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from . import _cpu
from ._dispatch import records_grad, tracing
from ._native import load, strides, unavailable as _unavailable

__all__ = ['attention', 'chunked', 'fused', 'matmul_preferred', 'unavailable']

_LOGITS_BYTES = 2 << 20
_CHOICE = {torch.float32: 'attention', torch.bfloat16: 'attention_bf16'}


SOURCE = Path(__file__).with_name('_attention_cpu.c')
_MAX_KEYS, _MAX_HEAD_DIM = 4096, 256   # the C kernel's limits: its per-thread buffers stay in cache


def matmul_preferred(q: torch.Tensor) -> bool:
    """Whether this CPU measured batched matmuls (or, for fp32, the C kernel: a faster way to the same products)
    faster than SDPA for ``q``'s dtype (CPU tensors only)."""
    return q.device.type == 'cpu' and q.dtype in _CHOICE and _cpu.choice(_CHOICE[q.dtype]) != 'sdpa'


def _library() -> ctypes.CDLL:
    lib = load(SOURCE)
    fn = lib.mz_attention_forward
    if fn.argtypes is None:   # first use of this library
        P, S, I = ctypes.c_void_p, ctypes.POINTER(ctypes.c_long), ctypes.c_int
        fn.argtypes = [P, S] * 5 + [I] * 6 + [ctypes.c_float, I]
        fn.restype = I
    return lib


def unavailable() -> Optional[str]:
    """Why the C kernel cannot run here (None if it can); builds it on first call."""
    return _unavailable(SOURCE)


def _route(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> str:
    """'c', 'matmul' or 'sdpa' for this inference call."""
    if tracing() or q.dim() != 4 or q.device.type != 'cpu':
        return 'sdpa'
    if mask is not None and not mask.is_floating_point():
        return 'sdpa'   # (a boolean mask: SDPA's)
    if records_grad(q, k, v, mask) or q.dtype not in _CHOICE:
        return 'sdpa'
    option = _cpu.choice(_CHOICE[q.dtype])
    if option == 'c' and not (all(t.dtype == torch.float32 for t in (q, k, v)) and k.shape[-2] <= _MAX_KEYS
                              and max(q.shape[-1], v.shape[-1]) <= _MAX_HEAD_DIM
                              and (mask is None or mask.dtype == torch.float32) and unavailable() is None):
        return 'matmul'
    return option


def fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
          scale: Optional[float] = None) -> torch.Tensor:
    """The C kernel: fp32 CPU q (B, H, T, D), k (B, H, L, D), v (B, H, L, Dv), any strides; mask broadcastable to
    (B, H, T, L). No autograd."""
    B, H, T, D = q.shape
    L, Dv = k.shape[-2], v.shape[-1]
    if any(t.dtype != torch.float32 or t.device.type != 'cpu' for t in (q, k, v)):
        raise TypeError(f'attention (C kernel): q, k, v must be float32 CPU tensors, got '
                        f'{[(str(t.dtype), t.device.type) for t in (q, k, v)]}')
    m = None if mask is None else mask.to(torch.float32).expand(B, H, T, L)
    out = torch.empty(B, H, T, Dv, dtype=q.dtype)
    rc = _library().mz_attention_forward(
        q.data_ptr(), strides(q), k.data_ptr(), strides(k), v.data_ptr(), strides(v),
        None if m is None else m.data_ptr(), strides(m, 4), out.data_ptr(), strides(out),
        B, H, T, L, D, Dv, float(D ** -0.5 if scale is None else scale), torch.get_num_threads())
    if rc:
        raise MemoryError('attention (C kernel): could not allocate its per-thread buffers')
    return out


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
    route = _route(q, k, v, mask)
    if route == 'c':
        return fused(q, k, v, mask, scale)
    if route == 'matmul':
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
    fns = {'matmul': lambda: [chunked(*c) for c in cases],
           'sdpa': lambda: [F.scaled_dot_product_attention(*c) for c in cases]}
    if dtype == torch.float32 and unavailable() is None:
        fns['c'] = lambda: [fused(*c) for c in cases]
    return _cpu.interleaved(fns)


_cpu.register('attention', ('sdpa', 'matmul', 'c'), lambda: _measure(torch.float32),
              'fp32 CPU inference attention (window, routing, SHViT, TransNeXt): torch SDPA, chunked batched matmuls '
              'or the fused C kernel (ops/_attention_cpu.c)')
_cpu.register('attention_bf16', ('sdpa', 'matmul'), lambda: _measure(torch.bfloat16),
              'the same for bf16 inputs (autocast)')
