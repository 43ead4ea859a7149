"""The neighborhood op against NATTEN 0.17.5 itself (tests/fixtures/natten_na2d.safetensors, made by
tools/make_natten_fixture.py with natten.functional na2d_qk / na2d_av): NATTEN's border rule (windows shifted
inward), dilation groups and relative-position-bias indexing slot by slot, and every backend's output and
input gradients, forward and backward, for kernels 3-13 and dilations 1-4."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mixzoo.ops import _dispatch, neighborhood_attention
from mixzoo.ops.neighborhood import geometry as G
from helpers import rel_err

PATH = Path(__file__).resolve().parent / 'fixtures' / 'natten_na2d.safetensors'
with safe_open(str(PATH), framework='pt') as _f:
    META = json.loads(_f.metadata()['mixzoo'])
    DATA = {k: _f.get_tensor(k) for k in _f.keys()}
CASES = [pytest.param(c, id=c['name']) for c in META['cases']]


def _case(c):
    return {k.split('/', 1)[1]: v for k, v in DATA.items() if k.startswith(c['name'] + '/')}


def test_fixture_is_natten_0_17_5():
    assert META['natten'] == '0.17.5' and len(META['cases']) >= 10
    assert {c['kernel'] for c in META['cases']} >= {3, 5, 7, 9, 11, 13} and {c['dilation'] for c in META['cases']} >= {1, 2, 3, 4}


@pytest.mark.parametrize('c', CASES)
def test_window_slots_are_nattens(c):
    """Every query's window slot reads NATTEN's key and NATTEN's rpb entry (border 'shift')."""
    t = _case(c)
    k = c['kernel']
    idx, valid, rel_r, rel_c = G.windows(c['H'], c['W'], k, c['dilation'], 'shift', 'cpu')
    assert bool(valid.all())               # (maps of at least kernel x dilation, as NATTEN requires)
    assert torch.equal(idx, t['slot_key'].long())
    assert torch.equal(rel_r * (2 * k - 1) + rel_c, t['slot_rpb'].long())


# every backend in the dtypes it computes in (float64: the reference's and the torch backend's)
PAIRS = [pytest.param(b.name, d, id=f'{b.name}-{str(d)[6:]}') for b in _dispatch.backends('neighborhood')
         for d in (torch.float64, torch.float32) if d in b.dtypes]


@pytest.mark.parametrize('backend,dtype', PAIRS)
@pytest.mark.parametrize('c', CASES)
def test_backend_matches_natten(c, backend, dtype):
    """Output and, for backends with a backward, the input gradients (a forward-only one: under no_grad)."""
    t = _case(c)
    b = next(b for b in _dispatch.backends('neighborhood') if b.name == backend)
    leaves = [t[n].to(dtype, copy=True).requires_grad_(b.autograd) for n in ('q', 'k', 'v', 'rpb')]
    call = _dispatch.Call.of(*leaves, head_dim=c['head_dim'], window_area=c['kernel'] ** 2)
    why = b.reasons(call, forced=True)
    if why:
        pytest.skip(f'backend cannot run here: {"; ".join(why)}')
    if backend == 'triton' and _dispatch.triton_interpret() and c['H'] * c['W'] * c['kernel'] ** 2 > 1000:
        pytest.skip('the Triton interpreter (no GPU) runs the small cases only (25-120 s a larger one); on a GPU '
                    'every case runs')
    q, k, v, rpb = leaves
    out = neighborhood_attention(q, k, v, c['kernel'], c['dilation'], rpb=rpb, scale=1.0, border='shift',
                                 backend=backend)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert rel_err(out.double(), t['out']) <= tol, 'output'
    if not b.autograd:
        return
    (out * t['grad_out'].to(dtype)).sum().backward()
    for name, leaf in zip(('q', 'k', 'v', 'rpb'), leaves):
        assert rel_err(leaf.grad.double(), t[f'grad_{name}']) <= 10 * tol, f'grad of {name}'
