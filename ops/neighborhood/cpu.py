"""Neighborhood attention on CPU, fp32 (bf16 inputs computed in fp32), without autograd: the C kernel of
``neighborhood_cpu.c``, one pass per block of queries (window logits + relative-position bias, extra-key logits +
their bias, one softmax, the window values weighted by it plus the window weights, the extra values).

It reads q, k, v through their strides (views of one qkv projection: no copies) and writes an NHWC buffer
(B, H, W, heads, Dv) returned as a (B, heads, H, W, Dv) view, so the mixer's merge of the heads is a view too.
The window geometry is ``geometry.axis_windows``' (both borders, any dilation, maps smaller than the window); an
extra bias is a ``GridBias`` (read by its factors, never expanded) or a tensor.
Measured on the CI machine (2-core AMD EPYC, AVX-512), batch 8, the op alone, interleaved best of 5, torch backend
-> C: NAT-T's calls (qkv views, kernel 7, with the bias) (8, 2, 56, 56, 32) 45.3 -> 13.1 ms, (8, 4, 28, 28, 32)
25.7 -> 6.1 ms, DiNAT's dilation 4 there 15.7 -> 8.6 ms, (8, 8, 14, 14, 32) 7.3 -> 3.0 ms; TransNeXt-T's (3x3
windows, 49 pooled keys with their GridBias, window weights) (8, 3, 56, 56, 24) 24.0 -> 15.9 ms, (8, 6, 28, 28, 24)
12.4 -> 7.6 ms, (8, 12, 14, 14, 24) 6.8 -> 3.6 ms. Whole forwards: NAT-T 776 -> 521 ms, TransNeXt-T 1024 -> 926.
bfloat16 calls (CPU autocast) are computed in float32 from converted copies, the result rounded once to bfloat16,
where this CPU measured that faster than the torch backend's bf16 products (choice ``neighborhood_bf16``; DiNAT-T's
bf16 forward ran slower than its fp32 one without it). Autograd, other devices and traced graphs take the
``torch`` backend. Needs a C compiler on first use (see ops/_native.py).
"""
import ctypes
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from .._native import backend_unavailable, load, strides
from . import geometry as G

SOURCE = Path(__file__).with_name('neighborhood_cpu.c')
DTYPES = (torch.float32, torch.bfloat16)


def unavailable() -> Optional[str]:
    return backend_unavailable(SOURCE)


class _Extra(ctypes.Structure):
    """extra_t of the C file: the extra keys / values and their bias (a GridBias's factors or a tensor)."""
    _fields_ = [('k', ctypes.c_void_p), ('v', ctypes.c_void_p), ('ks', ctypes.POINTER(ctypes.c_long)),
                ('vs', ctypes.POINTER(ctypes.c_long)), ('P', ctypes.c_int), ('table', ctypes.c_void_p),
                ('table_heads', ctypes.c_int), ('Uh', ctypes.c_int), ('Uw', ctypes.c_int), ('ph', ctypes.c_int),
                ('pw', ctypes.c_int), ('ih', ctypes.c_void_p), ('iw', ctypes.c_void_p), ('bias', ctypes.c_void_p),
                ('bs', ctypes.POINTER(ctypes.c_long))]


def library(portable: bool = False) -> ctypes.CDLL:
    """The compiled kernel (``portable``: built without -march=native, the generic vector code)."""
    lib = load(SOURCE, native_arch=not portable)
    fn = lib.mz_neighborhood_forward
    if fn.argtypes is None:   # first use of this library
        P, L, I = ctypes.c_void_p, ctypes.POINTER(ctypes.c_long), ctypes.c_int
        fn.argtypes = ([P, L, P, L, P, L, P, P, L, P, L] + [I] * 7 + [P] * 6
                       + [ctypes.POINTER(_Extra), ctypes.c_float, I])
        fn.restype = I
    return lib


@lru_cache(maxsize=64)
def _axis(n: int, kernel: int, dilation: int, border: str):
    """One axis' (positions, bias index, valid) as int32 tensors (n, kernel), the bias index offset by k - 1."""
    pos, valid, rel = G.axis_windows(n, kernel, dilation, border)
    return tuple(t.to(torch.int32).contiguous() for t in (pos, rel + kernel - 1, valid))


