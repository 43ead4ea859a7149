"""The neighborhood attention C kernel (ops/neighborhood/neighborhood_cpu.c, backend 'cpu'): NAT / DiNAT shapes
beyond the registry grid (qkv views, dilations, maps smaller than the window, head dims off the vector width),
the portable build, thread counts, and when the dispatcher takes it."""
import pytest
import torch

from mixzoo.ops import _cpu, _dispatch, neighborhood_attention
from mixzoo.ops.neighborhood import cpu

pytestmark = pytest.mark.skipif(cpu.unavailable() is not None, reason=f'C kernel unavailable: {cpu.unavailable()}')


def _inputs(B, h, H, W, D, kernel, dilation, Dv=None, qkv_view=True, rpb=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    Dv = Dv or D
    if qkv_view:    # as NAT's mixer passes them: views of one (B, H, W, 3, heads, D) projection
        q, k, v = torch.randn(B, H, W, 3, h, D, generator=g).permute(3, 0, 4, 1, 2, 5)
        v = v[..., :Dv]
    else:
        q, k, v = torch.randn(B, h, H, W, D, generator=g), torch.randn(B, h, H, W, D, generator=g), \
            torch.randn(B, h, H, W, Dv, generator=g)
    table = torch.randn(h, 2 * kernel - 1, 2 * kernel - 1, generator=g) if rpb else None
    return q, k, v, kernel, dilation, table


def _check(args, border, **kw):
    q, k, v, kernel, dilation, rpb = args
    ref = neighborhood_attention(q.double(), k.double(), v.double(), kernel, dilation,
                                 None if rpb is None else rpb.double(), border=border, backend='reference')
    out = cpu.neighborhood_attention(q, k, v, kernel, dilation, rpb, border=border, **kw)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert (out.double() - ref).abs().max().item() <= 2e-6 * ref.abs().max().item()
    return out


@pytest.mark.parametrize('border', ['shift', 'mask'])
@pytest.mark.parametrize('shape', [
    (2, 2, 14, 15, 32, 7, 1, None, True, True),      # NAT's head dim, qkv views
    (1, 2, 21, 17, 32, 7, 3, None, True, True),      # DiNAT-like dilation
    (1, 3, 9, 8, 20, 5, 2, 12, False, True),         # head dims off the vector width, Dv != D
    (1, 2, 4, 6, 16, 7, 1, None, True, False),       # map smaller than the window, no bias
    (1, 1, 5, 13, 8, 3, 4, None, False, True),       # dilation sub-grids shorter than the kernel
])
def test_kernel_matches_reference(shape, border):
    *dims, Dv, view, rpb = shape
    _check(_inputs(*dims, Dv=Dv, qkv_view=view, rpb=rpb), border)


def test_head_dim_strided_inputs_and_nhwc_output():
    q, k, v, kernel, dilation, rpb = _inputs(1, 2, 8, 9, 16, 5, 1, qkv_view=False)
    out = _check((q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v, kernel, dilation, rpb), 'shift')
    assert out.permute(0, 2, 3, 1, 4).is_contiguous()      # heads merge back into channels as a view


def test_portable_build_matches_reference():
    lib = cpu.library(portable=True)
    for border in ('shift', 'mask'):
        _check(_inputs(1, 2, 11, 10, 32, 7, 1), border, lib=lib)
        _check(_inputs(1, 1, 9, 12, 20, 3, 2, Dv=12, qkv_view=False), border, lib=lib)


def test_thread_count_does_not_change_results():
    args = _inputs(2, 2, 12, 12, 32, 7, 1)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu.neighborhood_attention(*args, border='shift')
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, cpu.neighborhood_attention(*args, border='shift'))


def _call(q, **kw):
    return _dispatch.Call.of(q, head_dim=q.shape[-1], window_area=49, **kw)


def _force(monkeypatch, option):
    monkeypatch.setenv('MIXZOO_CPU', f'neighborhood:{option}')
    monkeypatch.setattr(_cpu, '_DECIDED', {})     # (decisions are memoised per process)


def test_dispatch_takes_it_for_fp32_inference_without_extra_keys(monkeypatch, tmp_path):
    monkeypatch.setenv('MIXZOO_CACHE', str(tmp_path))
    _force(monkeypatch, 'c')
    q = _inputs(1, 2, 8, 8, 32, 7, 1)[0]
    assert _dispatch.select('neighborhood', _call(q, extra_keys=0, window_weights=0)).name == 'cpu'
    assert _dispatch.select('neighborhood', _call(q, extra_keys=1, window_weights=0)).name == 'torch'
    assert _dispatch.select('neighborhood', _call(q.bfloat16(), extra_keys=0, window_weights=0)).name == 'torch'
    assert _dispatch.select('neighborhood', _call(q.detach().requires_grad_())).name == 'torch'
    with pytest.raises(_dispatch.BackendError, match='extra_keys not supported'):
        _dispatch.select('neighborhood', _call(q, extra_keys=1, window_weights=0), backend='cpu')
    _force(monkeypatch, 'torch')
    assert _dispatch.select('neighborhood', _call(q, extra_keys=0, window_weights=0)).name == 'torch'


def test_refuses_what_it_does_not_compute():
    q, k, v, kernel, dilation, rpb = _inputs(1, 1, 6, 6, 8, 3, 1)
    with pytest.raises(TypeError, match='must be float32 CPU'):
        cpu.neighborhood_attention(q, k.double(), v, kernel, dilation, rpb)
    with pytest.raises(ValueError, match="extra keys and window weights are not supported"):
        cpu.neighborhood_attention(q, k, v, kernel, dilation, rpb, extra_k=k[:, :, 0], extra_v=v[:, :, 0])
