"""Fused neighborhood attention in Triton, forward and backward.

One program per (batch*head, tile of BQ queries in row-major map order). The k*k window keys of each
query are read in place through the geometry's index table (H, W, k*k) - no gathered K/V copy - one
slot at a time, and the extra keys in tiles of BN with tl.dot; one online softmax runs over both, so
the (window + extra) logits never exist in memory. The relative-position bias is read through a
flattened (2k-1)^2 index table; out-of-map slots are excluded by the validity table.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._dispatch import empty
from .._triton import pick, tile
from . import geometry as G
from .. import neighborhood as package   # (imported while the package registers: its functions at call time)


@triton.jit
def _slot_logits(q, K, IDX, VALID, RELI, RPB, bh, hd, j, offs_q, qmask, offs_d, dmask, sk_bh, K2, D, scale,
                 HAS_RPB: tl.constexpr):
    """Window slot j of every query of the tile: (logit, key row, key index, in-map flag)."""
    kidx = tl.load(IDX + offs_q * K2 + j, mask=qmask, other=0)
    ok = (tl.load(VALID + offs_q * K2 + j, mask=qmask, other=0) != 0) & qmask
    kr = tl.load(K + bh * sk_bh + kidx[:, None] * D + offs_d[None, :], mask=ok[:, None] & dmask[None, :],
                 other=0.).to(tl.float32)
    s = tl.sum(q * kr, axis=1) * scale
    if HAS_RPB:
        ri = tl.load(RELI + offs_q * K2 + j, mask=qmask, other=0)
        s += tl.load(RPB + hd * (4 * K2) + ri, mask=ok, other=0.).to(tl.float32)   # (2k-1)^2 < 4 k^2
    return s, kr, kidx, ok


@triton.jit
def _extra_logits(q, EK, EB, bh, b, hd, offs_n, nmask, offs_q, qmask, offs_d, dmask, sek_bh, seb_b, seb_h, P, D,
                  scale, HAS_EB: tl.constexpr):
    """Extra keys offs_n for the tile's queries: (logits (BQ, BN), key rows (BN, BD))."""
    ek = tl.load(EK + bh * sek_bh + offs_n[:, None] * D + offs_d[None, :],
                 mask=nmask[:, None] & dmask[None, :], other=0.).to(tl.float32)
    s = tl.dot(q, tl.trans(ek), input_precision="ieee") * scale
    if HAS_EB:
        s += tl.load(EB + b * seb_b + hd * seb_h + offs_q[:, None] * P + offs_n[None, :],
                     mask=qmask[:, None] & nmask[None, :], other=0.).to(tl.float32)
    return s, ek


