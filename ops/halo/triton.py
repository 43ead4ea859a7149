"""Fused halo attention in Triton, forward and backward.

One program per (batch*head, query block): it reads its (block + 2 halo)^2 key/value window straight
from the (B, heads, D, H, W) maps by index arithmetic (out-of-map positions load as zeros, i.e. the
'zero_pad' border, or are masked), so no unfolded K/V copy exists; online softmax over key tiles.
Relative-position logits enter as two small per-query tables computed by torch,
qh[.., t] = q . rel_h[t] and qw likewise (t in [0, 2 win - 1)), which the kernel indexes at
(key row - query row + win - 1); their gradients flow back through torch.

Backward recomputes probabilities from the saved log-sum-exp; dQ is complete within a program;
dK / dV (windows of neighbouring blocks overlap by the halo) and the qh / qw gradients are
accumulated with fp32 atomics.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl

from .._dispatch import empty
from .._triton import pick, tile
from . import geometry as G


@triton.jit
def _coords(blk, nbw, bq, block, halo, win, offs_q, offs_k):
    """Query map coordinates of this block's tile rows and key map coordinates of a key tile."""
    bi = blk // nbw
    bj = blk % nbw
    a = offs_q // bq
    b = offs_q % bq
    r = offs_k // win
    c = offs_k % win
    return bi * bq + a, bj * bq + b, bi * block - halo + r, bj * block - halo + c, a, b, r, c


@triton.jit
def _logits(Q_tile, K, QH, QW, bh, qy, qx, qvalid, ky, kx, kvalid_load, kvalid_soft, a, b, r, c, offs_d,
            sk_bh, skd, skh, skw, Wq, win, D, scale, HAS_REL: tl.constexpr):
    k = tl.load(K + bh * sk_bh + offs_d[:, None] * skd + ky[None, :] * skh + kx[None, :] * skw,
                mask=(offs_d[:, None] < D) & kvalid_load[None, :], other=0.)              # (D, BK)
    s = tl.dot(Q_tile, k) * scale
    if HAS_REL:
        L = 2 * win - 1
        qrow = (qy * Wq + qx) * L
        s += tl.load(QH + qrow[:, None] + (r[None, :] - a[:, None] + win - 1),
                     mask=qvalid[:, None] & kvalid_soft[None, :], other=0.).to(tl.float32)
        s += tl.load(QW + qrow[:, None] + (c[None, :] - b[:, None] + win - 1),
                     mask=qvalid[:, None] & kvalid_soft[None, :], other=0.).to(tl.float32)
    s = tl.where(kvalid_soft[None, :], s, float('-inf'))
    return s, k


@triton.jit
def _fwd(Q, K, V, QH, QW, O, LSE,
         sq_bh, sqd, sqh, sqw, sk_bh, skd, skh, skw, sv_bh, svd, svh, svw, so_bh, sod, soh, sow,
         H, W, Hq, Wq, nbw, nb, D, Dv, scale,
         bq: tl.constexpr, block: tl.constexpr, halo: tl.constexpr, win: tl.constexpr,
         HAS_REL: tl.constexpr, MASK_BORDER: tl.constexpr,
         BQ: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr):
    bh = tl.program_id(1)
    blk = tl.program_id(0)
    offs_q = tl.arange(0, BQ)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    qy, qx, _, _, a, b, _, _ = _coords(blk, nbw, bq, block, halo, win, offs_q, offs_q)
    qvalid = (offs_q < bq * bq) & (qy < Hq) & (qx < Wq)
    q = tl.load(Q + bh * sq_bh + offs_d[None, :] * sqd + qy[:, None] * sqh + qx[:, None] * sqw,
                mask=qvalid[:, None] & (offs_d[None, :] < D), other=0.)                   # (BQ, D)
    m_i = tl.full([BQ], -1.0e30, tl.float32)
    l_i = tl.zeros([BQ], tl.float32)
    acc = tl.zeros([BQ, BDV], tl.float32)
    QHb = QH + bh * Hq * Wq * (2 * win - 1)
    QWb = QW + bh * Hq * Wq * (2 * win - 1)
    for start in range(0, win * win, BK):
        offs_k = start + tl.arange(0, BK)
        _, _, ky, kx, _, _, r, c = _coords(blk, nbw, bq, block, halo, win, offs_q, offs_k)
        inmap = (ky >= 0) & (ky < H) & (kx >= 0) & (kx < W) & (offs_k < win * win)
        soft = (offs_k < win * win) & inmap if MASK_BORDER else offs_k < win * win
        s, _k = _logits(q, K, QHb, QWb, bh, qy, qx, qvalid, ky, kx, inmap, soft, a, b, r, c, offs_d,
                        sk_bh, skd, skh, skw, Wq, win, D, scale, HAS_REL)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        v = tl.load(V + bh * sv_bh + offs_dv[None, :] * svd + ky[:, None] * svh + kx[:, None] * svw,
                    mask=inmap[:, None] & (offs_dv[None, :] < Dv), other=0.)              # (BK, Dv)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    l_i = tl.where(l_i == 0., 1., l_i)
    acc = acc / l_i[:, None]
    tl.store(O + bh * so_bh + offs_dv[None, :] * sod + qy[:, None] * soh + qx[:, None] * sow,
             acc.to(O.dtype.element_ty), mask=qvalid[:, None] & (offs_dv[None, :] < Dv))
    tl.store(LSE + bh * Hq * Wq + qy * Wq + qx, m_i + tl.log(l_i), mask=qvalid)


