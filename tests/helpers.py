"""Shared helpers for the test suite."""
import torch

from mixzoo._counting import gmacs, param_count  # noqa: F401  (re-exported for the tests)
from mixzoo._random import randomize_  # noqa: F401


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-12) -> float:
    """max |a - b| relative to the scale (max |b|, at least ``floor``) of the reference."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(floor)).item()


def first_variants():
    """{family: its first registered variant that is neither build-only nor slow}: the one small variant per
    family that tests run where every variant would cost too much."""
    from mixzoo import MODELS
    first = {}
    for name, m in MODELS.items():
        if not m.build_only and not m.slow:
            first.setdefault(m.family, name)
    return first


def official_layout(family: str, state_dict):
    """A zoo state dict renamed to the family's release layout: its record's rename table, read backwards."""
    from mixzoo import FAMILIES
    renames = FAMILIES[family].renames
    if renames is None:
        raise KeyError(f'{family} declares no release-layout renames')
    return renames.to_official(state_dict)
