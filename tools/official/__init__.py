"""Recipes for the official-reference fixtures: one file per family whose reference is its official
repository (``<family>.py``). A recipe declares

    REPO        'owner/name' of the official repository
    WRAPPER     the key the release file wraps its state dict in ('model'), or None for a plain state dict
    FIXTURES    {fixture name: dict(zoo=<zoo model name>, zoo_kwargs={...}, official_kwargs={...},
                                    sizes=[(H, W), ...], batch=N)}
    build_official(repo, official_kwargs, size) -> the official nn.Module, imported from the work tree
                at ``repo`` (built for ``size`` where the official model is tied to one input size)
and may declare

    CPU_DTYPES  the dtypes the official code runs in on CPU, where others would end the process (default: any)

tools/make_official_fixture.py writes tests/fixtures/<fixture name>.safetensors from a recipe;
tests/test_official_fixtures.py loads every declared fixture through the zoo's converter. Recipes import
no zoo code (the official code runs in processes of its own), so this module is loaded by file path.
"""
import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Dict

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
FIXTURE_DIR = ROOT / 'tests' / 'fixtures'
REQUIRED = ('REPO', 'WRAPPER', 'FIXTURES', 'build_official')


def recipe(family: str) -> ModuleType:
    path = HERE / f'{family}.py'
    if not path.is_file():
        known = ', '.join(recipes()) or 'none'
        raise KeyError(f'no official-fixture recipe for {family!r} (tools/official/{family}.py); known: {known}')
    spec = importlib.util.spec_from_file_location(f'mixzoo_official_recipe_{family}', path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    missing = [a for a in REQUIRED if not hasattr(mod, a)]
    if missing:
        raise AttributeError(f'tools/official/{family}.py lacks {", ".join(missing)}')
    return mod


def recipes() -> Dict[str, ModuleType]:
    return {p.stem: recipe(p.stem) for p in sorted(HERE.glob('*.py')) if not p.stem.startswith('_')}


def fixture_path(name: str) -> Path:
    return FIXTURE_DIR / f'{name}.safetensors'


def read_fixture(name: str):
    """-> (metadata dict, weights {official key: tensor}, [(input, logits32, logits64) per size])."""
    from safetensors import safe_open
    path = fixture_path(name)
    if not path.is_file():
        raise FileNotFoundError(f'fixture {path} is missing: regenerate it with tools/make_official_fixture.py '
                                f'(see tests/fixtures/README.md)')
    with safe_open(str(path), framework='pt') as f:
        meta = json.loads(f.metadata()['mixzoo'])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    # (newer fixtures store weights and inputs as float16: float16-representable values, exact in float32)
    weights = {k[len('weights/'):]: v.float() if v.is_floating_point() else v for k, v in tensors.items()
               if k.startswith('weights/')}
    runs = [(tensors[f'input/{i}'].float(), tensors[f'logits32/{i}'], tensors[f'logits64/{i}'])
            for i in range(len(meta['sizes']))]
    return meta, weights, runs
