"""Dense layers on oneDNN for fp32 CPU tensors (used by the models' linear layers and the ops' small
projections), where this CPU measured them faster than torch's BLAS (``ops._cpu`` choice ``linear``)."""
import os
from contextlib import contextmanager
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import _cpu
from ._dispatch import records_grad, tracing
from .gelu import gelu_tanh

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
    """(on, why) of the oneDNN linear route (fp32; the bf16 one under autocast in the text), for
    ``python -m mixzoo.ops info``."""
    env = f'{ENV}={_ENV_VALUE}' if _ENV_VALUE is not None else f'{ENV} unset (default on)'
    why = _off_reason()
    if why:
        return False, f'off: {why}; {env}'
    bf16 = (f'bf16 under CPU autocast: {"oneDNN" if _cpu.choice("linear_bf16") == "onednn" else "F.linear"} '
            f'({_cpu.explain("linear_bf16")})')
    if _cpu.choice('linear') != 'onednn':
        return False, f'off on this CPU for fp32: F.linear (BLAS) chosen ({_cpu.explain("linear")}); {bf16}; {env}'
    return True, (f'on on this CPU ({_cpu.explain("linear")}): {env}; fp32 CPU inference linears (every zoo model\'s '
                  'nn.Linear, via mixzoo.layers.use_fast_layers, and the ops\' projections) of more than '
                  'max(20480, 64 * in_features) elements run as oneDNN 1x1 convolutions; '
                  f'{bf16}; autograd, GPU, other dtypes and tracing / torch.compile take F.linear; '
                  f'{ENV}=0 turns it off')


def autocast_bf16(x: torch.Tensor) -> bool:
    """``x`` is a CPU tensor under CPU autocast to bfloat16 whose products autocast runs in bf16."""
    return (x.device.type == 'cpu' and torch.is_autocast_enabled('cpu')
            and torch.get_autocast_dtype('cpu') == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16))


def _inference_dtype(x: torch.Tensor, *params: Optional[torch.Tensor]) -> Optional[torch.dtype]:
    """The dtype a oneDNN route computes ``x``'s product in here (fp32; bf16 under CPU autocast to bfloat16), or
    None where no route runs: autograd, other devices / dtypes / autocast types, tracing, no oneDNN."""
    if tracing():
        return None   # compilers have their own CPU GEMM lowering; traced graphs keep the plain ops
    if x.device.type != 'cpu' or _off_reason() is not None:
        return None
    if records_grad(x, *params):
        return None   # training: the 1x1 conv's backward is slower than sgemm's (see linear())
    if torch.is_autocast_enabled('cpu'):
        return torch.bfloat16 if autocast_bf16(x) else None
    return torch.float32 if x.dtype == torch.float32 else None


def _route(x: torch.Tensor, weight: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype the oneDNN route computes ``x @ weight.T`` in here, or None: F.linear."""
    dtype = _inference_dtype(x, weight)   # (first: under tracing a size comparison would be a guard)
    if dtype is None or weight.dtype != torch.float32:
        return None
    if x.numel() <= max(20480, 64 * x.shape[-1]):
        return None   # small inputs (heads): torch would send such a conv to its slow non-oneDNN kernel
    return dtype if _cpu.choice('linear' if dtype == torch.float32 else 'linear_bf16') == 'onednn' else None


def conv_dtype(x: torch.Tensor, *params: Optional[torch.Tensor]) -> Optional[torch.dtype]:
    """The dtype a convolution of ``x`` runs in on oneDNN here with an activation post-op (fp32; bf16 under CPU
    autocast to bfloat16), or None where it does not (autograd, other devices / dtypes, tracing, no oneDNN)."""
    return None if _FUSED is None else _inference_dtype(x, *params)


def conv_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding, stride, dilation,
             groups: int, act: str, dtype: torch.dtype) -> torch.Tensor:
    """``act(conv2d(x, weight, bias))`` as one oneDNN convolution with the activation as its post-op, in ``dtype``
    (from :func:`conv_dtype`; the inputs are cast to it, as autocast would)."""
    x, weight, bias = (t if t is None else t.to(dtype) for t in (x, weight, bias))
    attr, algorithm = _POST_OPS[act]
    return _FUSED(x, weight, bias, list(padding), list(stride), list(dilation), groups, attr, [], algorithm)


# activations oneDNN applies to the GEMM's output tile while it is in cache (a post-op): name -> (attr, algorithm).
# Not ReLU: oneDNN's ReLU post-op maps NaN to 0 (torch's keeps it), which would hide a bad input
_POST_OPS = {'gelu': ('gelu', 'none'), 'gelu_tanh': ('gelu', 'tanh')}
_FUSED = getattr(getattr(torch.ops, 'mkldnn', None), '_convolution_pointwise', None)


def activation(x: torch.Tensor, act: Optional[str]) -> torch.Tensor:
    """The post-op ``act`` in torch (the path every unfused call takes)."""
    if act is None:
        return x
    return gelu_tanh(x) if act == 'gelu_tanh' else F.gelu(x)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           act: Optional[str] = None) -> torch.Tensor:
    """``F.linear``, computed for fp32 CPU inputs as a 1x1 convolution over the rows, so that it runs
    on oneDNN instead of the BLAS sgemm behind ``F.linear``.

    Why: torch's CPU wheels link MKL, whose sgemm takes a slow code path on AMD CPUs; oneDNN picks
    AVX-512 there. Whether it wins is measured on each CPU (``ops._cpu`` choice ``linear``: ``onednn`` or
    ``blas``, timed on the zoo's MLP shapes; ``MIXZOO_CPU=linear:blas`` forces F.linear). Measured on this
    project's CI machine (2-core AMD EPYC with AVX-512), best of 20:
    (1568 x 384) @ (384 x 1536) 8.34 -> 3.98 ms, (25088 x 384) @ (384 x 96) 10.3 -> 4.4 ms; results equal
    to F.linear within 1.2e-6 relative. Inference only: with autograd the convolution's backward measured
    1.07-1.4x slower than F.linear's (TransNeXt-T shapes, e.g. (25088 x 72) @ (72 x 768) fwd+bwd 730 vs
    625 ms), and it was the largest item of a TransNeXt-T training step. Everything else (autograd, GPU,
    other dtypes, torch.compile / export / FX tracing) takes ``F.linear``. ``MIXZOO_ONEDNN_LINEAR=0``
    turns it off. Under CPU autocast to bfloat16 (inference) the same route runs in bf16 where this CPU measured
    it faster than autocast's F.linear (``ops._cpu`` choice ``linear_bf16``; the GELU post-op is most of it).

    ``act`` ('gelu', 'gelu_tanh' or None) is applied to the result: on the oneDNN route as the
    convolution's post-op (no separate pass over the output, which for an MLP's hidden layer is the
    block's largest map: DaViT-T's GELUs were 6.5% of its batch-8 forward), elsewhere in torch."""
    if act is not None and act not in _POST_OPS:
        raise ValueError(f'act={act!r}: expected one of {sorted(_POST_OPS)} or None')
    dtype = _route(x, weight)
    if dtype is None:
        return activation(F.linear(x, weight, bias), act)
    if dtype != torch.float32:   # under autocast: its casts (the weight's per call, as autocast's own linear)
        x, weight, bias = (t if t is None else t.to(dtype) for t in (x, weight, bias))
    return _conv_linear(x, weight, bias, act)


def routed(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear(x, weight)`` takes the oneDNN route here."""
    return _route(x, weight) is not None


