"""Small blocks shared by the families that timm.layers does not provide as needed."""
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ConvNormAct, Mlp, trunc_normal_
from timm.layers.activations import GELU, GELUTanh as _TimmGELUTanh
from timm.layers.conv2d_same import Conv2dSame
from timm.layers.padding import get_same_padding, pad_same as _timm_pad_same

from .ops._dispatch import records_grad, symbolic
from .ops import _onednn
from .ops._onednn import linear
from .ops.dwconv import depthwise_conv2d
from .ops.gelu import gelu_tanh


class ChannelScale(nn.Module):
    """Per-channel learnable scale (layer scale) on NCHW maps; parameter named ``scale``
    (timm MetaFormer layout)."""

    def __init__(self, dim: int, init_value: float = 1e-5):
        super().__init__()
        self.scale = nn.Parameter(init_value * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(1, -1, 1, 1)


def _bn_affine(bn: nn.BatchNorm2d):
    """(scale, shift) of an eval-mode BatchNorm: bn(x) = x * scale + shift (per channel)."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    # (one op for the shift: the fold runs per conv per eval forward, where a few us an op add up)
    shift = -bn.running_mean * scale if bn.bias is None else torch.addcmul(bn.bias, bn.running_mean, scale, value=-1)
    return scale, shift


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:   # devices without autocast (meta)
        return False


def bn_foldable(x: torch.Tensor, *bns: nn.Module) -> bool:
    """True when every BatchNorm uses running statistics (eval mode), so it is an affine map that
    can be folded into the neighbouring conv, and ``x`` is computed in full precision (under
    autocast or in half precision the separate BN, which runs in fp32, is more accurate), or in CPU inference
    under autocast to bfloat16: there the conv's output is rounded to bf16 before the BN either way, and the
    fold (in fp32, the folded weights rounded once) saves the BN's fp32 pass over the map."""
    if not all(isinstance(bn, nn.BatchNorm2d) and not bn.training and bn.running_mean is not None for bn in bns):
        return False
    if x.dtype in (torch.float32, torch.float64) and not _autocast_on(x.device.type):
        return True
    return not torch.is_grad_enabled() and _onednn.autocast_bf16(x)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) whose forward is ``ops._onednn.linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class GELUTanh(_TimmGELUTanh):
    """timm's GELUTanh (no parameters, same module name in a model's repr) computed by ``ops.gelu_tanh``: a C
    kernel forward and backward on CPU fp32 where the CPU measured it faster than torch's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_tanh(x)


def _post_op(act: nn.Module):
    """The oneDNN post-op name of an MLP activation module, or None when it has none."""
    if isinstance(act, nn.GELU):
        return 'gelu_tanh' if act.approximate == 'tanh' else 'gelu'
    if isinstance(act, _TimmGELUTanh):
        return 'gelu_tanh'
    return 'gelu' if type(act) is GELU else None   # (not ReLU: see ops._onednn._POST_OPS)


def _hooked(*modules: nn.Module) -> bool:
    """A forward (pre-)hook watches one of ``modules``: a fused path would skip its call, so take the modules'."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