@triton.jit
def _bwd(Q, K, V, QH, QW, DO, LSE, Delta, DQ, DK, DV, DQH, DQW,
         sq_bh, sqd, sqh, sqw, sk_bh, skd, skh, skw, sv_bh, svd, svh, svw,
         H, W, Hq, Wq, nbw, nb, D, Dv, scale,
         bq: tl.constexpr, block: tl.constexpr, halo: tl.constexpr, win: tl.constexpr,
         HAS_REL: tl.constexpr, MASK_BORDER: tl.constexpr,
         BQ: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr):
    """dO, dQ, dK, dV are contiguous (B*heads, C, H, W); dK/dV/dQH/dQW fp32, zero-initialised."""
    bh = tl.program_id(1)
    blk = tl.program_id(0)
    offs_q = tl.arange(0, BQ)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    qy, qx, _, _, a, b, _, _ = _coords(blk, nbw, bq, block, halo, win, offs_q, offs_q)
    qvalid = (offs_q < bq * bq) & (qy < Hq) & (qx < Wq)
    q = tl.load(Q + bh * sq_bh + offs_d[None, :] * sqd + qy[:, None] * sqh + qx[:, None] * sqw,
                mask=qvalid[:, None] & (offs_d[None, :] < D), other=0.)
    do = tl.load(DO + bh * Dv * Hq * Wq + offs_dv[None, :] * Hq * Wq + qy[:, None] * Wq + qx[:, None],
                 mask=qvalid[:, None] & (offs_dv[None, :] < Dv), other=0.)                 # (BQ, Dv)
    lse = tl.load(LSE + bh * Hq * Wq + qy * Wq + qx, mask=qvalid, other=0.)
    delta = tl.load(Delta + bh * Hq * Wq + qy * Wq + qx, mask=qvalid, other=0.)
    L = 2 * win - 1
    QHb = QH + bh * Hq * Wq * L
    QWb = QW + bh * Hq * Wq * L
    dq = tl.zeros([BQ, BD], tl.float32)
    for start in range(0, win * win, BK):
        offs_k = start + tl.arange(0, BK)
        _, _, ky, kx, _, _, r, c = _coords(blk, nbw, bq, block, halo, win, offs_q, offs_k)
        inmap = (ky >= 0) & (ky < H) & (kx >= 0) & (kx < W) & (offs_k < win * win)
        soft = (offs_k < win * win) & inmap if MASK_BORDER else offs_k < win * win
        s, k = _logits(q, K, QHb, QWb, bh, qy, qx, qvalid, ky, kx, inmap, soft, a, b, r, c, offs_d,
                       sk_bh, skd, skh, skw, Wq, win, D, scale, HAS_REL)
        p = tl.exp(s - lse[:, None])
        p = tl.where(qvalid[:, None], p, 0.)
        v = tl.load(V + bh * sv_bh + offs_dv[None, :] * svd + ky[:, None] * svh + kx[:, None] * svw,
                    mask=inmap[:, None] & (offs_dv[None, :] < Dv), other=0.)
        dp = tl.dot(do, tl.trans(v)).to(tl.float32)                                        # (BQ, BK)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), tl.trans(k))                                          # (BQ, D)
        # key-side gradients land on map positions shared with neighbouring blocks: atomics
        dv_t = tl.dot(tl.trans(p.to(do.dtype)), do)                                       # (BK, Dv)
        tl.atomic_add(DV + bh * Dv * H * W + offs_dv[None, :] * H * W + ky[:, None] * W + kx[:, None], dv_t,
                      mask=inmap[:, None] & (offs_dv[None, :] < Dv))
        dk_t = tl.dot(tl.trans(ds.to(q.dtype)), q) * scale                                  # (BK, D)
        tl.atomic_add(DK + bh * D * H * W + offs_d[None, :] * H * W + ky[:, None] * W + kx[:, None], dk_t,
                      mask=inmap[:, None] & (offs_d[None, :] < D))
        if HAS_REL:
            qrow = (qy * Wq + qx) * L
            gm = qvalid[:, None] & soft[None, :]
            tl.atomic_add(DQH + bh * Hq * Wq * L + qrow[:, None] + (r[None, :] - a[:, None] + win - 1), ds, mask=gm)
            tl.atomic_add(DQW + bh * Hq * Wq * L + qrow[:, None] + (c[None, :] - b[:, None] + win - 1), ds, mask=gm)
    tl.store(DQ + bh * D * Hq * Wq + offs_d[None, :] * Hq * Wq + qy[:, None] * Wq + qx[:, None],
             (dq * scale).to(DQ.dtype.element_ty), mask=qvalid[:, None] & (offs_d[None, :] < D))


