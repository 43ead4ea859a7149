"""Routed attention without the topk-fold copy of K/V: one routed slot at a time, combined by online softmax.

Slot j is "every query region attends to its j-th routed region": an ordinary batched attention over
N = B * R (query region) problems whose keys are one region each, so only that region's K/V are copied
(one K/V-sized transient, never topk of them). Each slot returns its output and log-sum-exp; the slots are
merged with the usual online-softmax rescaling into ONE softmax over the topk * Tk keys. The backward
recomputes each slot's probabilities from the merged log-sum-exp (nothing quadratic is saved) and scatters
the keys' / values' gradients back to their regions with index_add.

Per-slot kernel: PyTorch's fused flash-attention CPU kernel (forward + backward, with log-sum-exp) on CPU
when q / k / v share a head dim; elsewhere batched matmuls over chunks of query regions, sized to keep the
logits buffer under a budget.  Measured at BiFormer-T stage-1 shapes against alternatives (tools/opbench.py
--op routing): one SDPA over the gathered topk regions, logits against every region masked to the routed
ones, and this chunked matmul path on CPU (see the README's op table / the op's report).
"""
from typing import Optional, Tuple

import torch

_aten = torch.ops.aten
_LOGITS_BUDGET = 1 << 22       # logits elements per chunk on the matmul path (16 MB in fp32)


def _flash_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return q.device.type == 'cpu' and q.shape[-1] == v.shape[-1] and hasattr(
        _aten, '_scaled_dot_product_flash_attention_for_cpu_backward')


def _slot(x: torch.Tensor, idx_j: torch.Tensor) -> torch.Tensor:
    """(B, R, heads, T, D) regions, (B, R) slot indices -> (B * R, heads, T, D): region idx_j[b, r] of image b."""
    B = x.shape[0]
    return x[torch.arange(B, device=x.device).view(B, 1), idx_j].flatten(0, 1)


# ---- per-slot kernels: (q, k, v) of shape (N, heads, L, D) -> (out, lse (N, heads, L)); backward given the
# merged (out, lse) of all slots ----------------------------------------------------------------------------

def _flash_fwd(q, k, v, scale):
    return _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)


def _flash_bwd(do, q, k, v, o, lse, scale):
    return _aten._scaled_dot_product_flash_attention_for_cpu_backward(do, q, k, v, o, lse, 0.0, False, scale=scale)


def _chunks(q, k):
    N, h, T = q.shape[:3]
    n = max(1, _LOGITS_BUDGET // (h * T * k.shape[2]))
    return [slice(s, s + n) for s in range(0, N, n)]


def _acc(t):
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _matmul_fwd(q, k, v, scale):
    o = torch.empty(q.shape[:3] + v.shape[-1:], dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=_acc(q).dtype, device=q.device)
    for sl in _chunks(q, k):
        s = _acc(torch.matmul(q[sl] * scale, k[sl].transpose(-1, -2)))
        # max, exp in place, sum, and the output divided by the sum (not the probabilities): one logits buffer,
        # and on CPU ~1.3x faster than torch.logsumexp followed by exp(s - lse)
        m = s.amax(-1, keepdim=True)
        p = s.sub_(m).exp_()
        denom = p.sum(-1, keepdim=True)
        lse[sl] = (m + denom.log()).squeeze(-1)
        if p.dtype == v.dtype:
            o[sl] = torch.matmul(p, v[sl]).div_(denom)
        else:   # half precision: normalised before the cast (an unnormalised sum of values could overflow fp16)
            o[sl] = torch.matmul(p.div_(denom).to(v.dtype), v[sl])
    return o, lse


def _matmul_bwd(do, q, k, v, o, lse, scale, delta):
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    for sl in _chunks(q, k):
        qs = q[sl] * scale
        p = _acc(torch.matmul(qs, k[sl].transpose(-1, -2))).sub_(lse[sl].unsqueeze(-1)).exp_()
        dv[sl] = torch.matmul(p.to(do.dtype).transpose(-1, -2), do[sl])
        dp = _acc(torch.matmul(do[sl], v[sl].transpose(-1, -2)))
        ds = p.mul_(dp.sub_(delta[sl].unsqueeze(-1))).to(q.dtype)
        dq[sl] = torch.matmul(ds, k[sl]) * scale
        dk[sl] = torch.matmul(ds.transpose(-1, -2), qs)
    return dq, dk, dv


class _RoutedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, scale):
        B, h, R, T, _ = q.shape
        flash = _flash_ok(q, k, v)
        qf = q.transpose(1, 2).reshape(B * R, h, T, q.shape[-1])     # a view for q sliced from a fused qkv
        kt, vt = k.transpose(1, 2), v.transpose(1, 2)                 # (B, R, heads, Tk, D) views
        o = lse = None
        for j in range(idx.shape[-1]):
            kj, vj = _slot(kt, idx[..., j]), _slot(vt, idx[..., j])
            oj, lj = _flash_fwd(qf, kj, vj, scale) if flash else _matmul_fwd(qf, kj, vj, scale)
            if o is None:
                o, lse = (_acc(oj) if idx.shape[-1] > 1 else oj), lj
            else:                                                     # online softmax merge of slot j
                new = torch.logaddexp(lse, lj)
                o = o * (lse - new).exp_().unsqueeze(-1) + _acc(oj) * (lj - new).exp_().unsqueeze(-1)
                lse = new
        o = o.to(q.dtype)
        ctx.save_for_backward(qf, k, v, idx, o, lse)
        ctx.scale, ctx.flash = scale, flash
        return o.unflatten(0, (B, R)).transpose(1, 2)

    @staticmethod
    def backward(ctx, do):
        qf, k, v, idx, o, lse = ctx.saved_tensors
        scale = ctx.scale
        B, h, R = k.shape[:3]
        dof = do.transpose(1, 2).reshape(o.shape)
        kt, vt = k.transpose(1, 2), v.transpose(1, 2)
        # gradients of K / V summed over every (query region, slot) that routed to a region: in fp32 for halves
        dk = torch.zeros(kt.shape, dtype=_acc(k).dtype, device=k.device).flatten(0, 1)
        dv = torch.zeros(vt.shape, dtype=_acc(v).dtype, device=v.device).flatten(0, 1)
        delta = None if ctx.flash else (_acc(dof) * _acc(o)).sum(-1)
        base = (torch.arange(B, device=idx.device) * R).view(B, 1)
        dq = None
        for j in range(idx.shape[-1]):
            kj, vj = _slot(kt, idx[..., j]), _slot(vt, idx[..., j])
            if ctx.flash:
                gq, gk, gv = _flash_bwd(dof, qf, kj, vj, o, lse, scale)
            else:
                gq, gk, gv = _matmul_bwd(dof, qf, kj, vj, o, lse, scale, delta)
            dq = _acc(gq) if dq is None else dq + gq
            target = (base + idx[..., j]).flatten()
            dk.index_add_(0, target, gk.to(dk.dtype))
            dv.index_add_(0, target, gv.to(dv.dtype))
        dq = dq.to(qf.dtype).unflatten(0, (B, R)).transpose(1, 2)
        dk = dk.to(k.dtype).unflatten(0, (B, R)).transpose(1, 2)
        dv = dv.to(v.dtype).unflatten(0, (B, R)).transpose(1, 2)
        return dq, dk, dv, None, None


def routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor,
                     scale: Optional[float] = None) -> torch.Tensor:
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _RoutedAttention.apply(q, k, v, idx, scale)
