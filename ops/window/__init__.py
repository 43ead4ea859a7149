"""Window attention: multi-head softmax attention inside non-overlapping windows.

    out = window_attention(q, k, v, bias=None, key_mask=None, scale=None, backend=None)

q, k, v   (B', heads, N, D): B' = batch * windows (batch-major), N = tokens per window.
          Any strides (views of a fused qkv projection are fine).
bias      optional (heads, N, N) additive logits shared by every window (relative position).
key_mask  optional bool (M, N), True = key takes part; window b uses row b % M (M = windows per
          image, so padding masks are given once per image, not per batch element).
scale     default D ** -0.5.
Returns   (B', heads, N, D) in q's dtype (may be a non-contiguous view).

Block and grid partitions (MaxViT), and padding to a window multiple, are layouts of the map:
see :mod:`ops.window.partition`.
"""
from typing import Optional

import torch

from .._dispatch import Call, register_op, select, triton_kernels
from . import eager, reference
from .partition import (crop, pad_end_to, pad_map, pad_to_multiple, padded_size, padding_key_mask, partition,
                        relative_position_index, unpartition)

__all__ = ['window_attention', 'partition', 'unpartition', 'pad_map', 'pad_to_multiple', 'pad_end_to', 'crop',
           'padded_size', 'padding_key_mask', 'relative_position_index']

OP = 'window'
register_op(OP, triton=triton_kernels(__name__, 'window_attention', validated=True, head_dims=(1, 256),
                                      limits={'window_area': 4096},
                                      doc='fused forward + backward, online softmax, bias/mask read in place'),
            torch=eager.window_attention, reference=reference.window_attention)


def _validate(q, k, v, bias, key_mask):
    if q.dim() != 4:
        raise ValueError(f'window_attention: q must be (B*windows, heads, N, D), got shape {tuple(q.shape)}')
    if k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f'window_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} '
                         'must share (B*windows, heads, N) and q/k the head dim')
    if v.shape[-1] != q.shape[-1]:
        raise ValueError(f'window_attention: v head dim {v.shape[-1]} != q head dim {q.shape[-1]}')
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f'window_attention: q/k/v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})')
    if not q.is_floating_point():
        raise TypeError(f'window_attention: floating point inputs required, got {q.dtype}')
    Bp, H, N, _ = q.shape
    if bias is not None and tuple(bias.shape) != (H, N, N):
        raise ValueError(f'window_attention: bias must be (heads, N, N) = {(H, N, N)}, got {tuple(bias.shape)}')
    if key_mask is not None:
        if key_mask.dtype != torch.bool or key_mask.dim() != 2 or key_mask.shape[1] != N:
            raise ValueError(f'window_attention: key_mask must be bool (windows, {N}), '
                             f'got {key_mask.dtype} {tuple(key_mask.shape)}')
        if Bp % key_mask.shape[0]:
            raise ValueError(f'window_attention: B*windows={Bp} is not a multiple of key_mask rows '
                             f'{key_mask.shape[0]}')


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     key_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                     backend: Optional[str] = None) -> torch.Tensor:
    _validate(q, k, v, bias, key_mask)
    call = Call.of(q, k, v, bias, head_dim=q.shape[-1], window_area=q.shape[-2])
    return select(OP, call, backend).fn(q, k, v, bias, key_mask, scale)
