#!/usr/bin/env python
"""The zoo's main job: for every registered model, parameters and GMACs beside the published
figures, and inference and training-step (forward+backward) throughput beside its reference model (timm's,
or the authors' code given --official-repo), measured side by side in one run (interleaved repetitions, best
of each), as ratios; and how much of the machine each model uses: its GFLOP/s as a share of a square matmul's
rate (the GEMM rate, measured in the same run).

    python tools/benchmark.py                          # every model's params/GMACs; speed for the
                                                       # variants tested in full (the default job)
    python tools/benchmark.py --quick                  # a first look: one small model per family,
                                                       # batch 2, best of 3 (a few minutes on 2 cores)
    python tools/benchmark.py --model mz_maxvit_tiny_tf_224 mz_poolformer_s12
    python tools/benchmark.py --model 'mz_poolformer_*' --batch-size 16 --csv out.csv
    python tools/benchmark.py --model mz_maxvit_tiny_tf_224 --compare-backend reference
    python tools/benchmark.py --model mz_poolformer_s12 --dtype bf16     # both models under bf16 autocast
    python tools/benchmark.py --model 'mz_nat_*' --official-repo nat=PATH/Neighborhood-Attention-Transformer \
        --memory-sides 224 512 1024                    # the authors' NAT timed beside the zoo's; peak memory
    python tools/benchmark.py --op halo [--backward]     # an op's backends: time and peak memory
                                                       # (window, halo, neighborhood, routing, linear)

The table is Markdown with padded columns, a legend under it (every column, and what `-` means);
progress (model i of n, elapsed seconds) goes to stderr. The header names the CPU, torch threads,
allocator and load the figures were measured under, and the GEMM rate (float32; bfloat16 where the CPU has
native bf16 instructions, avx512_bf16 / amx_bf16).

Official references are optional: the official-reference families (NAT, DiNAT, TransNeXt, L2ViT, BiFormer)
are timed beside their authors' code only given `--official-repo FAMILY=PATH` (a checkout of the authors'
repository, built through tools/official/FAMILY.py); otherwise their reference columns show `-`. The full
run also measures the peak memory of one forward at input sides 224 to 1024 for those families' smallest
variants (the official models' beside them where given).

The page: a full run (no --model and default settings) writes its table into BENCHMARKS.md at the
repository root as this machine's section (CPU model + vector ISA, e.g. "AMD EPYC, AVX-512"; the GPU for
a CUDA run), replacing that section and keeping every other machine's; a --quick run writes the
machine's separate "quick look" section. A run of chosen models or settings writes nothing unless
--page PATH is given (then into the machine's "custom run" section); --no-page writes nothing. With
matplotlib installed (`pip install "mixzoo[plots]"`) a run that writes the page also draws its plots
(tools/benchplots.py) into tools/plots/ and links them from its section.
"""
import argparse
import csv
import datetime
import fnmatch
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from functools import partial

import torch

import timm  # noqa: E402

from _zoo import mixzoo  # noqa: E402  (tools/ is on sys.path: this script's folder)
from mixzoo._counting import gmacs, param_count  # noqa: E402
from machine import cpu_flags, describe, machine_key  # noqa: E402  (tools/ is on sys.path: this script's folder)
import benchpage  # noqa: E402
import benchplots  # noqa: E402
import official_bench  # noqa: E402
from benchpage import Column  # noqa: E402
from benchplots import memory_key  # noqa: E402
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

Each section's header gives the machine's GEMM rate (a square float32 matmul; bfloat16 where the CPU runs it
natively), and the `gemm_%` columns every model's share of it: the families that use the machine least show
there. Plots, where drawn (matplotlib installed), are linked from their section.

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


PLOTS_DIR = 'tools/plots'                 # the plots' folder (the top level is fixed: DESIGN.md), linked from the page
MEMORY_SIDES = (224, 384, 512, 768, 1024)   # the full run's peak-memory sweep (input sides)
GEMM_N = 2048                              # the GEMM rate's matmul: GEMM_N^3 multiply-adds
# the CPU flags that make a half-precision GEMM native (without them torch converts to fp32 inside the kernel,
# and a share of a rate the CPU has no instructions for would measure the conversion)
NATIVE = {'bfloat16': ('amx_bf16', 'avx512_bf16'), 'float16': ('amx_fp16', 'avx512_fp16')}
DTYPES = {'fp32': 'float32', 'bf16': 'bfloat16', 'fp16': 'float16'}


