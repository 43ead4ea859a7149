"""Halo attention on CPU, fp32, without autograd: the fused C kernel of ``halo_cpu.c``.

One pass per (image, head, query block) with the window in L1: the in-map keys are gathered once
(transposed, pre-scaled) beside the relative tables, one register-blocked product gives the q . k
logits and the row / column relative logits together, then bias, softmax (timm's zero border keys in
closed form: three factorised blocks of (row, column) pairs, each with its own exact maximum, so that
none underflows at large logits; ``border_blocks`` in the C file) and the product with the values. It
reads q, k, v through their strides (NHWC projections: no copies) and writes an NHWC buffer returned
as a (B, heads, Dv, Hq, Wq) view.

Why C: eager PyTorch cannot fuse these steps on CPU. The ``torch`` backend's per-window steps are
separate passes over memory, and its batched products go through MKL, whose fp32 path on AMD CPUs
runs at about a third of this machine's AVX-512 peak. Measured on the CI machine (2-core AMD EPYC,
AVX-512), halonet26t stage 3 (batch 8, 16 x 16, 8 heads of 32, block 8, halo 2), NHWC q/k/v, the op
alone, best of 30: 1.53 ms vs 4.4-5.0 for ``torch``. Autograd, other dtypes and devices, and traced or
compiled graphs go to the ``torch`` backend. Needs a C compiler on first use (see ops/_native.py).
"""
import ctypes
from pathlib import Path
from typing import Optional

import torch

from .._dispatch import empty
from .._native import backend_unavailable, load, strides

SOURCE = Path(__file__).with_name('halo_cpu.c')


def unavailable() -> Optional[str]:
    return backend_unavailable(SOURCE)


def library(portable: bool = False) -> ctypes.CDLL:
    """The compiled kernel (``portable``: built without -march=native, the generic vector code)."""
    lib = load(SOURCE, native_arch=not portable)
    fn = lib.mz_halo_forward
    if fn.argtypes is None:   # first use of this library
        P, L, I = ctypes.c_void_p, ctypes.POINTER(ctypes.c_long), ctypes.c_int
        fn.argtypes = [P, L, P, L, P, L, P, L, P, P] + [I] * 10 + [ctypes.c_float, I, I]
        fn.restype = I
    return lib


def halo_attention(q, k, v, block, halo, rel_h=None, rel_w=None, scale=None, border='zero_pad', lib=None):
    """Fused C kernel (compiled on first use, cached): window gather, q.k with the relative
    logits in one product, softmax, values; CPU fp32 inference."""
    lib = lib or library()
    tensors = (q, k, v) + ((rel_h, rel_w) if rel_h is not None else ())
    if any(t.dtype != torch.float32 or t.device.type != 'cpu' for t in tensors):
        raise TypeError('halo_attention (cpu backend): q, k, v and the relative tables must all be float32 CPU '
                        f'tensors, got {[(str(t.dtype), t.device.type) for t in tensors]}')
    B, h, D, H, W = k.shape
    Dv, Hq, Wq = v.shape[2], q.shape[-2], q.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    out = empty(B, Hq, Wq, h, Dv, dtype=q.dtype, device=q.device).permute(0, 3, 4, 1, 2)
    if rel_h is not None:
        rel_h, rel_w = rel_h.detach().contiguous(), rel_w.detach().contiguous()
    rc = lib.mz_halo_forward(q.data_ptr(), strides(q), k.data_ptr(), strides(k), v.data_ptr(), strides(v),
                             out.data_ptr(), strides(out),
                             rel_h.data_ptr() if rel_h is not None else None,
                             rel_w.data_ptr() if rel_w is not None else None,
                             B, h, D, Dv, H, W, Hq, Wq, block, halo, float(scale), int(border == 'zero_pad'),
                             torch.get_num_threads())
    if rc:
        raise MemoryError('halo_attention (cpu backend): the kernel could not allocate its per-thread buffers')
    return out
