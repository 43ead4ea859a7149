"""Depthwise convolution (one filter per channel) with a fast weight gradient on CPU.

    y = depthwise_conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1)

``F.conv2d(x, weight, bias, stride, padding, dilation, groups=C)`` for ``x`` (N, C, H, W) and ``weight``
(C, 1, kh, kw), same values. When autograd needs the weight's gradient of a stride-1 convolution with a 5x5 or
larger filter on CPU in fp32, that gradient comes from the C kernel of ``dwconv_cpu.c`` (NCHW or channels-last
maps; the input's gradient stays oneDNN's, the bias's is a sum), where this CPU measured it faster (``ops._cpu``
choices ``dwconv_grad`` and ``dwconv_grad_nhwc``; ``MIXZOO_CPU=dwconv_grad:torch,dwconv_grad_nhwc:torch``
forces torch's).

Why: torch's CPU backward (oneDNN) computes the weight gradient of a large depthwise filter at a few GFLOP/s,
10-50x its forward's time; asked for the bias's gradient too, it runs that pass even when the weight's is not
wanted. Measured on this project's CI machine (2-core AMD EPYC, AVX-512, 2 threads), the weight gradient of 7x7
filters: NCHW (4, 96, 56, 56) 25.6 -> 1.9 ms, (4, 384, 14, 14) 4.1 -> 0.6 ms; channels-last (8, 64, 56, 56) 13.0
-> 3.0 ms, (4, 768, 7, 7) 12.6 -> 0.24 ms; L2ViT-T's training step at batch 4 (12 such filters) 923 -> 878 ms.
3x3 filters stay oneDNN's (``MIN_TAPS``: it measured faster at some of their shapes, slower at others). Other
strides, dtypes and devices, autocast, 'same' padding strings and traced or compiled graphs take torch's
convolution.
"""
import ctypes
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .. import _cpu
from .._dispatch import dense_format, records_grad, tracing
from .._native import load, unavailable as _unavailable

__all__ = ['depthwise_conv2d', 'weight_grad', 'unavailable']

OP = 'dwconv_grad'
SOURCE = Path(__file__).with_name('dwconv_cpu.c')
Pair = Union[int, Tuple[int, int]]


def _library(portable: bool = False) -> ctypes.CDLL:
    lib = load(SOURCE, native_arch=not portable)
    for fn in (lib.mz_dw_weight_grad, lib.mz_dw_weight_grad_nhwc):
        if fn.argtypes is None:   # first use of this library
            fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 11
            fn.restype = ctypes.c_int
    return lib


def unavailable() -> Optional[str]:
    """Why the C kernel cannot run here (None if it can); builds it on first call."""
    return _unavailable(SOURCE)


def _pair(v: Pair) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def weight_grad(x: torch.Tensor, g: torch.Tensor, kernel: Tuple[int, int], padding: Pair = 0, dilation: Pair = 1,
                portable: bool = False) -> torch.Tensor:
    """The (C, 1, kh, kw) weight gradient of a stride-1 depthwise convolution of ``x`` (N, C, H, W) given the
    output's gradient ``g`` (N, C, Ho, Wo): the C kernel (float32 CPU tensors), on channels-last maps where ``x``
    is one (``g`` is brought to ``x``'s layout), else on NCHW ones."""
    (ph, pw), (dh, dw), (kh, kw) = _pair(padding), _pair(dilation), kernel
    N, C, H, W = x.shape
    if any(t.dtype != torch.float32 or t.device.type != 'cpu' for t in (x, g)):
        raise TypeError(f'depthwise weight_grad (C kernel): x and g must be float32 CPU tensors, got '
                        f'{[(str(t.dtype), t.device.type) for t in (x, g)]}')
    if g.shape != (N, C, H + 2 * ph - (kh - 1) * dh, W + 2 * pw - (kw - 1) * dw):
        raise ValueError(f'depthwise weight_grad: gradient shape {tuple(g.shape)} is not the stride-1 output of '
                         f'{tuple(x.shape)} with a {kh}x{kw} kernel, padding {(ph, pw)}, dilation {(dh, dw)}')
    lib = _library(portable)
    fmt = torch.channels_last if dense_format(x) == torch.channels_last else torch.contiguous_format
    fn = lib.mz_dw_weight_grad_nhwc if fmt == torch.channels_last else lib.mz_dw_weight_grad
    x, g = x.contiguous(memory_format=fmt), g.contiguous(memory_format=fmt)
    gw = torch.empty(C, 1, kh, kw, dtype=x.dtype)
    if fn(x.data_ptr(), g.data_ptr(), gw.data_ptr(), N, C, H, W, kh, kw, ph, pw, dh, dw, torch.get_num_threads()):
        raise MemoryError('depthwise weight_grad (C kernel): could not allocate its per-thread buffers')
    return gw


