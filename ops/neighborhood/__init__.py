"""Neighborhood (sliding-window) attention on a 2-D map, with optional extra keys in the same softmax.

    out = neighborhood_attention(q, k, v, kernel_size, dilation=1, rpb=None, extra_k=None, extra_v=None,
                                 extra_bias=None, scale=None, border='mask', window_weights=None, backend=None)

q, k    (B, heads, H, W, D); v (B, heads, H, W, Dv): every query attends to the kernel x kernel
        window of keys around it (kernel odd; keys ``dilation`` apart).
rpb     optional (heads, 2k-1, 2k-1) relative-position bias, indexed by (key - query) in dilation
        steps + k - 1 (NATTEN's layout; a centred (heads, k*k) table is its middle k x k).
extra_k, extra_v  optional (B, heads, P, D) / (B, heads, P, Dv) keys shared by all queries
        (TransNeXt's pooled tokens), normalised in the same softmax as the window.
extra_bias  optional (B | 1, heads | 1, H, W, P) logit bias of the extra keys, or a ``GridBias``
        (the same bias by factors, for extra keys on a grid: expanded a query tile at a time).
scale   multiplies q . k for window and extra keys (default D ** -0.5); biases are added after.
window_weights  optional (B, heads, H, W, k*k) added to the window slots' softmax probabilities before
        they weight the values (out-of-map slots count 0): TransNeXt's query-dependent "learnable
        tokens" term, in the same pass over the window values.
border  'mask': window centred, out-of-map keys excluded (TransNeXt); 'shift': window shifted
        inward to stay k x k (NATTEN / NAT). Maps smaller than the window work under both.
Returns (B, heads, H, W, Dv).
"""
from typing import Optional

import torch

from .. import _cpu
from .._dispatch import Call, register_op, select, triton_kernels
from . import cpu, eager, reference
from .geometry import BORDERS, GridBias

__all__ = ['neighborhood_attention', 'neighborhood_aggregate', 'GridBias']

OP = 'neighborhood'


def _measure(dtype: torch.dtype) -> dict:
    """The C kernel and the torch backend at batch 2 on NAT-T's stage 1-3 calls and a DiNAT dilation (q, k, v as the
    mixer passes them: views of one qkv projection; with the relative-position bias) and on a TransNeXt-T stage-2 call
    (3x3 windows, 49 pooled keys with their GridBias, window weights), in ``dtype``."""
    g = torch.Generator().manual_seed(0)
    cases = []
    for heads, side, dilation in ((2, 56, 1), (4, 28, 1), (4, 28, 4), (8, 14, 1)):
        q, k, v = torch.randn(2, side, side, 3, heads, 32, generator=g).to(dtype).permute(3, 0, 4, 1, 2, 5)
        cases.append((q, k, v, 7, dilation, torch.randn(heads, 13, 13, generator=g).to(dtype), None, None, None, None,
                      'shift'))
    q, k, v = torch.randn(2, 28, 28, 3, 6, 24, generator=g).to(dtype).permute(3, 0, 4, 1, 2, 5)
    bias = GridBias(torch.randn(6, 13, 13, generator=g).to(dtype), torch.randint(0, 13, (28, 7), generator=g),
                    torch.randint(0, 13, (28, 7), generator=g))
    extra = [torch.randn(2, 6, 49, 24, generator=g).to(dtype) for _ in range(2)]
    cases.append((q, k, v, 3, 1, torch.randn(6, 5, 5, generator=g).to(dtype), *extra, bias, 1.0, 'mask',
                  torch.randn(2, 6, 28, 28, 9, generator=g).to(dtype)))
    fns = {'torch': lambda: [eager.neighborhood_attention(*c) for c in cases]}
    if cpu.unavailable() is None:
        fns['c'] = lambda: [cpu.neighborhood_attention(*c) for c in cases]
    return _cpu.interleaved(fns)


_CHOICE = {torch.float32: OP, torch.bfloat16: OP + '_bf16'}
_cpu.register(OP, ('c', 'torch'), lambda: _measure(torch.float32), 'fp32 CPU inference neighborhood attention (NAT, '
              'DiNAT, TransNeXt): the C kernel (backend cpu) or the torch backend')
_cpu.register(OP + '_bf16', ('c', 'torch'), lambda: _measure(torch.bfloat16), 'the same for bf16 inputs (autocast): '
              'the C kernel on float32 copies or the torch backend in bf16')


register_op(OP, triton=triton_kernels(__name__, 'neighborhood_attention', validated=False, head_dims=(1, 128),
                                      doc='fused forward + backward (window slots read in place + extra-key '
                                          'tiles, one online softmax; atomics for dK/dV)'),
            cpu=dict(fn=cpu.neighborhood_attention, devices=('cpu',), dtypes=cpu.DTYPES, autograd=False,
                     available=cpu.unavailable, auto_check=lambda call: _cpu.kernel_not_chosen(_CHOICE[call.dtype])),
            torch=eager.neighborhood_attention, reference=reference.neighborhood_attention)