def native_gemm(dtype: str, device: str):
    """What runs a `dtype` GEMM natively here (the CPU flag, or 'CUDA'), or None."""
    if dtype == 'float32':
        return 'fp32'
    if device.startswith('cuda'):
        return 'CUDA' if dtype == 'float16' or torch.cuda.is_bf16_supported() else None
    return next((f for f in NATIVE[dtype] if f in cpu_flags()), None)


def gemm_rate(dtype: str = 'float32', device: str = 'cpu', n: int = GEMM_N, reps: int = 3) -> float:
    """GFLOP/s of an n x n by n x n matmul in `dtype` at this process's torch threads, best of `reps` after
    a warm-up: the rate the models' shares (`gemm_%`) are measured against."""
    a, b = (torch.randn(n, n, device=device).to(getattr(torch, dtype)) for _ in range(2))
    return 2 * n ** 3 / best_time({'mm': lambda: a @ b}, reps, device)['mm'] / 1e9


def gemm_rates(device: str, run_dtype: str):
    """({dtype: GFLOP/s, or None where not native here}, the header line): float32, bfloat16, and the run's."""
    rates, parts = {}, []
    for dt in dict.fromkeys(['float32', 'bfloat16', run_dtype]):
        native = native_gemm(dt, device)
        rates[dt] = gemm_rate(dt, device, GEMM_N) if native else None
        if not native:
            parts.append(f'{dt} none (no native {dt} GEMM: {" / ".join(NATIVE[dt])} absent)')
        else:
            parts.append(f'{dt} {rates[dt]:.0f} GFLOP/s' + ('' if dt == 'float32' else f' ({native})'))
    return rates, (f'GEMM rate ({GEMM_N}^3 matmul, {torch.get_num_threads()} threads, best of 3): '
                   + '; '.join(parts))


def precision(args):
    """The context of every timed call: float32 as it is; float16 / bfloat16 under torch.autocast for the zoo
    and its reference alike (weights stay float32, matmuls and convolutions run in the half type, as a
    mixed-precision user runs them)."""
    if args.dtype == 'float32':
        return nullcontext
    return partial(torch.autocast, args.device.split(':')[0], getattr(torch, args.dtype))


def under(amp, fn):
    def run(x):
        with amp():
            return fn(x)
    return run


def training_step(model, amp):
    def step(x):
        with amp():
            out = model(x)
        out.float().sum().backward()
        model.zero_grad(set_to_none=True)   # each step allocates its gradients afresh, as after optimizer.zero_grad()
    return step


def time_training(models, x, reps, device, amp):
    """{label: best seconds} of a training step (train mode, forward + backward of the logits' sum) of each model,
    interleaved rounds after a warm-up step each; the models are back in eval mode afterwards."""
    for m in models.values():
        m.train()
    try:
        return best_time({k: partial(training_step(m, amp), x) for k, m in models.items()}, reps, device)
    finally:
        for m in models.values():
            m.eval()