@triton.jit
def _fwd(Q, K, V, IDX, VALID, RELI, RPB, EK, EV, EB, OUT, LSE,
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
        s, kr, kidx, ok = _slot_logits(q, K, IDX, VALID, RELI, RPB, bh, hd, j, offs_q, qmask, offs_d, dmask,
                                       sk_bh, K2, D, scale, HAS_RPB)
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
            s, ek = _extra_logits(q, EK, EB, bh, b, hd, offs_n, nmask, offs_q, qmask, offs_d, dmask, sek_bh,
                                  seb_b, seb_h, P, D, scale, HAS_EB)
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
    tl.store(LSE + bh * HW + offs_q, m + tl.log(tl.where(lsum == 0., 1., lsum)), mask=qmask)
    tl.store(OUT + bh * so_bh + offs_q[:, None] * Dv + offs_v[None, :], out.to(OUT.dtype.element_ty),
             mask=qmask[:, None] & vmask[None, :])


@triton.jit
def _bwd(Q, K, V, IDX, VALID, RELI, RPB, EK, EV, EB, DO, LSE, DELTA, DQ, DK, DV, DSW, DEK, DEV, DEB,
         HW, K2, P, D, Dv, heads, scale,
         sq_bh, sk_bh, sv_bh, sek_bh, sev_bh, seb_b, seb_h,
         HAS_RPB: tl.constexpr, HAS_EXTRA: tl.constexpr, HAS_EB: tl.constexpr, NEED_DEB: tl.constexpr,
         BQ: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr):
    """Probabilities recomputed from the saved log-sum-exp. dQ is complete within the program; dK / dV
    of the (overlapping) windows and the extra keys' dK / dV are accumulated with fp32 atomics; the
    window logits' gradients go out (DSW) for the relative-position table, the extra ones (DEB) for the
    extra bias when it needs a gradient."""
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
    do = tl.load(DO + bh * HW * Dv + offs_q[:, None] * Dv + offs_v[None, :], mask=qmask[:, None] & vmask[None, :],
                 other=0.).to(tl.float32)
    lse = tl.load(LSE + bh * HW + offs_q, mask=qmask, other=0.)
    delta = tl.load(DELTA + bh * HW + offs_q, mask=qmask, other=0.)
    dq = tl.zeros((BQ, BD), tl.float32)
    for j in range(K2):
        s, kr, kidx, ok = _slot_logits(q, K, IDX, VALID, RELI, RPB, bh, hd, j, offs_q, qmask, offs_d, dmask,
                                       sk_bh, K2, D, scale, HAS_RPB)
        p = tl.where(ok, tl.exp(s - lse), 0.)
        vr = tl.load(V + bh * sv_bh + kidx[:, None] * Dv + offs_v[None, :], mask=ok[:, None] & vmask[None, :],
                     other=0.).to(tl.float32)
        ds = p * (tl.sum(do * vr, axis=1) - delta)
        dq += ds[:, None] * kr * scale
        tl.atomic_add(DK + bh * HW * D + kidx[:, None] * D + offs_d[None, :], ds[:, None] * q * scale,
                      mask=ok[:, None] & dmask[None, :])
        tl.atomic_add(DV + bh * HW * Dv + kidx[:, None] * Dv + offs_v[None, :], p[:, None] * do,
                      mask=ok[:, None] & vmask[None, :])
        if HAS_RPB:
            tl.store(DSW + bh * HW * K2 + offs_q * K2 + j, ds, mask=qmask)
    if HAS_EXTRA:
        for n0 in range(0, P, BN):
            offs_n = n0 + tl.arange(0, BN)
            nmask = offs_n < P
            s, ek = _extra_logits(q, EK, EB, bh, b, hd, offs_n, nmask, offs_q, qmask, offs_d, dmask, sek_bh,
                                  seb_b, seb_h, P, D, scale, HAS_EB)
            ev = tl.load(EV + bh * sev_bh + offs_n[:, None] * Dv + offs_v[None, :],
                         mask=nmask[:, None] & vmask[None, :], other=0.).to(tl.float32)          # (BN, BDV)
            live = qmask[:, None] & nmask[None, :]
            p = tl.where(live, tl.exp(s - lse[:, None]), 0.)
            dp = tl.dot(do, tl.trans(ev), input_precision="ieee")
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds, ek, input_precision="ieee") * scale
            tl.atomic_add(DEK + bh * P * D + offs_n[:, None] * D + offs_d[None, :],
                          tl.dot(tl.trans(ds), q, input_precision="ieee") * scale, mask=nmask[:, None] & dmask[None, :])
            tl.atomic_add(DEV + bh * P * Dv + offs_n[:, None] * Dv + offs_v[None, :],
                          tl.dot(tl.trans(p), do, input_precision="ieee"), mask=nmask[:, None] & vmask[None, :])
            if NEED_DEB:
                tl.store(DEB + bh * HW * P + offs_q[:, None] * P + offs_n[None, :], ds, mask=live)
    tl.store(DQ + bh * HW * D + offs_q[:, None] * D + offs_d[None, :], dq, mask=qmask[:, None] & dmask[None, :])


def _tables(H, W, kernel, dilation, border, h, rpb, device, dtype):
    idx, valid, rr, rc = G.windows(H, W, kernel, dilation, border, device)
    reli = (rr * (2 * kernel - 1) + rc).to(torch.int32).contiguous()
    table = torch.zeros(h, 4 * kernel * kernel, dtype=dtype, device=device)   # the per-head stride the kernels use
    if rpb is not None:
        table[:, :(2 * kernel - 1) ** 2] = rpb.reshape(h, -1)
    return idx.to(torch.int32).contiguous(), valid.to(torch.int8).contiguous(), reli, table


def _bias_view(extra_bias, HW, P):
    """(B | 1, heads | 1, H, W, P) -> contiguous (B | 1, heads | 1, HW * P) and its batch / head strides
    (0 for broadcast dims)."""
    eb = extra_bias.reshape(extra_bias.shape[0], extra_bias.shape[1], HW * P).contiguous()
    return eb, (eb.stride(0) if eb.shape[0] > 1 else 0), (eb.stride(1) if eb.shape[1] > 1 else 0)


