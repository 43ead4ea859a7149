"""ops.gelu_tanh (the tanh-approximated GELU: a C kernel forward and backward on CPU fp32): values and gradients
against float64 torch over the whole range, the tails and special values, both builds, memory layouts, thread
counts, which path each input takes, and the modules that use it."""
import pytest
import torch
import torch.nn.functional as F

from conftest import MISSING_DEP
from mixzoo.ops import _native
from mixzoo.ops import _cpu, gelu_tanh
from mixzoo.ops import gelu as gelu_op

_why = gelu_op.unavailable()
needs_kernel = pytest.mark.skipif(_why is not None, reason=f'{MISSING_DEP}: {_why}')


def _reference(x: torch.Tensor, g: torch.Tensor):
    xd = x.double().requires_grad_()
    y = F.gelu(xd, approximate='tanh')
    y.backward(g.double())
    return y.detach(), xd.grad


def _run(x: torch.Tensor, g: torch.Tensor, backend):
    xr = x.clone().requires_grad_()
    y = gelu_tanh(xr, backend=backend)
    y.backward(g)
    return y.detach(), xr.grad


@needs_kernel
@pytest.mark.parametrize('backend', ['c', 'c-portable'])
def test_matches_float64_over_the_range(backend):
    """Every fp32 step of [-12, 12] (both tails, the cancellation-prone region near 0), an odd length (a partial
    last vector); errors at fp32 rounding: the gradient within 3e-7 absolute, tighter than torch's own fp32
    kernel (1.0e-6 at x = -5.06, measured), the values within half an ulp at 12 and 3e-7 relative below 1."""
    x = torch.linspace(-12, 12, 240_007)
    g = torch.ones_like(x)
    y, gx = _run(x, g, backend)
    ry, rg = _reference(x, g)
    assert (y.double() - ry).abs().max().item() < 6e-7
    assert (gx.double() - rg).abs().max().item() < 3e-7
    small = x.abs() < 1
    assert ((y.double() - ry)[small].abs() <= 4e-7 * ry[small].abs() + 1e-30).all()   # relative near 0 (torch: 2.4e-7)


@needs_kernel
@pytest.mark.parametrize('backend', ['c', 'c-portable'])
def test_bfloat16_rounds_once(backend):
    """bf16 tensors: computed in fp32 and rounded once to nearest even; at least as often the correctly rounded
    value as torch's bf16 kernel (measured 98.8% vs 93.4% over N(0, 9)), never more than one bf16 step from it;
    NaN stays NaN, the gradient within one bf16 step of float64's."""
    x = (torch.randn(1 << 16, generator=torch.Generator().manual_seed(2)) * 3).bfloat16()
    x[:2] = torch.tensor([float('nan'), float('inf')])
    xr = x.clone().requires_grad_()
    y = gelu_tanh(xr, backend=backend)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).bfloat16()
    y.backward(g)
    assert y.dtype == xr.grad.dtype == torch.bfloat16 and torch.isnan(y[0]) and y[1] == float('inf')
    y, x, g, gx = y[2:].detach(), x[2:], g[2:], xr.grad[2:]
    # below -6 a float64 0.5 x (1 + tanh(u)) cancels to 0 (the kernel's x sigmoid(2u) keeps the tiny true value)
    tail = x < -6
    assert (y[tail].float().abs() < 1e-9).all()   # (|gelu(-6)| = 8e-11)
    y, x, g, gx = y[~tail], x[~tail], g[~tail], gx[~tail]
    exact = F.gelu(x.double(), approximate='tanh').bfloat16()
    ours, theirs = (y == exact).float().mean().item(), (F.gelu(x, approximate='tanh') == exact).float().mean().item()
    assert ours >= theirs and ours > 0.95
    step = exact.float().abs() * 2 ** -7 + 1e-30
    assert ((y.float() - exact.float()).abs() <= step).all()
    ref = torch.ops.aten.gelu_backward(g.double(), x.double(), approximate='tanh')
    assert ((gx.double() - ref).abs() <= ref.abs() * 2 ** -7 + 1e-6).all()


@needs_kernel
def test_special_values():
    x = torch.tensor([float('nan'), float('inf'), 1e20, -1e20, -30., 30., 0., -0.])
    xr = x.clone().requires_grad_()
    y = gelu_tanh(xr, backend='c')
    y.backward(torch.ones_like(x))
    assert torch.isnan(y[0]) and torch.isnan(xr.grad[0])       # NaN stays NaN both ways
    assert y[1] == float('inf') and xr.grad[1] == 1             # (torch: gradient NaN at +inf)
    assert y[2] == 1e20 and xr.grad[2] == 1 and y[3] == 0 and xr.grad[3] == 0
    assert y[4] == 0 and xr.grad[4] == 0 and y[5] == 30 and xr.grad[5] == 1
    assert y[6] == 0 and xr.grad[6] == 0.5 and xr.grad[7] == 0.5