def _extra(extra_k, extra_v, extra_bias, shape, keep: list) -> _Extra:
    """The C struct of the extra keys (all zero: none); ``keep`` holds the tensors it points into."""
    if extra_k is None:
        return _Extra()
    B, h, H, W = shape
    ex = _Extra(k=extra_k.data_ptr(), v=extra_v.data_ptr(), ks=strides(extra_k), vs=strides(extra_v),
                P=extra_k.shape[2])
    if isinstance(extra_bias, G.GridBias):
        table = extra_bias.table.detach().contiguous()
        ih, iw = (t.to(torch.int32).contiguous() for t in (extra_bias.index_h, extra_bias.index_w))
        if ih.shape[1] * iw.shape[1] != ex.P or not (0 <= int(ih.min()) and int(ih.max()) < table.shape[1]
                                                     and 0 <= int(iw.min()) and int(iw.max()) < table.shape[2]):
            raise ValueError(f'neighborhood_attention: a GridBias over {ex.P} extra keys needs index_h (H, ph) and '
                             f'index_w (W, pw) with ph * pw = {ex.P}, indexing its table {tuple(table.shape)}; got '
                             f'{tuple(ih.shape)}, {tuple(iw.shape)} in [{int(ih.min())}, {int(ih.max())}] / '
                             f'[{int(iw.min())}, {int(iw.max())}]')
        keep += [table, ih, iw]
        ex.table, ex.ih, ex.iw = table.data_ptr(), ih.data_ptr(), iw.data_ptr()
        ex.table_heads, (ex.Uh, ex.Uw), (ex.ph, ex.pw) = table.shape[0], table.shape[1:], (ih.shape[1], iw.shape[1])
    elif extra_bias is not None:
        bias = extra_bias.detach().expand(B, h, H, W, extra_k.shape[2])
        keep.append(bias)
        ex.bias, ex.bs = bias.data_ptr(), strides(bias)
    keep += [ex.ks, ex.vs, ex.bs]
    return ex


def neighborhood_attention(q, k, v, kernel, dilation=1, rpb=None, extra_k=None, extra_v=None, extra_bias=None,
                           scale=None, border='mask', window_weights=None, lib=None):
    """Fused C kernel (compiled on first use, cached): window logits + relative-position bias and the extra keys'
    logits + bias, one softmax, the window (+ window weights) and extra values per query; CPU fp32 / bf16 inference."""
    table = getattr(extra_bias, 'table', extra_bias)
    tensors = [t for t in (q, k, v, rpb, extra_k, extra_v, table, window_weights) if t is not None]
    if any(t.dtype not in DTYPES or t.dtype != q.dtype or t.device.type != 'cpu' for t in tensors):
        raise TypeError('neighborhood_attention (cpu backend): every tensor must be float32 (or every one bfloat16) '
                        f'on the CPU, got {[(str(t.dtype), t.device.type) for t in tensors]}')
    if q.dtype == torch.bfloat16:   # computed in float32 (converted copies), the result rounded once to bfloat16
        def f32(t):     # (tensors and GridBias)
            return None if t is None else t.to(torch.float32)
        return neighborhood_attention(*(f32(t) for t in (q, k, v)), kernel, dilation, f32(rpb), f32(extra_k),
                                      f32(extra_v), f32(extra_bias), scale, border, f32(window_weights),
                                      lib).to(torch.bfloat16)
    lib = lib or library()
    B, h, H, W, D = q.shape
    Dv = v.shape[-1]

    def rows(t):    # (the kernel's rule: the head dimension contiguous)
        return None if t is None else t if t.stride(-1) == 1 else t.contiguous()
    q, k, v, extra_k, extra_v = (rows(t) for t in (q, k, v, extra_k, extra_v))
    out = torch.empty(B, H, W, h, Dv, dtype=q.dtype).permute(0, 3, 1, 2, 4)
    keep = []
    ex = _extra(extra_k, extra_v, extra_bias, (B, h, H, W), keep)
    rpb = rpb.detach().contiguous() if rpb is not None else None
    ww = window_weights.detach() if window_weights is not None else None
    rc = lib.mz_neighborhood_forward(
        q.data_ptr(), strides(q), k.data_ptr(), strides(k), v.data_ptr(), strides(v),
        None if rpb is None else rpb.data_ptr(), None if ww is None else ww.data_ptr(), strides(ww, 5),
        out.data_ptr(), strides(out), B, h, H, W, D, Dv, kernel,
        *(t.data_ptr() for t in _axis(H, kernel, dilation, border) + _axis(W, kernel, dilation, border)),
        ctypes.byref(ex), float(D ** -0.5 if scale is None else scale), torch.get_num_threads())
    if rc:
        raise MemoryError('neighborhood_attention (cpu backend): the kernel could not allocate its per-thread buffers')
    return out
