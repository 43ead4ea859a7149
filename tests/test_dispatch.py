"""The dispatcher: capability reasons, priority, forcing by argument and environment."""
import pytest
import torch

from mixzoo import ops
from mixzoo.ops import _dispatch
from mixzoo.ops._dispatch import Backend, BackendError, Call


@pytest.fixture
def toy_op():
    name = 'toy_test_op'
    _dispatch.register(Backend(name, 'fast', lambda: 'fast', devices=('cuda',), dtypes=(torch.float16,),
                               head_dims=(16, 128), limits={'window_area': 64}, autograd=False))
    _dispatch.register(Backend(name, 'plain', lambda: 'plain'))
    yield name
    _dispatch._REGISTRY.pop(name)
    _dispatch._PRIORITY.pop(name)


def test_priority_and_fallback(toy_op):
    assert _dispatch.select(toy_op, Call('cuda', torch.float16, 32)).name == 'fast'
    assert _dispatch.select(toy_op, Call('cpu', torch.float16, 32)).name == 'plain'


def test_reasons_name_every_unmet_capability(toy_op):
    fast = _dispatch.backends(toy_op)[0]
    why = ' | '.join(fast.reasons(Call('cpu', torch.float32, 8, True, (('window_area', 100),))))
    for words in ('device cpu not supported', 'dtype float32 not supported', 'head dim 8 outside [16, 128]',
                  'no backward', 'window_area 100 > 64'):
        assert words in why


def test_forced_backend_error_lists_reasons(toy_op):
    with pytest.raises(BackendError, match=r"backend 'fast' \(from backend=\) cannot run.*device cpu not supported"):
        _dispatch.select(toy_op, Call('cpu', torch.float16, 32), backend='fast')
    with pytest.raises(BackendError, match="unknown backend 'nope'.*known: fast, plain"):
        _dispatch.select(toy_op, Call('cpu', torch.float16, 32), backend='nope')


def test_env_forcing(toy_op, monkeypatch):
    monkeypatch.setenv('MIXZOO_BACKEND', f'other:fast,{toy_op}:plain')
    assert _dispatch.select(toy_op, Call('cuda', torch.float16, 32)).name == 'plain'
    monkeypatch.setenv('MIXZOO_BACKEND', 'fast')   # a bare name applies to every op
    with pytest.raises(BackendError, match=r'from MIXZOO_BACKEND=.*device cpu'):
        _dispatch.select(toy_op, Call('cpu', torch.float16, 32))


def test_scoped_forcing_wins_and_is_undone(toy_op, monkeypatch):
    monkeypatch.setenv('MIXZOO_BACKEND', f'{toy_op}:fast')
    with _dispatch.forcing(**{toy_op: 'plain'}):
        assert _dispatch.select(toy_op, Call('cuda', torch.float16, 32)).name == 'plain'
        with pytest.raises(BackendError, match='unknown backend'), _dispatch.forcing(**{toy_op: 'nope'}):
            _dispatch.select(toy_op, Call('cuda', torch.float16, 32))
        assert _dispatch.forced_backend(toy_op) == 'plain'
    assert _dispatch.forced_backend(toy_op) == 'fast'


def test_no_backend_error_lists_each(toy_op):
    _dispatch._PRIORITY[toy_op].remove('plain')
    try:
        with pytest.raises(BackendError, match=r'no backend can run.*\n  fast: device cpu not supported'):
            _dispatch.select(toy_op, Call('cpu', torch.float16, 32))
    finally:
        _dispatch._PRIORITY[toy_op].append('plain')


def test_ops_info_prints_every_op_and_backend(capsys):
    from mixzoo.ops.__main__ import main
    assert main(['info']) == 0
    out = capsys.readouterr().out
    for op in _dispatch.ops():
        assert f'[{op}]' in out
        for b in _dispatch.backends(op):
            assert f'  {b.name}' in out
    assert 'here, cpu/float32' in out


def test_window_op_forced_backend_message():
    q = torch.randn(2, 1, 4, 8, dtype=torch.float64)
    with pytest.raises(BackendError, match=r"window: backend 'triton'.*dtype float64 not supported"):
        _dispatch.select('window', Call.of(q, head_dim=8, window_area=4), backend='triton')


def test_forcing_every_op_per_op_nested_and_restored(monkeypatch):
    monkeypatch.setenv('MIXZOO_BACKEND', 'window:torch')
    every = _dispatch.ops()
    assert set(every) >= {'window', 'halo', 'neighborhood', 'routing', 'linear'}
    q = torch.randn(2, 1, 4, 8)
    call = Call.of(q, head_dim=8, window_area=4)
    with ops.forcing('reference'):                       # every op, over MIXZOO_BACKEND
        assert [_dispatch.forced_backend(op) for op in every] == ['reference'] * len(every)
        assert _dispatch.select('window', call).name == 'reference'
        assert _dispatch.select('window', call, backend='torch').name == 'torch'   # a call's backend= wins
        with ops.forcing(window='torch'):                # nested: adds to the enclosing block
            assert _dispatch.forced_backend('window') == 'torch'
            assert _dispatch.forced_backend('halo') == 'reference'
        assert _dispatch.forced_backend('window') == 'reference'
    assert _dispatch.forced_backend('window') == 'torch' and _dispatch.forced_backend('halo') is None
    with ops.forcing('halo:reference,torch', routing='reference'):   # MIXZOO_BACKEND syntax and keywords
        assert [_dispatch.forced_backend(op) for op in ('halo', 'routing', 'window')] == ['reference', 'reference',
                                                                                         'torch']
    with pytest.raises(BackendError, match=r"forcing: unknown backend 'nope'; known: cpu, reference, torch, triton"):
        with ops.forcing('nope'):
            pass
    with pytest.raises(BackendError, match=r"forcing: unknown op 'windows'; known ops: .*window"):
        with ops.forcing(windows='torch'):
            pass
    with pytest.raises(BackendError, match=r"unknown backend 'cpu' for op 'window'; known: triton, torch, reference"):
        with ops.forcing(window='cpu'):
            pass
    with ops.forcing('cpu'):     # a backend of one op only: an op without it says so when called
        with pytest.raises(BackendError, match=r"window: unknown backend 'cpu' \(from forcing\)"):
            _dispatch.select('window', call)
    assert _dispatch.forced_backend('halo') is None


