"""Halo attention, written out: unfolded windows, explicit logits, explicit softmax. The oracle."""
import torch

from . import geometry as G


def halo_attention(q, k, v, block, halo, rel_h=None, rel_w=None, scale=None, border='zero_pad'):
    """Unfold + explicit softmax (oracle)."""
    stride, bq, win, nbh, nbw, Hp, Wp = G.dims(q, k, block, halo)
    H, W = k.shape[-2:]
    scale = q.shape[2] ** -0.5 if scale is None else scale
    qb = G.query_blocks(q, bq, nbh, nbw)                           # (B, h, nbh, nbw, bq2, D)
    kw = G.key_windows(k, block, halo, Hp, Wp)                     # (B, h, nbh, nbw, win2, D)
    vw = G.key_windows(v, block, halo, Hp, Wp)
    s = (qb @ kw.transpose(-1, -2)) * scale
    if rel_h is not None:
        s = s + G.rel_logits(qb, rel_h, rel_w, bq, win)
    if border == 'mask':
        s = s.masked_fill(~G.key_valid(H, W, block, halo, Hp, Wp, q.device)[:, :, None, :], float('-inf'))
    p = torch.softmax(s.float() if s.dtype in (torch.float16, torch.bfloat16) else s, dim=-1).to(v.dtype)
    return G.unblock(p @ vw, bq, q.shape[-2], q.shape[-1])
