"""Routed attention in blocks of query regions, never a topk-fold copy of the whole K/V.

The query regions of an image are taken a block at a time; only that block's routed regions are copied
(index_select: one contiguous copy, bounded by a budget), and the block is one batched attention call over
its topk * Tk keys (a single softmax, online inside the kernel). The output is allocated heads-last
(B, R, T, heads, Dv) so the caller's merge of the heads into the channels is a view. The backward recomputes
each block from the saved log-sum-exp (nothing quadratic is kept) and adds the keys' / values' gradients back
into their regions with index_add.

Kernel per block: PyTorch's fused flash-attention CPU kernel (forward and backward, with log-sum-exp) on CPU
when q / k / v share a head dim; otherwise batched matmuls with an explicit softmax, blocks then also sized to
bound the logits buffer.

Alternatives measured on CPU at BiFormer-T shapes (1 thread, fwd / fwd+bwd against the reference): one SDPA
call over the fully gathered K/V (topk copies of K/V) is 0.9-1.1x this one at topk 1 and up to 6x slower at
stage 3 (topk 16, batch 32); per-routed-slot flash attention merged by online softmax (one K/V-sized copy per
slot, topk kernel calls) matches it at topk 1 and is 2-3x slower at topk 4-16; logits against every region's
keys masked to the routed ones is ~100x slower than the reference at topk 1; this block layout with matmuls
instead of the flash kernel is 2.5-3x slower at the 1024 input.
"""
from typing import List, Optional, Tuple

import torch

from .._attention import matmul_preferred
from .._dispatch import symbolic, tracing

_aten = torch.ops.aten
_GATHER_BUDGET = 1 << 23       # elements of gathered K + V per block (32 MB in fp32)
_LOGITS_BUDGET = 1 << 22       # logits elements per block on the matmul path (16 MB in fp32)


def _flash_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return q.device.type == 'cpu' and q.shape[-1] == v.shape[-1] and hasattr(
        _aten, '_scaled_dot_product_flash_attention_for_cpu_backward')


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _blocks(q, k, v, idx, flash: bool) -> List[Tuple[int, slice]]:
    """(image, query-region slice) blocks: gathered K/V (and on the matmul path the logits) under budget."""
    B, h, R, T, D = q.shape
    if symbolic(T, k.shape[3]):       # (exported for any size: one block an image; a budget split would be a guard)
        return [(b, slice(0, R)) for b in range(B)]
    L = idx.shape[-1] * k.shape[3]
    n = _GATHER_BUDGET // (h * L * (D + v.shape[-1]))
    if not flash:
        n = min(n, _LOGITS_BUDGET // (h * T * L))
    n = max(1, n)
    return [(b, slice(r, min(r + n, R))) for b in range(B) for r in range(0, R, n)]


def _gather(x: torch.Tensor, idx_b: torch.Tensor) -> torch.Tensor:
    """(heads, R, Tk, D) of one image, (n, topk) routed regions -> (n, heads, topk * Tk, D) (a strided view of
    one contiguous copy)."""
    h, _, Tk, D = x.shape
    n, topk = idx_b.shape
    return x.index_select(1, idx_b.flatten()).view(h, n, topk * Tk, D).transpose(0, 1)


def _scatter_add_(dst: torch.Tensor, g: torch.Tensor, idx_b: torch.Tensor) -> None:
    """dst (heads, R, Tk, D) += the (n, heads, topk * Tk, D) gradient of _gather's output."""
    h, _, Tk, D = dst.shape
    dst.index_add_(1, idx_b.flatten(), g.transpose(0, 1).reshape(h, -1, Tk, D).to(dst.dtype))


# ---- per-block kernels: q (n, heads, T, D), k / v (n, heads, L, D | Dv) ------------------------------------

def _matmul_fwd(q, k, v, scale):
    s = _acc(torch.matmul(q * scale, k.transpose(-1, -2)))
    # max, exp in place, sum, and the output divided by the sum (not the probabilities): one logits buffer, and
    # on CPU ~1.3x faster than torch.logsumexp followed by exp(s - lse)
    m = s.amax(-1, keepdim=True)
    p = s.sub_(m).exp_()
    denom = p.sum(-1, keepdim=True)
    if p.dtype == v.dtype:
        o = torch.matmul(p, v).div_(denom)
    else:       # half precision: normalised before the cast (an unnormalised sum of values could overflow fp16)
        o = torch.matmul(p.div_(denom).to(v.dtype), v)
    return o, (m + denom.log()).squeeze(-1)


def _matmul_bwd(do, q, k, v, o, lse, scale):
    qs = q * scale
    p = _acc(torch.matmul(qs, k.transpose(-1, -2))).sub_(lse.unsqueeze(-1)).exp_()
    dv = torch.matmul(p.to(do.dtype).transpose(-1, -2), do)
    delta = (_acc(do) * _acc(o)).sum(-1, keepdim=True)
    ds = p.mul_(_acc(torch.matmul(do, v.transpose(-1, -2))).sub_(delta)).to(q.dtype)
    return torch.matmul(ds, k) * scale, torch.matmul(ds.transpose(-1, -2), qs), dv


def _flash_fwd(q, k, v, scale):
    return _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)


