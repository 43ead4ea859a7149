"""Op backends against `reference`, generated from the dispatcher's registry (the cases and checks: op_cases.py,
shared with tools/gpu_check.py, which runs the same grid on a GPU).

Every registered op must have a case generator in CASES; every backend of it is run over the op's grid (shapes,
dtypes, options) with NaN-poisoned outputs, forward and gradients compared with `reference` evaluated in float64, at
the tolerance the backend declares for the dtype. Triton backends run under TRITON_INTERPRET=1 when there is no GPU
(tiny shapes)."""
from contextlib import contextmanager

import pytest
import torch

import op_cases
from mixzoo.ops import _dispatch
from conftest import MISSING_DEP
from op_cases import CASES, OPS, Case  # noqa: F401  (test_gradcheck imports them from here)


def test_every_registered_op_has_cases():
    assert set(_dispatch.ops()) <= set(CASES), f'ops without test cases: {set(_dispatch.ops()) - set(CASES)}'


def _devices():
    return ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


def _params():
    for p in op_cases.grid(_devices()):
        yield pytest.param(p.op, p.backend, p.case, p.dtype, p.device, marks=[pytest.mark.slow] if p.slow else [],
                           id=p.id)


def _backend(op, name):
    return op_cases.backend(op, name)


@contextmanager
def _skip_unrunnable():
    """op_cases.Unrunnable as a skip; for a missing dependency one CI fails (conftest: it must have them)."""
    try:
        yield
    except op_cases.Unrunnable as e:
        pytest.skip(f'{MISSING_DEP}: {e}' if e.missing else f'backend cannot run here: {e}')


def _skip_if_unrunnable(op, backend, kwargs):
    with _skip_unrunnable():
        return op_cases.runnable(op, backend, kwargs)


@pytest.mark.parametrize('op,backend,case,dtype,device', list(_params()))
def test_backend_matches_reference(op, backend, case, dtype, device):
    with _skip_unrunnable():
        op_cases.check(op, backend, case, dtype, device)


@pytest.mark.parametrize('op,backend,case,dtype,device', [p for p in _params() if 'reference' not in p.id])
def test_inference_path_matches_reference(op, backend, case, dtype, device):
    """Without autograd a backend may take another path (zero-copy views, fused pieces that have no
    gradient): the same forward check, under no_grad."""
    with _skip_unrunnable():
        op_cases.check_inference(op, backend, case, dtype, device)


@pytest.mark.slow
@pytest.mark.parametrize('op', [o for o in _dispatch.ops() if o in CASES])
@pytest.mark.parametrize('grad', [False, True], ids=['no_grad', 'grad'])
def test_inductor_compiles_the_op_as_models_call_it(op, grad):
    """torch.compile's default (inductor) backend on each op as the models call it (backend chosen by the
    dispatcher), fullgraph: the inference and the autograd paths both trace without a graph break and
    generate code equal to eager. (Whole models are compiled in test_robustness with aot_eager, inductor's
    own tracing without its C++ code generation, which costs 40-130 s a model on a cold cache.)"""
    case = next(c for c in CASES[op]() if c.gradcheck)
    kw = {k: (v.detach().requires_grad_(grad) if torch.is_tensor(v) and v.is_floating_point() else v)
          for k, v in case.make(torch.float32, 'cpu').items()}
    names = [k for k, v in kw.items() if torch.is_tensor(v)]

    def f(*tensors):
        return OPS[op](**dict(kw, **dict(zip(names, tensors))))
    torch._dynamo.reset()
    with torch.set_grad_enabled(grad):
        want, got = f(*(kw[n] for n in names)), torch.compile(f, fullgraph=True)(*(kw[n] for n in names))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
