"""CPU-specific choices (ops._cpu): measured per CPU, cached per CPU signature, forced by MIXZOO_CPU, followed by
the oneDNN linear route and the halo op's dispatch, shown by ``python -m mixzoo.ops info``."""
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import MISSING_DEP
from mixzoo.ops import _attention, _cpu, _dispatch, _onednn
from mixzoo.ops import halo as halo_op
from mixzoo.ops.__main__ import main


def test_a_near_tie_keeps_the_first_option(fresh, monkeypatch):
    monkeypatch.setitem(_cpu._CHOICES, 'tie',
                        _cpu.Choice('tie', ('a', 'b'), lambda: {'a': 1.03e-3, 'b': 1e-3}, 'a tie'))
    assert _cpu.choice('tie') == 'a'


def test_measured_once_then_cached_per_signature(fresh, monkeypatch):
    runs = []
    monkeypatch.setitem(_cpu._CHOICES, 'toy', _cpu.Choice('toy', ('a', 'b'), lambda: runs.append(1) or
                                                         {'a': 2e-3, 'b': 1e-3}, 'a toy choice'))
    assert _cpu.choice('toy') == 'b' and _cpu.choice('toy') == 'b' and len(runs) == 1
    entry = json.loads(fresh.read_text())[_cpu.signature()]['toy']
    assert entry['option'] == 'b' and entry['ms'] == {'a': 2.0, 'b': 1.0} and entry['source'].startswith('measured')
    monkeypatch.setattr(_cpu, '_DECIDED', {})                     # a new process: read from the file
    d = _cpu.decision('toy')
    assert d['option'] == 'b' and 'cached in' in d['source'] and len(runs) == 1
    _cpu.decision('toy', retune=True)
    assert len(runs) == 2
    monkeypatch.setattr(_cpu, '_SIGNATURES', {torch.get_num_threads(): 'another CPU'})   # another CPU measures anew
    assert _cpu.choice('toy') == 'b' and len(runs) == 3
    assert len(json.loads(fresh.read_text())) == 2                 # one entry per CPU signature


def test_measured_outside_the_callers_autocast(fresh, monkeypatch):
    seen = []
    monkeypatch.setitem(_cpu._CHOICES, 'toy', _cpu.Choice('toy', ('a',), lambda: seen.append(
        (torch.is_autocast_enabled('cpu'), torch.is_inference_mode_enabled())) or {'a': 1e-3}, 'a toy choice'))
    with torch.autocast('cpu', torch.bfloat16):
        _cpu.choice('toy')
    assert seen == [(False, True)]


def test_forced_and_bad_values(fresh, monkeypatch):
    monkeypatch.setenv('MIXZOO_CPU', 'linear:blas')
    assert _cpu.decision('linear') == {'option': 'blas', 'source': 'forced by MIXZOO_CPU', 'ms': {}}
    assert not fresh.exists()                                     # nothing measured, nothing written
    monkeypatch.setattr(_cpu, '_DECIDED', {})
    monkeypatch.setenv('MIXZOO_CPU', 'linear:mkl')
    with pytest.raises(ValueError, match=r"'linear:mkl' is not <choice>:<option> with one of: "
                                         r"attention: sdpa\|matmul\|c;.* halo: c\|torch; linear: onednn\|blas; "
                                         r"linear_bf16: onednn\|autocast"):
        _cpu.choice('linear')


def test_every_choice_measures_its_options_here(fresh):
    def chosen(d, first):
        best = min(d['ms'], key=d['ms'].get)
        return best if d['ms'][best] < 0.95 * d['ms'][first] else first
    d = _cpu.decision('linear')
    assert set(d['ms']) == ({'onednn', 'blas'} if torch.backends.mkldnn.is_available() else set())
    assert all(v > 0 for v in d['ms'].values()) and (not d['ms'] or d['option'] == chosen(d, 'onednn'))
    d = _cpu.decision('linear_bf16')
    assert set(d['ms']) == ({'onednn', 'autocast'} if torch.backends.mkldnn.is_available() else set())
    d = _cpu.decision('halo')
    assert set(d['ms']) == ({'c', 'torch'} if halo_op.cpu.unavailable() is None else {'torch'})
    assert d['option'] == chosen(d, 'c' if 'c' in d['ms'] else 'torch')
    d = _cpu.decision('attention')
    c_runs = _attention.unavailable() is None
    assert set(d['ms']) == {'sdpa', 'matmul'} | ({'c'} if c_runs else set()) and d['option'] == chosen(d, 'sdpa')
    from mixzoo.ops import dwconv, gelu
    for name, op in (('gelu_tanh', gelu), ('gelu_tanh_bf16', gelu), ('dwconv_grad', dwconv),
                     ('dwconv_grad_nhwc', dwconv)):
        d = _cpu.decision(name)
        assert set(d['ms']) == ({'c', 'torch'} if op.unavailable() is None else {'torch'})
        assert d['option'] == chosen(d, 'c' if 'c' in d['ms'] else 'torch')