def _conv_linear(x, weight, bias=None, act=None):
    K = x.shape[-1]
    rows = x.reshape(-1, K)
    if rows.stride(-1) != 1 or rows.stride(0) != K:
        rows = rows.contiguous()
    # (M, K) rows seen as a (1, K, M, 1) channels-last image: the conv's GEMM reads them in place and
    # writes a channels-last (1, N, M, 1) output, i.e. (M, N) rows again
    image, w = rows.view(1, -1, 1, K).permute(0, 3, 1, 2), weight[:, :, None, None]
    if act is not None and _FUSED is not None:
        y = conv_act(image, w, bias, (0, 0), (1, 1), (1, 1), 1, act, image.dtype)
    else:
        y = activation(F.conv2d(image, w, bias), act)
    return y.permute(0, 2, 3, 1).reshape(*x.shape[:-1], weight.shape[0])


# the zoo's fp32 MLPs at batch 4 and 224^2 (stages 1-3 of a 4-stage model, ratio 4): rows, channels; each
# timed as the route runs it (fc1 with its GELU, fc2)
_MLPS = ((12544, 96), (3136, 192), (784, 384))


def _measure(dtype: torch.dtype) -> dict:
    if _off_reason() is not None:
        return {}
    g = torch.Generator().manual_seed(0)
    cases = [(torch.randn(m, c, generator=g), torch.randn(4 * c, c, generator=g) / c ** .5, torch.zeros(4 * c),
              torch.randn(c, 4 * c, generator=g) / (2 * c ** .5), torch.zeros(c)) for m, c in _MLPS]

    def mlps(lin):
        return lambda: [lin(lin(x, w1, b1, 'gelu'), w2, b2) for x, w1, b1, w2, b2 in cases]

    def f_linear(x, w, b, act=None):
        return activation(F.linear(x, w, b), act)
    if dtype == torch.float32:
        return _cpu.interleaved({'onednn': mlps(_conv_linear), 'blas': mlps(f_linear)})

    def autocast(fn):
        def run():
            with torch.autocast('cpu', dtype):
                return fn()
        return run
    # the route casts x and the weights per call, as autocast does: both sides pay the casts
    return _cpu.interleaved({'onednn': autocast(mlps(lambda x, w, b, act=None: _conv_linear(
        x.to(dtype), w.to(dtype), b.to(dtype), act))), 'autocast': autocast(mlps(f_linear))})


_cpu.register('linear', ('onednn', 'blas'), lambda: _measure(torch.float32),
              'fp32 CPU inference linears: a oneDNN 1x1 convolution (mixzoo.ops._onednn.linear) or F.linear (BLAS)')
_cpu.register('linear_bf16', ('onednn', 'autocast'), lambda: _measure(torch.bfloat16),
              'CPU inference linears under autocast to bfloat16: the oneDNN route in bf16 or autocast\'s F.linear')
