"""Bi-level routing attention (BiFormer, Zhu et al. 2023): region-to-region top-k routing, then token
attention of every query region to the tokens of its routed regions.

    weights, idx = routing_topk(q_r, k_r, topk, scale=None)
    out = routed_attention(q, k, v, idx, scale=None, backend=None)
    out = bilevel_routing_attention(q, k, v, topk, scale=None, backend=None)

routing_topk
    q_r, k_r  (B, R, C): per-region (mean) query / key over the full qk channel width C (BiFormer routes with
              all heads' channels concatenated, as one head). logits = (q_r * scale) @ k_r^T, scale default
              C ** -0.5. Inputs are detached: gradients never flow through the routing (as in BiFormer).
    idx       (B, R, topk) int64: the topk regions of highest logit, in descending order (torch.topk's order,
              ties included).
    weights   (B, R, topk): softmax over those topk logits (BiFormer computes them but does not use them).
    The order of idx does not depend on a positive scale; only the weights do.

routed_attention
    q, k      (B, heads, R, T, D) / (B, heads, R, Tk, D); v (B, heads, R, Tk, Dv). R regions (row-major over the
              region grid), T query tokens and Tk key tokens per region (Tk = T unless keys are pooled).
    idx       (B, R, topk) int64 in [0, R), shared by every head. Every query token of region r attends, in ONE
              softmax, to the topk * Tk key tokens of regions idx[b, r, :] (a repeated index counts twice).
    scale     default D ** -0.5. BiFormer scales by qk_dim ** -0.5 of the FULL qk width (all heads), not the
              head dim: its callers pass scale.
    Any strides (views of a fused qkv projection are fine). Returns (B, heads, R, T, Dv) in q's dtype.

bilevel_routing_attention
    The fused call: region means of q and k over their tokens (heads * D channels concatenated in head order),
    routing_topk with the same scale (None: routing_topk's default, which leaves idx unchanged), then
    routed_attention(q, k, v, idx, scale).

Maps <-> regions: :func:`to_regions` / :func:`from_regions` (a (B, H, W, C) map padded at the bottom/right to a
multiple of the region grid and split into its regions, as BiFormer's n_win x n_win windows), built on
:mod:`ops.window.partition` (block mode).
"""
from typing import Optional, Tuple, Union

import torch

from .._dispatch import Call, register_op, select, tracing, triton_kernels
from ..window.partition import crop, pad_map, padded_size, partition, unpartition
from . import eager, reference

__all__ = ['routing_topk', 'routed_attention', 'bilevel_routing_attention', 'to_regions', 'from_regions',
           'region_size']

OP = 'routing'
Grid = Union[int, Tuple[int, int]]

register_op(OP, triton=triton_kernels(__name__, 'routed_attention', validated=False, head_dims=(1, 128),
                                      doc="fused forward + backward reading the routed regions' K/V in place (no "
                                          'gather), online softmax in fp32, dK/dV over the inverse routing (no '
                                          'atomics)'),
            torch=eager.routed_attention, reference=reference.routed_attention)


# ---- maps <-> regions ---------------------------------------------------------------------------

def _grid(n_win: Grid) -> Tuple[int, int]:
    g = (n_win, n_win) if isinstance(n_win, int) else tuple(n_win)
    if len(g) != 2 or not all(isinstance(s, int) and s >= 1 for s in g):
        raise ValueError(f'region grid must be a positive int or (rows, cols), got {n_win!r}')
    return g


def region_size(hw: Tuple[int, int], n_win: Grid) -> Tuple[int, int]:
    """Tokens per region (rows, cols) of an H x W map split into an n_win grid after padding to its multiple."""
    g = _grid(n_win)
    Hp, Wp = padded_size(hw, g)
    return Hp // g[0], Wp // g[1]


def to_regions(x: torch.Tensor, n_win: Grid) -> torch.Tensor:
    """(B, H, W, C) map -> (B, R, T, C) regions: zero-padded at the bottom/right to a multiple of the region grid
    (BiFormer's auto_pad), then split into Sh x Sw regions of (Hp / Sh) x (Wp / Sw) tokens each; regions
    row-major over the grid, tokens row-major inside a region."""
    if x.dim() != 4:
        raise ValueError(f'to_regions: x must be a (B, H, W, C) map, got shape {tuple(x.shape)}')
    win = region_size(tuple(x.shape[1:3]), n_win)
    xp = pad_map(x, _grid(n_win))
    return partition(xp, win, 'block', grid=_grid(n_win)).unflatten(0, (x.shape[0], -1))