def _validate(q, k, v, kernel, dilation, rpb, extra_k, extra_v, extra_bias, border, window_weights=None):
    name = 'neighborhood_attention'
    if window_weights is not None and tuple(window_weights.shape) != (*q.shape[:4], kernel * kernel):
        raise ValueError(f'{name}: window_weights must be (B, heads, H, W, k*k) = {(*q.shape[:4], kernel * kernel)}, '
                         f'got {tuple(window_weights.shape)}')
    if q.dim() != 5 or k.shape != q.shape or v.dim() != 5 or v.shape[:4] != q.shape[:4]:
        raise ValueError(f'{name}: q, k must be (B, heads, H, W, D) and v (B, heads, H, W, Dv); got '
                         f'{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}')
    named = (('q', q), ('k', k), ('v', v), ('rpb', rpb), ('extra_k', extra_k), ('extra_v', extra_v),
             ('extra_bias', extra_bias), ('window_weights', window_weights))
    dts = {n: t.dtype for n, t in named if t is not None}
    if len(set(dts.values())) > 1:
        raise TypeError(f'{name}: all tensors must have one dtype, got ' + ', '.join(
            f'{n} {str(d).replace("torch.", "")}' for n, d in dts.items()))
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f'{name}: kernel_size must be odd and >= 1, got {kernel}')
    if dilation < 1:
        raise ValueError(f'{name}: dilation must be >= 1, got {dilation}')
    if border not in BORDERS:
        raise ValueError(f'{name}: border must be one of {BORDERS}, got {border!r}')
    h = q.shape[1]
    if rpb is not None and tuple(rpb.shape) != (h, 2 * kernel - 1, 2 * kernel - 1):
        raise ValueError(f'{name}: rpb must be (heads, 2k-1, 2k-1) = {(h, 2 * kernel - 1, 2 * kernel - 1)}, '
                         f'got {tuple(rpb.shape)}')
    if (extra_k is None) != (extra_v is None):
        raise ValueError(f'{name}: give both extra_k and extra_v or neither')
    if extra_k is not None:
        B, _, H, W, D = q.shape
        if (extra_k.dim() != 4 or extra_k.shape[:2] != (B, h) or extra_k.shape[-1] != D
                or extra_v.shape[:3] != extra_k.shape[:3] or extra_v.shape[-1] != v.shape[-1]):
            raise ValueError(f'{name}: extra_k / extra_v must be (B, heads, P, D) / (B, heads, P, Dv); got '
                             f'{tuple(extra_k.shape)}, {tuple(extra_v.shape)}')
        P = extra_k.shape[2]
        if isinstance(extra_bias, GridBias) and extra_bias.table.shape[0] not in (1, h):
            raise ValueError(f'{name}: GridBias table must have 1 or {h} heads, got {extra_bias.table.shape[0]}')
        if extra_bias is not None and (extra_bias.dim() != 5 or tuple(extra_bias.shape[2:]) != (H, W, P)):
            raise ValueError(f'{name}: extra_bias must be (B | 1, heads | 1, H, W, P) with P = {P}, '
                             f'got {tuple(extra_bias.shape)}')
    elif extra_bias is not None:
        raise ValueError(f'{name}: extra_bias given without extra keys')


def neighborhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: int, dilation: int = 1,
                           rpb: Optional[torch.Tensor] = None, extra_k: Optional[torch.Tensor] = None,
                           extra_v: Optional[torch.Tensor] = None, extra_bias: Optional[torch.Tensor] = None,
                           scale: Optional[float] = None, border: str = 'mask',
                           window_weights: Optional[torch.Tensor] = None,
                           backend: Optional[str] = None) -> torch.Tensor:
    _validate(q, k, v, kernel_size, dilation, rpb, extra_k, extra_v, extra_bias, border, window_weights)
    call = Call.of(q, k, v, rpb, extra_k, extra_v, getattr(extra_bias, 'table', extra_bias), window_weights,
                   head_dim=q.shape[-1], window_area=kernel_size * kernel_size)
    fn = select(OP, call, backend).fn
    if window_weights is None:
        return fn(q, k, v, kernel_size, dilation, rpb, extra_k, extra_v, extra_bias, scale, border)
    return fn(q, k, v, kernel_size, dilation, rpb, extra_k, extra_v, extra_bias, scale, border, window_weights)


def neighborhood_aggregate(weights: torch.Tensor, v: torch.Tensor, kernel_size: int, dilation: int = 1,
                           border: str = 'mask') -> torch.Tensor:
    """sum_j weights[..., j] * v[window slot j] for every query: the value aggregation of
    neighborhood attention with given per-slot weights (B, heads, H, W, k*k) (e.g. TransNeXt's
    query-dependent learnable tokens). Out-of-map slots contribute nothing. Returns (B, heads, H, W, Dv)."""
    if border not in BORDERS:
        raise ValueError(f'neighborhood_aggregate: border must be one of {BORDERS}, got {border!r}')
    B, h, H, W, _ = v.shape
    if weights.shape != (B, h, H, W, kernel_size * kernel_size):
        raise ValueError(f'neighborhood_aggregate: weights must be (B, heads, H, W, k*k) = '
                         f'{(B, h, H, W, kernel_size * kernel_size)}, got {tuple(weights.shape)}')
    from . import geometry as G
    if border == 'mask':   # centred windows: zero-padded shifted views, no gathered copy of v
        r = (kernel_size // 2) * dilation
        vp = torch.nn.functional.pad(v, (0, 0, r, r, r, r))
        out = None
        for a in range(kernel_size):
            for b in range(kernel_size):
                term = weights[..., a * kernel_size + b, None] * vp[:, :, a * dilation:a * dilation + H,
                                                                    b * dilation:b * dilation + W]
                out = term if out is None else out + term
        return out
    idx, valid, _, _ = G.windows(H, W, kernel_size, dilation, border, v.device)
    vg = v.reshape(B, h, H * W, -1)[:, :, idx]                          # (B, h, H, W, k*k, Dv)
    return ((weights * valid).unsqueeze(-2) @ vg).squeeze(-2)
