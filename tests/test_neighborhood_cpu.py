"""The neighborhood attention C kernel (ops/neighborhood/neighborhood_cpu.c, backend 'cpu'): NAT / DiNAT / TransNeXt
calls beyond the registry grid (qkv views, dilations, maps smaller than the window, head dims off the vector width,
extra keys with a GridBias or a tensor bias, window weights, rows of several query blocks), the portable build,
thread counts, and when the dispatcher takes it."""
import pytest
import torch

from mixzoo.ops import _cpu, _dispatch, neighborhood_attention
from mixzoo.ops.neighborhood import GridBias, cpu

pytestmark = pytest.mark.skipif(cpu.unavailable() is not None, reason=f'C kernel unavailable: {cpu.unavailable()}')


def _inputs(B, h, H, W, D, kernel, dilation, Dv=None, qkv_view=True, rpb=True, extra=0, grid=None, ww=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    Dv = Dv or D
    if qkv_view:    # as the mixers pass them: views of one (B, H, W, 3, heads, D) projection
        q, k, v = torch.randn(B, H, W, 3, h, D, generator=g).permute(3, 0, 4, 1, 2, 5)
        v = v[..., :Dv]
    else:
        q, k, v = torch.randn(B, h, H, W, D, generator=g), torch.randn(B, h, H, W, D, generator=g), \
            torch.randn(B, h, H, W, Dv, generator=g)
    kw = dict(rpb=torch.randn(h, 2 * kernel - 1, 2 * kernel - 1, generator=g) if rpb else None)
    if extra:
        kw.update(extra_k=torch.randn(B, h, extra, D, generator=g), extra_v=torch.randn(B, h, extra, Dv, generator=g))
        if grid:    # TransNeXt's pooled-key bias by factors: (1 | heads, Uh, Uw) table, (H, ph) / (W, pw) indices
            (ph, pw), heads = grid
            table = torch.randn(heads, 5, 6, generator=g)
            kw['extra_bias'] = GridBias(table, torch.randint(0, 5, (H, ph), generator=g),
                                        torch.randint(0, 6, (W, pw), generator=g))
        else:
            kw['extra_bias'] = torch.randn(1, h, H, W, extra, generator=g)
    if ww:
        kw['window_weights'] = 0.3 * torch.randn(B, h, H, W, kernel * kernel, generator=g)
    return (q, k, v, kernel, dilation), kw


def _double(t):
    if isinstance(t, GridBias):
        return GridBias(t.table.double(), t.index_h, t.index_w)
    return t.double() if torch.is_tensor(t) else t


def _check(inputs, border, **kw):
    (q, k, v, kernel, dilation), options = inputs
    ref = neighborhood_attention(q.double(), k.double(), v.double(), kernel, dilation, border=border,
                                 backend='reference', **{n: _double(t) for n, t in options.items()})
    out = cpu.neighborhood_attention(q, k, v, kernel, dilation, border=border, **options, **kw)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert (out.double() - ref).abs().max().item() <= 2e-6 * ref.abs().max().item()
    return out


@pytest.mark.parametrize('border', ['shift', 'mask'])
@pytest.mark.parametrize('shape,options', [
    ((2, 2, 14, 15, 32, 7, 1), {}),                              # NAT's head dim, qkv views
    ((1, 2, 21, 17, 32, 7, 3), {}),                              # DiNAT-like dilation
    ((1, 3, 9, 8, 20, 5, 2), dict(Dv=12, qkv_view=False)),       # head dims off the vector width, Dv != D
    ((1, 2, 4, 6, 16, 7, 1), dict(rpb=False)),                   # map smaller than the window, no bias
    ((1, 1, 5, 13, 8, 3, 4), dict(qkv_view=False)),              # dilation sub-grids shorter than the kernel
    ((2, 3, 14, 14, 24, 3, 1), dict(extra=49, grid=((7, 7), 3), ww=True)),     # TransNeXt-T stage-3-like
    ((1, 2, 9, 37, 24, 3, 1), dict(extra=30, grid=((5, 6), 1), ww=True)),     # one-head table; 2 query blocks a row
    ((1, 2, 6, 7, 8, 3, 2), dict(Dv=12, extra=5, qkv_view=False)),            # a tensor bias, dilation, Dv != D
])
def test_kernel_matches_reference(shape, options, border):
    _check(_inputs(*shape, **options), border)


def test_head_dim_strided_inputs_and_nhwc_output():
    (q, k, v, kernel, dilation), options = _inputs(1, 2, 8, 9, 16, 5, 1, qkv_view=False)
    out = _check(((q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v, kernel, dilation), options), 'shift')
    assert out.permute(0, 2, 3, 1, 4).is_contiguous()      # heads merge back into channels as a view


def test_portable_build_matches_reference():
    lib = cpu.library(portable=True)
    for border in ('shift', 'mask'):
        _check(_inputs(1, 2, 11, 10, 32, 7, 1), border, lib=lib)
        _check(_inputs(1, 1, 9, 12, 20, 3, 2, Dv=12, qkv_view=False), border, lib=lib)
        _check(_inputs(1, 2, 7, 9, 24, 3, 1, extra=12, grid=((3, 4), 2), ww=True), border, lib=lib)


def test_thread_count_does_not_change_results():
    (q, k, v, kernel, dilation), options = _inputs(2, 2, 12, 12, 24, 3, 1, extra=16, grid=((4, 4), 2), ww=True)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu.neighborhood_attention(q, k, v, kernel, dilation, border='mask', **options)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, cpu.neighborhood_attention(q, k, v, kernel, dilation, border='mask', **options))


