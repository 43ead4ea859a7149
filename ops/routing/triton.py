"""Fused routed attention in Triton: forward and backward, online softmax in fp32, keys / values read in place
from their routed regions (no gathered K/V, no attention matrix in memory).

Forward: one program per (query-token block, query region, batch*head) loops over its topk routed regions and
their key tiles. Backward: dQ in the same layout; dK / dV by a second pass over the INVERSE routing (for each
key region, the query regions that routed to it, built with a sort), one program per (key-token block, key
region, batch*head): deterministic, no atomics.

Layout: q, k, v are (B, heads, R, T | Tk, D | Dv) with arbitrary strides; the output is allocated
(B, R, T, heads, Dv) and returned as a (B, heads, R, T, Dv) view, so the mixer's merge of the heads back into
the map's channels is free.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl

from .._dispatch import empty
from .._triton import autotune, pick, tile


# launch tiles (ops._triton): the forward autotunes over _FWD (all fit up to head dim 128); the backward's two
# kernels take the first of _BWD that fits (fp32 at head dims above 32 needs 32-blocks on sm_80)
_FWD = (tile(BLOCK_M=64, BLOCK_N=64, num_stages=2), tile(BLOCK_M=128, BLOCK_N=64, num_stages=2),
        tile(BLOCK_M=64, BLOCK_N=32, num_stages=3), tile(BLOCK_M=32, BLOCK_N=32, num_warps=2, num_stages=2),
        tile(BLOCK_M=16, BLOCK_N=32, num_warps=2, num_stages=2))
_BWD = (tile(BLOCK_M=64, BLOCK_N=64, max_d=(32, 128)), tile(BLOCK_M=32, BLOCK_N=32))


@triton.jit
def _tile(P, base, offs_r, offs_d, n_rows, n_cols, sr, sd):
    """Load a (rows, head dim) tile at P + base, zero outside the bounds."""
    mask = (offs_r[:, None] < n_rows) & (offs_d[None, :] < n_cols)
    return tl.load(P + base + offs_r[:, None] * sr + offs_d[None, :] * sd, mask=mask, other=0.)


@triton.jit
def _put(P, val, base, offs_r, offs_d, n_rows, n_cols, sr, sd):
    mask = (offs_r[:, None] < n_rows) & (offs_d[None, :] < n_cols)
    tl.store(P + base + offs_r[:, None] * sr + offs_d[None, :] * sd, val.to(P.dtype.element_ty), mask=mask)


@autotune(_FWD, key=['T', 'Tk', 'BLOCK_D', 'BLOCK_DV'])
@triton.jit
def _fwd(Q, K, V, Idx, O, LSE,
         sqb, sqh, sqr, sqt, sqd, skb, skh, skr, skt, skd, svb, svh, svr, svt, svd,
         sob, soh, sor, sot, sod,
         H, R, T, Tk, D, DV, TOPK, scale,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    r = tl.program_id(1)
    bh = tl.program_id(2)
    b, h = bh // H, bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _tile(Q, b * sqb + h * sqh + r * sqr, offs_m, offs_d, T, D, sqt, sqd)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for j in range(TOPK):
        rk = tl.load(Idx + (b * R + r) * TOPK + j)
        for start_n in range(0, Tk, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = _tile(K, b * skb + h * skh + rk * skr, offs_n, offs_d, Tk, D, skt, skd)
            s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where((offs_n < Tk)[None, :], s, float('-inf'))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            v = _tile(V, b * svb + h * svh + rk * svr, offs_n, offs_dv, Tk, DV, svt, svd)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
    l_i = tl.where(l_i == 0., 1., l_i)
    _put(O, acc / l_i[:, None], b * sob + h * soh + r * sor, offs_m, offs_dv, T, DV, sot, sod)
    tl.store(LSE + (bh * R + r) * T + offs_m, m_i + tl.log(l_i), mask=offs_m < T)


@triton.jit
def _probs(q, k, lse, offs_m, offs_n, T, Tk, scale):
    """Softmax probabilities of a (query tile, key tile) pair recomputed from the log-sum-exp; 0 off bounds."""
    s = tl.dot(q, tl.trans(k)) * scale
    p = tl.exp(s - lse[:, None])
    return tl.where((offs_m[:, None] < T) & (offs_n[None, :] < Tk), p, 0.)


@triton.jit
def _bwd_q(Q, K, V, Idx, DO, LSE, Delta, DQ,
           sqb, sqh, sqr, sqt, sqd, skb, skh, skr, skt, skd, svb, svh, svr, svt, svd,
           sdb, sdh, sdr, sdt, sdd, sgb, sgh, sgr, sgt, sgd,
           H, R, T, Tk, D, DV, TOPK, scale,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One program per (query block, query region, batch*head): loops over its routed regions' key tiles."""
    r = tl.program_id(1)
    bh = tl.program_id(2)
    b, h = bh // H, bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _tile(Q, b * sqb + h * sqh + r * sqr, offs_m, offs_d, T, D, sqt, sqd)
    do = _tile(DO, b * sdb + h * sdh + r * sdr, offs_m, offs_dv, T, DV, sdt, sdd)
    row = (bh * R + r) * T + offs_m
    lse = tl.load(LSE + row, mask=offs_m < T, other=0.)
    delta = tl.load(Delta + row, mask=offs_m < T, other=0.)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for j in range(TOPK):
        rk = tl.load(Idx + (b * R + r) * TOPK + j)
        for start_n in range(0, Tk, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = _tile(K, b * skb + h * skh + rk * skr, offs_n, offs_d, Tk, D, skt, skd)
            v = _tile(V, b * svb + h * svh + rk * svr, offs_n, offs_dv, Tk, DV, svt, svd)
            p = _probs(q, k, lse, offs_m, offs_n, T, Tk, scale)
            dp = tl.dot(do, tl.trans(v)).to(tl.float32)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k)
    _put(DQ, dq * scale, b * sgb + h * sgh + r * sgr, offs_m, offs_d, T, D, sgt, sgd)


