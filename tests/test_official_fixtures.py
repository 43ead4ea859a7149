"""The zoo against the official code of the families whose reference is their official repository.

Fixtures (tests/fixtures, made by tools/make_official_fixture.py from the recipes in tools/official/) hold
official-layout weights, inputs and the official model's logits. Each is wrapped as the release file is,
loaded through the family's checkpoint_filter_fn and run in float32 and float64. A declared fixture that is
missing fails; so does an official-reference family without a recipe."""
import importlib.util
from pathlib import Path

import pytest
import timm
import torch

from mixzoo import MODELS
from helpers import rel_err

_spec = importlib.util.spec_from_file_location(
    'mixzoo_official_recipes', Path(__file__).resolve().parent.parent / 'tools' / 'official' / '__init__.py')
official = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(official)

RECIPES = official.recipes()
FIXTURES = [pytest.param(fam, name, id=name) for fam, rec in RECIPES.items() for name in rec.FIXTURES]


def test_every_official_reference_family_has_a_recipe():
    fams = {m.family for m in MODELS.values() if m.reference.startswith('official:')}
    assert fams <= set(RECIPES), f'official-reference families without tools/official/<family>.py: {fams - set(RECIPES)}'
    for fam, rec in RECIPES.items():
        refs = {m.reference for m in MODELS.values() if m.family == fam}
        assert refs == {f'official:{rec.REPO}'}, (fam, refs, rec.REPO)
        assert rec.FIXTURES, f'{fam}: the recipe declares no fixture'


@pytest.mark.parametrize('family,name', FIXTURES)
def test_official_fixture_logits(family, name, tmp_path):
    meta, weights, runs = official.read_fixture(name)     # FileNotFoundError (a failure) if it is missing
    spec = RECIPES[family].FIXTURES[name]
    # a recipe edited without regenerating its fixture would otherwise test a stale configuration
    assert (meta['zoo'], meta['zoo_kwargs'], [tuple(s) for s in meta['sizes']]) == \
        (spec['zoo'], spec['zoo_kwargs'], [tuple(s) for s in spec['sizes']]), \
        f'{name}: fixture made from another recipe; regenerate it (tests/fixtures/README.md)'
    path = tmp_path / f'{name}.pth'
    wrapper = RECIPES[family].WRAPPER
    torch.save({wrapper: weights} if wrapper else weights, path)       # as the release file holds them
    # (the class count goes into the cfg too, or timm drops a classifier of another size than 1000)
    overlay = dict(file=str(path), num_classes=spec['zoo_kwargs'].get('num_classes', 1000))
    zoo = timm.create_model(spec['zoo'], pretrained=True, pretrained_cfg_overlay=overlay, **spec['zoo_kwargs']).eval()
    for (x, logits32, logits64), size in zip(runs, meta['sizes']):
        assert tuple(x.shape[2:]) == tuple(size)
        with torch.no_grad():
            out32 = zoo(x)
            out64 = zoo.double()(x.double())
            zoo.float()
        assert out32.shape == logits32.shape
        err32, err64 = rel_err(out32, logits32), rel_err(out64, logits64)
        assert err32 <= 1e-5, f'{name} at {size}: float32 max |zoo - official| = {err32:.2e} of the logit scale'
        # the official models build some constants in float32 (TransNeXt's CPB table and length scales), which
        # bounds how close two float64 runs can be: measured ~1e-9
        assert err64 <= 1e-8, f'{name} at {size}: float64 max |zoo - official| = {err64:.2e} of the logit scale'
