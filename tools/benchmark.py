#!/usr/bin/env python
"""The zoo's main job: for every registered model, parameters and GMACs beside the published
figures, and inference throughput beside its reference model (timm's), measured side by side in
one run (interleaved repetitions, best of each), as a ratio.

    python tools/benchmark.py                          # every model's params/GMACs; speed for the
                                                       # variants tested in full (the default job)
    python tools/benchmark.py --quick                  # a first look: one small model per family,
                                                       # batch 2, best of 3 (a few minutes on 2 cores)
    python tools/benchmark.py --model mz_maxvit_tiny_tf_224 mz_poolformer_s12
    python tools/benchmark.py --model 'mz_poolformer_*' --batch-size 16 --csv out.csv
    python tools/benchmark.py --model mz_maxvit_tiny_tf_224 --compare-backend reference
    python tools/benchmark.py --op halo [--backward]     # an op's backends: time and peak memory
                                                       # (window, halo, neighborhood, routing, linear)

The table is Markdown with padded columns, a legend under it (every column, and what `-` means);
progress (model i of n, elapsed seconds) goes to stderr. The header names the CPU, torch threads,
allocator and load the figures were measured under.

The page: a full run (no --model and default settings) writes its table into BENCHMARKS.md at the
repository root as this machine's section (CPU model + vector ISA, e.g. "AMD EPYC, AVX-512"; the GPU for
a CUDA run), replacing that section and keeping every other machine's; a --quick run writes the
machine's separate "quick look" section. A run of chosen models or settings writes nothing unless
--page PATH is given (then into the machine's "custom run" section); --no-page writes nothing.
"""
import argparse
import csv
import datetime
import fnmatch
import os
import platform
import shlex
import subprocess
import sys
import time
from contextlib import contextmanager
from functools import partial

import torch

import timm  # noqa: E402

from _zoo import mixzoo  # noqa: E402  (tools/ is on sys.path: this script's folder)
from mixzoo._counting import gmacs, param_count  # noqa: E402
from machine import describe, machine_key  # noqa: E402  (tools/ is on sys.path: this script's folder)
import benchpage  # noqa: E402
from benchpage import Column  # noqa: E402
from opbench import best_time  # noqa: E402
from mixzoo import FAMILIES, MODELS  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, 'BENCHMARKS.md')
PREAMBLE = """# Benchmarks

Figures measured by `tools/benchmark.py`: every model's parameters and GMACs beside the published
figures, and its inference throughput beside its reference model (timm's), measured side by side in one
run. Each section holds one machine kind (CPU model and the vector instructions torch's kernels use on
it; the GPU for a CUDA run) with the date, the machine's header (cores, threads, allocator, load) and
the versions. A run replaces its own machine's section and keeps the others, so every figure stays with
the CPU and the date it was measured on; `--quick` runs go to a separate "quick look" section.
Regenerate this machine's section with

```bash
bash tools/env.sh python tools/benchmark.py           # --quick: a first look; --no-page: print only
```

Speed ratios depend on the CPU (vendor, AVX-512 or not) and on the load of the machine: compare ratios
within one section. The sections titled "Earlier" were carried over by hand from the README, with the
CPU and the date of each figure; the benchmark does not rewrite them.

"""


@contextmanager
def forced_backend(spec):
    old = os.environ.get('MIXZOO_BACKEND')
    if spec:
        os.environ['MIXZOO_BACKEND'] = spec
    try:
        yield
    finally:
        if old is None:
            os.environ.pop('MIXZOO_BACKEND', None)
        else:
            os.environ['MIXZOO_BACKEND'] = old


def time_side_by_side(runs, x, reps, device):
    """runs: {label: callable}. Interleaved repetitions; returns {label: best seconds}, outputs."""
    with torch.inference_mode():
        outs = {k: f(x) for k, f in runs.items()}     # the warm-up, and outputs for the equivalence column
        best = best_time({k: partial(f, x) for k, f in runs.items()}, reps, device, warmup=False)
    return best, outs


def quick_models():
    """--quick: each family's smallest fully tested variant (fewest published GMACs)."""
    best = {}
    for m in MODELS.values():
        cost = m.gmacs or float('inf')
        if not m.build_only and (m.family not in best or cost < best[m.family][0]):
            best[m.family] = (cost, m.name)
    return [name for _, name in best.values()]


