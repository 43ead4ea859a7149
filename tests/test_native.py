"""The compiled CPU kernels (ops/_native.py, ops/halo/halo_cpu.c): shapes beyond the registry grid
(model-sized heads, windows wider than one vector, strided NHWC views), the portable build, thread
counts, dispatch (picked for CPU fp32 inference only) and the reasons given when they cannot run."""
import pytest
import torch

from conftest import MISSING_DEP
from mixzoo.ops import _dispatch, _native, halo_attention
from mixzoo.ops.halo import cpu

_why = cpu.unavailable()
pytestmark = pytest.mark.skipif(_why is not None, reason=f'{MISSING_DEP}: {_why}')


def _inputs(B, h, D, H, W, stride, block, halo, rel=True, Dv=None, nhwc=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    Dv = Dv or D
    Hq, Wq = -(-H // stride), -(-W // stride)
    if nhwc:   # views of channels-last projections, k and v interleaved per head as the mixer passes them
        q = torch.randn(B, Hq, Wq, h, D, generator=g).permute(0, 3, 4, 1, 2)
        kv = torch.randn(B, H, W, h, D + Dv, generator=g).permute(0, 3, 4, 1, 2)
        k, v = kv[:, :, :D], kv[:, :, D:]
    else:
        q, k, v = (torch.randn(B, h, d, *hw, generator=g) for d, hw in ((D, (Hq, Wq)), (D, (H, W)), (Dv, (H, W))))
    win = block + 2 * halo
    rels = [0.3 * torch.randn(2 * win - 1, D, generator=g) for _ in range(2)] if rel else [None, None]
    return q, k, v, block, halo, *rels


def _check(args, border, **kw):
    ref = halo_attention(*[a.double() if torch.is_tensor(a) else a for a in args], border=border, backend='reference')
    out = cpu.halo_attention(*args, border=border, **kw)
    err = (out.double() - ref).abs().max().item()
    assert out.shape == ref.shape and err <= 2e-5 + 1e-4 * ref.abs().max().item(), err
    return out


@pytest.mark.parametrize('border', ['zero_pad', 'mask'])
@pytest.mark.parametrize('shape', [
    (2, 4, 32, 16, 16, 1, 8, 2, True, None, True),     # halonet26t stage 3 (batch 2, 4 heads)
    (1, 2, 16, 13, 11, 2, 8, 3, True, 24, True),       # strided queries, odd map, Dv != D, win 14
    (1, 2, 8, 21, 19, 1, 8, 5, True, 40, False),       # win 18: rows wider than a vector, scalar border sums
    (1, 2, 20, 9, 14, 1, 4, 2, False, None, False),    # no relative terms, head dim not a vector multiple
])
def test_halo_kernel_matches_reference(shape, border):
    *dims, rel, Dv, nhwc = shape
    _check(_inputs(*dims, rel=rel, Dv=Dv, nhwc=nhwc), border)


@pytest.mark.parametrize('backend', ['cpu', 'torch'])
def test_zero_border_keys_exact_at_large_logits(backend):
    """Every in-map key far below the zero border keys (q . k about -100) and relative logits spread over
    hundreds, an odd map, zero-padded borders: the out-of-map keys carry the softmax, and their closed-form
    term must stay exact when their rows / columns lie far below the in-map ones (one maximum shared by a
    window's rows underflowed such a group: the torch backend was off by 0.72 of the output scale here)."""
    for seed in range(3):
        q, k, v, block, halo, rh, rw = _inputs(1, 2, 16, 13, 11, 1, 8, 3, seed=seed)
        args = (q.abs() * 4 + 2, -(k.abs() * 4 + 2), v, block, halo, rh * 200, rw * 200)
        ref = halo_attention(*[a.double() if torch.is_tensor(a) else a for a in args], border='zero_pad',
                             backend='reference')
        with torch.no_grad():
            out = halo_attention(*args, border='zero_pad', backend=backend)
        # (fp32 at logits of this size: both backends 6.8e-5 of the scale, measured)
        assert (out.double() - ref).abs().max().item() <= 2e-4 * ref.abs().max().item(), seed


def test_portable_build_matches_reference():
    """The generic vector-extension code (what a CPU without AVX-512 runs), built without -march."""
    lib = cpu.library(portable=True)
    for border in ('zero_pad', 'mask'):
        _check(_inputs(1, 2, 32, 16, 13, 1, 8, 2, nhwc=True), border, lib=lib)
        _check(_inputs(1, 1, 8, 21, 19, 1, 8, 5, Dv=12), border, lib=lib)


def test_thread_count_does_not_change_results():
    args = _inputs(2, 2, 16, 12, 12, 1, 4, 2, nhwc=True)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu.halo_attention(*args)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, cpu.halo_attention(*args))


def test_dispatch_picks_kernel_for_cpu_fp32_inference_only():
    q, k, v, block, halo, rh, rw = _inputs(1, 2, 8, 8, 8, 1, 4, 1)
    call = _dispatch.Call.of(q, head_dim=8, window_area=36)
    assert _dispatch.select('halo', call).name == 'cpu'
    q.requires_grad_()
    assert _dispatch.select('halo', _dispatch.Call.of(q, head_dim=8, window_area=36)).name == 'torch'
    with torch.no_grad():
        assert _dispatch.select('halo', _dispatch.Call.of(q, head_dim=8, window_area=36)).name == 'cpu'
    half = _dispatch.Call.of(q.detach().bfloat16(), head_dim=8, window_area=36)
    assert _dispatch.select('halo', half).name == 'torch'
    with pytest.raises(_dispatch.BackendError, match='dtype bfloat16 not supported'):
        _dispatch.select('halo', half, backend='cpu')


def test_refuses_traced_calls_and_mixed_dtypes(monkeypatch):
    q, k, v, block, halo, rh, rw = _inputs(1, 1, 8, 8, 8, 1, 4, 1)
    with pytest.raises(TypeError, match='must all be float32 CPU'):
        cpu.halo_attention(q, k.double(), v, block, halo, rh, rw)
    monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
    assert 'torch.compile' in cpu.unavailable()
    assert _dispatch.select('halo', _dispatch.Call.of(q, head_dim=8, window_area=36)).name == 'torch'


def test_switch_and_build_failures_give_reasons(monkeypatch, tmp_path):
    monkeypatch.setenv('MIXZOO_NATIVE', '0')
    assert 'MIXZOO_NATIVE=0' in cpu.unavailable()
    q = _inputs(1, 1, 8, 8, 8, 1, 4, 1)[0]
    assert _dispatch.select('halo', _dispatch.Call.of(q, head_dim=8, window_area=36)).name == 'torch'
    monkeypatch.delenv('MIXZOO_NATIVE')
    monkeypatch.setenv('MIXZOO_CACHE', str(tmp_path))
    bad = tmp_path / 'bad_kernel.c'
    bad.write_text('int f(void) { return undeclared_name; }\n')
    with pytest.raises(_native.NativeUnavailable, match=r'compiling bad_kernel.c failed:(.|\n)*undeclared_name'):
        _native.load(bad)
    monkeypatch.setenv('CC', 'no-such-compiler-zz')
    with pytest.raises(_native.NativeUnavailable, match="no C compiler: 'no-such-compiler-zz' not found"):
        _native.load(tmp_path / 'other.c')
    monkeypatch.delenv('CC')
    good = tmp_path / 'good_kernel.c'
    good.write_text('int mz_answer(void) { return 42; }\n')
    assert _native.load(good).mz_answer() == 42
    assert list((tmp_path / 'native').glob('good_kernel-*.so'))   # cached under MIXZOO_CACHE


def test_editing_an_included_header_rebuilds(monkeypatch, tmp_path):
    """The cache key holds the local headers a kernel includes (ops/_vec.h): an edited header is a new build."""
    monkeypatch.setenv('MIXZOO_CACHE', str(tmp_path))
    (tmp_path / 'k.h').write_text('#define ANSWER 1\n')
    src = tmp_path / 'k.c'
    src.write_text('#include "k.h"\nint mz_answer(void) { return ANSWER; }\n')
    assert _native.load(src).mz_answer() == 1
    (tmp_path / 'k.h').write_text('#define ANSWER 2\n')
    monkeypatch.setattr(_native, '_CACHE', {})   # a new process
    assert _native.load(src).mz_answer() == 2
    assert len(list((tmp_path / 'native').glob('k-*.so'))) == 2


def test_jit_trace_records_the_traceable_path():
    """A ctypes call is invisible to torch.jit.trace (its output would be baked in as a constant)."""
    from mixzoo.mixers import HaloAttention
    m = HaloAttention(16, 16, num_heads=2, block_size=4, halo_size=1).eval()
    x1, x2 = torch.randn(1, 16, 8, 8), torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        traced = torch.jit.trace(m, (x1,), check_trace=False)
        assert torch.allclose(traced(x2), m(x2), atol=1e-6)
