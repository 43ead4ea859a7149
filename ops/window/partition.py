"""Window layouts on channels-last maps: pad, block/grid partition and its inverse.

``block``: window (i, j) holds the contiguous tile rows [i*wh, (i+1)*wh) x cols [j*ww, (j+1)*ww).
``grid``:  window (i, j) holds rows i, i + nh, i + 2*nh, ... (nh = Hp // wh windows per column),
           i.e. a dilated, image-spanning grid of wh x ww tokens (MaxViT's grid attention).
Either way a window has wh*ww tokens in row-major window coordinates, and the map is first
padded at the bottom/right to a multiple of (wh, ww).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ['padded_size', 'pad_map', 'partition', 'unpartition', 'padding_key_mask', 'relative_position_index']

Size = Tuple[int, int]


def padded_size(hw: Size, window: Size) -> Size:
    return (-(-hw[0] // window[0]) * window[0], -(-hw[1] // window[1]) * window[1])


def pad_map(x: torch.Tensor, window: Size) -> torch.Tensor:
    """Zero-pad a (B, H, W, C) map at the bottom/right to a multiple of ``window``."""
    H, W = x.shape[1:3]
    Hp, Wp = padded_size((H, W), window)
    if (Hp, Wp) == (H, W):
        return x
    return F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))


def _split(Hp: int, Wp: int, window: Size, mode: str):
    wh, ww = window
    nh, nw = Hp // wh, Wp // ww
    if mode == 'block':   # rows = i*wh + a
        return (nh, wh, nw, ww), (0, 1, 3, 2, 4)
    if mode == 'grid':    # rows = a*nh + i
        return (wh, nh, ww, nw), (0, 2, 4, 1, 3)
    raise ValueError(f"partition mode must be 'block' or 'grid', got {mode!r}")


def partition(x: torch.Tensor, window: Size, mode: str = 'block') -> torch.Tensor:
    """(B, Hp, Wp, C) with Hp, Wp multiples of ``window`` -> (B * nWindows, wh * ww, C)."""
    B, Hp, Wp, C = x.shape
    if Hp % window[0] or Wp % window[1]:
        raise ValueError(f'map {Hp}x{Wp} is not a multiple of window {window[0]}x{window[1]}; pad_map first')
    dims, perm = _split(Hp, Wp, window, mode)
    x = x.reshape(B, dims[0], dims[1], dims[2], dims[3], C).permute(*perm, 5)
    return x.reshape(-1, window[0] * window[1], C)


def unpartition(windows: torch.Tensor, window: Size, hw: Size, mode: str = 'block') -> torch.Tensor:
    """Inverse of :func:`partition`: (B * nWindows, wh * ww, C) -> (B, Hp, Wp, C)."""
    Hp, Wp = hw
    C = windows.shape[-1]
    dims, perm = _split(Hp, Wp, window, mode)
    wh, ww = window
    nh, nw = Hp // wh, Wp // ww
    x = windows.reshape(-1, nh, nw, wh, ww, C)
    inv = [0] * 5
    for pos, src in enumerate(perm):   # perm maps split dims -> (B, nh, nw, wh, ww)
        inv[src] = pos
    x = x.permute(*inv, 5)
    return x.reshape(-1, Hp, Wp, C)


def padding_key_mask(hw: Size, window: Size, mode: str = 'block',
                     device: Optional[torch.device] = None) -> Optional[torch.Tensor]:
    """(nWindows, wh*ww) bool, True where the token lies inside the H x W map; None if no padding."""
    H, W = hw
    Hp, Wp = padded_size(hw, window)
    if (Hp, Wp) == (H, W):
        return None
    valid = torch.zeros(1, Hp, Wp, 1, dtype=torch.bool, device=device)
    valid[:, :H, :W] = True
    return partition(valid, window, mode)[..., 0]


def relative_position_index(window: Size, device: Optional[torch.device] = None) -> torch.Tensor:
    """(N, N) index into a flattened (2wh-1, 2ww-1) table: entry [q, k] points at the offset
    (k_row - q_row + wh - 1, k_col - q_col + ww - 1) (the TF MaxViT convention)."""
    wh, ww = window
    r = torch.arange(wh, device=device).repeat_interleave(ww)
    c = torch.arange(ww, device=device).repeat(wh)
    dr = r[None, :] - r[:, None] + wh - 1
    dc = c[None, :] - c[:, None] + ww - 1
    return dr * (2 * ww - 1) + dc
