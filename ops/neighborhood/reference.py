"""Neighborhood attention written out: gathered windows, explicit logits, one explicit softmax over
window + extra keys. The oracle."""
import torch

from . import geometry as G


def neighborhood_attention(q, k, v, kernel, dilation=1, rpb=None, extra_k=None, extra_v=None, extra_bias=None,
                           scale=None, border='mask', window_weights=None):
    """Gathered windows + explicit softmax (oracle)."""
    B, h, H, W, D = q.shape
    extra_bias = G.full_bias(extra_bias)
    scale = D ** -0.5 if scale is None else scale
    idx, valid, rr, rc = G.windows(H, W, kernel, dilation, border, q.device)
    kg = k.reshape(B, h, H * W, D)[:, :, idx]                        # (B, h, H, W, k*k, D)
    vg = v.reshape(B, h, H * W, v.shape[-1])[:, :, idx]
    # (products as matmuls: the MAC counter counts the window products through this oracle)
    s = (q.unsqueeze(-2) @ kg.transpose(-1, -2)).squeeze(-2) * scale
    if rpb is not None:
        s = s + G.rel_bias(rpb, rr, rc)
    s = s.masked_fill(~valid, float('-inf'))
    if extra_k is not None:
        se = torch.einsum('bhxyd,bhpd->bhxyp', q, extra_k) * scale
        if extra_bias is not None:
            se = se + extra_bias
        s = torch.cat([s, se], dim=-1)
    p = torch.softmax(s.float() if s.dtype in (torch.float16, torch.bfloat16) else s, dim=-1).to(v.dtype)
    K2 = kernel * kernel
    pw = p[..., :K2] if window_weights is None else p[..., :K2] + window_weights.masked_fill(~valid, 0)
    out = (pw.unsqueeze(-2) @ vg).squeeze(-2)
    if extra_k is not None:
        out = out + torch.einsum('bhxyp,bhpd->bhxyd', p[..., K2:], extra_v)
    return out