@needs_kernel
@pytest.mark.parametrize('layout', ['contiguous', 'channels_last', 'strided'])
def test_layouts_and_gradient_strides(layout):
    """Any dense layout runs in place of its buffer (the output keeps it); a non-dense input is copied; the incoming
    gradient may have other strides than the input."""
    g0 = torch.Generator().manual_seed(0)
    x = torch.randn(2, 24, 7, 9, generator=g0) * 4
    if layout == 'channels_last':
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == 'strided':
        x = x[..., ::2]
    g = torch.randn(x.shape[::-1], generator=g0).permute(3, 2, 1, 0)   # neither of x's layouts
    y, gx = _run(x, g, 'c')
    ry, rg = _reference(x, g)
    if layout == 'channels_last':
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(y.double(), ry, atol=1e-6) and torch.allclose(gx.double(), rg, atol=2e-6)


@needs_kernel
def test_thread_count_does_not_change_results():
    x = torch.randn(3, 50_001, generator=torch.Generator().manual_seed(1))
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = gelu_tanh(x, backend='c')
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, gelu_tanh(x, backend='c'))


def test_which_path_each_input_takes(monkeypatch):
    """fp32 CPU takes the kernel where it runs and this CPU measured it faster; other dtypes, traced graphs and a
    forced torch choice take F.gelu; the kernel refuses what it cannot take, naming the way out."""
    calls = []
    monkeypatch.setattr(gelu_op._GeluTanh, 'apply', lambda *a: calls.append(a) or F.gelu(a[0], approximate='tanh'))
    x = torch.randn(4, 8)
    monkeypatch.setenv(_cpu.ENV, 'gelu_tanh:c,gelu_tanh_bf16:c')
    monkeypatch.setattr(_cpu, '_DECIDED', {})
    assert torch.equal(gelu_tanh(x.double()), F.gelu(x.double(), approximate='tanh'))
    assert not calls
    gelu_tanh(x)
    gelu_tanh(x.bfloat16())
    assert len(calls) == (2 if _why is None else 0)
    monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
    gelu_tanh(x)
    monkeypatch.undo()
    assert len(calls) == (2 if _why is None else 0)
    monkeypatch.setenv(_cpu.ENV, 'gelu_tanh:torch')
    monkeypatch.setattr(_cpu, '_DECIDED', {})
    monkeypatch.setattr(gelu_op._GeluTanh, 'apply', lambda *a: pytest.fail('forced torch took the kernel'))
    gelu_tanh(x)
    with pytest.raises(TypeError, match="needs a float32 or bfloat16 CPU tensor, got torch.float64.*backend='torch'"):
        gelu_tanh(x.double(), backend='c')
    with pytest.raises(ValueError, match="backend='cuda'"):
        gelu_tanh(x, backend='cuda')


def test_without_the_kernel_torch_runs(monkeypatch):
    monkeypatch.setenv('MIXZOO_NATIVE', '0')
    monkeypatch.setattr(_native, '_CACHE', {})
    assert 'MIXZOO_NATIVE=0' in gelu_op.unavailable()
    x = torch.randn(5, 7)
    assert torch.equal(gelu_tanh(x), F.gelu(x, approximate='tanh'))


def test_module_is_timms_with_the_op():
    """The zoo's GELUTanh is timm's module (the oneDNN post-op mapping and isinstance checks see it as one)
    computing ops.gelu_tanh; MaxViT's MBConv norms and MLPs use it."""
    import timm
    from timm.layers.activations import GELUTanh as TimmGELUTanh
    from mixzoo.layers import GELUTanh, _post_op
    x = torch.randn(2, 16, 5, 5)
    assert isinstance(GELUTanh(), TimmGELUTanh) and _post_op(GELUTanh()) == 'gelu_tanh'
    assert torch.allclose(GELUTanh()(x), TimmGELUTanh()(x), atol=1e-6)
    m = timm.create_model('mz_maxvit_tiny_tf_224', pretrained=False)
    acts = [type(a) for a in m.modules() if isinstance(a, TimmGELUTanh)]
    assert acts and set(acts) == {GELUTanh}
