"""Linear attention (non-causal, over every token of a map), as in L2ViT's linear global attention.

    out = linear_attention(q, k, v, temperature=None, clamp_min=100., backend=None)

q, k         (B, heads, N, D): queries and keys AFTER the feature map (L2ViT: ReLU), applied by the
             caller. Any strides (views of a fused qkv projection are fine).
v            (B, heads, N, Dv).
temperature  optional tensor with ``heads`` elements (e.g. the (heads, 1, 1) parameter): multiplies each
             head's K^T V, i.e. the numerator only, not the normaliser. None = 1.
clamp_min    positive float: the normaliser q_n . sum_m k_m is clamped from below at this value
             (L2ViT: 100; it is active for small activations and bounds the output of near-empty rows).
Returns      (B, heads, N, Dv) in q's dtype (may be a non-contiguous view):

    out[b, h, n] = temperature[h] * (q_n @ K^T V) / max(q_n . sum_m k_m, clamp_min)

which is the similarity form sum_m (q_n . k_m) v_m / max(sum_m q_n . k_m, clamp_min) computed in O(N).
With a ReLU feature map the similarities are non-negative, so the normaliser is a sum of weights; the
formula is computed as written for any real inputs (clamp_min > 0 keeps it finite).
"""
import math
from typing import Optional

import torch

from .._dispatch import Call, register_op, select, triton_kernels
from . import eager, reference

__all__ = ['linear_attention']

OP = 'linear'
register_op(OP, triton=triton_kernels(__name__, 'linear_attention', validated=False, head_dims=(1, 128),
                                      doc='K^T V and the key sum in one pass (token chunks added with atomics), '
                                          'then the output pass; fused backward; fp32 accumulation'),
            torch=eager.linear_attention, reference=reference.linear_attention)


def _validate(q, k, v, temperature, clamp_min):
    if q.dim() != 4:
        raise ValueError(f'linear_attention: q must be (B, heads, N, D), got shape {tuple(q.shape)}')
    if k.shape != q.shape or v.dim() != 4 or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f'linear_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must share '
                         '(B, heads, N) and q/k the head dim')
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f'linear_attention: q/k/v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})')
    if not q.is_floating_point():
        raise TypeError(f'linear_attention: floating point inputs required, got {q.dtype}')
    if temperature is not None:
        if not torch.is_tensor(temperature) or temperature.numel() != q.shape[1]:
            got = tuple(temperature.shape) if torch.is_tensor(temperature) else type(temperature).__name__
            raise ValueError(f'linear_attention: temperature must be a tensor with one value per head '
                             f'({q.shape[1]}), got {got}')
        if temperature.device != q.device:
            raise ValueError(f'linear_attention: temperature on {temperature.device}, inputs on {q.device}')
    if not isinstance(clamp_min, (int, float)) or isinstance(clamp_min, bool) or not 0 < clamp_min < math.inf:
        raise ValueError(f'linear_attention: clamp_min must be a positive finite number, got {clamp_min!r}')


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: Optional[torch.Tensor] = None,
                     clamp_min: float = 100., backend: Optional[str] = None) -> torch.Tensor:
    _validate(q, k, v, temperature, clamp_min)
    call = Call.of(q, k, v, temperature, head_dim=q.shape[-1], tokens=q.shape[-2], value_dim=v.shape[-1])
    return select(OP, call, backend).fn(q, k, v, temperature, float(clamp_min))
