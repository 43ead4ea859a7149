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

from .._dispatch import symbolic

__all__ = ['padded_size', 'pad_map', 'pad_to_multiple', 'pad_end_to', 'crop', 'partition', 'unpartition',
           'padding_key_mask', 'relative_position_index']

Size = Tuple[int, int]


def padded_size(hw: Size, window: Size) -> Size:
    return _padded(hw[0], window[0]), _padded(hw[1], window[1])


def _padded(n, m):
    # (one expression for symbolic sizes too: the padded tensor's size and the reshape to windows agree)
    return (n + m - 1) // m * m


def pad_to_multiple(x: torch.Tensor, multiple: Size, dims: Size = (1, 2)) -> torch.Tensor:
    """Zero-pad the two ``dims`` of ``x`` at the end to a multiple of ``multiple`` (at most ``m - 1`` each)."""
    return pad_end_to(x, [_padded(x.shape[d], m) for d, m in zip(dims, multiple)], dims, [m - 1 for m in multiple])


def pad_end_to(x: torch.Tensor, sizes: Size, dims: Size, max_pads: Size) -> torch.Tensor:
    """Zero-pad the two ``dims`` of ``x`` at the end up to ``sizes``, which exceed the current sizes by at most
    ``max_pads`` (static ints).

    With symbolic sizes (torch.export with dynamic H, W) the pad amount is not taken from the size: a pad
    computed from it becomes a guard on the size (zero or not at the traced size) and the padded size an
    expression torch's solver cannot relate to the size (the crop back guards too). The map is padded by the
    largest amount (static) and the first ``sizes`` rows kept by an index (no bound to prove): the same values,
    a graph for every size."""
    current = [x.shape[d] for d in dims]
    if symbolic(*current):
        for d, n, m in zip(dims, sizes, max_pads):
            if m > 0:
                x = _pad_end(x, (d,), (m,)).index_select(d, torch.arange(n, device=x.device))
        return x
    if list(sizes) == current:
        return x
    return _pad_end(x, dims, [n - c for n, c in zip(sizes, current)])


def _pad_end(x: torch.Tensor, dims, amounts) -> torch.Tensor:
    """F.pad at the end of ``dims`` by ``amounts`` (one copy)."""
    dims = [d % x.dim() for d in dims]
    pad = [0] * (2 * (x.dim() - min(dims)))
    for d, n in zip(dims, amounts):
        pad[2 * (x.dim() - 1 - d) + 1] = n
    return F.pad(x, pad)


def crop(x: torch.Tensor, sizes: Size, dims: Size = (1, 2)) -> torch.Tensor:
    """The first ``sizes`` entries of the two ``dims`` (undoes :func:`pad_to_multiple`); a view, or an index
    under symbolic sizes (a slice there needs size <= padded size proven: a guard)."""
    if symbolic(*sizes):
        for d, n in zip(dims, sizes):
            x = x.index_select(d, torch.arange(n, device=x.device))
        return x
    idx = [slice(None)] * x.dim()
    for d, n in zip(dims, sizes):
        idx[d] = slice(0, n)
    return x[tuple(idx)]


def pad_map(x: torch.Tensor, window: Size) -> torch.Tensor:
    """Zero-pad a (B, H, W, C) map at the bottom/right to a multiple of ``window``."""
    return pad_to_multiple(x, window, (1, 2))


def _split(Hp: int, Wp: int, window: Size, mode: str):
    wh, ww = window
    nh, nw = Hp // wh, Wp // ww
    if mode == 'block':   # rows = i*wh + a
        return (nh, wh, nw, ww), (0, 1, 3, 2, 4)
    if mode == 'grid':    # rows = a*nh + i
        return (wh, nh, ww, nw), (0, 2, 4, 1, 3)
    raise ValueError(f"partition mode must be 'block' or 'grid', got {mode!r}")


def partition(x: torch.Tensor, window: Size, mode: str = 'block', grid: Optional[Size] = None) -> torch.Tensor:
    """(B, Hp, Wp, C) with Hp, Wp multiples of ``window`` -> (B * nWindows, wh * ww, C). ``grid``: the window
    counts (nh, nw) where they are what is fixed (BiFormer's regions): under symbolic sizes Hp // (Hp // nh) is
    not known to be nh, and the reshape would guard on it."""
    B, Hp, Wp, C = x.shape
    if not symbolic(Hp, Wp) and (Hp % window[0] or Wp % window[1]):
        raise ValueError(f'map {Hp}x{Wp} is not a multiple of window {window[0]}x{window[1]}; pad_map first')
    dims, perm = _split(Hp, Wp, window, mode)
    if grid is not None:
        dims = tuple(grid[i // 2] if (i % 2 == 0) == (mode == 'block') else dims[i] for i in range(4))
    x = x.reshape(B, dims[0], dims[1], dims[2], dims[3], C).permute(*perm, 5)
    return _flatten(x, (-1, window[0] * window[1], C))


def _flatten(x: torch.Tensor, shape) -> torch.Tensor:
    # reshape of a permuted map; under symbolic sizes a copy first: whether reshape can view depends on
    # which window counts are 1 (a guard per count: the last stage's single window specialised the graph)
    if symbolic(*x.shape):
        x = x.clone(memory_format=torch.contiguous_format)
    return x.reshape(shape)


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
    return _flatten(x.permute(*inv, 5), (-1, Hp, Wp, C))


def padding_key_mask(hw: Size, window: Size, mode: str = 'block',
                     device: Optional[torch.device] = None) -> Optional[torch.Tensor]:
    """(nWindows, wh*ww) bool, True where the token lies inside the H x W map; None if no padding (always a
    mask under symbolic sizes: whether there is padding is not known)."""
    H, W = hw
    Hp, Wp = padded_size(hw, window)
    if not symbolic(H, W) and (Hp, Wp) == (H, W):
        return None
    valid = (torch.arange(Hp, device=device)[:, None] < H) & (torch.arange(Wp, device=device)[None, :] < W)
    return partition(valid[None, :, :, None], window, mode)[..., 0]


def relative_position_index(window: Size, device: Optional[torch.device] = None) -> torch.Tensor:
    """(N, N) index into a flattened (2wh-1, 2ww-1) table: entry [q, k] points at the offset
    (k_row - q_row + wh - 1, k_col - q_col + ww - 1) (the TF MaxViT convention)."""
    wh, ww = window
    r = torch.arange(wh, device=device).repeat_interleave(ww)
    c = torch.arange(ww, device=device).repeat(wh)
    dr = r[None, :] - r[:, None] + wh - 1
    dc = c[None, :] - c[:, None] + ww - 1
    return dr * (2 * ww - 1) + dc
