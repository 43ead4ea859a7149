"""The ops' test cases, generated from the dispatcher's registry, without pytest: tests/test_ops.py and
tests/test_gradcheck.py run them under pytest, tools/gpu_check.py runs the same grid on a GPU.

Every registered op has a case generator in CASES; every backend of it is run over the op's grid (shapes, dtypes,
options) with NaN-poisoned outputs, forward and gradients compared with `reference` evaluated in float64, at the
tolerance the backend declares for the dtype (:func:`check`; :func:`check_inference` under no_grad).
Triton backends run under TRITON_INTERPRET=1 when there is no GPU (tiny shapes)."""
import itertools
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, NamedTuple, Sequence

import torch

from mixzoo import ops
from mixzoo.ops import _dispatch


@dataclass
class Case:
    id: str
    make: Callable[[torch.dtype, str], Dict]   # (dtype, device) -> kwargs for the op (tensors may require grad)
    tiny: bool = True                          # small enough for the Triton interpreter
    dtypes: tuple = (torch.float32, torch.float16, torch.bfloat16)
    gradcheck: bool = False                    # the case test_gradcheck uses (every option switched on)


# ---- window attention -----------------------------------------------------------------------

def _window_case(B, M, H, N, D, bias, mask, fused=False):
    def make(dtype, device):
        g = torch.Generator().manual_seed(B * 1000 + N * 10 + D)
        Bp = B * M
        if fused:   # q, k, v as strided views of one (B', N, 3, H, D) projection, as the mixers pass them
            qkv = torch.randn(Bp, N, 3, H, D, generator=g).to(device, dtype)
            q, k, v = (t.detach().requires_grad_() for t in qkv.permute(2, 0, 3, 1, 4))
        else:
            q, k, v = (torch.randn(Bp, H, N, D, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
        kw = dict(q=q, k=k, v=v)
        if bias:
            kw['bias'] = (torch.randn(H, N, N, generator=g)).to(device, dtype).requires_grad_()
        if mask:
            km = torch.rand(M, N, generator=g) > 0.4
            km[:, 0] = True     # as with padding, every window keeps a real key
            kw['key_mask'] = km.to(device)
        return kw
    tag = (f'B{B}xW{M}-h{H}-N{N}-d{D}' + ('-bias' if bias else '') + ('-mask' if mask else '')
           + ('-fused' if fused else ''))
    return Case(tag, make, tiny=N * B * M * H <= 400)


def window_cases() -> List[Case]:
    cases = [_window_case(2, 3, 2, 9, 8, b, m) for b, m in itertools.product((False, True), repeat=2)]
    cases[-1].gradcheck = True
    cases += [_window_case(1, 2, 1, 16, 16, True, True, fused=True),
              _window_case(2, 1, 3, 20, 32, True, False, fused=True),
              _window_case(1, 4, 2, 49, 32, True, True),          # MaxViT's 7x7 windows
              _window_case(1, 2, 1, 49, 64, True, False, fused=True)]
    return cases


# ---- halo attention --------------------------------------------------------------------------

def _halo_case(B, h, D, H, W, stride, block, halo, rel, border, Dv=None):
    Dv = Dv or D

    def make(dtype, device):
        g = torch.Generator().manual_seed(H * 100 + W + stride)
        Hq, Wq = -(-H // stride), -(-W // stride)
        kw = dict(q=torch.randn(B, h, D, Hq, Wq, generator=g).to(device, dtype).requires_grad_(),
                  k=torch.randn(B, h, D, H, W, generator=g).to(device, dtype).requires_grad_(),
                  v=torch.randn(B, h, Dv, H, W, generator=g).to(device, dtype).requires_grad_(),
                  block=block, halo=halo, border=border)
        if rel:
            win = block + 2 * halo
            kw['rel_h'] = (0.3 * torch.randn(2 * win - 1, D, generator=g)).to(device, dtype).requires_grad_()
            kw['rel_w'] = (0.3 * torch.randn(2 * win - 1, D, generator=g)).to(device, dtype).requires_grad_()
        return kw
    tag = f'B{B}h{h}d{D}-{H}x{W}-s{stride}-b{block}h{halo}' + ('-rel' if rel else '') + f'-{border}'
    return Case(tag, make, tiny=B * h * H * W <= 256)


def halo_cases() -> List[Case]:
    return [_halo_case(2, 2, 8, 8, 8, 1, 4, 1, True, 'zero_pad'),
            _halo_case(1, 2, 8, 8, 8, 1, 4, 1, True, 'mask'),
            _halo_case(1, 1, 16, 11, 7, 1, 4, 2, True, 'zero_pad', Dv=8),     # odd sizes, Dv != Dqk
            _halo_case(1, 2, 8, 10, 13, 1, 4, 2, False, 'mask'),
            _halo_case(1, 2, 8, 8, 12, 2, 4, 1, True, 'zero_pad'),             # strided queries
            _halo_case(1, 1, 8, 9, 7, 2, 4, 1, True, 'mask'),
            _halo_case(1, 1, 8, 3, 5, 1, 8, 3, True, 'mask'),                 # map smaller than a block
            Case(**{**_halo_case(1, 1, 4, 5, 6, 2, 4, 1, True, 'mask').__dict__, 'gradcheck': True})]


# ---- neighborhood attention ------------------------------------------------------------------

def _nbhd_case(B, h, D, H, W, kernel, dilation, border, rpb, extra, Dv=None, ww=False):
    Dv = Dv or D

    def make(dtype, device):
        g = torch.Generator().manual_seed(H * 100 + W + kernel * 7 + dilation)

        def t(*shape, s=1.0):
            return (s * torch.randn(*shape, generator=g)).to(device, dtype).requires_grad_()
        kw = dict(q=t(B, h, H, W, D), k=t(B, h, H, W, D), v=t(B, h, H, W, Dv), kernel_size=kernel,
                  dilation=dilation, border=border)
        if rpb:
            kw['rpb'] = t(h, 2 * kernel - 1, 2 * kernel - 1, s=0.5)
        if extra:
            kw.update(extra_k=t(B, h, extra, D), extra_v=t(B, h, extra, Dv), extra_bias=t(1, h, H, W, extra, s=0.5))
        if ww:
            kw['window_weights'] = t(B, h, H, W, kernel * kernel, s=0.3)
        return kw
    tag = (f'B{B}h{h}d{D}-{H}x{W}-k{kernel}d{dilation}-{border}' + ('-rpb' if rpb else '')
           + (f'-extra{extra}' if extra else '') + ('-ww' if ww else ''))
    return Case(tag, make, tiny=B * h * H * W <= 256)


def neighborhood_cases() -> List[Case]:
    cases = [_nbhd_case(2, 2, 8, 6, 7, 3, 1, border, True, 5) for border in ('mask', 'shift')]
    cases += [_nbhd_case(1, 2, 8, 9, 8, 5, 1, 'shift', True, 0),
              _nbhd_case(1, 1, 16, 7, 9, 7, 1, 'mask', False, 4, Dv=8),     # odd sizes, Dv != D
              _nbhd_case(1, 2, 8, 11, 10, 3, 2, 'mask', True, 0),           # dilation
              _nbhd_case(1, 2, 8, 11, 10, 3, 2, 'shift', True, 3),
              _nbhd_case(1, 1, 8, 4, 3, 7, 1, 'mask', True, 2),             # map smaller than the window
              _nbhd_case(1, 1, 8, 4, 3, 5, 1, 'shift', False, 0),
              _nbhd_case(1, 2, 24, 14, 14, 3, 1, 'mask', True, 49),         # TransNeXt-like: 3x3 + 7x7 pooled
              _nbhd_case(1, 2, 8, 6, 5, 3, 1, 'mask', True, 4, ww=True),    # + its learnable-token weights
              _nbhd_case(1, 1, 8, 5, 6, 5, 1, 'shift', False, 0, ww=True),
              _nbhd_case(1, 2, 4, 5, 6, 3, 1, 'mask', True, 3, ww=True)]   # every option, small: gradcheck
    cases[-1].gradcheck = True
    return cases


# ---- routed (bi-level routing) attention ------------------------------------------------------

def _routing_case(B, h, R, T, D, topk, Tk=None, Dv=None, fused=False):
    Tk, Dv = Tk or T, Dv or D

    def make(dtype, device):
        g = torch.Generator().manual_seed(R * 100 + T * 10 + topk + D)
        if fused:   # q, k, v as strided views of one (B, R, T, 3, heads, D) projection, as the mixer passes them
            qkv = torch.randn(B, R, T, 3, h, D, generator=g).to(device, dtype)
            q, k, v = (t.detach().requires_grad_() for t in qkv.permute(3, 0, 4, 1, 2, 5))
        else:
            q = torch.randn(B, h, R, T, D, generator=g).to(device, dtype).requires_grad_()
            k = torch.randn(B, h, R, Tk, D, generator=g).to(device, dtype).requires_grad_()
            v = torch.randn(B, h, R, Tk, Dv, generator=g).to(device, dtype).requires_grad_()
        idx = torch.rand(B, R, R, generator=g).argsort(-1)[..., :topk]     # distinct routed regions per row
        return dict(q=q, k=k, v=v, idx=idx.to(device), scale=(h * D) ** -0.5)
    tag = f'B{B}h{h}d{D}-R{R}-T{T}' + (f'-Tk{Tk}' if Tk != T else '') + f'-top{topk}' + (
        f'-dv{Dv}' if Dv != D else '') + ('-fused' if fused else '')
    return Case(tag, make, tiny=B * h * R * T <= 512)


def routing_cases() -> List[Case]:
    return [_routing_case(2, 2, 4, 9, 8, 2),
            _routing_case(1, 2, 4, 9, 8, 4),                  # topk = R: full attention
            _routing_case(1, 1, 6, 6, 16, 3, fused=True),     # 2x3 region grid of 2x3-token regions
            _routing_case(1, 2, 4, 10, 8, 2, Tk=4, Dv=16),    # pooled keys (Tk != T), Dv != D
            _routing_case(1, 2, 9, 16, 32, 3, fused=True),    # head dim 32
            _routing_case(1, 1, 4, 12, 64, 1),                # head dim 64, topk 1 (BiFormer stage 1)
            _routing_case(1, 1, 49, 4, 32, 4),                # 7x7 grid (BiFormer's n_win)
            Case(**{**_routing_case(1, 1, 4, 6, 4, 2, Tk=3).__dict__, 'gradcheck': True})]


# ---- linear attention ------------------------------------------------------------------------

def _linear_case(B, h, N, D, Dv, scale, temperature=True, fused=False, rows=False):
    """q, k = relu(scale * randn) (the caller's feature map): small scales leave every normaliser
    q_n . sum k under the clamp (100), large ones above it. ``rows``: each query row rescaled so its
    normaliser is 30 or 300, both regimes and none near the clamp's kink (finite differences stay valid)."""
    def make(dtype, device):
        g = torch.Generator().manual_seed(B * 1000 + N * 10 + D + int(10 * scale))
        q, k = ((scale * torch.randn(B, h, N, D, generator=g)).relu() for _ in range(2))
        v = torch.randn(B, h, N, Dv, generator=g)
        if rows:
            qz = (q @ k.sum(-2).unsqueeze(-1)).clamp_min(1e-6)
            q = q * torch.tensor([30., 300.]).repeat(N)[:N].view(1, 1, N, 1) / qz
        kw = dict(q=q, k=k, v=v)
        if temperature:
            kw['temperature'] = 0.5 + torch.rand(h, 1, 1, generator=g)
        kw = {n: t.to(device, dtype) for n, t in kw.items()}
        if fused:   # q, k, v as strided views of one (B, N, 3, heads, D) projection, as the mixer passes them
            qkv = torch.stack([kw['q'], kw['k'], kw['v']], 2).transpose(1, 3).contiguous()
            kw.update(zip('qkv', qkv.permute(2, 0, 3, 1, 4)))
        return {n: t.detach().requires_grad_() for n, t in kw.items()}
    tag = (f'B{B}h{h}-N{N}-d{D}' + (f'-dv{Dv}' if Dv != D else '') + f'-x{scale:g}' + ('-rows' if rows else '')
           + ('' if temperature else '-notemp') + ('-fused' if fused else ''))
    return Case(tag, make, tiny=B * h * N <= 400)


def linear_cases() -> List[Case]:
    return [_linear_case(2, 3, 20, 24, 24, 0.3),                        # every normaliser clamped
            _linear_case(2, 2, 33, 16, 16, 3.0),                        # none clamped; two token chunks
            _linear_case(1, 2, 37, 8, 24, 1.6),                         # odd N, Dv != D, a third of the rows clamped
            _linear_case(2, 3, 49, 32, 32, 0.7, fused=True),            # L2ViT's head dim, 7x7, qkv views, some clamped
            _linear_case(1, 1, 50, 64, 64, 2.0, temperature=False),     # head dim 64, no temperature
            _linear_case(1, 3, 196, 32, 32, 0.5),                       # L2ViT-T stage-3 map (14x14)
            Case(**{**_linear_case(1, 2, 20, 8, 8, 1.0, rows=True).__dict__, 'gradcheck': True})]


CASES: Dict[str, Callable[[], List[Case]]] = {'window': window_cases, 'halo': halo_cases,
                                              'neighborhood': neighborhood_cases, 'routing': routing_cases,
                                              'linear': linear_cases}
OPS = {'window': ops.window_attention, 'halo': ops.halo_attention, 'neighborhood': ops.neighborhood_attention,
       'routing': ops.routed_attention, 'linear': ops.linear_attention}
# how each op describes a call to the dispatcher (for the "can this backend run here" check)
CALLS = {'window': lambda kw: _dispatch.Call.of(kw['q'], head_dim=kw['q'].shape[-1], window_area=kw['q'].shape[-2]),
         'halo': lambda kw: _dispatch.Call.of(kw['q'], head_dim=kw['q'].shape[2],
                                              window_area=(kw['block'] + 2 * kw['halo']) ** 2),
         'neighborhood': lambda kw: _dispatch.Call.of(kw['q'], head_dim=kw['q'].shape[-1],
                                                      window_area=kw['kernel_size'] ** 2),
         'routing': lambda kw: _dispatch.Call.of(kw['q'], head_dim=kw['q'].shape[-1], tokens=kw['q'].shape[3],
                                                 keys=kw['idx'].shape[-1] * kw['k'].shape[3],
                                                 topk=kw['idx'].shape[-1]),
         'linear': lambda kw: _dispatch.Call.of(kw['q'], head_dim=kw['q'].shape[-1], tokens=kw['q'].shape[-2],
                                                value_dim=kw['v'].shape[-1])}


# ---- the grid and the checks ------------------------------------------------------------------------------------

class Param(NamedTuple):
    op: str
    backend: str
    case: Case
    dtype: torch.dtype
    device: str
    slow: bool            # an interpreted Triton run of a case that is not tiny

    @property
    def id(self) -> str:
        return f'{self.op}-{self.backend}-{self.case.id}-{str(self.dtype)[6:]}-{self.device}'


def grid(devices: Sequence[str], ops_: Sequence[str] = ()) -> Iterator[Param]:
    """Every (op, backend, case, dtype, device) to check: the case's dtypes the backend declares (the others:
    test_dispatch), on the devices it declares. Interpreted Triton (CPU, 1-12 s a case) runs the half dtypes on the
    op's first case and its gradcheck case only (every option on); every case in float32, the large ones slow."""
    for op in _dispatch.ops():
        if op not in CASES or (ops_ and op not in ops_):
            continue
        for b in _dispatch.backends(op):
            for i, case in enumerate(CASES[op]()):
                for dtype in (d for d in case.dtypes if d in b.dtypes):
                    for dev in (d for d in devices if d in b.devices):
                        interpreted = b.name == 'triton' and dev == 'cpu'
                        if interpreted and dtype != torch.float32 and not (case.tiny and (i == 0 or case.gradcheck)):
                            continue
                        yield Param(op, b.name, case, dtype, dev, interpreted and not case.tiny)


class Unrunnable(Exception):
    """The backend cannot run the case here (``missing``: for a missing dependency, which CI must have)."""

    def __init__(self, reason: str, missing: bool = False):
        super().__init__(reason)
        self.missing = missing


def backend(op: str, name: str) -> _dispatch.Backend:
    return {b.name: b for b in _dispatch.backends(op)}[name]


def runnable(op: str, name: str, kwargs: Dict) -> _dispatch.Backend:
    """The backend, or :class:`Unrunnable` with the reasons it cannot run this call here."""
    b = backend(op, name)
    missing = b.available()      # triton not importable, no C compiler
    if missing:
        raise Unrunnable(missing, missing=True)
    why = b.reasons(CALLS[op](kwargs), forced=True)
    if why:
        raise Unrunnable('; '.join(why))
    return b


def _close(got, want, atol, rtol, what, name, dtype):
    err = (got.double() - want).abs().max().item()
    lim = atol + rtol * want.abs().max().item()
    assert err <= lim, f'{what}: max abs err {err:.3g} > {lim:.3g} ({name}, {dtype})'


def check(op: str, name: str, case: Case, dtype: torch.dtype, device: str) -> None:
    """Forward and gradients of backend ``name`` against `reference` in float64 (AssertionError if not within the
    backend's tolerance; :class:`Unrunnable` if it cannot run here). A forward-only backend must refuse autograd."""
    kw = case.make(dtype, device)
    if not backend(op, name).autograd:
        try:
            OPS[op](**kw, backend=name)
        except _dispatch.BackendError as e:
            assert 'no backward' in str(e), e
            return
        raise AssertionError(f'{name}: a forward-only backend accepted a call that needs autograd')
    b = runnable(op, name, kw)
    atol, rtol = b.tolerance(dtype)
    grads_of = [k for k, v in kw.items() if torch.is_tensor(v) and v.requires_grad]
    ref_kw = {k: (v.detach().double().requires_grad_(v.requires_grad) if torch.is_tensor(v) and v.is_floating_point()
                  else v) for k, v in kw.items()}
    ref = OPS[op](**ref_kw, backend='reference')
    with _dispatch.poisoned_outputs():
        out = OPS[op](**kw, backend=name)
    assert out.shape == ref.shape and out.dtype == dtype
    assert torch.isfinite(out).all(), 'output has NaN/inf (an element the kernel never wrote?)'
    _close(out, ref.detach(), atol, rtol, 'forward', name, dtype)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(device)
    with _dispatch.poisoned_outputs():
        (out.float() * g).sum().backward()
    (ref * g.double()).sum().backward()
    for arg in grads_of:
        got = kw[arg].grad
        assert got is not None and torch.isfinite(got).all(), f'grad of {arg} missing or non-finite'
        _close(got, ref_kw[arg].grad, atol, rtol, f'grad {arg}', name, dtype)


def check_inference(op: str, name: str, case: Case, dtype: torch.dtype, device: str) -> None:
    """Without autograd a backend may take another path (zero-copy views, fused pieces that have no gradient):
    the same forward check, under no_grad."""
    kw = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in case.make(dtype, device).items()}
    b = runnable(op, name, kw)
    atol, rtol = b.tolerance(dtype)
    with torch.no_grad():
        ref = OPS[op](**{k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
                         for k, v in kw.items()}, backend='reference')
        with _dispatch.poisoned_outputs():
            out = OPS[op](**kw, backend=name)
    assert out.shape == ref.shape and out.dtype == dtype and torch.isfinite(out).all()
    _close(out, ref, atol, rtol, 'forward (no_grad)', name, dtype)