class _DepthwiseConv2d(torch.autograd.Function):
    """Stride 1: torch's forward and input / bias gradients, the C kernel's weight gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding, dilation):
        ctx.save_for_backward(x, weight)
        ctx.geometry, ctx.has_bias = (padding, dilation), bias is not None
        return F.conv2d(x, weight, bias, 1, padding, dilation, x.shape[1])

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        padding, dilation = ctx.geometry
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = gb = None
        if need_x:   # (g in x's layout: oneDNN's backward is slow on a mix)
            g_x = g.contiguous(memory_format=dense_format(x) or torch.contiguous_format)
            gx = torch.ops.aten.convolution_backward(g_x, x, weight, None, [1, 1], list(padding), list(dilation), False,
                                                     [0, 0], x.shape[1], [True, False, False])[0]
        if need_b:   # (not oneDNN's: asked for a bias gradient, it runs its slow weight-gradient pass too)
            gb = g.sum((0, 2, 3))
        gw = weight_grad(x, g, tuple(weight.shape[2:]), padding, dilation) if need_w else None
        return gx, gw, gb, None, None


# the kernel only for filters of this many taps and more: oneDNN's weight gradient of 5x5 and larger filters is
# slow on either layout, of 3x3 ones mixed (measured, AMD EPYC, 2 threads, 7x7: NCHW (4, 96, 56, 56) 25.6 vs 1.9 ms,
# NHWC (8, 64, 56, 56) 13.0 vs 3.0 ms; 3x3 with its input gradient, NCHW batch 8: 256 ch. at 56x56 32.3 vs 18.6 ms,
# 1024 at 14x14 2.3 vs 3.0 ms; NHWC (4, 96, 56, 56) 0.32 vs 0.56 ms)
MIN_TAPS = 25


def _kernel_runs(x, weight, bias, stride, padding) -> bool:
    if not (records_grad(weight) and x.device.type == 'cpu' and x.dim() == 4
            and all(t is None or t.dtype == torch.float32 for t in (x, weight, bias))
            and _pair(stride) == (1, 1) and not isinstance(padding, str)
            and weight.dim() == 4 and weight.shape[0] == x.shape[1] and weight.shape[1] == 1
            and weight.shape[2] * weight.shape[3] >= MIN_TAPS
            and not tracing() and not torch.is_autocast_enabled('cpu')):
        return False
    # (a map in neither layout is copied to NCHW)
    return _cpu.choice(OP_NHWC if dense_format(x) == torch.channels_last else OP) == 'c' and unavailable() is None


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, stride: Pair = 1,
                     padding: Union[Pair, str] = 0, dilation: Pair = 1) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups=x.shape[1])``; see the module docstring."""
    if _kernel_runs(x, weight, bias, stride, padding):
        return _DepthwiseConv2d.apply(x, weight, bias, _pair(padding), _pair(dilation))
    return F.conv2d(x, weight, bias, stride, padding, dilation, x.shape[1])


def _measure(layout: str) -> dict:
    """The weight gradient of a 7x7 filter bank (L2ViT-T's stage-2 LCM at batch 1) on NCHW or channels-last maps."""
    gen = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if layout == 'nhwc' else torch.contiguous_format
    x, g = (torch.randn(1, 192, 28, 28, generator=gen).contiguous(memory_format=fmt) for _ in range(2))
    w = torch.randn(192, 1, 7, 7, generator=gen)
    fns = {'torch': lambda: torch.ops.aten.convolution_backward(g, x, w, None, [1, 1], [3, 3], [1, 1], False, [0, 0],
                                                                192, [False, True, False])}
    if unavailable() is None:
        fns['c'] = lambda: weight_grad(x, g, (7, 7), 3)
    return _cpu.interleaved(fns, reps=10)


OP_NHWC = OP + '_nhwc'
_cpu.register(OP, ('c', 'torch'), lambda: _measure('nchw'), 'fp32 CPU depthwise convolution weight gradient '
              f"(stride 1, filters of {MIN_TAPS} taps and more, NCHW maps): the C kernel (ops/dwconv) or torch's")
_cpu.register(OP_NHWC, ('c', 'torch'), lambda: _measure('nhwc'), "the same on channels-last maps: the C kernel or "
              "torch's")
