"""Fused neighborhood attention in Triton: forward (inference) only, so far.

One program per (batch*head, tile of BQ queries in row-major map order). The k*k window keys of each
query are read in place through the geometry's index table (H, W, k*k) - no gathered K/V copy - one
slot at a time, and the extra keys in tiles of BN with tl.dot; one online softmax runs over both, so
the (window + extra) logits never exist in memory. The relative-position bias is read through a
flattened (2k-1)^2 index table; out-of-map slots are excluded by the validity table. The backward
(dK/dV scatter for overlapping windows) is not written yet: the backend declares no autograd, so the
dispatcher uses `torch` whenever gradients are needed.
"""
import torch
import triton
import triton.language as tl

from .._dispatch import empty, triton_interpret
from . import geometry as G


@triton.jit
def _fwd(Q, K, V, IDX, VALID, RELI, RPB, EK, EV, EB, OUT,
         HW, K2, P, D, Dv, heads, scale,
         sq_bh, sk_bh, sv_bh, sek_bh, sev_bh, seb_b, seb_h, so_bh,
         HAS_RPB: tl.constexpr, HAS_EXTRA: tl.constexpr, HAS_EB: tl.constexpr,
         BQ: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr):
    bh = tl.program_id(1)
    b = bh // heads
    hd = bh % heads
    offs_q = tl.program_id(0) * BQ + tl.arange(0, BQ)
    qmask = offs_q < HW
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BDV)
    dmask = offs_d < D
    vmask = offs_v < Dv
    q = tl.load(Q + bh * sq_bh + offs_q[:, None] * D + offs_d[None, :], mask=qmask[:, None] & dmask[None, :],
                other=0.).to(tl.float32)
    m = tl.full((BQ,), float('-inf'), tl.float32)
    lsum = tl.zeros((BQ,), tl.float32)
    acc = tl.zeros((BQ, BDV), tl.float32)
    for j in range(K2):
        kidx = tl.load(IDX + offs_q * K2 + j, mask=qmask, other=0)
        ok = tl.load(VALID + offs_q * K2 + j, mask=qmask, other=0) != 0
        kr = tl.load(K + bh * sk_bh + kidx[:, None] * D + offs_d[None, :], mask=ok[:, None] & dmask[None, :],
                     other=0.).to(tl.float32)
        s = tl.sum(q * kr, axis=1) * scale
        if HAS_RPB:
            ri = tl.load(RELI + offs_q * K2 + j, mask=qmask, other=0)
            s += tl.load(RPB + hd * (4 * K2) + ri, mask=ok, other=0.).to(tl.float32)   # (2k-1)^2 < 4 k^2
        s = tl.where(ok, s, float('-inf'))
        m_new = tl.maximum(m, s)
        m_safe = tl.where(m_new == float('-inf'), 0., m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(s - m_safe)
        vr = tl.load(V + bh * sv_bh + kidx[:, None] * Dv + offs_v[None, :], mask=ok[:, None] & vmask[None, :],
                     other=0.).to(tl.float32)
        acc = acc * alpha[:, None] + p[:, None] * vr
        lsum = lsum * alpha + p
        m = m_new
    if HAS_EXTRA:
        for n0 in range(0, P, BN):
            offs_n = n0 + tl.arange(0, BN)
            nmask = offs_n < P
            ek = tl.load(EK + bh * sek_bh + offs_n[None, :] * D + offs_d[:, None],
                         mask=nmask[None, :] & dmask[:, None], other=0.).to(tl.float32)          # (BD, BN)
            s = tl.dot(q, ek, input_precision="ieee") * scale
            if HAS_EB:
                s += tl.load(EB + b * seb_b + hd * seb_h + offs_q[:, None] * P + offs_n[None, :],
                             mask=qmask[:, None] & nmask[None, :], other=0.).to(tl.float32)
            s = tl.where(nmask[None, :], s, float('-inf'))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float('-inf'), 0., m_new)
            alpha = tl.exp(m - m_safe)
            p = tl.exp(s - m_safe[:, None])
            ev = tl.load(EV + bh * sev_bh + offs_n[:, None] * Dv + offs_v[None, :],
                         mask=nmask[:, None] & vmask[None, :], other=0.).to(tl.float32)          # (BN, BDV)
            acc = acc * alpha[:, None] + tl.dot(p, ev, input_precision="ieee")
            lsum = lsum * alpha + tl.sum(p, axis=1)
            m = m_new
    out = acc / tl.where(lsum == 0., 1., lsum)[:, None]
    tl.store(OUT + bh * so_bh + offs_q[:, None] * Dv + offs_v[None, :], out.to(OUT.dtype.element_ty),
             mask=qmask[:, None] & vmask[None, :])


def neighborhood_attention(q, k, v, kernel, dilation=1, rpb=None, extra_k=None, extra_v=None, extra_bias=None,
                           scale=None, border='mask'):
    B, h, H, W, D = q.shape
    Dv = v.shape[-1]
    HW, K2 = H * W, kernel * kernel
    scale = D ** -0.5 if scale is None else float(scale)
    idx, valid, rr, rc = G.windows(H, W, kernel, dilation, border, q.device)
    idx = idx.to(torch.int32).contiguous()
    valid = valid.to(torch.int8).contiguous()
    qf, kf, vf = (t.reshape(B * h, HW, t.shape[-1]).contiguous() for t in (q, k, v))
    dummy = qf.new_zeros(1)
    if rpb is not None:
        reli = (rr * (2 * kernel - 1) + rc).to(torch.int32).contiguous()
        # (heads, (2k-1)^2) padded to 4 k^2 entries per head, the stride the kernel assumes
        table = torch.zeros(h, 4 * K2, dtype=q.dtype, device=q.device)
        table[:, :(2 * kernel - 1) ** 2] = rpb.reshape(h, -1)
    else:
        reli, table = idx, dummy
    P = extra_k.shape[2] if extra_k is not None else 0
    ekf = extra_k.reshape(B * h, P, D).contiguous() if P else dummy
    evf = extra_v.reshape(B * h, P, Dv).contiguous() if P else dummy
    if extra_bias is not None:     # (B | 1, heads | 1, H, W, P): broadcast dims get stride 0
        eb = extra_bias.reshape(extra_bias.shape[0], extra_bias.shape[1], HW * P).contiguous()
        seb_b = eb.stride(0) if eb.shape[0] > 1 else 0
        seb_h = eb.stride(1) if eb.shape[1] > 1 else 0
    else:
        eb, seb_b, seb_h = dummy, 0, 0
    out = empty((B * h, HW, Dv), dtype=q.dtype, device=q.device)
    p2 = triton.next_power_of_2
    BQ = 16 if triton_interpret() else 64
    grid = (triton.cdiv(HW, BQ), B * h)
    _fwd[grid](qf, kf, vf, idx, valid, reli, table, ekf, evf, eb, out,
               HW, K2, P, D, Dv, h, scale,
               qf.stride(0), kf.stride(0), vf.stride(0), ekf.stride(0) if P else 0, evf.stride(0) if P else 0,
               seb_b, seb_h, out.stride(0),
               HAS_RPB=rpb is not None, HAS_EXTRA=P > 0, HAS_EB=extra_bias is not None,
               BQ=BQ, BN=16 if triton_interpret() else 64, BD=max(16, p2(D)), BDV=max(16, p2(Dv)),
               num_warps=1 if triton_interpret() else 4)
    return out.view(B, h, H, W, Dv)
