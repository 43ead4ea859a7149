"""The ``backend=`` model kwarg (mixzoo.mixers.set_backend): it reaches the op call of every mixer, gives the
logits of the MIXZOO_BACKEND way, and a bad name errors naming the valid ones."""
import pytest
import timm
import torch

import mixzoo  # noqa: F401  (registers the zoo's models)
from mixzoo.mixers import OpMixer, set_backend
from helpers import randomize_
from mixzoo.ops import _dispatch
from mixzoo.ops._dispatch import BackendError

# one small model per op (its family's mixers call that op)
MODEL_OF_OP = {'neighborhood': 'mz_transnext_micro', 'routing': 'mz_biformer_tiny', 'window': 'mz_davit_tiny',
               'halo': 'mz_halonet26t', 'linear': 'mz_l2vit_tiny'}


@pytest.fixture
def picked(monkeypatch):
    """(op, backend) of every op call, recorded by wrapping each registered backend's function."""
    calls = []
    for op in _dispatch.ops():
        for b in _dispatch.backends(op):
            monkeypatch.setattr(b, 'fn', lambda *a, _fn=b.fn, _ob=(op, b.name), **k: calls.append(_ob) or _fn(*a, **k))
    return calls


def test_every_op_has_a_model_here():
    assert set(MODEL_OF_OP) == {op for op in _dispatch.ops() if not op.startswith('toy')}


@pytest.mark.parametrize('op', list(MODEL_OF_OP))
def test_backend_kwarg_equals_the_env_var_way(op, picked, monkeypatch):
    name = MODEL_OF_OP[op]
    forced = timm.create_model(name, backend='reference').eval()
    randomize_(forced)
    plain = timm.create_model(name).eval()
    plain.load_state_dict(forced.state_dict())
    mixers = [m for m in forced.modules() if isinstance(m, OpMixer)]
    assert mixers and {m.backend for m in mixers} == {'reference'}
    assert {m.backend for m in plain.modules() if isinstance(m, OpMixer)} == {None}
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        out = forced(x)
        assert op in {o for o, _ in picked} and {b for _, b in picked} == {'reference'}
        picked.clear()
        auto = plain(x)
        assert 'reference' not in {b for _, b in picked}       # without forcing a fast path runs
        picked.clear()
        monkeypatch.setenv('MIXZOO_BACKEND', 'reference')
        env = plain(x)
        assert {b for _, b in picked} == {'reference'}
    assert torch.equal(out, env)
    torch.testing.assert_close(out, auto, rtol=1e-4, atol=1e-4)
    set_backend(forced, None)                                  # back to the dispatcher's choice
    assert {m.backend for m in mixers} == {None}


def test_backend_per_op_and_features_only(picked):
    model = timm.create_model('mz_biformer_tiny', backend='routing:reference', features_only=True).eval()
    by_op = {m.op: m.backend for m in model.modules() if isinstance(m, OpMixer)}
    assert by_op == {'routing': 'reference', 'window': None}
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert ('routing', 'reference') in picked and ('window', 'reference') not in picked
    set_backend(model, {'window': 'reference'})
    assert {m.op: m.backend for m in model.modules() if isinstance(m, OpMixer)} == {'routing': None,
                                                                                  'window': 'reference'}


def test_bad_backend_names_error_clearly():
    with pytest.raises(BackendError, match=r"backend='nope': 'nope' is not a backend of op 'window' "
                                           r"\(known: triton, torch, reference\)"):
        timm.create_model('mz_davit_tiny', backend='nope')
    with pytest.raises(BackendError, match=r"backend='cpu': 'cpu' is not a backend of op 'window'"):
        timm.create_model('mz_davit_tiny', backend='cpu')
    with pytest.raises(BackendError, match=r"unknown op 'halo'; the model calls only window"):
        timm.create_model('mz_davit_tiny', backend='halo:torch')
    with pytest.raises(BackendError, match=r"unknown backend 'eager' for op 'routing'; known: triton, torch, "
                                           r"reference"):
        timm.create_model('mz_biformer_tiny', backend={'routing': 'eager'})
    with pytest.raises(ValueError, match='has no mixer that calls a dispatched op'):
        timm.create_model('mz_poolformer_s12', backend='reference')
