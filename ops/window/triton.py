"""Fused window attention in Triton: forward and backward, online softmax, additive bias and
key mask read in place (no per-window bias copy, no materialised attention matrix).

Layout: q, k, v are (B', heads, N, D) with arbitrary strides (views of a fused qkv projection
work as they are); the output is allocated (B', N, heads, D) and returned as a (B', heads, N, D)
view so the caller's ``transpose(1, 2).reshape(B', N, heads * D)`` is free.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._dispatch import empty
from .._triton import autotune, pick, tile


# launch tiles (ops._triton): the forward autotunes over _FWD; the backward's two kernels take the first of _BWD
# that fits: 64-blocks in 8 warps at the models' head dims (in 4, _bwd_q spilled 92 bytes of registers at MaxViT's
# shapes: ptxas, bf16, sm_90), 32-blocks above head dim 64 at 2-byte elements, 16-blocks in fp32 (up to 256)
_FWD = (tile(BLOCK_M=64, BLOCK_N=64, num_stages=2, max_d=(64, 256)),
        tile(BLOCK_M=32, BLOCK_N=64, num_stages=2, max_d=(64, 256)),
        tile(BLOCK_M=64, BLOCK_N=32, num_stages=3, max_d=(64, 256)),
        tile(BLOCK_M=32, BLOCK_N=32, num_warps=2, num_stages=2), tile(BLOCK_M=16, BLOCK_N=64, num_warps=2, num_stages=2))
_BWD = (tile(BLOCK_M=64, BLOCK_N=64, num_warps=8, max_d=(64, 64)), tile(BLOCK_M=32, BLOCK_N=32, max_d=(0, 256)),
        tile(BLOCK_M=16, BLOCK_N=16))


@triton.jit
def _tile_ptrs(P, b, h, offs_r, offs_d, N, D, sb, sh, sr, sd):
    """Pointers and bounds mask of a (rows, head dim) tile of a (B', heads, N, D) strided tensor."""
    ptrs = P + b * sb + h * sh + offs_r[:, None] * sr + offs_d[None, :] * sd
    return ptrs, (offs_r[:, None] < N) & (offs_d[None, :] < D)


@triton.jit
def _load_tile(P, b, h, offs_r, offs_d, N, D, sb, sh, sr, sd):
    ptrs, mask = _tile_ptrs(P, b, h, offs_r, offs_d, N, D, sb, sh, sr, sd)
    return tl.load(ptrs, mask=mask, other=0.)


@triton.jit
def _store_tile(P, val, b, h, offs_r, offs_d, N, D, sb, sh, sr, sd):
    ptrs, mask = _tile_ptrs(P, b, h, offs_r, offs_d, N, D, sb, sh, sr, sd)
    tl.store(ptrs, val.to(P.dtype.element_ty), mask=mask)


@triton.jit
def _program_coords(H, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """(batch*window b, head h, flat bh, row offsets of this program's tile, head-dim offsets)."""
    bh = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    return bh // H, bh % H, bh, offs, tl.arange(0, BLOCK_D)


@triton.jit
def _scores(q, K, Bias, KMask, b, h, offs_m, offs_n, offs_d, N, D, M,
            skb, skh, skn, skd, sbh, sbm, sbn, smm, smn, scale,
            HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr):
    """Logits of a (query tile, key tile) pair with bias and -inf on invalid keys; also returns k."""
    k = _load_tile(K, b, h, offs_n, offs_d, N, D, skb, skh, skn, skd)
    s = tl.dot(q, tl.trans(k)) * scale
    if HAS_BIAS:
        s += tl.load(Bias + h * sbh + offs_m[:, None] * sbm + offs_n[None, :] * sbn,
                     mask=(offs_m[:, None] < N) & (offs_n[None, :] < N), other=0.).to(tl.float32)
    valid = offs_n < N
    if HAS_MASK:
        valid = valid & (tl.load(KMask + (b % M) * smm + offs_n * smn, mask=offs_n < N, other=0) != 0)
    s = tl.where(valid[None, :], s, float('-inf'))
    return s, k


@autotune(_FWD, key=['N', 'BLOCK_D', 'HAS_BIAS', 'HAS_MASK'])
@triton.jit
def _fwd(Q, K, V, Bias, KMask, O, LSE,
         sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
         sbh, sbm, sbn, smm, smn, H, N, D, M, scale,
         HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    b, h, bh, offs_m, offs_d = _program_coords(H, BLOCK_M, BLOCK_D)
    q = _load_tile(Q, b, h, offs_m, offs_d, N, D, sqb, sqh, sqn, sqd)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        s, k = _scores(q, K, Bias, KMask, b, h, offs_m, offs_n, offs_d, N, D, M,
                       skb, skh, skn, skd, sbh, sbm, sbn, smm, smn, scale, HAS_BIAS, HAS_MASK)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        v = _load_tile(V, b, h, offs_n, offs_d, N, D, svb, svh, svn, svd)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    l_i = tl.where(l_i == 0., 1., l_i)
    acc = acc / l_i[:, None]
    _store_tile(O, acc, b, h, offs_m, offs_d, N, D, sob, soh, son, sod)
    tl.store(LSE + bh * N + offs_m, m_i + tl.log(l_i), mask=offs_m < N)


@triton.jit
def _bwd_kv(Q, K, V, Bias, KMask, DO, LSE, Delta, DK, DV,
            sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
            sbh, sbm, sbn, smm, smn, H, N, D, M, scale,
            HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (key tile, batch*head): loops over query tiles, accumulates dK, dV."""
    b, h, bh, offs_n, offs_d = _program_coords(H, BLOCK_N, BLOCK_D)
    v = _load_tile(V, b, h, offs_n, offs_d, N, D, svb, svh, svn, svd)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_tile(Q, b, h, offs_m, offs_d, N, D, sqb, sqh, sqn, sqd)
        do = _load_tile(DO, b, h, offs_m, offs_d, N, D, H * N * D, N * D, D, 1)
        lse = tl.load(LSE + bh * N + offs_m, mask=offs_m < N, other=0.)
        delta = tl.load(Delta + bh * N + offs_m, mask=offs_m < N, other=0.)
        s, k = _scores(q, K, Bias, KMask, b, h, offs_m, offs_n, offs_d, N, D, M,
                       skb, skh, skn, skd, sbh, sbm, sbn, smm, smn, scale, HAS_BIAS, HAS_MASK)
        p = tl.exp(s - lse[:, None])
        p = tl.where(offs_m[:, None] < N, p, 0.)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        dp = tl.dot(do, tl.trans(v)).to(tl.float32)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    _store_tile(DK, dk * scale, b, h, offs_n, offs_d, N, D, sdb, sdh, sdn, sdd)
    _store_tile(DV, dv, b, h, offs_n, offs_d, N, D, sdb, sdh, sdn, sdd)


@triton.jit
def _bwd_q(Q, K, V, Bias, KMask, DO, LSE, Delta, DQ, DBias,
           sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
           sbh, sbm, sbn, smm, smn, H, N, D, M, scale,
           HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, BIAS_GRAD: tl.constexpr,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (query tile, batch*head): loops over key tiles, accumulates dQ and
    adds its share of dBias (summed over windows) with fp32 atomics."""
    b, h, bh, offs_m, offs_d = _program_coords(H, BLOCK_M, BLOCK_D)
    q = _load_tile(Q, b, h, offs_m, offs_d, N, D, sqb, sqh, sqn, sqd)
    do = _load_tile(DO, b, h, offs_m, offs_d, N, D, H * N * D, N * D, D, 1)
    lse = tl.load(LSE + bh * N + offs_m, mask=offs_m < N, other=0.)
    delta = tl.load(Delta + bh * N + offs_m, mask=offs_m < N, other=0.)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        s, k = _scores(q, K, Bias, KMask, b, h, offs_m, offs_n, offs_d, N, D, M,
                       skb, skh, skn, skd, sbh, sbm, sbn, smm, smn, scale, HAS_BIAS, HAS_MASK)
        p = tl.exp(s - lse[:, None])
        p = tl.where(offs_m[:, None] < N, p, 0.)
        v = _load_tile(V, b, h, offs_n, offs_d, N, D, svb, svh, svn, svd)
        dp = tl.dot(do, tl.trans(v)).to(tl.float32)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
        if BIAS_GRAD:
            tl.atomic_add(DBias + h * N * N + offs_m[:, None] * N + offs_n[None, :], ds,
                          mask=(offs_m[:, None] < N) & (offs_n[None, :] < N))
    _store_tile(DQ, dq * scale, b, h, offs_m, offs_d, N, D, sdb, sdh, sdn, sdd)


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _aux(q, bias, mask_i8):
    """Kernel arguments for the optional bias / int8 key mask (a dummy pointer when absent)."""
    dummy = q.new_empty(1)
    bias_arg, bstr = (bias, tuple(bias.stride())) if bias is not None else (dummy, (0, 0, 0))
    mask_arg, mstr, M = (mask_i8, tuple(mask_i8.stride()), mask_i8.shape[0]) if mask_i8 is not None \
        else (dummy, (0, 0), 1)
    return bias_arg, bstr, mask_arg, mstr, M


# The kernels are wrapped as torch custom ops (forward and backward), so torch.compile / export
# trace through them as single nodes instead of falling back to eager around a Python function.

@torch.library.custom_op('mixzoo::window_attention_fwd', mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
            key_mask: Optional[torch.Tensor], scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> out (B', N, heads, D) contiguous, lse (B', heads, N) fp32."""
    Bp, H, N, D = q.shape
    mask_i8 = key_mask.to(torch.int8) if key_mask is not None else None
    bias_t, bstr, mask_t, mstr, M = _aux(q, bias, mask_i8)
    out = empty((Bp, N, H, D), dtype=q.dtype, device=q.device)
    lse = empty((Bp, H, N), dtype=torch.float32, device=q.device)
    out_v = out.transpose(1, 2)
    grid = lambda meta: (triton.cdiv(N, meta['BLOCK_M']), Bp * H)  # noqa: E731
    _fwd[grid](q, k, v, bias_t, mask_t, out_v, lse,
               *q.stride(), *k.stride(), *v.stride(), *out_v.stride(), *bstr, *mstr,
               H, N, D, M, scale, HAS_BIAS=bias is not None, HAS_MASK=key_mask is not None,
               BLOCK_D=_block_d(D))
    return out, lse


@_fwd_op.register_fake
def _(q, k, v, bias, key_mask, scale):
    Bp, H, N, D = q.shape
    return q.new_empty((Bp, N, H, D)), q.new_empty((Bp, H, N), dtype=torch.float32)


@torch.library.custom_op('mixzoo::window_attention_bwd', mutates_args=())
def _bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
            key_mask: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, do: torch.Tensor,
            scale: float, bias_grad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dq, dk, dv (B', heads, N, D), dbias (heads, N, N) fp32 (empty when not asked)."""
    Bp, H, N, D = q.shape
    do = do.contiguous()
    delta = (do.float() * out.transpose(1, 2).float()).sum(-1).contiguous()
    mask_i8 = key_mask.to(torch.int8) if key_mask is not None else None
    bias_t, bstr, mask_arg, mstr, M = _aux(q, bias, mask_i8)
    dq, dk, dv = (empty((Bp, H, N, D), dtype=q.dtype, device=q.device) for _ in range(3))
    dbias = torch.zeros((H, N, N) if bias_grad else (0,), dtype=torch.float32, device=q.device)
    launch = pick(_BWD, _block_d(D), q.dtype)
    blk = launch['BLOCK_M']
    common = dict(HAS_BIAS=bias is not None, HAS_MASK=mask_i8 is not None, BLOCK_D=_block_d(D), **launch)
    strides = (*q.stride(), *k.stride(), *v.stride(), *dk.stride(), *bstr, *mstr)
    _bwd_kv[(triton.cdiv(N, blk), Bp * H)](q, k, v, bias_t, mask_arg, do, lse, delta, dk, dv,
                                           *strides, H, N, D, M, scale, **common)
    _bwd_q[(triton.cdiv(N, blk), Bp * H)](q, k, v, bias_t, mask_arg, do, lse, delta, dq,
                                          dbias if bias_grad else bias_t,
                                          *strides, H, N, D, M, scale, BIAS_GRAD=bias_grad, **common)
    return dq, dk, dv, dbias


@_bwd_op.register_fake
def _(q, k, v, bias, key_mask, out, lse, do, scale, bias_grad):
    H, N = q.shape[1], q.shape[2]
    return (torch.empty_like(q), torch.empty_like(q), torch.empty_like(q),
            q.new_empty((H, N, N) if bias_grad else (0,), dtype=torch.float32))


def _setup(ctx, inputs, output):
    q, k, v, bias, key_mask, scale = inputs
    ctx.save_for_backward(q, k, v, bias, key_mask, *output)
    ctx.scale = scale


def _backward(ctx, do, _dlse):
    q, k, v, bias, key_mask, out, lse = ctx.saved_tensors
    bias_grad = bias is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dbias = _bwd_op(q, k, v, bias, key_mask, out, lse, do.transpose(1, 2), ctx.scale, bias_grad)
    return dq, dk, dv, (dbias.to(bias.dtype) if bias_grad else None), None, None


_fwd_op.register_autograd(_backward, setup_context=_setup)


def window_attention(q, k, v, bias: Optional[torch.Tensor] = None, key_mask: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None) -> torch.Tensor:
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, _ = _fwd_op(q, k, v, bias, key_mask, scale)
    return out.transpose(1, 2)
