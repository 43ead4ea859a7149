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


class GridBias:
    """An extra-key logit bias given by factors instead of in full: for extra keys that form a ph x pw
    grid (TransNeXt's pooled tokens), bias[h, y, x, i * pw + j] = table[h, index_h[y, i], index_w[x, j]].

    table (heads | 1, Uh, Uw); index_h (H, ph) and index_w (W, pw) int64 into its rows / columns.
    The full (1, heads, H, W, ph * pw) tensor grows with the map squared (805 MB for TransNeXt-T stage 1
    at 1024x1024); backends that tile queries expand only the rows of a tile (:meth:`rows`), the others
    call :meth:`materialize`. Gradients flow to ``table`` either way."""

    def __init__(self, table: torch.Tensor, index_h: torch.Tensor, index_w: torch.Tensor):
        if table.dim() != 3 or index_h.dim() != 2 or index_w.dim() != 2:
            raise ValueError(f'GridBias: table (heads, Uh, Uw), index_h (H, ph), index_w (W, pw) expected, got '
                             f'{tuple(table.shape)}, {tuple(index_h.shape)}, {tuple(index_w.shape)}')
        self.table, self.index_h, self.index_w = table, index_h, index_w

    @property
    def dtype(self) -> torch.dtype:
        return self.table.dtype

    @property
    def device(self) -> torch.device:
        return self.table.device

    @property
    def requires_grad(self) -> bool:
        return self.table.requires_grad

    @property
    def shape(self) -> Tuple[int, ...]:
        (H, ph), (W, pw) = self.index_h.shape, self.index_w.shape
        return (1, self.table.shape[0], H, W, ph * pw)

    def dim(self) -> int:
        return 5

    def to(self, dtype: torch.dtype) -> 'GridBias':
        return GridBias(self.table.to(dtype), self.index_h, self.index_w)

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        """(1, heads, r1 - r0, W, ph * pw): the bias of query rows [r0, r1)."""
        ih, iw = self.index_h[r0:r1], self.index_w
        t = self.table[:, ih[:, None, :, None], iw[None, :, None, :]]       # (heads, t, W, ph, pw)
        return t.flatten(-2)[None]

    def materialize(self) -> torch.Tensor:
        return self.rows(0, self.index_h.shape[0])


def full_bias(extra_bias):
    """A GridBias expanded to its tensor; tensors and None pass through."""
    return extra_bias.materialize() if isinstance(extra_bias, GridBias) else extra_bias


def bias_rows(extra_bias, r0: int, r1: int):
    """Rows [r0, r1) of an extra bias, tensor (B | 1, heads | 1, H, W, P) or GridBias."""
    if isinstance(extra_bias, GridBias):
        return extra_bias.rows(r0, r1)
    return extra_bias[..., r0:r1, :, :]


def _axis_tiles(n: int, kernel: int, border: str, tile: int):
    """One axis of a dilation-free map cut into query tiles of ``tile`` (the last one clamped: its extra
    queries repeat the last position) and, per tile, the key region that holds every window of its queries
    (``tile + kernel - 1`` keys, inside the map). -> (queries (nt, tile), region (nt, R), key slot of every
    query's window in its tile's region (nt, tile, k), valid (nt, tile, k), rel (nt, tile, k) rpb offsets)."""
    pos, valid, rel = axis_windows(n, kernel, 1, border)
    nt = -(-n // tile)
    R = min(n, tile + kernel - 1)
    q = torch.arange(nt * tile).clamp(max=n - 1).view(nt, tile)
    start = (torch.arange(nt) * tile - kernel // 2).clamp(0, n - R)
    region = start[:, None] + torch.arange(R)
    local = (pos[q] - start[:, None, None]).clamp(0, R - 1)              # (clamped keys are masked: valid)
    return q, region, local, valid[q], rel[q]


def _tiles(H: int, W: int, kernel: int, border: str, ty: int, tx: int) -> Tuple[torch.Tensor, ...]:
    (qy, ry, ly, vy, rely), (qx, rx, lx, vx, relx) = (_axis_tiles(H, kernel, border, ty),
                                                      _axis_tiles(W, kernel, border, tx))
    Rx, k = rx.shape[1], kernel
    # (nty, ntx, ty*tx, k*k): a query's window slot (a, b) -> its key's place in the tile's region (row-major)
    slot = ly[:, None, :, None, :, None] * Rx + lx[None, :, None, :, None, :]
    valid = vy[:, None, :, None, :, None] & vx[None, :, None, :, None, :]
    rel = (rely[:, None, :, None, :, None] + k - 1) * (2 * k - 1) + relx[None, :, None, :, None, :] + k - 1
    shape = (qy.shape[0], qx.shape[0], ty * tx, k * k)
    return qy, qx, ry, rx, slot.reshape(shape), valid.reshape(shape), rel.reshape(shape)


@lru_cache(maxsize=64)
def _tiles_np(H: int, W: int, kernel: int, border: str, ty: int, tx: int):
    return tuple(t.numpy() for t in _tiles(H, W, kernel, border, ty, tx))


def tiles(H: int, W: int, kernel: int, border: str, ty: int, tx: int, device) -> Tuple[torch.Tensor, ...]:
    """A dilation-free H x W map in ty x tx query tiles (see _axis_tiles): (query rows (nty, ty), query
    columns (ntx, tx), region rows (nty, Ry), region columns (ntx, Rx), window slots in the region
    (nty, ntx, ty*tx, k*k), valid (same), flat rpb index (same) into a (2k-1) x (2k-1) table). Cached as
    numpy arrays for eager calls, rebuilt under tracing (as ``windows``)."""
    if torch.compiler.is_compiling():
        tables = _tiles(H, W, kernel, border, ty, tx)
    else:
        tables = tuple(torch.from_numpy(a) for a in _tiles_np(H, W, kernel, border, ty, tx))
    return tuple(t.to(device) for t in tables)
