#!/usr/bin/env python
"""Make the official-reference fixtures of a family: build the official model from its repository,
fill deterministic random weights that make every tensor matter (backbones/_random.py: BN statistics,
norm affines, temperatures, biases perturbed), run seeded inputs at each declared size in float32 and
float64, and write tests/fixtures/<name>.safetensors (official-layout weights, inputs, logits, and the
metadata: official commit, command, zoo model and kwargs). tests/fixtures/README.md is rewritten from
the metadata of every fixture present.

    python tools/make_official_fixture.py --family transnext --official-repo PATH/TransNeXt [--only NAME]

Run it in a Python that can import the official code's dependencies (timm, einops, ...), outside the
zoo's own test environment if they clash; the zoo itself is not imported. Recipes: tools/official/.
"""
import argparse
import datetime
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


official = _load(HERE / 'official' / '__init__.py', 'mixzoo_official_recipes')
randomize_ = _load(ROOT / 'backbones' / '_random.py', 'mixzoo_random').randomize_


# what follows this line in tests/fixtures/README.md is written by hand (full-size checks) and kept
BY_HAND = '## Full-size checks (by hand, with the official code; kept when the table above is regenerated)\n'


def official_commit(repo: Path, given: str = None) -> str:
    if given:
        return given
    try:
        return subprocess.run(['git', '-C', str(repo), 'rev-parse', 'HEAD'], check=True, capture_output=True,
                              text=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        marker = repo / '.commit'       # an exported tree (git archive) with the commit written beside it
        if marker.is_file():
            return marker.read_text().strip()
    raise SystemExit(f'cannot tell the official commit of {repo} (not a git work tree, no .commit file): '
                     f'pass --official-commit')


def _half_exact(t: torch.Tensor) -> torch.Tensor:
    return (t.half() if t.is_floating_point() else t).to(t.dtype).detach().contiguous()


@torch.no_grad()
def make_fixture(family: str, rec, name: str, repo: Path, commit: str, command: str) -> Path:
    spec = rec.FIXTURES[name]
    sizes = [tuple(s) for s in spec['sizes']]
    batch = spec.get('batch', 2)
    torch.manual_seed(0)
    model = randomize_(rec.build_official(str(repo), dict(spec['official_kwargs']), sizes[0]), seed=0)
    # weights and inputs take float16-representable values, stored as float16 (exactly: half the file); the
    # official model runs on them cast back to its own dtypes
    weights = {k: _half_exact(v) for k, v in model.state_dict().items()}
    tensors = {f'weights/{k}': v.half() if v.is_floating_point() else v for k, v in weights.items()}
    g = torch.Generator().manual_seed(1)
    for i, size in enumerate(sizes):
        # a fresh model per size, run as built (buffers keep the dtypes the official code gives them), then in float64
        m = rec.build_official(str(repo), dict(spec['official_kwargs']), size)
        m.load_state_dict(weights, strict=True)
        x = _half_exact(torch.randn(batch, 3, *size, generator=g))
        tensors[f'input/{i}'] = x.half()
        tensors[f'logits32/{i}'] = m.eval()(x).float().contiguous()
        tensors[f'logits64/{i}'] = m.double().eval()(x.double()).contiguous()
    meta = dict(name=name, family=family, official_repo=rec.REPO, official_commit=commit,
                command=command, wrapper=rec.WRAPPER, zoo=spec['zoo'], zoo_kwargs=spec['zoo_kwargs'],
                official_kwargs=spec['official_kwargs'], sizes=[list(s) for s in sizes], batch=batch,
                torch=torch.__version__, made=datetime.date.today().isoformat(),
                # the official code's own libraries, as imported (e.g. NATTEN for NAT / DiNAT)
                libraries={m: getattr(sys.modules[m], '__version__', '?') for m in ('natten', 'timm', 'einops')
                           if m in sys.modules},
                params=sum(v.numel() for v in model.parameters()))
    from safetensors.torch import save_file
    official.FIXTURE_DIR.mkdir(parents=True, exist_ok=True)
    path = official.fixture_path(name)
    save_file(tensors, str(path), metadata={'mixzoo': json.dumps(meta)})
    return path


def write_readme() -> Path:
    rows = []
    for fam, rec in official.recipes().items():
        for name in rec.FIXTURES:
            try:
                meta = official.read_fixture(name)[0]
            except FileNotFoundError:
                rows.append(f'| `{name}` | {rec.REPO} | (missing) | | | |')
                continue
            size = official.fixture_path(name).stat().st_size / 1e6
            sizes = ', '.join(f'{h}x{w}' for h, w in meta['sizes'])
            rows.append(f"| `{name}` | {meta['official_repo']} | `{meta['official_commit'][:12]}` | `{meta['zoo']}` "
                        f"reduced, {meta['params']:,} params | {sizes} (batch {meta['batch']}) | {size:.2f} MB |")
    text = f"""# Official-reference fixtures

Made with the official code of each family by `tools/make_official_fixture.py` (recipes in
`tools/official/<family>.py`), checked by `tests/test_official_fixtures.py`: the official-layout weights
are wrapped as the release file is, loaded through the zoo's `checkpoint_filter_fn`
(`timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))`), and the zoo's logits
must match the official ones (float32 within 1e-5 of the logit scale, float64 within 1e-8). A declared
fixture that is missing fails the test.

Each file (safetensors) holds `weights/<official key>` (deterministic random weights: BN statistics,
norm affines, temperatures and biases all perturbed), `input/<i>`, `logits32/<i>` and `logits64/<i>` (the
official model in float32 / float64 on the same input) and its metadata (commit, command, configs, the
official code's libraries, e.g. NATTEN). Fixtures made since NAT / DiNAT store weights and inputs as float16:
values chosen float16-representable, so the float32 / float64 runs on them are exact.

| fixture | official repository | commit | config | sizes | file |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Regenerate (the official repository checked out or exported anywhere; its commit is read with git, or
from a `.commit` file beside an exported tree):

    python tools/make_official_fixture.py --family <family> --official-repo <path to the official repo>

The exact command of each file is in its metadata (`command`).
"""
    path = official.FIXTURE_DIR / 'README.md'
    kept = path.read_text().split(BY_HAND, 1)[1] if path.is_file() and BY_HAND in path.read_text() else '\n'
    path.write_text(f'{text}\n{BY_HAND}{kept}')
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--family', required=True, help=f'one of: {", ".join(official.recipes())}')
    ap.add_argument('--official-repo', required=True, type=Path, help='work tree of the official repository')
    ap.add_argument('--official-commit', help='commit of that tree when it is not a git work tree')
    ap.add_argument('--only', nargs='*', help='fixture names (default: all of the family)')
    args = ap.parse_args(argv)
    rec = official.recipe(args.family)
    repo = args.official_repo.resolve()
    if not repo.is_dir():
        raise SystemExit(f'--official-repo {repo}: not a directory')
    commit = official_commit(repo, args.official_commit)
    names = args.only or list(rec.FIXTURES)
    unknown = [n for n in names if n not in rec.FIXTURES]
    if unknown:
        raise SystemExit(f'unknown fixture(s) {unknown}; {args.family} declares {list(rec.FIXTURES)}')
    command = f'python tools/make_official_fixture.py --family {args.family} --official-repo <{rec.REPO}>'
    for name in names:
        path = make_fixture(args.family, rec, name, repo, commit, command + (f' --only {name}' if args.only else ''))
        print(f'wrote {path.relative_to(ROOT)} ({path.stat().st_size / 1e6:.2f} MB)')
    print(f'wrote {write_readme().relative_to(ROOT)}')


if __name__ == '__main__':
    sys.exit(main())
