"""Deterministic random weights for equivalence checks (tests, official fixtures).

Pure torch, no zoo imports: tools/make_official_fixture.py loads this file by path in a process that
runs the official code (whose top-level packages may clash with the zoo's)."""
import torch
import torch.nn as nn


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