# launch tiles of the key dimension (ops._triton; the query block is the halo block's): each kernel takes the
# first of its list that fits. 32 keys in 8 warps: 64 keys in 4 warps spilled 0.2-2.3 KB of registers at
# HaloNet26t's shapes (ptxas, bf16, sm_90), and the backward overflowed sm_80's shared memory in fp32 at its
# stage 4 (head dim 64); fp32 above head dim 64 takes 16 keys in 2 stages
_FWD = (tile(BK=32, num_warps=8),)
_BWD = (tile(BK=32, num_warps=8, max_d=(64, 128)), tile(BK=16, num_stages=2))


def _blocks(tiles, D: int, Dv: int, bq: int, dtype):
    p2 = triton.next_power_of_2
    BD, BDV = max(16, p2(D)), max(16, p2(Dv))
    return dict(BQ=max(16, p2(bq * bq)), BD=BD, BDV=BDV, **pick(tiles, max(BD, BDV), dtype))


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(B, heads, C, H, W) -> (B*heads, C, H, W) (a view when possible)."""
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


@torch.library.custom_op('mixzoo::halo_attention_fwd', mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qh: torch.Tensor, qw: torch.Tensor,
            block: int, halo: int, scale: float, mask_border: bool, has_rel: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    B, h, D, Hq, Wq = q.shape
    H, W = k.shape[-2:]
    Dv = v.shape[2]
    stride, bq, win, nbh, nbw, _, _ = G.dims(q, k, block, halo)
    qf, kf, vf = _flat(q), _flat(k), _flat(v)
    out = empty((B * h, Dv, Hq, Wq), dtype=q.dtype, device=q.device)
    lse = empty((B * h, Hq, Wq), dtype=torch.float32, device=q.device)
    _fwd[(nbh * nbw, B * h)](qf, kf, vf, qh, qw, out, lse, *qf.stride(), *kf.stride(), *vf.stride(), *out.stride(),
                             H, W, Hq, Wq, nbw, nbh * nbw, D, Dv, scale, bq=bq, block=block, halo=halo, win=win,
                             HAS_REL=has_rel, MASK_BORDER=mask_border, **_blocks(_FWD, D, Dv, bq, q.dtype))
    return out.view(B, h, Dv, Hq, Wq), lse


@_fwd_op.register_fake
def _(q, k, v, qh, qw, block, halo, scale, mask_border, has_rel):
    B, h, D, Hq, Wq = q.shape
    return q.new_empty((B, h, v.shape[2], Hq, Wq)), q.new_empty((B * h, Hq, Wq), dtype=torch.float32)


@torch.library.custom_op('mixzoo::halo_attention_bwd', mutates_args=())
def _bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qh: torch.Tensor, qw: torch.Tensor,
            out: torch.Tensor, lse: torch.Tensor, do: torch.Tensor, block: int, halo: int, scale: float,
            mask_border: bool, has_rel: bool
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, h, D, Hq, Wq = q.shape
    H, W = k.shape[-2:]
    Dv = v.shape[2]
    stride, bq, win, nbh, nbw, _, _ = G.dims(q, k, block, halo)
    qf, kf, vf = _flat(q), _flat(k), _flat(v)
    do = _flat(do).contiguous()
    delta = (do.float() * _flat(out).float()).sum(1).contiguous()                          # (B*h, Hq, Wq)
    dq = empty((B * h, D, Hq, Wq), dtype=q.dtype, device=q.device)
    dk = torch.zeros((B * h, D, H, W), dtype=torch.float32, device=q.device)
    dv = torch.zeros((B * h, Dv, H, W), dtype=torch.float32, device=q.device)
    dqh = torch.zeros(qh.shape, dtype=torch.float32, device=q.device)
    dqw = torch.zeros(qw.shape, dtype=torch.float32, device=q.device)
    _bwd[(nbh * nbw, B * h)](qf, kf, vf, qh, qw, do, lse, delta, dq, dk, dv, dqh, dqw,
                             *qf.stride(), *kf.stride(), *vf.stride(),
                             H, W, Hq, Wq, nbw, nbh * nbw, D, Dv, scale, bq=bq, block=block, halo=halo, win=win,
                             HAS_REL=has_rel, MASK_BORDER=mask_border, **_blocks(_BWD, D, Dv, bq, q.dtype))
    shape = lambda t, c, hh, ww: t.view(B, h, c, hh, ww)  # noqa: E731
    return (shape(dq, D, Hq, Wq), shape(dk, D, H, W).to(k.dtype), shape(dv, Dv, H, W).to(v.dtype),
            dqh.to(qh.dtype), dqw.to(qw.dtype))


@_bwd_op.register_fake
def _(q, k, v, qh, qw, out, lse, do, block, halo, scale, mask_border, has_rel):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(qh), torch.empty_like(qw)


def _setup(ctx, inputs, output):
    q, k, v, qh, qw, block, halo, scale, mask_border, has_rel = inputs
    ctx.save_for_backward(q, k, v, qh, qw, *output)
    ctx.args = (block, halo, scale, mask_border, has_rel)


def _backward(ctx, do, _dlse):
    q, k, v, qh, qw, out, lse = ctx.saved_tensors
    dq, dk, dv, dqh, dqw = _bwd_op(q, k, v, qh, qw, out, lse, do, *ctx.args)
    return dq, dk, dv, dqh, dqw, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup)


def halo_attention(q, k, v, block, halo, rel_h=None, rel_w=None, scale=None, border='zero_pad'):
    scale = q.shape[2] ** -0.5 if scale is None else float(scale)
    has_rel = rel_h is not None
    if has_rel:   # per-query tables q . rel[t], (B*heads, Hq, Wq, 2 win - 1); their backward is torch's
        qh = torch.einsum('bhdyx,td->bhyxt', q, rel_h.to(q.dtype)).reshape(-1, q.shape[-2], q.shape[-1],
                                                                            rel_h.shape[0]).contiguous()
        qw = torch.einsum('bhdyx,td->bhyxt', q, rel_w.to(q.dtype)).reshape(-1, q.shape[-2], q.shape[-1],
                                                                            rel_w.shape[0]).contiguous()
    else:
        qh = qw = q.new_zeros((1,))
    out, _ = _fwd_op(q, k, v, qh, qw, block, halo, scale, border == 'mask', has_rel)
    return out
