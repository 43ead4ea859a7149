"""TransNeXt's token mixers (Shi, "TransNeXt", CVPR 2024), on NHWC maps, for any map size.

``AggregatedAttention`` (stages 1-3): every query attends, in one softmax, to its 3x3 neighbourhood
(``ops.neighborhood``, border 'mask': out-of-map keys excluded) and to the map average-pooled to
(H // sr, W // sr) tokens; plus a query-dependent "learnable tokens" term on the local values.
``GlobalAttention`` (stage 4): full attention with the same query treatment.

Resolution-dependent terms are computed for the actual H, W (the official model fixes them at
construction for one square size; at that size these equal it):
- length scale of a query = log(#in-map local keys + #pooled keys) (log(N) in stage 4);
- pooled grid = (max(1, H // sr), max(1, W // sr)), token positions = bin centres of
  adaptive_avg_pool1d(arange(n)) along each axis;
- continuous position bias: an MLP (2 -> 512 -> heads) on sign(d) * log2(1 + |d|) / 3 with
  d = (query - key position) / (pretrain stage size - 1) * 8 per axis; the pretrain stage size
  (e.g. 56 at stage 1 for 224 pre-training) stays fixed, so the bias extrapolates to other sizes.
Queries are l2-normalised, shifted by a learned query embedding and scaled by softplus(temperature)
x the length scale; keys are l2-normalised (q . k are then cosine similarities).
"""
import math
from functools import lru_cache
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from ..ops import neighborhood_attention
from ..ops._attention import attention
from ..ops._dispatch import symbolic
from ..ops.neighborhood import GridBias
from ..ops.neighborhood.geometry import windows as window_geometry

from .base import OpMixer


_CPB_ROWS = 16384     # coordinates per block of the position-bias MLP (32 MB of hidden activations)


def _inv_softplus(x: float) -> float:
    return math.log(math.expm1(x))     # (plain floats: models are also built on the meta device)


