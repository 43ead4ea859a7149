"""GELU with the tanh approximation (timm's ``GELUTanh``, ``F.gelu(x, approximate='tanh')``).

    y = gelu_tanh(x)

Same values and gradient as torch's (within fp32 rounding). On CPU, fp32 or bf16, it runs the C kernel of
``gelu_cpu.c`` forward and backward (one pass over memory each; bf16 computed in fp32 registers and rounded
once, as torch's bf16 kernel does), where this CPU measured it faster than torch's kernel (``ops._cpu`` choices
``gelu_tanh`` and ``gelu_tanh_bf16``; ``MIXZOO_CPU=gelu_tanh:torch`` forces torch's). Why:
torch's CPU kernel evaluates a vector tanh per element, about 2.7x the time of a memory-bound pass; the C
kernel computes the same function as ``x * sigmoid(2u)`` with one exp. Measured on this project's CI machine
(2-core AMD EPYC, AVX-512, 2 threads), a (8, 256, 56, 56) map (MaxViT-T's first-stage MBConv): forward
5.55 -> 2.05 ms (1.64 without allocating the output), backward 6.02 -> 2.06 ms (the kernel); MaxViT-T, the family
that uses it, runs 90 of them per training step.
Other dtypes and devices, and traced or compiled graphs, take ``F.gelu``.
"""
import ctypes
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _cpu
from .._dispatch import dense_format, tracing
from .._native import load, unavailable as _unavailable

__all__ = ['gelu_tanh', 'unavailable']

OP = 'gelu_tanh'
SOURCE = Path(__file__).with_name('gelu_cpu.c')


def _library(portable: bool = False) -> ctypes.CDLL:
    lib = load(SOURCE, native_arch=not portable)
    if lib.mz_gelu_tanh_forward.argtypes is None:   # first use of this library
        P, L, I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
        for suffix in ('', '_bf16'):
            getattr(lib, 'mz_gelu_tanh_forward' + suffix).argtypes = [P, P, L, I]
            getattr(lib, 'mz_gelu_tanh_backward' + suffix).argtypes = [P, P, P, L, I]
    return lib


def _entry(lib: ctypes.CDLL, direction: str, dtype: torch.dtype):
    return getattr(lib, f'mz_gelu_tanh_{direction}' + ('_bf16' if dtype == torch.bfloat16 else ''))


def unavailable() -> Optional[str]:
    """Why the C kernel cannot run here (None if it can); builds it on first call."""
    return _unavailable(SOURCE)


class _GeluTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, portable: bool) -> torch.Tensor:
        y = torch.empty_like(x)
        _entry(_library(portable), 'forward', x.dtype)(x.data_ptr(), y.data_ptr(), x.numel(), torch.get_num_threads())
        ctx.save_for_backward(x)
        ctx.portable = portable
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, = ctx.saved_tensors
        g = g.contiguous(memory_format=dense_format(x)).to(x.dtype)   # (x is dense: see gelu_tanh)
        gx = torch.empty_like(x)
        _entry(_library(ctx.portable), 'backward', x.dtype)(g.data_ptr(), x.data_ptr(), gx.data_ptr(), x.numel(),
                                                            torch.get_num_threads())
        return gx, None


_CHOICE = {torch.float32: OP, torch.bfloat16: OP + '_bf16'}


def _kernel_runs(x: torch.Tensor) -> bool:
    return (x.device.type == 'cpu' and x.dtype in _CHOICE and not tracing() and dense_format(x) is not None
            and _cpu.choice(_CHOICE[x.dtype]) == 'c' and unavailable() is None)


def gelu_tanh(x: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """GELU, tanh approximation. ``backend``: None (the C kernel where it runs and this CPU measured it faster,
    else torch), 'c' (the C kernel; TypeError for inputs it does not take), 'c-portable' (the kernel built
    without -march=native: the generic vector code), 'torch' (``F.gelu``)."""
    if backend is None:
        backend = 'c' if _kernel_runs(x) else 'torch'
    if backend == 'torch':
        return F.gelu(x, approximate='tanh')
    if backend not in ('c', 'c-portable'):
        raise ValueError(f"gelu_tanh: backend={backend!r}: expected None, 'c', 'c-portable' or 'torch'")
    if x.device.type != 'cpu' or x.dtype not in _CHOICE:
        raise TypeError(f'gelu_tanh (C kernel): needs a float32 or bfloat16 CPU tensor, got {x.dtype} on '
                        f"{x.device.type}; backend='torch' takes any")
    if dense_format(x) is None:   # (the kernel runs over the buffer as one flat array)
        x = x.contiguous()
    return _GeluTanh.apply(x, backend == 'c-portable')


def _measure(dtype: torch.dtype) -> dict:
    """Forward + backward of a (4, 256, 28, 28) map (MaxViT-T's second-stage MBConv hidden map at batch 2)."""
    x = torch.randn(4, 256, 28, 28, generator=torch.Generator().manual_seed(0)).to(dtype)
    g = torch.randn_like(x)
    fns = {'torch': lambda: (F.gelu(x, approximate='tanh'), torch.ops.aten.gelu_backward(g, x, approximate='tanh'))}
    if unavailable() is None:
        lib = _library()
        y, gx = torch.empty_like(x), torch.empty_like(x)

        def c():
            _entry(lib, 'forward', dtype)(x.data_ptr(), y.data_ptr(), x.numel(), torch.get_num_threads())
            _entry(lib, 'backward', dtype)(g.data_ptr(), x.data_ptr(), gx.data_ptr(), x.numel(),
                                           torch.get_num_threads())
        fns['c'] = c
    return _cpu.interleaved(fns, reps=10)


_cpu.register(OP, ('c', 'torch'), lambda: _measure(torch.float32), 'fp32 CPU GELU (tanh approximation), forward '
              "and backward: the C kernel (ops/gelu) or torch's")
_cpu.register(OP + '_bf16', ('c', 'torch'), lambda: _measure(torch.bfloat16), 'the same for bf16 tensors (autocast '
              'inference: MaxViT-T measured 57 ms of its 469 ms batch-8 forward in torch\'s bf16 GELU)')