def from_regions(regions: torch.Tensor, n_win: Grid, hw: Tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`to_regions`: (B, R, T, C) -> (B, H, W, C), the padding cropped off."""
    g = _grid(n_win)
    win = region_size(hw, n_win)
    if regions.dim() != 4 or regions.shape[1] != g[0] * g[1] or regions.shape[2] != win[0] * win[1]:
        raise ValueError(f'from_regions: expected (B, {g[0] * g[1]}, {win[0] * win[1]}, C) for a {hw[0]}x{hw[1]} map '
                         f'on a {g[0]}x{g[1]} grid, got {tuple(regions.shape)}')
    x = unpartition(regions.flatten(0, 1), win, (win[0] * g[0], win[1] * g[1]), 'block')
    return crop(x, hw)


# ---- routing --------------------------------------------------------------------------------------

def routing_topk(q_r: torch.Tensor, k_r: torch.Tensor, topk: int,
                 scale: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    if q_r.dim() != 3 or k_r.shape != q_r.shape:
        raise ValueError(f'routing_topk: q_r and k_r must both be (B, R, C), got {tuple(q_r.shape)} and '
                         f'{tuple(k_r.shape)}')
    if not q_r.is_floating_point() or k_r.dtype != q_r.dtype:
        raise ValueError(f'routing_topk: q_r / k_r must share a floating dtype, got {q_r.dtype}, {k_r.dtype}')
    R = q_r.shape[1]
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= R:
        raise ValueError(f'routing_topk: topk must be an int in [1, R={R}], got {topk!r}')
    scale = q_r.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.matmul(q_r.detach() * scale, k_r.detach().transpose(-2, -1))     # (B, R, R)
    top, idx = torch.topk(logits, topk, dim=-1)
    weights = torch.softmax(top.float() if top.dtype in (torch.float16, torch.bfloat16) else top, -1).to(top.dtype)
    return weights, idx


# ---- routed attention -----------------------------------------------------------------------------

def _validate(q, k, v, idx):
    if q.dim() != 5 or k.dim() != 5 or v.dim() != 5:
        raise ValueError(f'routed_attention: q, k, v must be (B, heads, R, T, D); got {tuple(q.shape)}, '
                         f'{tuple(k.shape)}, {tuple(v.shape)}')
    if k.shape[:3] != q.shape[:3] or v.shape[:3] != q.shape[:3]:
        raise ValueError(f'routed_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must share '
                         '(B, heads, R)')
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f'routed_attention: k head dim {k.shape[-1]} != q head dim {q.shape[-1]}')
    if k.shape[3] != v.shape[3]:
        raise ValueError(f'routed_attention: k has {k.shape[3]} tokens per region, v {v.shape[3]}')
    if not q.is_floating_point() or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f'routed_attention: q/k/v must share a floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}')
    if min(q.shape) == 0 or min(k.shape) == 0 or min(v.shape) == 0:
        raise ValueError(f'routed_attention: empty input ({tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)})')
    B, _, R = q.shape[:3]
    if not torch.is_tensor(idx) or idx.dtype != torch.int64:
        raise ValueError(f'routed_attention: idx must be an int64 tensor, got '
                         f'{idx.dtype if torch.is_tensor(idx) else type(idx).__name__}')
    if idx.dim() != 3 or idx.shape[:2] != (B, R) or not 1 <= idx.shape[2] <= R:
        raise ValueError(f'routed_attention: idx must be (B, R, topk) = ({B}, {R}, 1..{R}), got {tuple(idx.shape)}')
    if idx.device != q.device:
        raise ValueError(f'routed_attention: idx is on {idx.device}, q on {q.device}')
    # the range check reads the data: not on meta tensors, nor while tracing (it would be a graph break)
    if idx.device.type != 'meta' and not tracing():
        lo, hi = (t.item() for t in torch.aminmax(idx))
        if lo < 0 or hi >= R:
            raise ValueError(f'routed_attention: idx values must lie in [0, R={R}), got [{lo}, {hi}]')


def routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor,
                     scale: Optional[float] = None, backend: Optional[str] = None) -> torch.Tensor:
    _validate(q, k, v, idx)
    call = Call.of(q, k, v, head_dim=q.shape[-1], tokens=q.shape[3], keys=idx.shape[-1] * k.shape[3],
                   topk=idx.shape[-1])
    return select(OP, call, backend).fn(q, k, v, idx, scale)


def bilevel_routing_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: int,
                              scale: Optional[float] = None, backend: Optional[str] = None) -> torch.Tensor:
    if q.dim() != 5 or k.dim() != 5:
        raise ValueError(f'bilevel_routing_attention: q, k must be (B, heads, R, T, D); got {tuple(q.shape)}, '
                         f'{tuple(k.shape)}')
    if k.shape[:3] != q.shape[:3] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f'bilevel_routing_attention: q {tuple(q.shape)} and k {tuple(k.shape)} must share '
                         '(B, heads, R) and the head dim')
    B, h, R, _, D = q.shape
    # region means with the heads' channels concatenated in head order: (B, R, heads * D)
    q_r = q.detach().mean(3).transpose(1, 2).reshape(B, R, h * D)
    k_r = k.detach().mean(3).transpose(1, 2).reshape(B, R, h * D)
    _, idx = routing_topk(q_r, k_r, topk, scale)
    return routed_attention(q, k, v, idx, scale, backend)
