"""Shared helpers for the test suite."""
import torch
import torch.nn as nn

from backbones._counting import gmacs, param_count  # noqa: F401  (re-exported for the tests)


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Perturb every parameter and buffer so that no term of the forward is trivially zero/one:
    BN running stats random, zero-initialised biases and tiny layer scales made O(0.1)."""
    g = torch.Generator().manual_seed(seed)
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            continue
        r = torch.randn(t.shape, generator=g, dtype=torch.float32).to(t.dtype)
        if name.endswith('running_var'):
            t.copy_(torch.rand(t.shape, generator=g) * 1.5 + 0.5)
        elif name.endswith('running_mean'):
            t.copy_(r * 0.1)
        elif t.ndim <= 1:
            t.add_(r * 0.1)
        else:
            std = t.float().std().item() if t.numel() > 1 else 0.
            t.add_(r * (0.5 * std if std > 0 else 0.02))
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the scale (max |b|) of the reference."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def official_layout(family: str, state_dict):
    """A zoo state dict renamed to the family's official release layout (the inverse of its filter),
    for families whose reference is the official repository."""
    import re
    if family != 'transnext':
        raise KeyError(f'no official layout for {family}')
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r'^stages\.(\d)\.downsample\.', lambda m: f'patch_embed{int(m[1]) + 1}.', k)
        k = re.sub(r'^stages\.(\d)\.blocks\.', lambda m: f'block{int(m[1]) + 1}.', k)
        k = re.sub(r'^stages\.(\d)\.norm\.', lambda m: f'norm{int(m[1]) + 1}.', k)
        out[k.replace('head.fc.', 'head.')] = v
    return out
