#!/usr/bin/env python
"""A zoo model beside its official implementation, measured in one run on this machine: logits
difference with the same weights, forward and forward+backward throughput (interleaved repetitions,
best of each, as ratios) and peak memory of one forward at a large input (the official model rebuilt for
that size where it is tied to one).

    python tools/official_bench.py --family transnext --official-repo PATH [--variant tiny]
        [--size 224] [--batch 8] [--reps 5] [--memory-size 1024]

The official code is imported first, from the recipe in tools/official/<family>.py (which declares
VARIANTS = {variant: zoo name} and build_variant(repo, variant, size)), then the zoo (``mixzoo``, whose
namespace cannot clash with an official repository's top-level packages such as BiFormer's ``ops``).
Peak memory: tools/opbench.peak_mb (on CPU the running sum of the profiler's per-op allocations).
"""
import argparse
import sys
from pathlib import Path

import torch

import machine   # (this script's folder is on sys.path; no zoo import)
from make_official_fixture import official as recipes


def cpu_model() -> str:
    return f'{machine.cpu_model()}, {torch.get_num_threads()} torch threads, allocator: {machine.allocator()}'


def op_table(rec, args):
    """The zoo's op (its default backend here) beside the official library's kernels, on the shapes the recipe
    declares (``OP_SHAPES``: {label: (op kwargs, tensor shapes)}, ``official_op`` / ``zoo_op``): forward under
    no_grad and forward+backward, interleaved, best of ``--reps``."""
    from opbench import best_time
    print(f'# op: {rec.OP_NAME} vs the official library, CPU: {cpu_model()}, torch {torch.__version__}')
    print(f'| {"shape":<40} | pass             | official ms | zoo ms | official / zoo |\n|---|---|---|---|---|')
    for label, shapes in rec.OP_SHAPES.items():
        g = torch.Generator().manual_seed(0)
        inputs = [torch.randn(s, generator=g) for s in shapes['tensors']]
        for what, grad in (('forward', False), ('forward+backward', True)):
            leaves = [t.clone().requires_grad_(grad) for t in inputs]

            def run(fn):
                with torch.set_grad_enabled(grad):
                    out = fn(*leaves, **shapes['kwargs'])
                    if grad:
                        out.sum().backward()
            t = best_time({'official': lambda: run(rec.official_op), 'zoo': lambda: run(rec.zoo_op)},
                          args.reps, 'cpu')
            print(f'| {label:<40} | {what:<16} | {1e3 * t["official"]:11.1f} | {1e3 * t["zoo"]:6.1f} | '
                  f'{t["official"] / t["zoo"]:13.2f}x |')


def build(rec, repo: str, name: str, size, weights=None):
    """The official model of zoo model ``name`` (its recipe's variant), built for ``size`` (some are tied to one
    input size), in eval mode: with ``weights`` where given, else random weights that make every tensor matter."""
    variants = {n: v for v, n in rec.VARIANTS.items()}
    if name not in variants:
        raise KeyError(f'{name}: not among the official recipe\'s variants ({", ".join(variants)})')
    model = rec.build_variant(repo, variants[name], tuple(size))
    if weights is None:
        from mixzoo._random import randomize_
        randomize_(model)
    else:
        model.load_state_dict(weights)
    return model.eval()


def pair(rec, repo: str, name: str, size):
    """(official, zoo): the official model with random weights and the zoo model ``name`` with the same weights,
    loaded through the zoo's converter, both in eval mode. The official code is imported before the zoo."""
    official = build(rec, repo, name, size)
    import timm
    import mixzoo  # noqa: F401
    zoo = timm.create_model(name)
    zoo.load_state_dict(sys.modules[type(zoo).__module__].checkpoint_filter_fn(dict(official.state_dict()), zoo))
    return official, zoo.eval()


def forward_peak_mb(model, side: int, device: str = 'cpu') -> float:
    """Peak memory of one inference forward of a (1, 3, side, side) input, MB (opbench.peak_mb: memory alive
    beyond the input), after one unmeasured forward at that side: the first call at a size in a process allocates
    more (about 10% at small sizes), so whichever model ran first would be charged for it."""
    from opbench import peak_mb
    x = torch.randn(1, 3, side, side, device=device)

    def one():
        with torch.inference_mode():
            model(x)
    one()
    return peak_mb(one, device)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--family', required=True)
    ap.add_argument('--official-repo', required=True, type=Path)
    ap.add_argument('--variant', default='tiny')
    ap.add_argument('--size', type=int, default=224)
    ap.add_argument('--batch', type=int, default=8)
    ap.add_argument('--reps', type=int, default=5)
    ap.add_argument('--memory-size', type=int, default=1024, help='input side for the peak-memory row (0: skip)')
    ap.add_argument('--no-backward', action='store_true')
    ap.add_argument('--ops-only', action='store_true', help="only the op table (recipes that declare OP_SHAPES)")
    args = ap.parse_args(argv)
    rec = recipes.recipe(args.family)
    repo = str(args.official_repo.resolve())
    if hasattr(rec, 'OP_SHAPES'):
        op_table(rec, args)
        if args.ops_only:
            return 0
    from opbench import best_time
    name = rec.VARIANTS[args.variant]
    official, zoo = pair(rec, repo, name, (args.size, args.size))
    print(f'# {name} vs official {rec.REPO} ({args.variant}), CPU: {cpu_model()}, torch {torch.__version__}')
    x = torch.randn(args.batch, 3, args.size, args.size)
    with torch.inference_mode():
        a, b = official(x), zoo(x)
    print(f'max |zoo - official| / max |official| = {((a - b).abs().max() / a.abs().max()).item():.2e} '
          f'({args.size}x{args.size}, batch {args.batch}, float32, same weights)')
    rows = []

    def fwd(m):
        with torch.inference_mode():
            m(x)
    t = best_time({'official': lambda: fwd(official), 'zoo': lambda: fwd(zoo)}, args.reps, 'cpu')
    rows.append(('forward', t))
    if not args.no_backward:
        official.train(), zoo.train()

        def fwd_bwd(m):
            m(x).square().mean().backward()
            m.zero_grad(set_to_none=True)
        t = best_time({'official': lambda: fwd_bwd(official), 'zoo': lambda: fwd_bwd(zoo)}, max(2, args.reps // 2), 'cpu')
        rows.append(('forward+backward', t))
        official.eval(), zoo.eval()
    print(f'| {"pass":<18} | official img/s | zoo img/s | zoo / official |\n|---|---|---|---|')
    for what, t in rows:
        print(f'| {what:<18} | {args.batch / t["official"]:14.2f} | {args.batch / t["zoo"]:9.2f} | '
              f'{t["official"] / t["zoo"]:13.2f}x |')
    if args.memory_size:
        S = args.memory_size
        big = build(rec, repo, name, (S, S), official.state_dict())
        mo, mz = forward_peak_mb(big, S), forward_peak_mb(zoo, S)
        print(f'peak memory of one forward at {S}x{S} (batch 1, inference): official {mo:.0f} MB, zoo {mz:.0f} MB '
              f'(zoo / official = {mz / mo:.3f})')


if __name__ == '__main__':
    sys.exit(main())