@triton.jit
def _bwd_kv(Q, K, V, Src, Start, DO, LSE, Delta, DK, DV_,
            sqb, sqh, sqr, sqt, sqd, skb, skh, skr, skt, skd, svb, svh, svr, svt, svd,
             sdb, sdh, sdr, sdt, sdd, sgb, sgh, sgr, sgt, sgd, swb, swh, swr, swt, swd,
            H, R, T, Tk, D, DV, scale,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One program per (key block, key region, batch*head): loops over the query regions routed to this key
    region (inverse routing Src[Start[b*R + rk] : Start[b*R + rk + 1]]) and their query tiles."""
    rk = tl.program_id(1)
    bh = tl.program_id(2)
    b, h = bh // H, bh % H
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _tile(K, b * skb + h * skh + rk * skr, offs_n, offs_d, Tk, D, skt, skd)
    v = _tile(V, b * svb + h * svh + rk * svr, offs_n, offs_dv, Tk, DV, svt, svd)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    lo = tl.load(Start + b * R + rk)
    hi = tl.load(Start + b * R + rk + 1)
    for e in range(lo, hi):
        r = tl.load(Src + e)
        for start_m in range(0, T, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = _tile(Q, b * sqb + h * sqh + r * sqr, offs_m, offs_d, T, D, sqt, sqd)
            do = _tile(DO, b * sdb + h * sdh + r * sdr, offs_m, offs_dv, T, DV, sdt, sdd)
            row = (bh * R + r) * T + offs_m
            lse = tl.load(LSE + row, mask=offs_m < T, other=0.)
            delta = tl.load(Delta + row, mask=offs_m < T, other=0.)
            p = _probs(q, k, lse, offs_m, offs_n, T, Tk, scale)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            dp = tl.dot(do, tl.trans(v)).to(tl.float32)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    _put(DK, dk * scale, b * sgb + h * sgh + rk * sgr, offs_n, offs_d, Tk, D, sgt, sgd)
    _put(DV_, dv, b * swb + h * swh + rk * swr, offs_n, offs_dv, Tk, DV, swt, swd)


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _heads_last(B, H, R, T, D, like):
    """A (B, R, T, heads, D) allocation (what the op returns) and its (B, heads, R, T, D) view (what the
    kernels index)."""
    t = empty((B, R, T, H, D), dtype=like.dtype, device=like.device)
    return t, t.permute(0, 3, 1, 2, 4)


def inverse_routing(idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """For each (image b, key region rk), the query regions r with rk among idx[b, r, :] (once per occurrence):
    src (B * R * topk,) int32 query regions grouped by b * R + rk, start (B * R + 1,) int32 offsets."""
    B, R, topk = idx.shape
    key = (idx + (torch.arange(B, device=idx.device) * R).view(B, 1, 1)).flatten()
    order = torch.argsort(key, stable=True)
    src = (order // topk % R).to(torch.int32)
    start = torch.zeros(B * R + 1, dtype=torch.int32, device=idx.device)
    start[1:] = torch.cumsum(torch.bincount(key, minlength=B * R), 0).to(torch.int32)
    return src, start


# The kernels are wrapped as torch custom ops (forward and backward), so torch.compile / export trace through
# them as single nodes instead of falling back to eager around a Python function.

@torch.library.custom_op('mixzoo::routed_attention_fwd', mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor,
            scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> out (B, R, T, heads, Dv) contiguous, lse (B, heads, R, T) fp32."""
    B, H, R, T, D = q.shape
    Tk, DV, topk = k.shape[3], v.shape[-1], idx.shape[-1]
    idx = idx.contiguous()
    out, out_v = _heads_last(B, H, R, T, DV, q)
    lse = empty((B, H, R, T), dtype=torch.float32, device=q.device)
    grid = lambda meta: (triton.cdiv(T, meta['BLOCK_M']), R, B * H)  # noqa: E731
    _fwd[grid](q, k, v, idx, out_v, lse, *q.stride(), *k.stride(), *v.stride(), *out_v.stride(),
               H, R, T, Tk, D, DV, topk, scale, BLOCK_D=_block_d(D), BLOCK_DV=_block_d(DV))
    return out, lse


@_fwd_op.register_fake
def _(q, k, v, idx, scale):
    B, H, R, T, _ = q.shape
    return q.new_empty((B, R, T, H, v.shape[-1])), q.new_empty((B, H, R, T), dtype=torch.float32)


@torch.library.custom_op('mixzoo::routed_attention_bwd', mutates_args=())
def _bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, out: torch.Tensor,
            lse: torch.Tensor, do: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """out / do (B, R, T, heads, Dv) -> dq, dk, dv in (B, R, T | Tk, heads, D | Dv) layout (contiguous)."""
    B, H, R, T, D = q.shape
    Tk, DV, topk = k.shape[3], v.shape[-1], idx.shape[-1]
    idx = idx.contiguous()
    delta = (do.float() * out.float()).sum(-1).permute(0, 3, 1, 2).contiguous()     # (B, heads, R, T)
    src, start = inverse_routing(idx)
    do_v = do.permute(0, 3, 1, 2, 4)
    dq, dq_v = _heads_last(B, H, R, T, D, q)
    dk, dk_v = _heads_last(B, H, R, Tk, D, k)
    dv, dv_v = _heads_last(B, H, R, Tk, DV, v)
    launch = pick(_BWD, max(_block_d(D), _block_d(DV)), q.dtype)
    blk = launch['BLOCK_M']
    common = dict(BLOCK_D=_block_d(D), BLOCK_DV=_block_d(DV), **launch)
    strides = (*q.stride(), *k.stride(), *v.stride(), *do_v.stride())
    _bwd_q[(triton.cdiv(T, blk), R, B * H)](q, k, v, idx, do_v, lse, delta, dq_v, *strides, *dq_v.stride(),
                                            H, R, T, Tk, D, DV, topk, scale, **common)
    _bwd_kv[(triton.cdiv(Tk, blk), R, B * H)](q, k, v, src, start, do_v, lse, delta, dk_v, dv_v, *strides,
                                              *dk_v.stride(), *dv_v.stride(), H, R, T, Tk, D, DV, scale, **common)
    return dq, dk, dv


@_bwd_op.register_fake
def _(q, k, v, idx, out, lse, do, scale):
    B, H, R, T, D = q.shape
    Tk, DV = k.shape[3], v.shape[-1]
    return q.new_empty((B, R, T, H, D)), k.new_empty((B, R, Tk, H, D)), v.new_empty((B, R, Tk, H, DV))


def _setup(ctx, inputs, output):
    q, k, v, idx, scale = inputs
    ctx.save_for_backward(q, k, v, idx, *output)
    ctx.scale = scale


def _backward(ctx, do, _dlse):
    q, k, v, idx, out, lse = ctx.saved_tensors
    dq, dk, dv = _bwd_op(q, k, v, idx, out, lse, do, ctx.scale)
    return dq.permute(0, 3, 1, 2, 4), dk.permute(0, 3, 1, 2, 4), dv.permute(0, 3, 1, 2, 4), None, None


_fwd_op.register_autograd(_backward, setup_context=_setup)


def routed_attention(q, k, v, idx, scale=None) -> torch.Tensor:
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, _ = _fwd_op(q, k, v, idx, scale)
    return out.permute(0, 3, 1, 2, 4)