class Progress:
    """'[i/n 12s] name: step' on stderr, flushed, so a long job shows where it is between table rows."""

    def __init__(self, n):
        self.n, self.t0, self.i = n, time.perf_counter(), 0

    def __call__(self, msg, next_model=False):
        self.i += next_model
        print(f'[{self.i}/{self.n} {time.perf_counter() - self.t0:.0f}s] {msg}', file=sys.stderr, flush=True)


def official_families():
    """Display names of the families whose reference is the official code (no timm model to time)."""
    fams = sorted({m.family for m in MODELS.values() if m.reference.startswith('official:')})
    return [FAMILIES[f].cls.__name__ if f in FAMILIES else f for f in fams]


def columns(args):
    """The model table's columns, each with its legend line. A new measurement adds a Column here and
    fills its key in the row dicts (speed() / main()); the table, legend, CSV and page follow."""
    cols = [
        Column('model', 'the zoo model (`timm.create_model` name).'),
        Column('reference', "the model it is checked and timed against: `timm:<name>` (timed here, side by "
                            "side) or `official:<repository>` (the authors' code, not timed here)."),
        Column('params_M', "the zoo model's parameters, millions.", '.2f', width=7),
        Column('pub_params_M', 'the published parameter count (paper / model card), millions.', 'g'),
        Column('GMACs', "the zoo model's multiply-accumulates per image at the input size, billions "
                        "(torch.utils.flop_counter, plain linear layers, whole attention windows).", '.3f', width=7),
        Column('pub_GMACs', 'the published GMACs at the published resolution.', 'g'),
        Column('dGMACs_%', 'the zoo\'s GMACs vs the published figure, in %: 100 * (GMACs - pub_GMACs) / '
                           'pub_GMACs (only at the model\'s own input size).', '+.2f'),
        Column('top1_pub', 'the published ImageNet-1k top-1, %.', 'g'),
        Column('img/s', f'the zoo model\'s inference throughput, images per second (batch {args.batch_size}, '
                        f'{args.dtype}, best of {args.reps} rounds after a warm-up).', '.4g', width=6),
        Column('ref_img/s', 'the timm reference\'s throughput, measured in the same run, its rounds '
                            'interleaved with the zoo\'s.', '.4g', width=6),
        Column('ratio', 'img/s / ref_img/s, measured side by side in one run (> 1: the zoo is faster). '
                        'Ratios move with the CPU and the load: compare them within one run.', '.2f'),
        Column('max_diff', 'max |zoo logits - reference logits| / max |reference logits| on the timed batch, '
                           'the reference\'s weights loaded into the zoo model.', '.1e'),
    ]
    if args.compare_backend:
        b = args.compare_backend
        cols += [Column(f'{b}_img/s', f'the zoo model with every op forced to backend `{b}`, same run.', '.4g'),
                 Column(f'ratio_vs_{b}', f'img/s / {b}_img/s (> 1: the default backends are faster).', '.2f')]
    return cols


def dash_notes():
    fams = official_families()
    return ['`-`: nothing to show. In `pub_*`, `top1_pub` and `dGMACs_%`: no published figure for that variant '
            '(or another input size than the published one). In the speed columns: the model was not timed '
            '(the default job times the variants tested in full; `--speed none` times none). In `ref_img/s`, '
            '`ratio` and `max_diff`: no timm reference to time -- the official-reference families '
            f'({", ".join(fams)}) are compared with their authors\' code by `tools/official_bench.py --family F '
            '--official-repo PATH`, which needs a checkout of the official repository.']


def run_kind(args):
    """'full' (the default job), 'quick' (--quick) or 'custom' (chosen models or settings): which section
    of the page the run may write."""
    if args.quick:
        return 'quick'
    chosen = [args.model, args.img_size, args.batch_size, args.reps, args.backend, args.compare_backend,
              args.threads, os.environ.get('MIXZOO_BACKEND')]
    if any(v is not None for v in chosen) or args.speed != 'default' or args.dtype != 'float32':
        return 'custom'
    return 'full'