def _force(monkeypatch, option):
    monkeypatch.setenv('MIXZOO_CPU', f'neighborhood:{option},neighborhood_bf16:{option}')
    monkeypatch.setattr(_cpu, '_DECIDED', {})     # (decisions are memoised per process)


def test_dispatch_takes_it_for_inference_where_measured_faster(fresh, monkeypatch):
    _force(monkeypatch, 'c')
    q = _inputs(1, 2, 8, 8, 32, 7, 1)[0][0]

    def call(t):
        return _dispatch.Call.of(t, head_dim=32, window_area=49)
    assert _dispatch.select('neighborhood', call(q)).name == 'cpu'
    assert _dispatch.select('neighborhood', call(q.bfloat16())).name == 'cpu'
    assert _dispatch.select('neighborhood', call(q.half())).name == 'torch'
    assert _dispatch.select('neighborhood', call(q.detach().requires_grad_())).name == 'torch'
    with pytest.raises(_dispatch.BackendError, match='no backward'):
        _dispatch.select('neighborhood', call(q.detach().requires_grad_()), backend='cpu')
    _force(monkeypatch, 'torch')
    assert _dispatch.select('neighborhood', call(q)).name == 'torch'
    assert _dispatch.select('neighborhood', call(q.bfloat16())).name == 'torch'
    assert _dispatch.select('neighborhood', call(q), backend='cpu').name == 'cpu'     # forcing still runs it


def test_bfloat16_is_computed_in_float32_and_rounded_once():
    (q, k, v, kernel, dilation), options = _inputs(1, 2, 9, 10, 24, 3, 1, extra=12, grid=((3, 4), 2), ww=True)
    bf = [t.bfloat16() for t in (q, k, v)]
    half_options = {n: t.to(torch.bfloat16) for n, t in options.items()}
    out = cpu.neighborhood_attention(*bf, kernel, dilation, border='mask', **half_options)
    f32 = cpu.neighborhood_attention(*(t.float() for t in bf), kernel, dilation, border='mask',
                                     **{n: t.to(torch.float32) for n, t in half_options.items()})
    assert out.dtype == torch.bfloat16 and torch.equal(out, f32.bfloat16())


def test_refuses_other_and_mixed_dtypes():
    (q, k, v, kernel, dilation), options = _inputs(1, 1, 6, 6, 8, 3, 1)
    for other in (k.double(), k.bfloat16()):
        with pytest.raises(TypeError, match=r'must be float32 \(or every one bfloat16\)'):
            cpu.neighborhood_attention(q, other, v, kernel, dilation, **options)


def test_a_grid_bias_outside_its_table_is_an_error():
    (q, k, v, kernel, dilation), options = _inputs(1, 2, 6, 7, 8, 3, 1, extra=12, grid=((3, 4), 2))
    bad = GridBias(options['extra_bias'].table, options['extra_bias'].index_h + 5, options['extra_bias'].index_w)
    with pytest.raises(ValueError, match='GridBias over 12 extra keys needs'):
        cpu.neighborhood_attention(q, k, v, kernel, dilation, border='mask', **dict(options, extra_bias=bad))