def _flash_bwd(do, q, k, v, o, lse, scale):
    return _aten._scaled_dot_product_flash_attention_for_cpu_backward(do, q, k, v, o, lse, 0.0, False, scale=scale)


class _RoutedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, scale):
        B, h, R, T, _ = q.shape
        # inference: the matmul kernels where this CPU measured them faster than SDPA's (ops._attention)
        inference = not any(ctx.needs_input_grad[:3])
        flash = _flash_ok(q, k, v) and not (inference and not tracing() and matmul_preferred(q))
        fwd = _flash_fwd if flash else _matmul_fwd
        out = torch.empty(B, R, T, h, v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(B, R, h, T, dtype=_acc(q).dtype, device=q.device)
        for b, rs in _blocks(q, k, v, idx, flash):
            o, l = fwd(q[b, :, rs].transpose(0, 1), _gather(k[b], idx[b, rs]), _gather(v[b], idx[b, rs]), scale)
            out[b, rs].copy_(o.transpose(1, 2))
            lse[b, rs] = l
        ctx.save_for_backward(q, k, v, idx, out, lse)
        ctx.scale, ctx.flash = scale, flash
        return out.permute(0, 3, 1, 2, 4)

    @staticmethod
    def backward(ctx, do):
        q, k, v, idx, out, lse = ctx.saved_tensors
        bwd = _flash_bwd if ctx.flash else _matmul_bwd
        dq = torch.empty(q.shape[0], q.shape[2], q.shape[3], q.shape[1], q.shape[4], dtype=q.dtype,
                         device=q.device).permute(0, 3, 1, 2, 4)
        # K / V gradients summed over every query region that routed to a region: in fp32 for half inputs
        dk = torch.zeros(k.shape, dtype=_acc(k).dtype, device=k.device)
        dv = torch.zeros(v.shape, dtype=_acc(v).dtype, device=v.device)
        for b, rs in _blocks(q, k, v, idx, ctx.flash):
            gq, gk, gv = bwd(do[b, :, rs].transpose(0, 1), q[b, :, rs].transpose(0, 1), _gather(k[b], idx[b, rs]),
                             _gather(v[b], idx[b, rs]), out[b, rs].transpose(1, 2), lse[b, rs], ctx.scale)
            dq[b, :, rs] = gq.transpose(0, 1)
            _scatter_add_(dk[b], gk, idx[b, rs])
            _scatter_add_(dv[b], gv, idx[b, rs])
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None


def routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor,
                     scale: Optional[float] = None) -> torch.Tensor:
    """Blocks of query regions, each gathering only its routed K/V (bounded copy, never a
    topk-fold copy of the whole); fused flash-attention kernel per block on CPU (D == Dv), matmuls + softmax
    elsewhere; backward recomputes from the log-sum-exp."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _RoutedAttention.apply(q, k, v, idx, scale)
