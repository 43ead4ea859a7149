"""Shared helpers for the test suite."""
import torch

from backbones._counting import gmacs, param_count  # noqa: F401  (re-exported for the tests)
from backbones._random import randomize_  # noqa: F401


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
