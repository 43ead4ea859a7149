"""Shared layers: the oneDNN route of linear layers (ops._onednn.linear, mixzoo.layers.Linear), TF 'same' padding."""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import GELU, GELUTanh, Mlp

import mixzoo  # noqa: F401  (registers the models)
from mixzoo import layers
from mixzoo.ops import _onednn
from mixzoo._registry import MODELS, families


def _onednn_used(monkeypatch):
    """Calls of the oneDNN route, with the route chosen for this test whatever this CPU measured (ops._cpu)."""
    from mixzoo.ops import _cpu
    monkeypatch.setenv('MIXZOO_CPU', 'linear:onednn')
    monkeypatch.setattr(_cpu, '_DECIDED', {})
    calls = []
    real, fused = F.conv2d, _onednn._FUSED
    monkeypatch.setattr(_onednn.F, "conv2d", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(_onednn, "_FUSED", lambda *a: calls.append('fused') or fused(*a))
    return calls


@pytest.mark.parametrize('act', [nn.GELU(), nn.GELU(approximate='tanh'), GELUTanh(), GELU()])
def test_fused_mlp_equals_timms_mlp(monkeypatch, act):
    """The builder's FusedMlp: the hidden activation as the GEMM's post-op in inference, timm's Mlp otherwise."""
    torch.manual_seed(0)
    ref = Mlp(96, 384, act_layer=lambda: act).eval()
    m = layers.use_fast_layers(Mlp(96, 384, act_layer=lambda: act).eval())
    m.load_state_dict(ref.state_dict())
    assert type(m) is layers.FusedMlp and m.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(4, 300, 96)
    calls = _onednn_used(monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)
    assert calls.count('fused') == 1 or _onednn._FUSED is None
    calls.clear()
    seen = []
    m.act.register_forward_hook(lambda *a: seen.append(1))       # a hook on the activation: timm's forward
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)
    assert seen and 'fused' not in calls
    x.requires_grad_()
    torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)   # autograd: F.linear, then the module


def test_fused_mlp_row_chunks_equal_the_whole(monkeypatch):
    """A hidden map over _HIDDEN_BYTES runs in row chunks (inference on the oneDNN route): same values."""
    torch.manual_seed(0)
    m = layers.use_fast_layers(Mlp(64, 256).eval())
    x = torch.randn(3, 700, 64)
    calls = _onednn_used(monkeypatch)
    with torch.no_grad():
        whole = m(x)
        monkeypatch.setattr(layers, '_HIDDEN_BYTES', 1 << 16)
        monkeypatch.setattr(layers, '_CHUNK_BYTES', 256 * 4 * 800)        # 800 rows a chunk: 3 chunks, the last short
        n = len(calls)
        chunked = m(x)
    assert calls.count('fused') - 1 == 3 and len(calls) - n == 6
    assert chunked.shape == whole.shape
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)


def test_linear_rejects_an_unknown_activation_and_relu_stays_timms():
    with pytest.raises(ValueError, match="act='relu': expected one of"):
        layers.linear(torch.randn(4, 8), torch.randn(8, 8), act='relu')
    m = layers.use_fast_layers(Mlp(96, 384, act_layer=nn.ReLU))   # oneDNN's ReLU post-op turns NaN into 0
    assert type(m) is Mlp


@pytest.mark.parametrize('shape,bias', [((512, 96), True), ((2, 300, 64), False), ((3, 7, 11, 40), True),
                                        ((4, 2, 8), True)])        # the last one is small: F.linear
def test_linear_equals_f_linear_forward_and_grads(monkeypatch, shape, bias):
    torch.manual_seed(0)
    K, N = shape[-1], 72
    x = torch.randn(*shape, requires_grad=True)
    w = (torch.randn(N, K) * K ** -0.5).requires_grad_()
    b = torch.randn(N, requires_grad=True) if bias else None
    calls = _onednn_used(monkeypatch)
    ref = F.linear(x, w, b)
    with torch.no_grad():                      # inference: oneDNN for all but small inputs
        y0 = layers.linear(x, w, b)
    assert bool(calls) == (x.numel() > max(20480, 64 * K))
    torch.testing.assert_close(y0, ref.detach(), rtol=1e-5, atol=1e-5)
    calls.clear()
    y = layers.linear(x, w, b)                 # autograd: F.linear (its backward is the faster one)
    assert not calls
    assert y.shape == ref.shape and y.is_contiguous()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], g)
    exp = torch.autograd.grad(ref, [t for t in (x, w, b) if t is not None], g)
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-4)


