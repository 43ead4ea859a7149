"""Halo-attention geometry shared by the backends: padding, block/window unfolding, relative logits.

Queries are cut into non-overlapping blocks of ``bq = block // stride`` (stride 1 or 2: the query
map may be the strided one); block (i, j) attends to the ``win = block + 2 * halo`` square of the
key map starting at (i * block - halo, j * block - halo). Maps of any size are padded at the
bottom/right to a block multiple; keys outside the map are zero vectors (``zero_pad``, timm's
HaloNet) or excluded from the softmax (``mask``).
"""
import torch
import torch.nn.functional as F

BORDERS = ('zero_pad', 'mask')


def dims(q: torch.Tensor, k: torch.Tensor, block: int, halo: int):
    """(stride, query block, window, n blocks h, n blocks w, padded key H, W)."""
    H, W = k.shape[-2:]
    stride = -(-H // q.shape[-2])
    bq = block // stride
    nbh, nbw = -(-H // block), -(-W // block)
    return stride, bq, block + 2 * halo, nbh, nbw, nbh * block, nbw * block


def key_windows(t: torch.Tensor, block: int, halo: int, Hp: int, Wp: int) -> torch.Tensor:
    """(B, h, D, H, W) -> (B, h, nbh, nbw, win*win, D): zero padded (halo + block multiple), unfolded."""
    H, W = t.shape[-2:]
    t = F.pad(t, (halo, Wp - W + halo, halo, Hp - H + halo))
    win = block + 2 * halo
    t = t.unfold(3, win, block).unfold(4, win, block)             # (B, h, D, nbh, nbw, win, win)
    return t.flatten(-2).permute(0, 1, 3, 4, 5, 2)


def query_blocks(q: torch.Tensor, bq: int, nbh: int, nbw: int) -> torch.Tensor:
    """(B, h, D, Hq, Wq) -> (B, h, nbh, nbw, bq*bq, D), zero padded to the block grid."""
    B, h, D, Hq, Wq = q.shape
    q = F.pad(q, (0, nbw * bq - Wq, 0, nbh * bq - Hq))
    q = q.reshape(B, h, D, nbh, bq, nbw, bq).permute(0, 1, 3, 5, 4, 6, 2)
    return q.reshape(B, h, nbh, nbw, bq * bq, D)


def unblock(o: torch.Tensor, bq: int, Hq: int, Wq: int) -> torch.Tensor:
    """(B, h, nbh, nbw, bq*bq, D) -> (B, h, D, Hq, Wq) (cropped)."""
    B, h, nbh, nbw, _, D = o.shape
    o = o.reshape(B, h, nbh, nbw, bq, bq, D).permute(0, 1, 6, 2, 4, 3, 5).reshape(B, h, D, nbh * bq, nbw * bq)
    return o[..., :Hq, :Wq]


def key_valid(H: int, W: int, block: int, halo: int, Hp: int, Wp: int, device) -> torch.Tensor:
    """(nbh, nbw, win*win) bool: the window position lies inside the H x W map."""
    ones = torch.ones(1, 1, 1, H, W, device=device)
    return key_windows(ones, block, halo, Hp, Wp)[0, 0, ..., 0] > 0


def rel_index(bq: int, win: int, device=None) -> torch.Tensor:
    """(bq, win) index into a (2*win - 1) table: key offset r - query offset a + win - 1."""
    a = torch.arange(bq, device=device)[:, None]
    r = torch.arange(win, device=device)[None, :]
    return r - a + win - 1


def rel_logits(qb: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, bq: int, win: int) -> torch.Tensor:
    """Relative-position logits (..., bq*bq, win*win) for query blocks qb (..., bq*bq, D):
    q . rel_h[kr - qr + win - 1] + q . rel_w[kc - qc + win - 1] (timm's PosEmbedRel)."""
    idx = rel_index(bq, win, qb.device)
    lh = (qb @ rel_h.to(qb.dtype).t()).unflatten(-2, (bq, bq))            # (..., a, b, 2win-1)
    lw = (qb @ rel_w.to(qb.dtype).t()).unflatten(-2, (bq, bq))
    lead = lh.shape[:-3]
    gh = torch.gather(lh, -1, idx[:, None, :].expand(*lead, bq, bq, win))   # (..., a, b, r)
    gw = torch.gather(lw, -1, idx[None, :, :].expand(*lead, bq, bq, win))   # (..., a, b, c)
    return (gh[..., :, None] + gw[..., None, :]).reshape(*lead, bq * bq, win * win)