def versions():
    """mixzoo's version and commit (+ 'local changes' when the working tree differs), and Python's."""
    try:
        from importlib.metadata import version
        v = version('mixzoo')
    except Exception:  # noqa: BLE001 - not installed as a distribution
        v = '?'
    commit = ''
    try:
        git = ['git', '-C', ROOT]
        head = subprocess.run(git + ['rev-parse', '--short', 'HEAD'], capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            dirty = subprocess.run(git + ['status', '--porcelain', '--untracked-files=no'], capture_output=True,
                                   text=True, timeout=20).stdout.strip()
            commit = f' (git {head.stdout.strip()}{", local changes" if dirty else ""})'
    except (OSError, subprocess.SubprocessError):
        pass
    return f'mixzoo {v}{commit}, Python {platform.python_version()}'


def page_section(kind, argv, head, cols, rows, elapsed, device):
    """(key, Markdown) of this run's section of the page."""
    key = machine_key(device) + {'full': '', 'quick': ', quick look', 'custom': ', custom run'}[kind]
    what = {'full': 'the full run', 'quick': 'a quick look (`--quick`: a first look, not a figure)',
            'custom': 'a custom run'}[kind]
    cmd = ' '.join(['python tools/benchmark.py'] + [shlex.quote(a) for a in argv])
    when = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
    lines = [f'## {key}', '',
             f'Measured {when}: {what}, `{cmd}`, '
             f'{f"{elapsed / 60:.0f} min" if elapsed >= 120 else f"{elapsed:.0f} s"}.', '',
             '```text', *head, '```', '',
             *benchpage.table(cols, rows), '',
             *benchpage.legend(cols, dash_notes())]
    return key, '\n'.join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', nargs='+', default=None, help='zoo model names or globs (default: all)')
    p.add_argument('--speed', choices=['default', 'all', 'none'], default='default',
                   help="which models to time: 'default' = --model ones, else those not build_only")
    p.add_argument('--img-size', type=int, default=None, help='input size (default: the model\'s own)')
    p.add_argument('--batch-size', type=int, default=None, help='default 8 (--quick: 2)')
    p.add_argument('--reps', type=int, default=None, help='timed rounds, best kept; default 5 (--quick: 3)')
    p.add_argument('--quick', action='store_true', help='a first look: one small model per family (or the '
                                                        '--model ones), batch 2, best of 3')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: all cores)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--dtype', default='float32', choices=['float32', 'float16', 'bfloat16'])
    p.add_argument('--backend', default=None, help="force op backends for the zoo, e.g. 'window:torch'")
    p.add_argument('--compare-backend', default=None, help="also time the zoo with this backend, e.g. 'reference'")
    p.add_argument('--csv', default=None, help='append rows to this CSV file')
    p.add_argument('--page', default=None, metavar='PATH',
                   help='write the table into this page, as this machine\'s section (default: BENCHMARKS.md at '
                        'the repository root, for a full or --quick run; a run of chosen models or settings '
                        'writes only with --page)')
    p.add_argument('--no-page', action='store_true', help='write no page, print only')
    p.add_argument('--op', default=None, help='benchmark one op\'s backends instead (window, halo, neighborhood, '
                                               'routing, linear): time and peak memory on its family\'s shapes '
                                               '(tools/opbench.py)')
    p.add_argument('--backward', action='store_true', help='with --op: time forward+backward')
    args = p.parse_args(argv)
    kind = run_kind(args)
    if args.batch_size is None:
        args.batch_size = 2 if args.quick else 8
    if args.reps is None:
        args.reps = 3 if args.quick else 5
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.op:
        import opbench
        if args.op not in opbench.OPS:
            p.error(f'--op must be one of {", ".join(opbench.OPS)}')
        print('\n'.join(describe(args.device)))
        print(f'device {args.device}, {args.dtype}')
        opbench.OPS[args.op](args)
        return 0
    dtype = getattr(torch, args.dtype)

    names = quick_models() if args.quick and not args.model else list(MODELS)
    if args.model:
        names = [n for n in MODELS if any(fnmatch.fnmatch(n, pat) for pat in args.model)]
        unknown = [pat for pat in args.model if not any(fnmatch.fnmatch(n, pat) for n in MODELS)]
        if unknown:
            p.error(f'unknown model(s) {unknown}; known: {", ".join(MODELS)}')
    timed = set(names) if (args.speed == 'all' or (args.speed == 'default' and (args.model or args.quick))) else \
        set() if args.speed == 'none' else {n for n in names if not MODELS[n].build_only}

    forced = os.environ.get('MIXZOO_BACKEND')
    head = describe(args.device) + [
        f'device {args.device}, batch {args.batch_size}, {args.dtype}, best of {args.reps}'
        f'{", quick mode" if args.quick else ""}; timed: {len(timed)} of {len(names)} models'
        f'{f"; MIXZOO_BACKEND={forced}" if forced else ""}',
        versions()]
    print('\n'.join(head), flush=True)
    cols = columns(args)
    # widths fixed before the first row so the rows line up as they stream in (the page re-pads)
    widths = benchpage.widths(cols, [{'model': n, 'reference': MODELS[n].reference} for n in names])
    print('\n'.join(benchpage.header(cols, widths)), flush=True)
    rows = []
    progress = Progress(len(names))
    t0 = time.perf_counter()
    for name in names:
        info = MODELS[name]
        size = (args.img_size or info.img_size,) * 2
        progress(f'{name}: parameters and GMACs', next_model=True)
        with torch.device('meta'):
            zm = timm.create_model(name)
            params, g = param_count(zm) / 1e6, gmacs(zm, size)
        own_size = size[0] == info.img_size
        row = {'model': name, 'reference': info.reference, 'params_M': params, 'pub_params_M': info.params_m,
               'GMACs': g, 'pub_GMACs': info.gmacs,
               'dGMACs_%': 100 * (g - info.gmacs) / info.gmacs if info.gmacs and own_size else None,
               'top1_pub': info.top1}
        if name in timed:
            progress(f'{name}: timing beside {info.reference} at {size[0]}x{size[1]} (warm-up + {args.reps} rounds)')
            row.update(speed(name, info, size, args, dtype))
        rows.append(row)
        print(benchpage.row(cols, row, widths), flush=True)
    elapsed = time.perf_counter() - t0
    print('\n' + '\n'.join(benchpage.legend(cols, dash_notes())))
    if args.csv:
        new = not os.path.exists(args.csv)
        with open(args.csv, 'a', newline='') as f:
            w = csv.DictWriter(f, fieldnames=[c.name for c in cols])
            if new:
                w.writeheader()
            w.writerows(rows)
    page = None if args.no_page else args.page or (PAGE if kind in ('full', 'quick') else None)
    if page:
        key, body = page_section(kind, argv, head, cols, rows, elapsed, args.device)
        what = benchpage.update_page(page, key, body, PREAMBLE)
        print(f'page: {what} the section "{key}" of {page}', file=sys.stderr, flush=True)
    elif not args.no_page:
        print('page: not written (a run of chosen models or settings; --page PATH writes it)', file=sys.stderr,
              flush=True)
    progress(f'done: {len(names)} models')
    return 0