@pytest.mark.parametrize('option', ['onednn', 'blas'])
def test_linear_route_follows_the_choice(fresh, monkeypatch, option):
    monkeypatch.setenv('MIXZOO_CPU', f'linear:{option}')
    calls = []
    real = F.conv2d
    monkeypatch.setattr(_onednn.F, 'conv2d', lambda *a, **k: calls.append(1) or real(*a, **k))
    x, w = torch.randn(700, 64), torch.randn(32, 64)
    with torch.no_grad():
        torch.testing.assert_close(_onednn.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    used = bool(calls)
    assert used == (option == 'onednn' and torch.backends.mkldnn.is_available())
    assert _onednn.state()[0] == used


@pytest.mark.parametrize('option', ['onednn', 'autocast'])
def test_bf16_autocast_linear_route_follows_the_choice(fresh, monkeypatch, option):
    monkeypatch.setenv('MIXZOO_CPU', f'linear_bf16:{option}')
    calls = []
    fused = _onednn._FUSED
    monkeypatch.setattr(_onednn, '_FUSED', lambda *a: calls.append(a[0].dtype) or fused(*a))
    x, w, b = torch.randn(700, 64), torch.randn(128, 64) / 8, torch.randn(128)
    with torch.no_grad(), torch.autocast('cpu', torch.bfloat16):
        y, ref = _onednn.linear(x, w, b, 'gelu'), F.gelu(F.linear(x, w, b))
        x.requires_grad_()
        assert _onednn.linear(x, w, b).dtype == torch.bfloat16       # no_grad: still the route
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), rtol=1.6e-2, atol=5e-2)
    assert calls == ([torch.bfloat16] if option == 'onednn' and fused is not None and
                     torch.backends.mkldnn.is_available() else [])
    calls.clear()
    with torch.autocast('cpu', torch.bfloat16):                       # autograd: autocast's F.linear
        assert _onednn.linear(x, w, b, 'gelu').dtype == torch.bfloat16 and not calls
    with torch.no_grad(), torch.autocast('cpu', torch.float16):       # fp16 autocast: F.linear
        _onednn.linear(x, w, b, 'gelu')
    assert not calls


@pytest.mark.parametrize('option', ['c', 'torch'])
def test_halo_dispatch_follows_the_choice(fresh, monkeypatch, option):
    if option == 'c' and halo_op.cpu.unavailable():
        pytest.skip(f'the halo C kernel cannot be built here: {halo_op.cpu.unavailable()}')
    monkeypatch.setenv('MIXZOO_CPU', f'halo:{option}')
    call = _dispatch.Call('cpu', torch.float32, 32, False, (('window_area', 144),))
    assert _dispatch.select('halo', call).name == {'c': 'cpu', 'torch': 'torch'}[option]
    if option == 'torch':
        assert _dispatch.select('halo', call, 'cpu').name == 'cpu'           # forcing still runs the C kernel
        assert 'measured slower than the torch backend on this CPU' in ' '.join(
            _dispatch.backends('halo')[1].reasons(call))


def test_info_shows_every_choice(fresh, capsys, monkeypatch):
    monkeypatch.setenv('MIXZOO_CPU', 'halo:torch')
    main(['info'])
    out = capsys.readouterr().out
    assert f'CPU choices for {_cpu.signature()}' in out
    assert '  halo        -> torch    forced by MIXZOO_CPU' in out
    line = next(ln for ln in out.splitlines() if ln.startswith('  linear      -> '))
    d = _cpu.decision('linear')
    assert d['option'] in line and d['source'] in line and all(f'{k} {v} ms' in line for k, v in d['ms'].items())


