"""ops.depthwise_conv2d (a C kernel's weight gradient for large depthwise filters in CPU fp32 training): gradients
against float64 torch on NCHW and channels-last maps (tails of rows and channel vectors, dilation, rectangular
filters, both builds, thread counts), which calls take the kernel, and the class switch the builder makes."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import MISSING_DEP
from mixzoo.ops import _cpu, depthwise_conv2d
from mixzoo.ops import dwconv

_why = dwconv.unavailable()
needs_kernel = pytest.mark.skipif(_why is not None, reason=f'{MISSING_DEP}: {_why}')

CASES = [   # N, C, H, W, (kh, kw), padding, dilation
    (2, 20, 13, 37, (7, 7), 3, 1),       # rows over two vectors with a tail, channels not a vector multiple
    (1, 48, 9, 9, (5, 5), 2, 2),         # dilated, output smaller than the input
    (2, 17, 11, 6, (3, 9), (1, 4), 1),   # rectangular filter wider than 8 taps (two register groups)
    (3, 33, 7, 7, (7, 7), 0, 1),         # no padding: a 1x1 output
]


def _weight_grad64(x, g, w, padding, dilation):
    return torch.ops.aten.convolution_backward(g.double(), x.double(), w.double(), None, [1, 1],
                                               list(dwconv._pair(padding)), list(dwconv._pair(dilation)), False,
                                               [0, 0], x.shape[1], [False, True, False])[1]


def _inputs(N, C, H, W, k, padding, dilation, layout, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=gen)
    w = torch.randn(C, 1, *k, generator=gen)
    (ph, pw), (dh, dw) = dwconv._pair(padding), dwconv._pair(dilation)
    g = torch.randn(N, C, H + 2 * ph - (k[0] - 1) * dh, W + 2 * pw - (k[1] - 1) * dw, generator=gen)
    if layout == 'nhwc':
        x, g = x.contiguous(memory_format=torch.channels_last), g.contiguous(memory_format=torch.channels_last)
    return x, g, w


@needs_kernel
@pytest.mark.parametrize('portable', [False, True])
@pytest.mark.parametrize('layout', ['nchw', 'nhwc'])
@pytest.mark.parametrize('case', CASES)
def test_weight_grad_matches_float64(case, layout, portable):
    N, C, H, W, k, padding, dilation = case
    x, g, w = _inputs(*case, layout)
    out = dwconv.weight_grad(x, g, k, padding, dilation, portable=portable)
    ref = _weight_grad64(x, g, w, padding, dilation)
    assert out.shape == ref.shape
    assert (out.double() - ref).abs().max().item() <= 2e-6 * ref.abs().max().item()


@needs_kernel
def test_thread_count_does_not_change_results():
    x, g, w = _inputs(2, 40, 20, 20, (7, 7), 3, 1, 'nhwc')
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = dwconv.weight_grad(x, g, (7, 7), 3)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, dwconv.weight_grad(x, g, (7, 7), 3))


@needs_kernel
@pytest.mark.parametrize('layout', ['nchw', 'nhwc', 'strided'])
@pytest.mark.parametrize('bias', [True, False])
def test_autograd_matches_conv2d(layout, bias):
    """Input, weight and bias gradients through the kernel path equal F.conv2d's (float64) for every layout; a map
    dense in neither order is taken as NCHW."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 24, 15, 30 if layout == 'strided' else 15, generator=gen)
    x = x[..., ::2] if layout == 'strided' else x.contiguous(memory_format=torch.channels_last) if layout == 'nhwc' \
        else x
    w, b = torch.randn(24, 1, 7, 7, generator=gen), torch.randn(24, generator=gen) if bias else None
    g = torch.randn(2, 24, 15, 15, generator=gen)
    leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
    y = depthwise_conv2d(leaves[0], leaves[1], leaves[2] if bias else None, 1, 3)
    choice = _cpu.choice(dwconv.OP_NHWC if layout == 'nhwc' else dwconv.OP)
    assert y.grad_fn.name().startswith('_DepthwiseConv2d') == (choice == 'c')
    y.backward(g)
    ref = [t.double().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
    F.conv2d(ref[0], ref[1], ref[2] if bias else None, 1, 3, 1, 24).backward(g.double())
    assert torch.allclose(y.double(), F.conv2d(*[r.detach() for r in ref[:2]], ref[2].detach() if bias else None,
                                               1, 3, 1, 24), atol=1e-5)
    for a, r in zip(leaves, ref):
        assert (a.grad.double() - r.grad).abs().max().item() <= 2e-6 * r.grad.abs().max().item()


def test_which_calls_take_the_kernel(monkeypatch):
    """Only stride-1 5x5-and-larger depthwise filters whose weight gradient autograd needs, in fp32 on CPU, outside
    autocast and tracing, where the choice says 'c'; everything else is exactly F.conv2d."""
    taken = []
    monkeypatch.setattr(dwconv._DepthwiseConv2d, 'apply', lambda *a: taken.append(a) or F.conv2d(
        a[0], a[1], a[2], 1, a[3], a[4], a[0].shape[1]))
    monkeypatch.setenv(_cpu.ENV, 'dwconv_grad:c,dwconv_grad_nhwc:c')
    monkeypatch.setattr(_cpu, '_DECIDED', {})
    x = torch.randn(1, 8, 12, 12)
    w5, w3 = torch.randn(8, 1, 5, 5, requires_grad=True), torch.randn(8, 1, 3, 3, requires_grad=True)
    expect = 1 if _why is None else 0
    depthwise_conv2d(x, w5, None, 1, 2)
    assert len(taken) == expect
    for args in [(x, w3, None, 1, 1), (x, w5, None, 2, 2), (x, w5.detach(), None, 1, 2), (x, w5, None, 1, 'same'),
                 (x.double(), w5.double(), None, 1, 2)]:
        y = depthwise_conv2d(*args)
        assert torch.equal(y, F.conv2d(*args, 1, 8))
    with torch.no_grad():
        depthwise_conv2d(x, w5, None, 1, 2)
    with torch.autocast('cpu', torch.bfloat16):
        depthwise_conv2d(x, w5, None, 1, 2)
    monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
    depthwise_conv2d(x, w5, None, 1, 2)
    monkeypatch.undo()
    assert len(taken) == expect
    monkeypatch.setenv(_cpu.ENV, 'dwconv_grad:torch,dwconv_grad_nhwc:torch')
    monkeypatch.setattr(_cpu, '_DECIDED', {})
    depthwise_conv2d(x, w5, None, 1, 2)
    assert len(taken) == expect


def test_weight_grad_refuses_mismatched_inputs():
    x, g, w = _inputs(1, 8, 10, 10, (5, 5), 2, 1, 'nchw')
    with pytest.raises(ValueError, match=r'gradient shape \(1, 8, 8, 8\) is not the stride-1 output'):
        dwconv.weight_grad(x, g[..., 1:-1, 1:-1], (5, 5), 2)
    with pytest.raises(TypeError, match='must be float32 CPU tensors'):
        dwconv.weight_grad(x.double(), g, (5, 5), 2)


def test_builder_switches_depthwise_convs():
    """Every plain depthwise nn.Conv2d of a zoo model is a DepthwiseConv2d (same parameters and state dict keys):
    L2ViT's 7x7 local-concentration convs among them; grouped and dense convs stay nn.Conv2d."""
    import timm
    from mixzoo.layers import DepthwiseConv2d, use_fast_layers
    m = timm.create_model('mz_l2vit_tiny', pretrained=False)
    dw = [c for c in m.modules() if isinstance(c, DepthwiseConv2d)]
    assert any(c.kernel_size == (7, 7) for c in dw)
    assert all(c.groups == c.in_channels == c.out_channels for c in dw)
    seq = use_fast_layers(nn.Sequential(nn.Conv2d(8, 8, 5, padding=2, groups=8), nn.Conv2d(8, 8, 3, groups=4),
                                        nn.Conv2d(8, 8, 3, padding='same', groups=8)))
    assert [type(c) for c in seq] == [DepthwiseConv2d, nn.Conv2d, nn.Conv2d]
    x = torch.randn(1, 8, 9, 9)
    assert torch.equal(seq[0](x), F.conv2d(x, seq[0].weight, seq[0].bias, 1, 2, 1, 8))