@lru_cache(maxsize=64)
def _axis_pairs(n: int, p: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Along one axis of n positions pooled to p tokens: 2 x (query - pooled token centre) for every
    (query, token) pair, as sorted distinct values and each pair's index into them (row-major n x p).
    Token centres are those of adaptive_avg_pool1d(arange(n), p). Plain Python on sizes: the same under
    eager, torch.compile and export (nothing data-dependent, no tensor cached)."""
    bins = [((i * n) // p, -((-(i + 1) * n) // p)) for i in range(p)]
    twice = [2 * q - (s + e - 1) for q in range(n) for s, e in bins]
    distinct = sorted(set(twice))
    pos = {m: i for i, m in enumerate(distinct)}
    return tuple(distinct), tuple(pos[m] for m in twice)


def _bins(n, p, device):
    """adaptive pooling's bins of n positions into p: (start (p,), end (p,)) as tensors."""
    i = torch.arange(p, device=device)
    return torch.div(i * n, p, rounding_mode='floor'), -torch.div(-(i + 1) * n, p, rounding_mode='floor')


def _axis_pairs_symbolic(n, p, device):
    """:func:`_axis_pairs` for a symbolic size (torch.export with dynamic H, W): the count of distinct values is
    not a closed form (nor a length torch.export can prove >= 0 when written from the bins), so the table holds
    every integer in [-(2n - 2), 2n - 2], where all offsets lie (a superset: the same bias for every pair; the
    MLP runs on ~4x the rows of the distinct ones, the price of one graph for every size).
    -> (values (4n - 3,) int64, index (n, p) into them)."""
    s, e = _bins(n, p, device)
    twice = 2 * torch.arange(n, device=device)[:, None] - (s + e - 1)[None, :]          # (n, p)
    return torch.arange(4 * n - 3, device=device) - (2 * n - 2), twice + (2 * n - 2)


def _cpb_inputs(H: int, W: int, ph: int, pw: int, pre_h: int, pre_w: int, device):
    """The position-bias MLP's inputs, factored by axis: a (query, pooled key) pair's relative coordinate
    is (dh[qh, kh], dw[qw, kw]), so the distinct pairs are the grid of the distinct dh and dw values (the
    official code takes torch.unique of all pairs: the same rows in another order, computed with the same
    float32 ops). -> (coordinates (Uh * Uw, 2), index_h (H, ph), index_w (W, pw), (Uh, Uw))."""
    def axis(n, p, pre):
        if symbolic(n, p):
            twice, index = _axis_pairs_symbolic(n, p, device)
            return twice.float() / 2 / (pre - 1) * 8, index
        twice, index = _axis_pairs(n, p)
        d = torch.tensor(twice, dtype=torch.float32, device=device) / 2 / (pre - 1) * 8
        return d, torch.tensor(index, device=device).view(n, p)
    dh, ih = axis(H, ph, pre_h)
    dw, iw = axis(W, pw, pre_w)
    grid = torch.stack(torch.meshgrid(dh, dw, indexing='ij'), -1).reshape(-1, 2)
    return grid, ih, iw, (dh.shape[0], dw.shape[0])


def _adaptive_avg_pool(x: torch.Tensor, out) -> torch.Tensor:
    """F.adaptive_avg_pool2d; under symbolic sizes as two averaging matrices over its bins (ONNX has no adaptive
    pooling of a size-dependent output, and the exporter specialises it)."""
    if not symbolic(*x.shape[-2:], *out):
        return F.adaptive_avg_pool2d(x, out)

    def mean_matrix(n, p):
        s, e = _bins(n, p, x.device)
        q = torch.arange(n, device=x.device)
        inside = (q[None, :] >= s[:, None]) & (q[None, :] < e[:, None])                     # (p, n)
        return inside.to(x.dtype) / (e - s)[:, None].to(x.dtype)
    return mean_matrix(x.shape[-2], out[0]) @ x @ mean_matrix(x.shape[-1], out[1]).t()


def _log_spaced(d: torch.Tensor) -> torch.Tensor:
    return torch.sign(d) * torch.log2(d.abs() + 1.0) / math.log2(8.0)


class _CosineQueryMixin(nn.Module):
    """The query/key treatment both mixers share, and the continuous position bias MLP."""

    def _init_common(self, dim: int, num_heads: int, pretrain_hw: Tuple[int, int]):
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.pretrain_hw = pretrain_hw
        self.temperature = nn.Parameter(torch.full((num_heads, 1, 1), _inv_softplus(1 / 0.24)))
        self.query_embedding = nn.Parameter(trunc_normal_(torch.empty(num_heads, 1, self.head_dim), std=0.02))
        self.cpb_fc1 = nn.Linear(2, 512)
        self.cpb_act = nn.ReLU(inplace=True)
        self.cpb_fc2 = nn.Linear(512, num_heads)

    def _scaled_query(self, qn: torch.Tensor, length_scale: torch.Tensor) -> torch.Tensor:
        """(l2norm(q) + query_embedding) * softplus(temperature) * length scale; qn (B, h, H, W, D)."""
        h, D = self.num_heads, self.head_dim
        t = F.softplus(self.temperature).view(1, h, 1, 1, 1)
        return (qn + self.query_embedding.view(1, h, 1, 1, D)) * t * length_scale.to(qn.dtype)[..., None]

    def _position_bias(self, H: int, W: int, ph: int, pw: int, x: torch.Tensor) -> GridBias:
        """The continuous position bias of every query for every pooled key, (1, heads, H, W, ph * pw), by
        factors: the MLP runs on the distinct coordinates only, and the op expands a query tile at a time
        (in full it is the largest tensor of the model at large inputs: 805 MB at TransNeXt-T stage 1, 1024)."""
        table, ih, iw, (uh, uw) = _cpb_inputs(H, W, ph, pw, *self.pretrain_hw, x.device)
        coords = _log_spaced(table).to(x.dtype)      # (log spacing in float32, as the official buffer)
        # the MLP a block of coordinates at a time: its 512-wide hidden layer over every distinct coordinate
        # would be the largest tensor of an inference (254016 x 512 floats = 496 MB at stage 1 for 1024x1024)
        blocks = [coords] if symbolic(*coords.shape) else coords.split(_CPB_ROWS)   # (a block count: a guard)
        bias = torch.cat([self.cpb_fc2(self.cpb_act(self.cpb_fc1(c))) for c in blocks])
        return GridBias(bias.t().reshape(self.num_heads, uh, uw), ih, iw)


class AggregatedAttention(_CosineQueryMixin, OpMixer):
    op = 'neighborhood'

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, window_size: int = 3, qkv_bias: bool = True,
                 pretrain_hw: Tuple[int, int] = (56, 56), attn_drop: float = 0., proj_drop: float = 0.):
        super().__init__()
        self._init_common(dim, num_heads, pretrain_hw)
        self.sr_ratio, self.window_size = sr_ratio, window_size
        n = window_size * window_size
        self.relative_pos_bias_local = nn.Parameter(trunc_normal_(torch.empty(num_heads, n), std=0.0004))
        self.learnable_tokens = nn.Parameter(trunc_normal_(torch.empty(num_heads, self.head_dim, n), std=0.02))
        self.learnable_bias = nn.Parameter(torch.zeros(num_heads, 1, n))
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr = nn.Conv2d(dim, dim, 1)
        self.norm = nn.LayerNorm(dim)          # eps 1e-5, as the official pooled-token norm
        self.act = nn.GELU()
        if attn_drop > 0:
            raise ValueError('attention dropout is not supported (TransNeXt trains without it)')

    def _local_bias_table(self) -> torch.Tensor:
        """The (heads, k*k) window bias as the centre of the op's (heads, 2k-1, 2k-1) offset table."""
        k, h = self.window_size, self.num_heads
        r = k // 2
        return F.pad(self.relative_pos_bias_local.view(h, k, k), (r, r, r, r))

    def forward(self, x: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
        B, H, W, C = x.shape
        h, D, k = self.num_heads, self.head_dim, self.window_size
        qn = F.normalize(self.q(x).view(B, H, W, h, D), dim=-1).permute(0, 3, 1, 2, 4)      # (B, h, H, W, D)
        kv = self.kv(x).view(B, H, W, 2, h, D)
        k_loc = F.normalize(kv[:, :, :, 0], dim=-1).permute(0, 3, 1, 2, 4)
        v_loc = kv[:, :, :, 1].permute(0, 3, 1, 2, 4)
        ph, pw = max(1, H // self.sr_ratio), max(1, W // self.sr_ratio)
        pooled = _adaptive_avg_pool(self.act(self.sr(x.permute(0, 3, 1, 2))), (ph, pw))
        pooled = self.norm(pooled.flatten(2).transpose(1, 2))                                  # (B, P, C)
        kvp = self.kv(pooled).view(B, ph * pw, 2, h, D)
        k_pool = F.normalize(kvp[:, :, 0], dim=-1).transpose(1, 2)                              # (B, h, P, D)
        v_pool = kvp[:, :, 1].transpose(1, 2)
        # length scale: log(#in-map keys of the centred window + #pooled keys), from the op's own geometry
        in_map = window_geometry(H, W, k, 1, 'mask', x.device)[1].sum(-1).float()              # (H, W)
        scale = torch.log(in_map + ph * pw)
        dt = v_loc.dtype     # (under autocast the normalised / scaled terms come out in float32)
        # query-dependent weights on the local values (from the un-scaled normalised query), added to the
        # window probabilities inside the op: one pass over the window values for both terms
        tokens = qn @ self.learnable_tokens[:, None] + self.learnable_bias[:, None]             # (B, h, H, W, k*k)
        o = neighborhood_attention(
            self._scaled_query(qn, scale).to(dt), k_loc.to(dt), v_loc, k, rpb=self._local_bias_table().to(dt),
            extra_k=k_pool.to(dt), extra_v=v_pool.to(dt),
            extra_bias=self._position_bias(H, W, ph, pw, x).to(dt), scale=1.0, border='mask',
            window_weights=tokens.to(dt), backend=self.op_backend(backend))
        return self.proj_drop(self.proj(o.permute(0, 2, 3, 1, 4).reshape(B, H, W, C)))


class GlobalAttention(_CosineQueryMixin):
    """Stage 4: full attention over the map with the continuous position bias (SDPA)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, pretrain_hw: Tuple[int, int] = (7, 7),
                 attn_drop: float = 0., proj_drop: float = 0.):
        super().__init__()
        self._init_common(dim, num_heads, pretrain_hw)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if attn_drop > 0:
            raise ValueError('attention dropout is not supported (TransNeXt trains without it)')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        h, D, N = self.num_heads, self.head_dim, H * W
        qkv = self.qkv(x).view(B, N, 3, h, D).permute(2, 0, 3, 1, 4)                            # (3, B, h, N, D)
        qn = F.normalize(qkv[0], dim=-1).view(B, h, H, W, D)
        if symbolic(N):     # (math.log would guard on N)
            scale = torch.full((H, W), N, dtype=torch.float64, device=x.device).log().float()
        else:
            scale = torch.full((H, W), math.log(N), device=x.device)      # (float64 log, as the official buffer)
        dt = qkv.dtype
        q = self._scaled_query(qn, scale).view(B, h, N, D).to(dt)
        bias = self._position_bias(H, W, H, W, x).materialize().view(1, h, N, N)
        o = attention(q, F.normalize(qkv[1], dim=-1).to(dt), qkv[2], bias.to(dt), scale=1.0)
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(B, H, W, C)))