@pytest.mark.parametrize('mask', ['none', 'per-window', 'broadcast'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_chunked_attention_equals_sdpa(monkeypatch, mask, dtype):
    monkeypatch.setattr(_attention, '_LOGITS_BYTES', 3 * 4 * 49 * 49 * 4)      # chunks of 4 of the 10 windows
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(10, 49, 3, 3, 32, generator=g).permute(2, 0, 3, 1, 4).to(dtype)   # the mixers' views
    m = {'none': None, 'broadcast': torch.randn(1, 3, 49, 49, generator=g),
         'per-window': torch.randn(3, 49, 49, generator=g).expand(10, 3, 49, 49).clone()}[mask]
    m = None if m is None else m.to(dtype)
    ref = F.scaled_dot_product_attention(*qkv.float(), attn_mask=None if m is None else m.float(), scale=0.3)
    got = _attention.chunked(*qkv, m, scale=0.3)
    assert got.dtype == dtype and got.shape == ref.shape
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=5e-2)
    torch.testing.assert_close(got.float(), ref, **tol)


@pytest.mark.skipif(_attention.unavailable() is not None, reason=f'{MISSING_DEP}: {_attention.unavailable()}')
@pytest.mark.parametrize('mask', ['none', 'per-window', 'broadcast'])
@pytest.mark.parametrize('shape', [(10, 3, 49, 49, 32, 32), (2, 2, 70, 37, 24, 40), (1, 1, 5, 300, 8, 8)])
def test_fused_attention_equals_sdpa(mask, shape):
    """The C kernel on the mixers' strided views: several row blocks (70 > 32 queries), keys not a vector multiple,
    Dv != D, a long key row; masks per window, broadcast, or none; against float64 SDPA."""
    B, H, T, L, D, Dv = shape
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, H, D, generator=g).transpose(1, 2)
    kv = torch.randn(B, L, H, D + Dv, generator=g).transpose(1, 2)
    k, v = kv[..., :D], kv[..., D:]
    m = {'none': None, 'broadcast': torch.randn(1, H, T, L, generator=g),
         'per-window': torch.randn(H, T, L, generator=g).expand(B, H, T, L).clone()}[mask]
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                         attn_mask=None if m is None else m.double(), scale=0.3)
    got = _attention.fused(q, k, v, m, scale=0.3)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert (got.double() - ref).abs().max().item() <= 2e-6 * ref.abs().max().item()


@pytest.mark.parametrize('option', ['sdpa', 'matmul', 'c'])
def test_attention_route_follows_the_choice(fresh, monkeypatch, option):
    """fp32 and bf16 inference take the chosen route ('c' is fp32's: bf16 then takes the matmuls); a boolean mask
    and autograd take SDPA."""
    monkeypatch.setenv('MIXZOO_CPU', f'attention:{option},attention_bf16:{"matmul" if option == "c" else option}')
    calls = []
    for name in ('chunked', 'fused'):
        real = getattr(_attention, name)
        monkeypatch.setattr(_attention, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    q, k, v = (torch.randn(4, 2, 49, 16) for _ in range(3))
    with torch.no_grad():
        for dt in (torch.float32, torch.bfloat16):
            torch.testing.assert_close(_attention.attention(q.to(dt), k.to(dt), v.to(dt)).float(),
                                       F.scaled_dot_product_attention(q, k, v), rtol=2e-2, atol=2e-2)
        _attention.attention(q, k, v, torch.ones(49, 49, dtype=torch.bool))    # a boolean mask: SDPA
    c_runs = _attention.unavailable() is None
    assert calls == {'sdpa': [], 'matmul': ['chunked', 'chunked'],
                     'c': ['fused' if c_runs else 'chunked', 'chunked']}[option]
    calls.clear()
    _attention.attention(q.requires_grad_(), k, v).sum().backward()            # autograd: SDPA
    assert not calls and q.grad is not None


def test_routing_inference_takes_the_matmul_kernel_where_chosen(fresh, monkeypatch):
    from mixzoo.ops import routed_attention
    from mixzoo.ops.routing import eager
    monkeypatch.setenv('MIXZOO_CPU', 'attention:matmul')
    used = []
    for name in ('_flash_fwd', '_matmul_fwd'):
        real = getattr(eager, name)
        monkeypatch.setattr(eager, name, lambda *a, real=real, name=name: used.append(name) or real(*a))
    q, k, v = (torch.randn(1, 2, 4, 16, 8) for _ in range(3))
    idx = torch.tensor([[[0, 1], [1, 2], [2, 3], [3, 0]]])
    with torch.no_grad():
        ref = routed_attention(q, k, v, idx, backend='reference')
        torch.testing.assert_close(routed_attention(q, k, v, idx, backend='torch'), ref, rtol=1e-5, atol=1e-5)
    assert used and set(used) == {'_matmul_fwd'}
    used.clear()
    routed_attention(q.requires_grad_(), k, v, idx, backend='torch').sum().backward()   # training: SDPA's flash
    assert set(used) == ({'_flash_fwd'} if eager._flash_ok(q, k, v) else {'_matmul_fwd'})
