"""Neighborhood (sliding-window) geometry: which keys each query sees, shared by the backends.

Along each axis of length n a query at i sees ``kernel`` keys spaced by ``dilation``:
- ``mask``  (TransNeXt): the window is centred on i; keys outside the map are excluded.
- ``shift`` (NATTEN / NAT): the window is shifted inward so it stays ``kernel`` keys wide inside the
  map, within i's dilation sub-grid (positions = i mod dilation). On a sub-grid shorter than the
  kernel every position of it is used and the remaining slots are excluded.
Relative offsets (key - query, in dilation steps) index a (2k-1, 2k-1) relative-position table.
"""
from functools import lru_cache
from typing import Tuple

import torch

BORDERS = ('mask', 'shift')


def axis_windows(n: int, kernel: int, dilation: int, border: str) -> Tuple[torch.Tensor, ...]:
    """(pos (n, k) clamped into [0, n), valid (n, k) bool, rel (n, k) offset in dilation steps)."""
    r = kernel // 2
    i = torch.arange(n, device='cpu')      # (CPU even under a device context: these are index tables)
    j = torch.arange(kernel, device='cpu')
    if border == 'mask':
        pos = i[:, None] + dilation * (j[None] - r)
        valid = (pos >= 0) & (pos < n)
    else:
        res, sub = i % dilation, i // dilation
        length = (n - res + dilation - 1) // dilation          # size of i's dilation sub-grid
        start = torch.minimum((sub - r).clamp(min=0), (length - kernel).clamp(min=0))
        steps = start[:, None] + j[None]
        pos = steps * dilation + res[:, None]
        valid = steps < length[:, None]
    rel = torch.div(pos - i[:, None], dilation, rounding_mode='floor')
    return pos.clamp(0, n - 1), valid, rel


def _windows(H: int, W: int, kernel: int, dilation: int, border: str) -> Tuple[torch.Tensor, ...]:
    pr, vr, rr = axis_windows(H, kernel, dilation, border)
    pc, vc, rc = axis_windows(W, kernel, dilation, border)
    K2 = kernel * kernel
    idx = (pr[:, None, :, None] * W + pc[None, :, None, :]).reshape(H, W, K2)
    valid = (vr[:, None, :, None] & vc[None, :, None, :]).reshape(H, W, K2)
    rel_r = (rr[:, None, :, None] + kernel - 1).expand(H, W, kernel, kernel).reshape(H, W, K2)
    rel_c = (rc[None, :, None, :] + kernel - 1).expand(H, W, kernel, kernel).reshape(H, W, K2)
    return idx, valid, rel_r, rel_c


@lru_cache(maxsize=64)
def _windows_np(H: int, W: int, kernel: int, dilation: int, border: str):
    # eager calls are cached as numpy arrays: a torch tensor cached while tracing (export, compile)
    # would be a fake one; traced calls rebuild the tables (static shapes: constant-folded)
    return tuple(t.numpy() for t in _windows(H, W, kernel, dilation, border))


def windows(H: int, W: int, kernel: int, dilation: int, border: str, device) -> Tuple[torch.Tensor, ...]:
    """For every query of an H x W map: (idx (H, W, k*k) flat key positions, valid (H, W, k*k),
    rel_r, rel_c (H, W, k*k) indices into a (2k-1, 2k-1) relative-position table)."""
    if torch.compiler.is_compiling():
        tables = _windows(H, W, kernel, dilation, border)
    else:
        tables = tuple(torch.from_numpy(a) for a in _windows_np(H, W, kernel, dilation, border))
    return tuple(t.to(device) for t in tables)


def rel_bias(rpb: torch.Tensor, rel_r: torch.Tensor, rel_c: torch.Tensor) -> torch.Tensor:
    """(heads, 2k-1, 2k-1) table -> (heads, H, W, k*k) bias of every query's window slots."""
    return rpb[:, rel_r, rel_c]