def speed(name, info, size, args, dtype):
    kind, ref_name = info.reference.split(':', 1)
    zoo = timm.create_model(name).eval().to(args.device, dtype)
    runs = {}
    out = {}
    x = torch.randn(args.batch_size, 3, *size, device=args.device, dtype=dtype)
    if kind == 'timm':
        ref = timm.create_model(ref_name).eval().to(args.device, dtype)
        zoo.load_state_dict(ref.state_dict())
        runs['ref'] = ref
    with forced_backend(args.backend):
        runs['zoo'] = zoo
        if args.compare_backend:
            def zoo_forced(t):
                with forced_backend(args.compare_backend):
                    return zoo(t)
            runs['forced'] = zoo_forced
        best, outs = time_side_by_side(runs, x, args.reps, args.device)
    bs = args.batch_size
    out['img/s'] = bs / best['zoo']
    if 'ref' in best:
        out['ref_img/s'] = bs / best['ref']
        out['ratio'] = best['ref'] / best['zoo']
        d = (outs['zoo'].double() - outs['ref'].double()).abs().max() / outs['ref'].double().abs().max()
        out['max_diff'] = d.item()
    if 'forced' in best:
        out[f'{args.compare_backend}_img/s'] = bs / best['forced']
        out[f'ratio_vs_{args.compare_backend}'] = best['forced'] / best['zoo']
    return out


if __name__ == '__main__':
    sys.exit(main())
