"""The dispatcher: capability reasons, priority, forcing by argument and environment."""
import pytest
import torch

from ops import _dispatch
from ops._dispatch import Backend, BackendError, Call


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
    from ops.__main__ import main
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