class FusedMlp(Mlp):
    """timm's Mlp (same modules and state dict) whose hidden activation runs as the oneDNN GEMM's post-op
    where ``ops._onednn.linear`` takes that route (fp32 CPU inference); elsewhere, or when a hook watches
    fc1 or the activation, exactly timm's forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = _post_op(self.act)
        if act is None or _hooked(self.fc1, self.act):
            return super().forward(x)
        rows = x.numel() // x.shape[-1]
        if rows * self.fc1.out_features * x.element_size() > _HIDDEN_BYTES and _onednn.routed(x, self.fc1.weight):
            # row chunks: each hidden block is reused from the heap, where one large hidden map would be a fresh
            # mmap (glibc's threshold is at most 32 MB) page-faulted on every call
            n = max(1, _CHUNK_BYTES // (self.fc1.out_features * x.element_size()))
            flat = x.reshape(rows, x.shape[-1])
            out = torch.cat([self._mlp(flat[i:i + n], act) for i in range(0, rows, n)])
            return out.view(*x.shape[:-1], out.shape[-1])
        return self._mlp(x, act)

    def _mlp(self, x: torch.Tensor, act: str) -> torch.Tensor:
        x = self.drop1(linear(x, self.fc1.weight, self.fc1.bias, act))
        return self.drop2(self.fc2(self.norm(x)))


# an MLP hidden map larger than this is computed in row chunks of _CHUNK_BYTES (inference on the oneDNN route).
# Measured AMD EPYC, 2 threads, fp32, (25088 x 96) -> 384 -> 96 (DaViT-T stage 1 at batch 8): 31.2 -> 21.9 ms in
# chunks of 4096 rows; (6272 x 192) -> 768 -> 192 (19 MB hidden): no gain
_HIDDEN_BYTES, _CHUNK_BYTES = 24 << 20, 6 << 20


class DepthwiseConv2d(nn.Conv2d):
    """nn.Conv2d with one filter per channel (same parameters and state dict) whose forward is
    ``ops.depthwise_conv2d`` (a C kernel's weight gradient in CPU fp32 training)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depthwise_conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)


def _depthwise(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.groups == m.in_channels == m.out_channels and m.padding_mode == 'zeros'
            and m.padding != 'same')


def use_fast_layers(model: nn.Module) -> nn.Module:
    """Make every plain nn.Linear of ``model`` (timm's Mlp and heads included) a ``Linear``, every timm Mlp on
    linears with a GELU a ``FusedMlp`` and every depthwise nn.Conv2d a ``DepthwiseConv2d``: class switches,
    parameters and hooks untouched. Done by the builder for every zoo model."""
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = Linear
        elif type(m) is Mlp and isinstance(m.fc1, nn.Linear) and _post_op(m.act) is not None:
            m.__class__ = FusedMlp
        elif _depthwise(m):
            m.__class__ = DepthwiseConv2d
    return model


def conv_bn_folded(conv: nn.Conv2d, bn: nn.BatchNorm2d, pre_bn: nn.BatchNorm2d = None):
    """Weight and bias of ``bn(conv(pre_bn(x)))`` as one convolution, for eval-mode BatchNorms.

    Computed from the live parameters on each call (cheap next to the activations), so it stays
    differentiable w.r.t. the conv and BN affine weights (frozen-BN fine-tuning keeps working) and
    never goes stale (a cache keyed on version counters was tried and dropped: ``p.data.copy_``
    does not bump them, so it could serve stale weights). ``pre_bn`` may only precede an unpadded
    1x1 convolution."""
    w, b = conv.weight, conv.bias
    if pre_bn is not None:
        assert conv.kernel_size == (1, 1) and conv.groups == 1
        s0, t0 = _bn_affine(pre_bn)
        b = (w.flatten(1) @ t0) + (b if b is not None else 0)
        w = w * s0.view(1, -1, 1, 1)
    s, t = _bn_affine(bn)
    w = w * s.view(-1, 1, 1, 1)
    b = t if b is None else b * s + t
    return w, b


def conv_forward(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Run ``conv``'s geometry (incl. timm's dynamic 'same' padding) with other weights."""
    if isinstance(conv, Conv2dSame):
        x, weight, padding = same_conv_args(conv, x, weight)
        return F.conv2d(x, weight, bias, conv.stride, padding, conv.dilation, conv.groups)
    if _depthwise_call(conv, x, weight):
        return depthwise_conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def conv_act_forward(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     act: nn.Module) -> torch.Tensor:
    """``act(conv_forward(conv, x, weight, bias))``; where the conv runs on oneDNN (CPU inference, fp32 or bf16
    autocast) and ``act`` is a GELU, the activation is the convolution's post-op (no pass of its own over the
    map: MaxViT-T's MBConv GELUs were 19% of its bf16 forward at batch 8)."""
    post = _post_op(act)
    dtype = _onednn.conv_dtype(x, weight, bias) if post is not None and not _hooked(act) else None
    if dtype is None or conv.padding_mode != 'zeros' or isinstance(conv.padding, str) and conv.padding != 'valid':
        return act(conv_forward(conv, x, weight, bias))
    if isinstance(conv, Conv2dSame):
        x, weight, padding = same_conv_args(conv, x, weight)
    else:
        padding = (0, 0) if conv.padding == 'valid' else conv.padding
    return _onednn.conv_act(x, weight, bias, padding, conv.stride, conv.dilation, conv.groups, post, dtype)


def _depthwise_call(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """``conv`` run with ``weight`` on ``x`` is depthwise: one single-channel filter per input channel."""
    return conv.groups == x.shape[1] == weight.shape[0] and weight.shape[1] == 1


_SYMMETRIC_SAME = True


@contextmanager
def padded_same():
    """Every Conv2dSame on its padded map inside the block (the MAC counter counts the architecture's filters,
    not the zero row / column of :func:`same_conv_args`)."""
    global _SYMMETRIC_SAME
    saved, _SYMMETRIC_SAME = _SYMMETRIC_SAME, False
    try:
        yield
    finally:
        _SYMMETRIC_SAME = saved


def same_conv_args(conv: Conv2dSame, x: torch.Tensor, weight: torch.Tensor):
    """(x, weight, padding) that run ``conv``'s TF 'same' padding (zeros, ``total // 2`` before, the rest after) as
    ``F.conv2d(x, weight, bias, conv.stride, padding, ...)``. A depthwise undilated filter keeps the map unpadded:
    the padding becomes symmetric, ``(total + 1) // 2`` a side, and where the total is odd (one more after than
    before) the filter gets a zero row / column in front, so every output sums the same taps over the same inputs
    (bitwise the same result). Why: the padded copy of the map cost more than the convolution itself; MaxViT-T's
    stride-2 depthwise 3x3 on its channels-last (8, 256, 112, 112) map, padded copy and conv 46.9 ms, symmetric
    conv with the 4x4 filter 8.5 ms (AMD EPYC, 2 threads; NCHW 88 -> 50 ms); MaxViT-T's batch-8 forward 755 -> 670 ms.
    Dense filters (the extra row and column would be 16/9 of the products), symbolic sizes (the total's parity
    unknown) and autograd (oneDNN's backward of the 4x4 stride-2 filter measured slower: MaxViT-T's training step
    2646 -> 2770 ms) take the padded map."""
    sizes = x.shape[-2:]
    if (_depthwise_call(conv, x, weight) and tuple(conv.dilation) == (1, 1) and not symbolic(*sizes)
            and not records_grad(x, weight) and _SYMMETRIC_SAME):
        totals = [get_same_padding(n, k, s, 1) for n, k, s in zip(sizes, weight.shape[-2:], conv.stride)]
        if totals[0] % 2 or totals[1] % 2:
            weight = F.pad(weight, (totals[1] % 2, 0, totals[0] % 2, 0))
        return x, weight, tuple((t + 1) // 2 for t in totals)
    return pad_same(x, conv.kernel_size, conv.stride, conv.dilation), weight, (0, 0)


def pad_same(x: torch.Tensor, kernel, stride, dilation=(1, 1)) -> torch.Tensor:
    """TF 'same' zero padding of an NCHW map for a strided kernel (timm's ``pad_same``: total
    ``max((ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)``, half before, the rest after).

    Under symbolic sizes (torch.export with dynamic H, W) the total, ``(-n) % s + (k - 1) * d + 1 - s``, would be a
    guard on the size (timm's ``max`` / ``ceil`` of it specialise the graph): the map is padded by the largest
    amounts (static) and the rows of this size's padding are picked by an index."""
    sizes = x.shape[-2:]
    if not symbolic(*sizes):
        return _timm_pad_same(x, kernel, stride, dilation)
    for axis, n, k, st, d in zip((-2, -1), sizes, kernel, stride, dilation):
        span = (k - 1) * d + 1
        if span < st:
            raise NotImplementedError(f"'same' padding of a kernel span {span} < stride {st} under symbolic sizes")
        total = (-n) % st + span - st
        lo_max, lo_min = (span - 1) // 2, (span - st) // 2          # the totals range over span - st .. span - 1
        hi_max = span - 1 - lo_min
        pad = [0, 0, lo_max, hi_max] if axis == -2 else [lo_max, hi_max]
        x = F.pad(x, pad).index_select(axis, torch.arange(n + total, device=x.device) + (lo_max - total // 2))
    return x


def trunc_normal_init(*types):
    """The usual ViT-style init for ``model.apply``: layers of ``types`` get trunc-normal(0.02) weights
    and zero biases."""
    def init(m: nn.Module) -> None:
        if isinstance(m, types):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return init


def drop_path_rates(rate: float, depths) -> list:
    """Per-stage lists of stochastic-depth rates rising linearly 0 -> ``rate`` over all blocks
    (plain Python, so models also build on the meta device)."""
    total = sum(depths)
    flat = [rate * i / max(total - 1, 1) for i in range(total)]
    out, start = [], 0
    for d in depths:
        out.append(flat[start:start + d])
        start += d
    return out


class ConvNorm(nn.Module):
    """Bias-free conv followed by BatchNorm (keys ``c``, ``bn``: the layout of SHViT / LeViT-style
    models). In eval with full precision the BN is folded into the conv on the fly;
    :meth:`fuse` returns the equivalent plain ``nn.Conv2d`` for deployment."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, padding: int = 0,
                 groups: int = 1, bn_weight_init: float = 1.):
        super().__init__()
        self.c = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bn_foldable(x, self.bn):
            return conv_forward(self.c, x, *conv_bn_folded(self.c, self.bn))
        return self.bn(self.c(x))

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        c = self.c
        w, b = conv_bn_folded(c, self.bn.eval())
        m = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation, c.groups,
                      bias=True, device=w.device, dtype=w.dtype)
        m.weight.copy_(w)
        m.bias.copy_(b)
        return m


class Residual(nn.Module):
    """``x + m(x)``; fusing a residual depthwise ConvNorm folds the identity into the kernel centre.
    The sum is taken in place in m's output (a fresh tensor from a conv / norm that autograd does not
    keep): a new activation-sized tensor per residual costs page faults on CPU."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.m(x)
        return y.add_(x) if y is not x and y.dtype == x.dtype else x + y   # mixed dtypes (autocast): promote

    @torch.no_grad()
    def fuse(self) -> nn.Module:
        if not isinstance(self.m, ConvNorm):
            return self
        conv = self.m.fuse()
        k = conv.kernel_size
        if conv.groups != conv.in_channels or conv.in_channels != conv.out_channels or k[0] % 2 == 0:
            return Residual(conv)
        conv.weight[:, 0, k[0] // 2, k[1] // 2] += 1
        return conv


def fuse_modules(model: nn.Module) -> nn.Module:
    """Replace, recursively, every child that has a ``fuse()`` by what it returns (deployment)."""
    for name, child in model.named_children():
        fused = child.fuse() if hasattr(child, 'fuse') else child
        if fused is not child:
            setattr(model, name, fused)
        fuse_modules(fused)
    return model


class FoldedConvNormAct(ConvNormAct):
    """timm's ConvNormAct (keys ``conv``, ``bn``; ``bn`` carries the activation) whose BatchNorm is
    folded into the conv in full-precision eval (one pass over the map instead of two)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bn_foldable(x, self.bn):
            return super().forward(x)
        w, b = conv_bn_folded(self.conv, self.bn)
        if isinstance(self.bn.drop, nn.Identity) or not self.bn.drop.training:   # (no dropout between them)
            x = conv_act_forward(self.conv, x, w, b, self.bn.act)
        else:
            x = self.bn.act(self.bn.drop(conv_forward(self.conv, x, w, b)))
        aa = getattr(self, 'aa', None)
        return aa(x) if aa is not None else x
