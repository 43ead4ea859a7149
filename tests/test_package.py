"""The installed distribution: one namespace, ``mixzoo``, whatever the repository's folders are called."""
import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ('setup.py', 'pyproject.toml', 'README.md', 'backbones', 'ops', 'checkpoints')


def test_wheel_holds_only_mixzoo_and_works_on_its_own(tmp_path):
    """`pip wheel --no-deps .` (from a copy of the sources, so no build/ or egg-info is left in the checkout;
    no build isolation: nothing is downloaded) gives one top-level package, mixzoo. Installed from it (not
    the checkout): importing mixzoo registers every model in timm (what timm's train.py --device-modules
    mixzoo does), the manifest is found as package data, the ops run, `python -m mixzoo.ops info` works."""
    src, out = tmp_path / 'src', tmp_path / 'wheel'
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns('__pycache__'))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy(ROOT / name, src / name)
    r = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', str(src),
                        '-w', str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = out.glob('mixzoo-*.whl')
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split('/', 1)[0] for n in names if not n.split('/', 1)[0].endswith('.dist-info')} == {'mixzoo'}
    # the ops as mixzoo.ops, the C kernels' sources and their shared header (compiled on first use) and the
    # manifest as package data
    assert {'mixzoo/__init__.py', 'mixzoo/mm.py', 'mixzoo/ops/__init__.py', 'mixzoo/ops/__main__.py',
            'mixzoo/ops/halo/halo_cpu.c', 'mixzoo/ops/gelu/gelu_cpu.c', 'mixzoo/ops/dwconv/dwconv_cpu.c',
            'mixzoo/ops/_vec.h', 'mixzoo/ops/_attention_cpu.c',
            'mixzoo/checkpoints/manifest.json'} <= set(names)

    site = tmp_path / 'site'
    r = subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '-q', '--target', str(site), str(wheel)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    code = ('import importlib, timm, torch; mixzoo = importlib.import_module("mixzoo"); '
            'assert mixzoo.__file__.startswith(%r), mixzoo.__file__; '
            'assert set(timm.list_models("mz_*")) == set(mixzoo.list_models()); '
            'from mixzoo import _pretrained; assert _pretrained.manifest()["models"]; '
            'from mixzoo import ops; q = torch.randn(2, 2, 49, 8); '
            'print(ops.window_attention(q, q, q).shape)') % str(site)
    env = {**os.environ, 'PYTHONPATH': str(site)}
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([sys.executable, '-m', 'mixzoo.ops', 'info'], capture_output=True, text=True, cwd=tmp_path,
                       env=env)
    assert r.returncode == 0 and '[window]' in r.stdout, r.stdout + r.stderr


def _imported_tops(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
        if isinstance(node, ast.Import):
            yield from (a.name.split('.')[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split('.')[0]


def test_no_code_imports_the_folders_by_their_own_names():
    """`ops` / `backbones` are folder names, not packages: importing them would load a second copy of the
    zoo beside mixzoo (its own op registry, its own model classes)."""
    bad = [f'{p.relative_to(ROOT)}: {top}' for d in ('backbones', 'ops', 'tools', 'tests')
           for p in (ROOT / d).rglob('*.py') for top in _imported_tops(p) if top in ('ops', 'backbones', 'checkpoints')]
    assert not bad, bad


USER_DOCS = ('README.md', 'INSTALL.md', 'CONTRIBUTING.md', 'checkpoints/README.md', 'configs/README.md',
             'tests/fixtures/README.md')


def test_readme_is_for_users():
    """Short, a create_model example near the top, every model in its (generated) table, the CI command as
    its test command; no user-facing page points at ../shared (users do not have it)."""
    import mixzoo
    text = (ROOT / 'README.md').read_text(encoding='utf-8')
    lines = text.splitlines()
    assert len(lines) <= 190, f'README.md has {len(lines)} lines: it is for users, measurements go to BENCHMARKS.md'
    assert any('timm.create_model(' in line for line in lines[:60])
    missing = [n for n in mixzoo.list_models() if f'`{n}`' not in text]
    assert not missing, f'not in the README model table (python tools/generate.py): {missing}'
    ci = (ROOT / '.ci' / 'run').read_text(encoding='utf-8').strip().splitlines()[-1]
    assert ci.split('tools/env.sh', 1)[1] in text, 'the README test command is not the one .ci/run runs'
    shared = [d for d in USER_DOCS if '../shared' in (ROOT / d).read_text(encoding='utf-8')]
    assert not shared, shared
