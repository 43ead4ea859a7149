"""Neighborhood attention fast path in plain PyTorch: query rows in tiles, so the gathered K/V
windows and the logits (window + extra keys) exist for one tile at a time (memory bounded by the
tile, not the map); window logits and outputs by batched matmuls instead of broadcast products.
An extra bias given as a ``GridBias`` is expanded one tile at a time too.

Inference on CPU with extra keys: the extra-key attention runs in SDPA's fused kernel, which also
returns its log-sum-exp, and is merged with the window part as two pieces of one softmax
(out = (e^lse_e * o_e + sum_w e^s_w v_w) / (e^lse_e + sum_w e^s_w), shifted by the max). That kernel
has no gradient for the log-sum-exp, so training takes the explicit path.
"""
import torch

from . import geometry as G

TILE_TOKENS = 4096     # queries per tile


def neighborhood_attention(q, k, v, kernel, dilation=1, rpb=None, extra_k=None, extra_v=None, extra_bias=None,
                           scale=None, border='mask', window_weights=None):
    """Query-row tiles: gathered windows + extra keys, one softmax, batched matmuls."""
    B, h, H, W, D = q.shape
    Dv = v.shape[-1]
    K2 = kernel * kernel
    scale = D ** -0.5 if scale is None else scale
    idx, valid, rr, rc = G.windows(H, W, kernel, dilation, border, q.device)
    ct = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype   # softmax dtype
    add = torch.zeros(valid.shape, dtype=ct, device=q.device).masked_fill(~valid, float('-inf'))
    if rpb is not None:
        add = add + G.rel_bias(rpb, rr, rc).to(ct)                    # (h, H, W, k*k)
    kf, vf = k.reshape(B, h, H * W, D), v.reshape(B, h, H * W, Dv)
    ekt = extra_k.transpose(-1, -2) if extra_k is not None else None
    rows = max(1, TILE_TOKENS // W)
    fused = (extra_k is not None and q.device.type == 'cpu' and _LSE_SDPA is not None and Dv == D   # (kernel's rule)
             and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                      for t in (q, k, v, rpb, extra_k, extra_v, extra_bias,
                                                                window_weights))))
    if window_weights is not None:          # out-of-map slots gather a clamped key: their weight must be 0
        window_weights = window_weights * valid.to(window_weights.dtype)
    outs = []
    for r0 in range(0, H, rows):
        r1 = min(H, r0 + rows)
        qt = q[:, :, r0:r1]                                                 # (B, h, t, W, D)
        it = idx[r0:r1]
        s = _SlotDot.apply(kf[:, :, it], qt).to(ct) * scale                # (B, h, t, W, k*k)
        s = s + add[..., r0:r1, :, :]
        if ekt is not None and fused:
            ww = None if window_weights is None else window_weights[:, :, r0:r1]
            outs.append(_merge_extra(qt, s, vf[:, :, it], extra_k, extra_v, extra_bias, r0, r1, scale, ww))
            continue
        if ekt is not None:
            se = (qt.flatten(2, 3) @ ekt).unflatten(2, (r1 - r0, W)).to(ct) * scale
            if extra_bias is not None:
                se = se + G.bias_rows(extra_bias, r0, r1).to(ct)
            s = torch.cat([s, se], dim=-1)
        p = torch.softmax(s, dim=-1).to(v.dtype)
        pw = p[..., :K2] if window_weights is None else p[..., :K2] + window_weights[:, :, r0:r1]
        o = _SlotSum.apply(pw, vf[:, :, it])                                # (B, h, t, W, Dv)
        if ekt is not None:
            o = o + (p[..., K2:].flatten(2, 3) @ extra_v).unflatten(2, (r1 - r0, W))
        outs.append(o)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


class _SlotDot(torch.autograd.Function):
    """(kg (..., k*k, D), q (..., D)) -> kg @ q (..., k*k) as one batched matmul. Autograd's backward for it
    would form the kg gradient as a batch of rank-1 matmuls ((k*k, 1) @ (1, D) per query: the slowest op of
    a TransNeXt training step on CPU); a broadcast product is the same numbers at memory speed."""

    @staticmethod
    def forward(ctx, kg, q):
        ctx.save_for_backward(kg, q)
        return (kg @ q.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def backward(ctx, g):
        kg, q = ctx.saved_tensors
        g = g.to(kg.dtype)
        return g.unsqueeze(-1) * q.unsqueeze(-2), (g.unsqueeze(-2) @ kg).squeeze(-2)


class _SlotSum(torch.autograd.Function):
    """(p (..., k*k), vg (..., k*k, Dv)) -> p @ vg (..., Dv); the vg gradient as a broadcast product (as above)."""

    @staticmethod
    def forward(ctx, p, vg):
        ctx.save_for_backward(p, vg)
        return (p.unsqueeze(-2) @ vg).squeeze(-2)

    @staticmethod
    def backward(ctx, g):
        p, vg = ctx.saved_tensors
        g = g.to(vg.dtype)
        return (vg @ g.unsqueeze(-1)).squeeze(-1), p.unsqueeze(-1) * g.unsqueeze(-2)


_LSE_SDPA = getattr(torch.ops.aten, '_scaled_dot_product_flash_attention_for_cpu', None)


def _merge_extra(qt, s, vg, extra_k, extra_v, extra_bias, r0, r1, scale, ww=None):
    """One query tile: window logits s (B, h, t, W, k*k) and gathered values vg, extra keys through
    SDPA (output + log-sum-exp), merged as one softmax; window weights ww added to the window
    probabilities."""
    B, h, t, W, D = qt.shape
    mask = None if extra_bias is None else G.bias_rows(extra_bias, r0, r1).flatten(2, 3).to(qt.dtype)
    o_e, lse = _LSE_SDPA(qt.flatten(2, 3), extra_k, extra_v, 0.0, False, attn_mask=mask, scale=scale)
    lse = lse.view(B, h, t, W, 1)
    m = torch.maximum(s.amax(-1, keepdim=True), lse)                       # finite: lse is
    a = torch.exp(s - m)
    a_e = torch.exp(lse - m)
    ct = torch.promote_types(qt.dtype, torch.float32)      # (half types merge in float32, float64 stays)
    if ww is None:
        o = (a.unsqueeze(-2).to(vg.dtype) @ vg).squeeze(-2).to(ct) + a_e * o_e.view(B, h, t, W, -1).to(ct)
        return (o / (a.sum(-1, keepdim=True) + a_e)).to(qt.dtype)
    inv = 1.0 / (a.sum(-1, keepdim=True) + a_e)
    pw = (a * inv + ww).to(vg.dtype)
    return ((pw.unsqueeze(-2) @ vg).squeeze(-2).to(ct) + (a_e * inv) * o_e.view(B, h, t, W, -1).to(ct)).to(qt.dtype)
