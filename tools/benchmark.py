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

Speed columns: zoo img/s, reference img/s, ratio = zoo / reference (>1: zoo faster); with
--compare-backend B also the zoo with every op forced to backend B and default / B.
"max|d|" is the largest logit difference between zoo and reference on the timed batch with the
reference's weights loaded into the zoo (relative to the logits' scale).
The header names the CPU, torch threads, allocator and load the figures were measured under; progress
(model i of n, elapsed seconds) goes to stderr.
"""
import argparse
import csv
import fnmatch
import os
import sys
import time
from contextlib import contextmanager
from functools import partial

import torch

import timm  # noqa: E402

from _zoo import mixzoo  # noqa: E402  (tools/ is on sys.path: this script's folder)
from mixzoo._counting import gmacs, param_count  # noqa: E402
from machine import describe  # noqa: E402  (tools/ is on sys.path: this script's folder)
from opbench import best_time  # noqa: E402
from mixzoo import MODELS  # noqa: E402


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


def fmt(v, spec):
    return '-' if v is None else format(v, spec)


def main(argv=None):
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
    p.add_argument('--op', default=None, help='benchmark one op\'s backends instead (window, halo, neighborhood, '
                                               'routing, linear): time and peak memory on its family\'s shapes '
                                               '(tools/opbench.py)')
    p.add_argument('--backward', action='store_true', help='with --op: time forward+backward')
    args = p.parse_args(argv)
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

    print('\n'.join(describe(args.device)))
    print(f'device {args.device}, batch {args.batch_size}, {args.dtype}, best of {args.reps}'
          f'{", quick mode" if args.quick else ""}; timed: {len(timed)} of {len(names)} models', flush=True)
    cols = ['model', 'reference', 'params_M', 'pub_params_M', 'GMACs', 'pub_GMACs', 'dGMACs_%', 'top1_pub',
            'img/s', 'ref_img/s', 'ratio', 'max|d|']
    if args.compare_backend:
        cols += [f'{args.compare_backend}_img/s', f'ratio_vs_{args.compare_backend}']
    print(' | '.join(cols))
    rows = []
    progress = Progress(len(names))
    for name in names:
        info = MODELS[name]
        size = (args.img_size or info.img_size,) * 2
        progress(f'{name}: parameters and GMACs', next_model=True)
        with torch.device('meta'):
            zm = timm.create_model(name)
            params, g = param_count(zm) / 1e6, gmacs(zm, size)
        row = dict(zip(cols, [name, info.reference, round(params, 2), info.params_m, round(g, 3), info.gmacs,
                              round(100 * (g - info.gmacs) / info.gmacs, 2) if info.gmacs else None, info.top1]))
        if name in timed:
            progress(f'{name}: timing beside {info.reference} at {size[0]}x{size[1]} (warm-up + {args.reps} rounds)')
            row.update(speed(name, info, size, args, dtype))
        rows.append(row)
        print(' | '.join(fmt(row.get(c), '.4g') if isinstance(row.get(c), float) else
                         ('-' if row.get(c) is None else str(row[c])) for c in cols), flush=True)
    if args.csv:
        new = not os.path.exists(args.csv)
        with open(args.csv, 'a', newline='') as f:
            w = csv.DictWriter(f, fieldnames=cols)
            if new:
                w.writeheader()
            w.writerows(rows)
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
        out['max|d|'] = d.item()
    if 'forced' in best:
        out[f'{args.compare_backend}_img/s'] = bs / best['forced']
        out[f'ratio_vs_{args.compare_backend}'] = best['forced'] / best['zoo']
    return out


if __name__ == '__main__':
    sys.exit(main())