def test_linear_non_contiguous_input_and_fallbacks(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(40, 700, 64).transpose(0, 1)          # rows not contiguous
    w, b = torch.randn(32, 64), torch.randn(32)
    calls = _onednn_used(monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(layers.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert calls
    calls.clear()
    layers.linear(x, w.requires_grad_(), b)                 # autograd: F.linear
    assert not calls
    w.requires_grad_(False)
    calls.clear()
    layers.linear(x.double(), w.double(), b.double())      # other dtypes: F.linear
    assert not calls
    with torch.autocast('cpu', dtype=torch.bfloat16):   # (its route: tests/test_cpu_choices.py)
        assert layers.linear(x, w, b).dtype == torch.bfloat16
    calls.clear()
    monkeypatch.setattr(_onednn, "_ONEDNN_LINEAR", False)   # MIXZOO_ONEDNN_LINEAR=0
    layers.linear(x, w, b)
    assert not calls


def test_every_model_linear_is_the_onednn_linear_with_nn_linear_keys():
    for family in families():
        name = min((n for n, i in MODELS.items() if i.family == family), key=lambda n: MODELS[n].params_m or 1e9)
        m = timm.create_model(name)
        linears = [mod for mod in m.modules() if isinstance(mod, nn.Linear)]
        assert linears and all(type(mod) is layers.Linear for mod in linears), name
        ref = nn.Linear(4, 3)
        mod = layers.Linear(4, 3)
        assert mod.state_dict().keys() == ref.state_dict().keys()


def test_disabled_scope_and_counting_report_linear_as_addmm(monkeypatch):
    from mixzoo._counting import gmacs
    x, w = torch.randn(700, 64), torch.randn(32, 64)
    calls = _onednn_used(monkeypatch)
    with _onednn.disabled():
        layers.linear(x, w)
    assert not calls
    layers.linear(x, w)
    assert calls
    m = timm.create_model('mz_davit_tiny')
    _, ops = gmacs(m, (64, 64), by_op=True)
    assert ops.get('addmm', 0) > 0.5 * sum(ops.values())   # the linear layers, counted as linear


def test_fx_trace_and_compile_keep_plain_linear():
    m = layers.Linear(64, 32)
    gm = torch.fx.symbolic_trace(m)                      # checks the tracer before touching the Proxy
    x = torch.randn(700, 64)
    torch.testing.assert_close(gm(x), F.linear(x, m.weight, m.bias), rtol=1e-5, atol=1e-5)
    assert 'conv2d' not in gm.code


@pytest.mark.parametrize('k,s', [(3, 2), (2, 2), (3, 1), (5, 2), (7, 4)])
def test_pad_same_equals_timms_and_exports_any_size(k, s):
    """TF 'same' padding equals timm's pad_same eagerly, and from one torch.export graph with symbolic H, W
    (the branch-free path) at sizes of every remainder: no size was specialised."""
    from timm.layers.padding import pad_same as timm_pad_same

    class Pad(torch.nn.Module):
        def forward(self, x):
            return layers.pad_same(x, (k, k), (s, s))
    dim = torch.export.Dim
    ep = torch.export.export(Pad(), (torch.randn(1, 2, 20, 21),), strict=False,
                             dynamic_shapes={'x': {2: dim('h', min=4, max=64), 3: dim('w', min=4, max=64)}})
    for hw in ((20, 21), (13, 8), (9, 9), (16, 17)):
        x = torch.randn(1, 2, *hw)
        assert torch.equal(Pad()(x), timm_pad_same(x, (k, k), (s, s)))
        assert torch.equal(ep.module()(x), timm_pad_same(x, (k, k), (s, s))), hw


@pytest.mark.parametrize('k', [3, 5])
def test_box_sum_values_and_gradient(k):
    """PoolFormer's window sum: avg_pool2d's sum with zero padding, and its hand-written gradient (the box sum
    of the gradient: the operator is its own adjoint) passes gradcheck in float64."""
    from mixzoo.mixers.pooling import box_sum
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64, requires_grad=True)
    ref = F.avg_pool2d(x, k, 1, k // 2, count_include_pad=True) * k * k
    torch.testing.assert_close(box_sum(x, k), ref)
    assert torch.autograd.gradcheck(lambda t: box_sum(t, k), (x,))
    with torch.no_grad():
        torch.testing.assert_close(box_sum(x, k), ref)


@pytest.mark.parametrize('kernel, stride', [(3, 2), (5, 2), (4, 1), (4, 2)])
@pytest.mark.parametrize('hw', [(16, 16), (15, 17), (9, 8)])
def test_same_padding_without_a_padded_map(kernel, stride, hw):
    """A depthwise Conv2dSame in inference runs on the unpadded map (symmetric padding, a zero front row / column
    where TF pads one more after): bitwise the padded map's result, at even and odd sizes; autograd and dense filters
    keep the padded map."""
    from timm.layers import create_conv2d
    from timm.layers.conv2d_same import Conv2dSame
    conv = create_conv2d(12, 12, kernel, stride=stride, groups=12, padding='same')
    x = torch.randn(2, 12, *hw).contiguous(memory_format=torch.channels_last)
    assert isinstance(conv, Conv2dSame)   # (timm pads statically where it can: these are the dynamic cases)
    with torch.no_grad():
        xs, w, padding = layers.same_conv_args(conv, x, conv.weight)
        assert xs is x
        ref = F.conv2d(layers.pad_same(x, conv.kernel_size, conv.stride), conv.weight, conv.bias, conv.stride, 0, 1, 12)
        assert torch.equal(layers.conv_forward(conv, x, conv.weight, conv.bias), ref)
    assert layers.same_conv_args(conv, x.requires_grad_(), conv.weight)[0] is not x    # autograd: the padded map
    dense = create_conv2d(12, 6, kernel, stride=2, padding='same')
    with torch.no_grad():
        assert layers.same_conv_args(dense, x.detach(), dense.weight)[2] == (0, 0)
