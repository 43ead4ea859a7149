"""Neighborhood attention fast path in plain PyTorch: query rows in tiles, so the gathered K/V
windows and the logits (window + extra keys) exist for one tile at a time (memory bounded by the
tile, not the map); window logits and outputs by batched matmuls instead of broadcast products."""
import torch

from . import geometry as G

TILE_TOKENS = 4096     # queries per tile


def neighborhood_attention(q, k, v, kernel, dilation=1, rpb=None, extra_k=None, extra_v=None, extra_bias=None,
                           scale=None, border='mask'):
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
    outs = []
    for r0 in range(0, H, rows):
        r1 = min(H, r0 + rows)
        qt = q[:, :, r0:r1]                                                 # (B, h, t, W, D)
        it = idx[r0:r1]
        s = (kf[:, :, it] @ qt.unsqueeze(-1)).squeeze(-1).to(ct) * scale   # (B, h, t, W, k*k)
        s = s + add[..., r0:r1, :, :]
        if ekt is not None:
            se = (qt.flatten(2, 3) @ ekt).unflatten(2, (r1 - r0, W)).to(ct) * scale
            if extra_bias is not None:
                se = se + extra_bias[..., r0:r1, :, :].to(ct)
            s = torch.cat([s, se], dim=-1)
        p = torch.softmax(s, dim=-1).to(v.dtype)
        o = (p[..., None, :K2] @ vf[:, :, it]).squeeze(-2)                  # (B, h, t, W, Dv)
        if ekt is not None:
            o = o + (p[..., K2:].flatten(2, 3) @ extra_v).unflatten(2, (r1 - r0, W))
        outs.append(o)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