def fb_reps(reps):
    """The training step's rounds: half the forward's, at least 2 (as tools/official_bench.py). A step costs about
    three forwards and varies less in relative terms: with half the rounds the full run takes about 2.5x its
    forward-only time rather than 4x."""
    return min(reps, max(2, reps // 2))


def efficiency(row, rate):
    """GFLOP/s from the counted GMACs (2 FLOPs a MAC; forward+backward: 3x the forward's FLOPs), and its share of
    the GEMM rate in %."""
    out = {}
    for pre, flops_per_mac in (('', 2), ('fb_', 6)):
        if row.get(f'{pre}img/s'):
            out[f'{pre}GFLOP/s'] = flops_per_mac * row['GMACs'] * row[f'{pre}img/s']
            if rate:
                out[f'{pre}gemm_%'] = 100 * out[f'{pre}GFLOP/s'] / rate
    return out


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


def family_name(family):
    return FAMILIES[family].cls.__name__ if family in FAMILIES else family


def official_families():
    """Display names of the families whose reference is the official code (no timm model to time)."""
    return [family_name(f) for f in sorted({m.family for m in MODELS.values() if m.reference.startswith('official:')})]


def columns(args):
    """The model table's columns, each with its legend line. A new measurement adds a Column here and
    fills its key in the row dicts (speed() / main()); the table, legend, CSV and page follow."""
    cols = [
        Column('model', 'the zoo model (`timm.create_model` name).'),
        Column('reference', "the model it is checked and timed against: `timm:<name>` (timed here, side by "
                            "side) or `official:<repository>` (the authors' code, timed beside the zoo's "
                            "given `--official-repo FAMILY=PATH`)."),
        Column('params_M', "the zoo model's parameters, millions.", '.2f', width=7),
        Column('pub_params_M', 'the published parameter count (paper / model card), millions.', 'g'),
        Column('GMACs', "the zoo model's multiply-accumulates per image at the input size, billions "
                        "(torch.utils.flop_counter, plain linear layers, whole attention windows).", '.3f', width=7),
        Column('pub_GMACs', 'the published GMACs at the published resolution.', 'g'),
        Column('dGMACs_%', 'the zoo\'s GMACs vs the published figure, in %: 100 * (GMACs - pub_GMACs) / '
                           'pub_GMACs (only at the model\'s own input size).', '+.2f'),
        Column('top1_pub', 'the published ImageNet-1k top-1, %.', 'g'),
        Column('img/s', f'the zoo model\'s inference throughput, images per second (batch {args.batch_size}, '
                        f'{dtype_text(args)}, best of {args.reps} rounds after a warm-up).', '.4g', width=6),
        Column('ref_img/s', 'the reference\'s throughput (timm\'s, or the official model given `--official-repo`), '
                            'measured in the same run, its rounds interleaved with the zoo\'s.', '.4g', width=6),
        Column('ratio', 'img/s / ref_img/s, measured side by side in one run (> 1: the zoo is faster). '
                        'Ratios move with the CPU and the load: compare them within one run.', '.2f'),
        Column('max_diff', 'max |zoo logits - reference logits| / max |reference logits| on the timed batch, '
                           'the reference\'s weights loaded into the zoo model.', '.1e'),
        Column('GFLOP/s', 'the zoo model\'s arithmetic rate: 2 * GMACs * img/s (the counted GMACs, not the kernels\' '
                          'own work).', '.4g'),
        Column('gemm_%', f'GFLOP/s as a share of this machine\'s {args.dtype} GEMM rate (the header), %: low = a '
                         'family that uses the machine less than its arithmetic allows.', '.1f'),
    ]
    if args.dtype != 'float32':
        cols.append(Column('x_fp32', f'the zoo model\'s {args.dtype} img/s over its own float32 img/s (no autocast), '
                                     'timed in the same interleaved rounds (> 1: the half type is faster).', '.2f'))
    if not args.no_backward:
        cols += [
            Column('fb_img/s', 'the zoo model\'s training-step throughput: forward + backward (train mode, loss = the '
                               'logits\' sum, gradients cleared after each step), best of '
                               f'{fb_reps(args.reps)} rounds after a warm-up step.', '.4g', width=6),
            Column('fb_ref_img/s', 'the reference\'s training-step throughput, its rounds interleaved with the zoo\'s.',
                   '.4g', width=6),
            Column('fb_ratio', 'fb_img/s / fb_ref_img/s (> 1: the zoo trains faster).', '.2f'),
            Column('fb_GFLOP/s', '3 * 2 * GMACs * fb_img/s: the backward counted as twice the forward\'s FLOPs '
                                 '(gradients of the activations and of the weights).', '.4g'),
            Column('fb_gemm_%', f'fb_GFLOP/s as a share of the {args.dtype} GEMM rate, %.', '.1f'),
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
            '(the default job times the variants tested in full; `--speed none` times none). In the reference '
            'columns (`ref_img/s`, `ratio`, `max_diff`, `fb_ref_img/s`, `fb_ratio`) of the official-reference '
            f'families ({", ".join(fams)}): their reference is the authors\' code, timed only given '
            '`--official-repo FAMILY=PATH` (a checkout of the official repository; `tools/official_bench.py` '
            'compares one model in more detail). In `gemm_%`: no native GEMM of the run\'s dtype on this CPU. '
            'In the `fb_` columns: a batch of 1 through BatchNorm, which cannot train on one value per channel.']


def dtype_text(args):
    return args.dtype if args.dtype == 'float32' else f'{args.dtype} autocast (float32 weights)'


def memory_columns(sides):
    return [Column('model', 'each official-reference family\'s smallest variant in the run.'),
            Column('implementation', '`zoo`, or `official`: the authors\' model, given `--official-repo FAMILY=PATH`.'),
            *[Column(memory_key(s), '' if i else f'(and every `MB@<side>`) peak memory of one inference forward at '
                     f'{s}x{s} (batch 1, float32), MB: memory alive beyond the input (tools/opbench.peak_mb; on CPU '
                     'the highest allocator total the profiler reports during the call).', '.0f')
              for i, s in enumerate(sides)]]


def run_kind(args):
    """'full' (the default job), 'quick' (--quick) or 'custom' (chosen models or settings): which section
    of the page the run may write."""
    if args.quick:
        return 'quick'
    # (getattr: a caller's Namespace may predate the memory and training-step options)
    chosen = [args.model, args.img_size, args.batch_size, args.reps, args.backend, args.compare_backend,
              args.threads, os.environ.get('MIXZOO_BACKEND'), getattr(args, 'memory_sides', None)]
    if any(v is not None for v in chosen) or args.speed != 'default' or args.dtype != 'float32' or \
            getattr(args, 'no_backward', False):
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


def section_key(kind, device):
    return machine_key(device) + {'full': '', 'quick': ', quick look', 'custom': ', custom run'}[kind]


def page_section(kind, argv, head, cols, rows, elapsed, device, extra=()):
    """(key, Markdown) of this run's section of the page; `extra`: lines after the table's legend."""
    key = section_key(kind, device)
    what = {'full': 'the full run', 'quick': 'a quick look (`--quick`: a first look, not a figure)',
            'custom': 'a custom run'}[kind]
    cmd = ' '.join(['python tools/benchmark.py'] + [shlex.quote(a) for a in argv])
    when = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
    lines = [f'## {key}', '',
             f'Measured {when}: {what}, `{cmd}`, '
             f'{f"{elapsed / 60:.0f} min" if elapsed >= 120 else f"{elapsed:.0f} s"}.', '',
             '```text', *head, '```', '',
             *benchpage.table(cols, rows), '',
             *benchpage.legend(cols, dash_notes()), *extra]
    return key, '\n'.join(lines)


def memory_models(names):
    """Each official-reference family's smallest variant among `names` (fewest published GMACs, fully tested
    variants first): the models of the peak-memory sweep."""
    best = {}
    for n in names:
        m = MODELS[n]
        cost = (m.build_only, m.gmacs or float('inf'))
        if m.reference.startswith('official:') and (m.family not in best or cost < best[m.family][0]):
            best[m.family] = (cost, n)
    return [n for _, n in sorted(best.values(), key=lambda v: v[1])]


def memory_rows(names, sides, official, device, progress):
    """Peak memory of one forward at each side: a row for each zoo model and, given its repository, one for the
    official model (rebuilt for each side, where it is tied to one input size)."""
    rows = []
    for name in memory_models(names):
        progress(f'{name}: peak memory of one forward at sides {", ".join(map(str, sides))}')
        zoo = timm.create_model(name).eval().to(device)
        rows.append({'model': name, 'implementation': 'zoo',
                     **{memory_key(s): official_bench.forward_peak_mb(zoo, s, device) for s in sides}})
        family = MODELS[name].family
        if family in official:
            try:
                rows.append({'model': name, 'implementation': 'official', **{
                    memory_key(s): official_bench.forward_peak_mb(
                        official_bench.build(*official[family], name, (s, s)).to(device), s, device) for s in sides}})
            except Exception as e:  # noqa: BLE001 - the user's checkout and its dependencies
                official_not_timed(name, f'was not built or did not run ({type(e).__name__}: {e})')
    return rows


def official_unsupported(family, recipe, args):
    """Why the official model cannot run in this run's dtype on this device (its recipe's CPU_DTYPES), or None."""
    dtypes = getattr(recipe, 'CPU_DTYPES', None)
    if args.device.split(':')[0] == 'cpu' and dtypes and args.dtype not in dtypes:
        return f'its code runs in {" / ".join(dtypes)} only on CPU (tools/official/{family}.py), not {args.dtype}'
    return None


def official_not_timed(name, why):
    print(f'{name}: the official model {why}; its columns show -', file=sys.stderr, flush=True)


def plot_lines(page, key, args, rows, mem_rows, sides):
    """Draw the plots beside the page (where matplotlib is installed); the Markdown lines that show them."""
    stem = re.sub(r'[^a-z0-9]+', '-', key.lower()).strip('-')
    points = benchplots.speed_points(rows, lambda n: family_name(MODELS[n].family))
    lines = benchplots.memory_lines(mem_rows, sides)
    try:
        paths = benchplots.draw(os.path.join(os.path.dirname(os.path.abspath(page)), PLOTS_DIR), stem, key, points,
                                lines, f'images / s (batch {args.batch_size}, {dtype_text(args)})')
    except benchplots.PlotsUnavailable as e:
        print(f'plots: not drawn ({e})', file=sys.stderr, flush=True)
        return ['', f'Plots: not drawn by this run ({e}).']
    print(f'plots: wrote {", ".join(paths)}', file=sys.stderr, flush=True)
    return [''] + [f'![{os.path.basename(p)}]({PLOTS_DIR}/{os.path.basename(p)})' for p in paths]


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
    p.add_argument('--dtype', default='float32', choices=['float32', 'float16', 'bfloat16', *DTYPES],
                   help='float16 / bfloat16 (fp16 / bf16): the zoo and its reference under torch.autocast')
    p.add_argument('--no-backward', action='store_true', help='time inference only (no training-step columns)')
    p.add_argument('--official-repo', nargs='+', action='extend', default=[], metavar='FAMILY=PATH',
                   help='time the official-reference family FAMILY (nat, dinat, transnext, l2vit, biformer) beside '
                        'its authors\' code, from the checkout at PATH (built by tools/official/FAMILY.py)')
    p.add_argument('--memory-sides', nargs='*', type=int, default=None, metavar='SIDE',
                   help='peak memory of one forward at these input sides for the official-reference families\' '
                        f'smallest variants (default: {" ".join(map(str, MEMORY_SIDES))} in the full run, none '
                        'otherwise)')
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
    args.dtype = DTYPES.get(args.dtype, args.dtype)
    kind = run_kind(args)
    if args.memory_sides is None:
        args.memory_sides = list(MEMORY_SIDES) if kind == 'full' else []
    official = official_repos(p, args.official_repo)
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

    names = quick_models() if args.quick and not args.model else list(MODELS)
    if args.model:
        names = [n for n in MODELS if any(fnmatch.fnmatch(n, pat) for pat in args.model)]
        unknown = [pat for pat in args.model if not any(fnmatch.fnmatch(n, pat) for n in MODELS)]
        if unknown:
            p.error(f'unknown model(s) {unknown}; known: {", ".join(MODELS)}')
    timed = set(names) if (args.speed == 'all' or (args.speed == 'default' and (args.model or args.quick))) else \
        set() if args.speed == 'none' else {n for n in names if not MODELS[n].build_only}

    forced = os.environ.get('MIXZOO_BACKEND')
    rates, gemm_line = gemm_rates(args.device, args.dtype)
    with_official = f'; official code: {", ".join(sorted(official))}' if official else ''
    head = describe(args.device) + [
        f'device {args.device}, batch {args.batch_size}, {dtype_text(args)}, best of {args.reps}'
        f'{", quick mode" if args.quick else ""}'
        f'{"" if args.no_backward else f" (training step: best of {fb_reps(args.reps)})"}'
        f'; timed: {len(timed)} of {len(names)} models'
        f'{f"; MIXZOO_BACKEND={forced}" if forced else ""}{with_official}',
        gemm_line,
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
            row.update(speed(name, info, size, args, official))
            row.update(efficiency(row, rates[args.dtype]))
        rows.append(row)
        print(benchpage.row(cols, row, widths), flush=True)
    print('\n' + '\n'.join(benchpage.legend(cols, dash_notes())))
    mem_rows, mem_lines = [], []
    if args.memory_sides:
        mem_cols = memory_columns(args.memory_sides)
        mem_rows = memory_rows(names, args.memory_sides, official, args.device, progress)
        mem_lines = ['', '### Peak memory against the input side', '', *benchpage.table(mem_cols, mem_rows), '',
                     *benchpage.legend(mem_cols)]
        print('\n' + '\n'.join(mem_lines[3:]), flush=True)
    elapsed = time.perf_counter() - t0
    if args.csv:
        new = not os.path.exists(args.csv)
        with open(args.csv, 'a', newline='') as f:
            w = csv.DictWriter(f, fieldnames=[c.name for c in cols])
            if new:
                w.writeheader()
            w.writerows(rows)
    page = None if args.no_page else args.page or (PAGE if kind in ('full', 'quick') else None)
    if page:
        key = section_key(kind, args.device)
        plots = plot_lines(page, key, args, rows, mem_rows, args.memory_sides)
        key, body = page_section(kind, argv, head, cols, rows, elapsed, args.device, mem_lines + plots)
        what = benchpage.update_page(page, key, body, PREAMBLE)
        print(f'page: {what} the section "{key}" of {page}', file=sys.stderr, flush=True)
    elif not args.no_page:
        print('page: not written (a run of chosen models or settings; --page PATH writes it)', file=sys.stderr,
              flush=True)
    progress(f'done: {len(names)} models')
    return 0


def official_repos(p, specs):
    """{family: (its official recipe, the checkout's path)} from the FAMILY=PATH options."""
    out = {}
    for spec in specs:
        family, _, path = spec.partition('=')
        if not path or not os.path.isdir(path):
            p.error(f'--official-repo {spec}: want FAMILY=PATH, PATH a checkout of the official repository')
        try:
            out[family] = (official_bench.recipes.recipe(family), os.path.abspath(path))
        except KeyError as e:
            p.error(f'--official-repo {spec}: {e.args[0]}')
    return out


def speed(name, info, size, args, official):
    """The speed columns of one model: inference beside its reference, then the training step (both timed with
    interleaved rounds, best of --reps)."""
    kind, ref_name = info.reference.split(':', 1)
    ref = None
    if kind == 'timm':
        ref = timm.create_model(ref_name)
        zoo = timm.create_model(name)
        zoo.load_state_dict(ref.state_dict())
    elif info.family in official:
        why_not = official_unsupported(info.family, official[info.family][0], args)
        if why_not:
            official_not_timed(name, f'is not timed: {why_not}')
        else:
            try:
                ref, zoo = official_bench.pair(*official[info.family], name, size)
            except Exception as e:  # noqa: BLE001 - the user's checkout and its dependencies
                official_not_timed(name, f'was not built or did not run ({type(e).__name__}: {e})')
    if ref is None:
        zoo = timm.create_model(name)
    models = {'zoo': zoo.eval().to(args.device)}
    if ref is not None:
        models['ref'] = ref.eval().to(args.device)
    amp = precision(args)
    runs = {k: under(amp, m) for k, m in models.items()}
    if args.dtype != 'float32':
        runs['fp32'] = models['zoo']      # the same model without autocast, for the x_fp32 column
    out = {}
    x = torch.randn(args.batch_size, 3, *size, device=args.device)
    with forced_backend(args.backend):
        if args.compare_backend:
            def zoo_forced(t):
                with forced_backend(args.compare_backend):
                    return runs['zoo'](t)
            runs['forced'] = zoo_forced
        fb = {}
        if not args.no_backward:
            try:
                fb = time_training(models, x, fb_reps(args.reps), args.device, amp)
            except ValueError as e:   # BatchNorm refuses to train on one value per channel (a batch of 1)
                print(f'{name}: training step not timed ({e})', file=sys.stderr, flush=True)
        best, outs = time_side_by_side(runs, x, args.reps, args.device)
    bs = args.batch_size
    out['img/s'] = bs / best['zoo']
    if 'ref' in best:
        out['ref_img/s'] = bs / best['ref']
        out['ratio'] = best['ref'] / best['zoo']
        d = (outs['zoo'].double() - outs['ref'].double()).abs().max() / outs['ref'].double().abs().max()
        out['max_diff'] = d.item()
    if 'fp32' in best:
        out['x_fp32'] = best['fp32'] / best['zoo']
    if 'forced' in best:
        out[f'{args.compare_backend}_img/s'] = bs / best['forced']
        out[f'ratio_vs_{args.compare_backend}'] = best['forced'] / best['zoo']
    if fb:
        out['fb_img/s'] = bs / fb['zoo']
    if 'ref' in fb:
        out['fb_ref_img/s'] = bs / fb['ref']
        out['fb_ratio'] = fb['ref'] / fb['zoo']
    return out

if __name__ == '__main__':
    sys.exit(main())
