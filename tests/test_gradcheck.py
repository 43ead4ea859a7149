"""Gradients of every op backend, generated from the registry: torch.autograd.gradcheck in float64
where the backend takes float64 (torch, reference), and a central finite-difference check of
directional derivatives in float32 where it does not (Triton, under the interpreter on CPU)."""
import pytest
import torch

from mixzoo.ops import _dispatch
from test_ops import CASES, OPS, _backend, _skip_if_unrunnable


def _gradcheck_params():
    for op in _dispatch.ops():
        if op not in CASES:
            continue
        case = next(c for c in CASES[op]() if c.gradcheck)
        for b in _dispatch.backends(op):
            if b.autograd:   # forward-only backends: test_ops checks that they refuse autograd calls
                yield pytest.param(op, b.name, case, id=f'{op}-{b.name}-{case.id}')


def _loss_fn(op, backend, kw, names):
    def f(*tensors):
        args = dict(kw, **dict(zip(names, tensors)))
        out = OPS[op](**args, backend=backend)
        w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        return (out * w).sum()
    return f


@pytest.mark.parametrize('op,backend,case', list(_gradcheck_params()))
def test_gradients(op, backend, case):
    b = _backend(op, backend)
    dtype = torch.float64 if torch.float64 in b.dtypes else torch.float32
    kw = case.make(dtype, 'cpu')
    _skip_if_unrunnable(op, backend, kw)
    names = [k for k, v in kw.items() if torch.is_tensor(v) and v.requires_grad]
    tensors = [kw[n].detach().clone().requires_grad_() for n in names]   # leaves (inputs may be views)
    f = _loss_fn(op, backend, kw, names)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda *t: f(*t), tensors, eps=1e-6, atol=1e-6, rtol=1e-4)
        return
    # float32: compare <grad, u> with (f(x + e u) - f(x - e u)) / 2e for a random direction u of each input
    # (one direction: each forward runs in the Triton interpreter, two evaluations per input)
    grads = torch.autograd.grad(f(*tensors), tensors)
    g = torch.Generator().manual_seed(3)
    for i, t in enumerate(tensors):
        for _ in range(1):
            u = torch.randn(t.shape, generator=g)
            eps = 1e-2
            with torch.no_grad():
                plus = [x + eps * u if j == i else x for j, x in enumerate(tensors)]
                minus = [x - eps * u if j == i else x for j, x in enumerate(tensors)]
                fd = (f(*plus) - f(*minus)).item() / (2 * eps)
            an = (grads[i] * u).sum().item()
            assert abs(fd - an) <= 2e-2 * max(1.0, abs(an)), f'{names[i]}: finite difference {fd} vs autograd {an}'