# launch tiles (ops._triton): 32 queries x 32 extra keys in 8 warps; the 64 x 64 tiles in 4 warps spilled 2.2 KB
# (forward) and 3.3 KB (backward) of registers at TransNeXt's shapes (ptxas, bf16, sm_90) and overflowed sm_80's
# shared memory at head dim 128
_FWD = (tile(BQ=32, BN=32, num_warps=8),)
_BWD = (tile(BQ=32, BN=32, num_warps=8),)


def _meta(tiles, D, Dv, dtype):
    p2 = triton.next_power_of_2
    BD, BDV = max(16, p2(D)), max(16, p2(Dv))
    return dict(BD=BD, BDV=BDV, **pick(tiles, max(BD, BDV), dtype))


def _flat(B, h, HW, *ts):
    """(B, heads, ...) tensors as contiguous (B * heads, HW | P, C) rows, as the kernels index them."""
    return [t.reshape(B * h, -1, t.shape[-1]).contiguous() for t in ts]


# The kernels are wrapped as torch custom ops (forward and backward), as the other ops' Triton kernels, so
# torch.compile / export trace through them as single nodes. Absent optional tensors are given to the kernels
# as a one-element dummy and returned from the backward as empty gradients.

@torch.library.custom_op('mixzoo::neighborhood_attention_fwd', mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: Optional[torch.Tensor],
            extra_k: Optional[torch.Tensor], extra_v: Optional[torch.Tensor], extra_bias: Optional[torch.Tensor],
            kernel: int, dilation: int, scale: float, border: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> out (B, heads, H, W, Dv), lse (B * heads, H * W) fp32."""
    B, h, H, W, D = q.shape
    Dv = v.shape[-1]
    HW, K2 = H * W, kernel * kernel
    idx, valid, reli, table = _tables(H, W, kernel, dilation, border, h, rpb, q.device, q.dtype)
    qf, kf, vf = _flat(B, h, HW, q, k, v)
    dummy = qf.new_zeros(1)
    P = extra_k.shape[2] if extra_k is not None else 0
    ekf, evf = _flat(B, h, HW, extra_k, extra_v) if P else (dummy, dummy)
    eb, seb_b, seb_h = _bias_view(extra_bias, HW, P) if extra_bias is not None else (dummy, 0, 0)
    out = empty((B * h, HW, Dv), dtype=q.dtype, device=q.device)
    lse = empty((B * h, HW), dtype=torch.float32, device=q.device)
    meta = _meta(_FWD, D, Dv, q.dtype)
    grid = (triton.cdiv(HW, meta['BQ']), B * h)
    _fwd[grid](qf, kf, vf, idx, valid, reli, table, ekf, evf, eb, out, lse, HW, K2, P, D, Dv, h, scale,
               qf.stride(0), kf.stride(0), vf.stride(0), ekf.stride(0) if P else 0, evf.stride(0) if P else 0,
               seb_b, seb_h, out.stride(0), HAS_RPB=rpb is not None, HAS_EXTRA=P > 0,
               HAS_EB=extra_bias is not None, **meta)
    return out.view(B, h, H, W, Dv), lse


@_fwd_op.register_fake
def _(q, k, v, rpb, extra_k, extra_v, extra_bias, kernel, dilation, scale, border):
    B, h, H, W, _ = q.shape
    return q.new_empty((B, h, H, W, v.shape[-1])), q.new_empty((B * h, H * W), dtype=torch.float32)


@torch.library.custom_op('mixzoo::neighborhood_attention_bwd', mutates_args=())
def _bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: Optional[torch.Tensor],
            extra_k: Optional[torch.Tensor], extra_v: Optional[torch.Tensor], extra_bias: Optional[torch.Tensor],
            out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor, kernel: int, dilation: int, scale: float,
            border: str, bias_grad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                   torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dq, dk, dv, drpb, dextra_k, dextra_v, dextra_bias in the inputs' shapes and dtype (the optional ones
    empty where the input is absent, or for the extra bias where ``bias_grad`` is False)."""
    B, h, H, W, D = q.shape
    Dv = v.shape[-1]
    has_rpb, has_extra, has_eb = rpb is not None, extra_k is not None, extra_bias is not None
    HW, K2, dev = H * W, kernel * kernel, q.device
    idx, valid, reli, table = _tables(H, W, kernel, dilation, border, h, rpb, dev, q.dtype)
    qf, kf, vf, do, of = _flat(B, h, HW, q, k, v, dout, out)
    dummy = qf.new_zeros(1)
    P = extra_k.shape[2] if has_extra else 0
    ekf, evf = _flat(B, h, HW, extra_k, extra_v) if has_extra else (dummy, dummy)
    eb, seb_b, seb_h = _bias_view(extra_bias, HW, P) if has_eb else (dummy, 0, 0)
    delta = (do.float() * of.float()).sum(-1).contiguous()
    f32 = dict(dtype=torch.float32, device=dev)
    dq = torch.empty((B * h, HW, D), **f32)
    dk, dv = torch.zeros((B * h, HW, D), **f32), torch.zeros((B * h, HW, Dv), **f32)
    dsw = torch.zeros((B * h, HW * K2), **f32) if has_rpb else dq.new_zeros(1)
    dek = torch.zeros((B * h, P, D), **f32) if has_extra else dq.new_zeros(1)
    dev_ = torch.zeros((B * h, P, Dv), **f32) if has_extra else dq.new_zeros(1)
    need_deb = has_eb and bias_grad
    deb = torch.zeros((B * h, HW * P), **f32) if need_deb else dq.new_zeros(1)
    meta = _meta(_BWD, D, Dv, q.dtype)
    grid = (triton.cdiv(HW, meta['BQ']), B * h)
    _bwd[grid](qf, kf, vf, idx, valid, reli, table, ekf, evf, eb, do, lse, delta, dq, dk, dv, dsw, dek, dev_, deb,
               HW, K2, P, D, Dv, h, scale, qf.stride(0), kf.stride(0), vf.stride(0),
               ekf.stride(0) if has_extra else 0, evf.stride(0) if has_extra else 0, seb_b, seb_h,
               HAS_RPB=has_rpb, HAS_EXTRA=has_extra, HAS_EB=has_eb, NEED_DEB=need_deb, **meta)
    dt = q.dtype
    none = lambda: q.new_empty(0)   # noqa: E731  (a fresh one per output: custom op outputs may not alias)
    shape = (B, h, H, W)
    drpb = none()
    if has_rpb:   # scatter the window logits' gradients onto the (2k-1)^2 offsets, summed over the batch
        acc = torch.zeros((h, (2 * kernel - 1) ** 2), **f32)
        acc.index_add_(1, reli.view(-1).long(), dsw.view(B, h, HW * K2).sum(0))
        drpb = acc.view(rpb.shape).to(dt)
    deb_out = none()
    if need_deb:   # summed over the dimensions the bias broadcasts
        full = deb.view(B, h, H, W, P)
        deb_out = full.sum(dim=[i for i in (0, 1) if extra_bias.shape[i] == 1], keepdim=True).to(dt)
    dek_out = dek.view(B, h, P, D).to(dt) if has_extra else none()
    dev_out = dev_.view(B, h, P, Dv).to(dt) if has_extra else none()
    return (dq.view(*shape, D).to(dt), dk.view(*shape, D).to(dt), dv.view(*shape, Dv).to(dt), drpb, dek_out, dev_out,
            deb_out)


@_bwd_op.register_fake
def _(q, k, v, rpb, extra_k, extra_v, extra_bias, out, lse, dout, kernel, dilation, scale, border, bias_grad):
    like = lambda t: q.new_empty(0) if t is None else torch.empty_like(t)   # noqa: E731
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), like(rpb), like(extra_k), like(extra_v),
            like(extra_bias if bias_grad else None))


