"""Dense layers on oneDNN for fp32 CPU tensors (used by the models' linear layers and the ops' small
projections)."""
import os
from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F

from ._dispatch import tracing

_ONEDNN_LINEAR = os.environ.get('MIXZOO_ONEDNN_LINEAR', '1') != '0'


@contextmanager
def disabled():
    """Plain F.linear inside the block (the counters report linear layers as linear, as timm's do)."""
    global _ONEDNN_LINEAR
    saved, _ONEDNN_LINEAR = _ONEDNN_LINEAR, False
    try:
        yield
    finally:
        _ONEDNN_LINEAR = saved


def _autocast_cpu() -> bool:
    return torch.is_autocast_enabled('cpu')


def _onednn_linear_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if tracing():
        return False   # compilers have their own CPU GEMM lowering; traced graphs keep plain linear
    if not (x.device.type == 'cpu' and x.dtype == weight.dtype == torch.float32 and _ONEDNN_LINEAR):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False   # training: the 1x1 conv's backward is slower than sgemm's (see linear())
    if x.numel() <= max(20480, 64 * x.shape[-1]):
        return False   # small inputs (heads): torch would send such a conv to its slow non-oneDNN kernel
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled and not _autocast_cpu()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear``, computed for fp32 CPU inputs as a 1x1 convolution over the rows, so that it runs
    on oneDNN instead of the BLAS sgemm behind ``F.linear``.

    Why: torch's CPU wheels link MKL, whose sgemm takes a slow code path on AMD CPUs; oneDNN picks
    AVX-512 there. Measured on this project's CI machine (2-core AMD EPYC with AVX-512), best of 20:
    (1568 x 384) @ (384 x 1536) 8.34 -> 3.98 ms, (25088 x 384) @ (384 x 96) 10.3 -> 4.4 ms; results equal
    to F.linear within 1.2e-6 relative. Inference only: with autograd the convolution's backward measured
    1.07-1.4x slower than F.linear's (TransNeXt-T shapes, e.g. (25088 x 72) @ (72 x 768) fwd+bwd 730 vs
    625 ms), and it was the largest item of a TransNeXt-T training step. Everything else (autograd, GPU,
    other dtypes, autocast, torch.compile / export / FX tracing) takes ``F.linear``. ``MIXZOO_ONEDNN_LINEAR=0``
    turns it off."""
    if not _onednn_linear_ok(x, weight):
        return F.linear(x, weight, bias)
    K = x.shape[-1]
    rows = x.reshape(-1, K)
    if rows.stride(-1) != 1 or rows.stride(0) != K:
        rows = rows.contiguous()
    # (M, K) rows seen as a (1, K, M, 1) channels-last image: the conv's GEMM reads them in place and
    # writes a channels-last (1, N, M, 1) output, i.e. (M, N) rows again
    y = F.conv2d(rows.view(1, -1, 1, K).permute(0, 3, 1, 2), weight[:, :, None, None], bias)
    return y.permute(0, 2, 3, 1).reshape(*x.shape[:-1], weight.shape[0])