def test_forcing_is_per_thread_and_undone_on_error():
    import threading
    seen = []
    with pytest.raises(KeyError), ops.forcing('reference'):
        t = threading.Thread(target=lambda: seen.append(_dispatch.forced_backend('window')))
        t.start()
        t.join()
        seen.append(_dispatch.forced_backend('window'))
        raise KeyError('inside')
    assert seen == [None, 'reference']
    assert _dispatch.forced_backend('window') is None


def test_register_op_declares_backends_in_order_with_their_docstrings():
    def plain(x):
        """The plain formulation."""
        return x

    name = 'toy_declared_op'
    try:
        _dispatch.register_op(name, triton=_dispatch.triton_kernels('mixzoo.ops.window', 'window_attention', validated=False,
                                                                    doc='kernels'),
                              fast=dict(fn=lambda x: x, devices=('cuda',), doc='fast'), plain=plain)
        assert [b.name for b in _dispatch.backends(name)] == ['triton', 'fast', 'plain']
        tri, fast, pl = _dispatch.backends(name)
        assert pl.doc == 'The plain formulation.' and pl.dtypes == _dispatch.FLOATS + (torch.float64,)
        assert tri.dtypes == _dispatch.FLOATS and tri.auto_devices == () and tri.devices == ('cuda', 'cpu')
        assert tri.doc.startswith('kernels; only when forced') and fast.devices == ('cuda',)
        # imported at registration: a first import inside a torch.compile'd call would be a graph break
        assert (tri.fn.__module__, tri.fn.__name__) == ('mixzoo.ops.window.triton', 'window_attention')
        with pytest.raises(ValueError, match="backend 'bare' needs a doc"):
            _dispatch.register_op(name, bare=lambda x: x)
    finally:
        _dispatch._REGISTRY.pop(name)
        _dispatch._PRIORITY.pop(name)


def test_op_packages_share_one_shape():
    """Every op registers through register_op: a 'torch' backend in eager.py (no module shadows the torch
    package), its oracle in reference.py, Triton kernels as torch custom ops in triton.py."""
    import importlib
    import pathlib
    root = pathlib.Path(ops.__file__).parent
    for op in _dispatch.ops():
        if op.startswith('toy'):
            continue
        table = {b.name: b for b in _dispatch.backends(op)}
        assert table['torch'].fn.__module__ == f'mixzoo.ops.{op}.eager', op
        assert table['reference'].fn.__module__ == f'mixzoo.ops.{op}.reference', op
        tri = table['triton'].fn
        assert (tri.__module__, tri.__name__) == (f'mixzoo.ops.{op}.triton', table['torch'].fn.__name__), op
        assert all(b.doc for b in table.values()), op
        assert not (root / op / 'torch.py').exists()
        src = (root / op / 'triton.py').read_text()
        assert 'torch.library.custom_op' in src and 'autograd.Function' not in src, op
        assert importlib.import_module(f'mixzoo.ops.{op}').torch is torch   # the package's `torch` is torch itself


def test_ops_info_shows_the_onednn_linear_switch(capsys, monkeypatch):
    from mixzoo.ops import _cpu, _onednn
    from mixzoo.ops.__main__ import main
    monkeypatch.setenv('MIXZOO_CPU', 'linear:onednn')   # whatever this CPU measured (tests/test_cpu_choices.py)
    monkeypatch.setattr(_cpu, '_DECIDED', {})
    main(['info'])
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith('oneDNN linear'))
    on, why = _onednn.state()
    assert on == torch.backends.mkldnn.is_available() and why in line
    assert 'MIXZOO_ONEDNN_LINEAR' in line
    monkeypatch.setattr(_onednn, '_ENV_VALUE', '0')
    monkeypatch.setattr(_onednn, '_ONEDNN_LINEAR', False)
    main(['info'])
    out = capsys.readouterr().out
    assert 'oneDNN linear (mixzoo.ops._onednn.linear): off: MIXZOO_ONEDNN_LINEAR=0 (read at import)' in out
    monkeypatch.setattr(_onednn, '_ENV_VALUE', None)
    with _onednn.disabled():
        assert _onednn.state() == (False, 'off: switched off in this process (inside mixzoo.ops._onednn.disabled(), as the '
                                          'FLOP counters do); MIXZOO_ONEDNN_LINEAR unset (default on)')
