"""Dense layers on oneDNN for fp32 CPU tensors (used by the models' linear layers and the ops' small
projections)."""
import os
from contextlib import contextmanager
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ._dispatch import tracing

ENV = 'MIXZOO_ONEDNN_LINEAR'
_ENV_VALUE = os.environ.get(ENV)                # read once, at import
_ONEDNN_LINEAR = _ENV_VALUE != '0'              # the switch (``disabled()`` turns it off for a block)


@contextmanager
def disabled():
    """Plain F.linear inside the block (the counters report linear layers as linear, as timm's do)."""
    global _ONEDNN_LINEAR
    saved, _ONEDNN_LINEAR = _ONEDNN_LINEAR, False
    try:
        yield
    finally:
        _ONEDNN_LINEAR = saved


def _off_reason() -> Optional[str]:
    """Why the route is off for every call on this machine and in this state (None: it is on)."""
    if not _ONEDNN_LINEAR:
        return (f'{ENV}=0 (read at import)' if _ENV_VALUE == '0' else
                'switched off in this process (inside mixzoo.ops._onednn.disabled(), as the FLOP counters do)')
    if not torch.backends.mkldnn.is_available():
        return 'this torch build has no oneDNN (torch.backends.mkldnn.is_available() is False)'
    if not torch.backends.mkldnn.enabled:
        return 'torch.backends.mkldnn.enabled is False'
    return None


def state() -> Tuple[bool, str]:
    """(on, why) of the oneDNN linear route, for ``python -m mixzoo.ops info``."""
    env = f'{ENV}={_ENV_VALUE}' if _ENV_VALUE is not None else f'{ENV} unset (default on)'
    why = _off_reason()
    if why:
        return False, f'off: {why}; {env}'
    return True, (f'on: {env}; fp32 CPU inference linears (every zoo model\'s nn.Linear, via '
                  'mixzoo.layers.use_onednn_linears, and the ops\' projections) of more than '
                  'max(20480, 64 * in_features) elements run as oneDNN 1x1 convolutions; autograd, GPU, other '
                  f'dtypes, autocast and tracing / torch.compile take F.linear; {ENV}=0 turns it off')


def _autocast_cpu() -> bool:
    return torch.is_autocast_enabled('cpu')


def _onednn_linear_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if tracing():
        return False   # compilers have their own CPU GEMM lowering; traced graphs keep plain linear
    if not (x.device.type == 'cpu' and x.dtype == weight.dtype == torch.float32):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False   # training: the 1x1 conv's backward is slower than sgemm's (see linear())
    if x.numel() <= max(20480, 64 * x.shape[-1]):
        return False   # small inputs (heads): torch would send such a conv to its slow non-oneDNN kernel
    return _off_reason() is None and not _autocast_cpu()


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
