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
import importlib
from typing import Optional

from .._dispatch import Backend, Call, register, select, triton_interpreter_limits, triton_unavailable
from . import reference as _reference
from .partition import pad_map, padded_size, padding_key_mask, partition, relative_position_index, unpartition

__all__ = ['window_attention', 'partition', 'unpartition', 'pad_map', 'padded_size', 'padding_key_mask',
           'relative_position_index']

# the backend file is named torch.py (the ops contract); importing it rebinds this package's
# attribute `torch`, so it is loaded by path and the real torch imported after it
_torch = importlib.import_module(f'{__name__}.torch')
import torch  # noqa: E402

OP = 'window'
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _triton_fn(*args):
    from . import triton as _triton   # imported lazily: triton is optional
    return _triton.window_attention(*args)


register(Backend(OP, 'triton', _triton_fn, devices=('cuda', 'cpu'), auto_devices=('cuda',),
                 dtypes=_FLOATS, head_dims=(1, 256), limits={'window_area': 4096},
                 available=triton_unavailable, check=triton_interpreter_limits,
                 doc='fused forward + backward, online softmax, bias/mask read in place; '
                     'CPU only under TRITON_INTERPRET=1 and when forced (tests)'))
register(Backend(OP, 'torch', _torch.window_attention, dtypes=_FLOATS + (torch.float64,),
                 doc='torch SDPA with one broadcast additive mask'))
register(Backend(OP, 'reference', _reference.window_attention, dtypes=_FLOATS + (torch.float64,),
                 doc='explicit scores / softmax (oracle)'))


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