def _setup(ctx, inputs, output):
    *tensors, kernel, dilation, scale, border = inputs
    ctx.save_for_backward(*tensors, *output)
    ctx.args = (kernel, dilation, scale, border)


def _backward(ctx, dout, _dlse):
    q, k, v, rpb, extra_k, extra_v, extra_bias, out, lse = ctx.saved_tensors
    bias_grad = extra_bias is not None and ctx.needs_input_grad[6]
    grads = _bwd_op(q, k, v, rpb, extra_k, extra_v, extra_bias, out, lse, dout, *ctx.args, bias_grad)
    present = (True, True, True, rpb is not None, extra_k is not None, extra_v is not None, bias_grad)
    return (*(g if p else None for g, p in zip(grads, present)), None, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup)


def neighborhood_attention(q, k, v, kernel, dilation=1, rpb=None, extra_k=None, extra_v=None, extra_bias=None,
                           scale=None, border='mask', window_weights=None):
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, _ = _fwd_op(q, k, v, rpb, extra_k, extra_v, G.full_bias(extra_bias), kernel, dilation, scale, border)
    # the kernels take no window weights: their term is the same sum over the window, added after
    if window_weights is None:
        return out
    return out + package.neighborhood_aggregate(window_weights, v, kernel, dilation, border)
