"""Neighborhood attention on CPU, fp32, without autograd and without extra keys (NAT / DiNAT inference): the C
kernel of ``neighborhood_cpu.c``, one pass per query over its window (logits, bias, softmax, values).

It reads q, k, v through their strides (views of one qkv projection: no copies) and writes an NHWC buffer
(B, H, W, heads, Dv) returned as a (B, heads, H, W, Dv) view, so the mixer's merge of the heads is a view too.
The window geometry is ``geometry.axis_windows``' (both borders, any dilation, maps smaller than the window).
Measured on the CI machine (2-core AMD EPYC, AVX-512), NAT-T's attention calls at batch 8 (qkv views, with the
relative-position bias, kernel 7), the op alone, interleaved best of 5: (8, 2, 56, 56, 32) torch backend 41.9 ->
11.7 ms, (8, 4, 28, 28, 32) 23.5 -> 5.8 ms, DiNAT's dilation 4 there 11.6 -> 6.1 ms, (8, 8, 14, 14, 32) 6.9 ->
2.9 ms, (8, 16, 7, 7, 32) 1.7 -> 1.4 ms; NAT-T's whole batch-8 forward 766 -> 505 ms.
Autograd, other dtypes and devices, extra keys, window weights and traced graphs take the ``torch`` backend.
Needs a C compiler on first use (see ops/_native.py).
"""
import ctypes
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from .._dispatch import Call, tracing
from .._native import load, unavailable as _unavailable
from . import geometry as G

SOURCE = Path(__file__).with_name('neighborhood_cpu.c')


def unavailable() -> Optional[str]:
    if tracing():   # first: under torch.compile this must not reach the file system (graph breaks)
        return 'inside torch.compile / export / FX or TorchScript tracing (an opaque C call on raw data)'
    return _unavailable(SOURCE)


def unsupported(call: Call) -> list:
    """What the kernel does not compute: extra keys (TransNeXt) and window weights."""
    return [f'{name} not supported (NAT / DiNAT windows only)' for name in ('extra_keys', 'window_weights')
            if call.size(name)]


def library(portable: bool = False) -> ctypes.CDLL:
    """The compiled kernel (``portable``: built without -march=native, the generic vector code)."""
    lib = load(SOURCE, native_arch=not portable)
    fn = lib.mz_neighborhood_forward
    if fn.argtypes is None:   # first use of this library
        P, L, I = ctypes.c_void_p, ctypes.POINTER(ctypes.c_long), ctypes.c_int
        fn.argtypes = [P, L, P, L, P, L, P, P, L] + [I] * 7 + [P] * 6 + [ctypes.c_float, I]
        fn.restype = I
    return lib


@lru_cache(maxsize=64)
def _axis(n: int, kernel: int, dilation: int, border: str):
    """One axis' (positions, bias index, valid) as int32 tensors (n, kernel), the bias index offset by k - 1."""
    pos, valid, rel = G.axis_windows(n, kernel, dilation, border)
    return tuple(t.to(torch.int32).contiguous() for t in (pos, rel + kernel - 1, valid))


def _strides(t: torch.Tensor):
    return (ctypes.c_long * 5)(*t.stride())


def neighborhood_attention(q, k, v, kernel, dilation=1, rpb=None, extra_k=None, extra_v=None, extra_bias=None,
                           scale=None, border='mask', window_weights=None, lib=None):
    """Fused C kernel (compiled on first use, cached): window logits + relative-position bias, softmax and the
    window's values per query; CPU fp32 inference, no extra keys or window weights."""
    if extra_k is not None or window_weights is not None:
        raise ValueError('neighborhood_attention (cpu backend): extra keys and window weights are not supported '
                         "(take backend='torch')")
    tensors = (q, k, v) + ((rpb,) if rpb is not None else ())
    if any(t.dtype != torch.float32 or t.device.type != 'cpu' for t in tensors):
        raise TypeError('neighborhood_attention (cpu backend): q, k, v and rpb must be float32 CPU tensors, got '
                        f'{[(str(t.dtype), t.device.type) for t in tensors]}')
    lib = lib or library()
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))   # (the kernel's rule: D contiguous)
    B, h, H, W, D = q.shape
    Dv = v.shape[-1]
    out = torch.empty(B, H, W, h, Dv, dtype=q.dtype).permute(0, 3, 1, 2, 4)
    rows, cols = _axis(H, kernel, dilation, border), _axis(W, kernel, dilation, border)
    table = rpb.detach().contiguous() if rpb is not None else None
    rc = lib.mz_neighborhood_forward(
        q.data_ptr(), _strides(q), k.data_ptr(), _strides(k), v.data_ptr(), _strides(v),
        None if table is None else table.data_ptr(), out.data_ptr(), _strides(out), B, h, H, W, D, Dv, kernel,
        *(t.data_ptr() for t in rows + cols),
        float(D ** -0.5 if scale is None else scale), torch.get_num_threads())
    if rc:
        raise MemoryError('neighborhood_attention (cpu backend): the kernel could not allocate its per-thread buffers')
    return out
