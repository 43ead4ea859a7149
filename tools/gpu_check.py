"""The GPU check: one command for a machine with a GPU, prepared on one without.

    python tools/gpu_check.py --out DIR [--time-limit 450] [--jobs N]
    python tools/gpu_check.py --out DIR --dry-run        # the same code paths on CPU at tiny shapes (CI runs it)

Needs this repository (on PYTHONPATH, or the zoo installed) and the machine's PyTorch (>= 2.8, with its Triton);
timm for the model sections. No network, nothing installed: the versions are read at the start and what is missing
is said (and its sections skipped, with the reason). Sections, each within what is left of ``--time-limit``:

1. correctness: the op registry's test grid (tests/op_cases.py, the cases tests/test_ops.py runs) on CUDA for every
   backend, fp32 / fp16 / bf16, forward + backward and the no_grad path, against ``reference`` in float64, with
   NaN-poisoned outputs (fp16 routing included); split over ``--jobs`` processes (Triton compiles in parallel);
2. ops: each op at its models' shapes, bf16, forward and forward+backward: time, peak memory, achieved TFLOP/s and
   GB/s and their share of the device's peak, for the ``triton`` and ``torch`` backends, FlexAttention with the
   equivalent mask / score_mod, and SDPA over all the map's tokens (the dense baseline); the equivalent ones are
   first checked against ``torch`` in fp32;
3. training: a bf16 training step (forward + backward + AdamW) in img/s of each family's smallest variant: the
   zoo with the dispatcher's backends, the zoo with ``triton`` forced, and its timm reference where there is one.

Writes DIR/report.md and DIR/report.json; exits 1 on any correctness failure (a grid case, an equivalent
implementation that disagrees, a non-finite training loss).
"""
import argparse
import ast
import importlib.abc
import importlib.machinery
import importlib.util
import json
import math
import os
import platform
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]


# ---- the zoo from this checkout ---------------------------------------------------------------------------------

def import_zoo():
    """``mixzoo``, installed or else mapped from this checkout by setup.py's PACKAGE_DIR (mixzoo -> backbones/,
    mixzoo.ops -> ops/, ...). Without timm the package's own __init__ (which registers the models in timm) is
    not run, so that ``mixzoo.ops`` still imports."""
    try:
        import mixzoo
        return mixzoo
    except ModuleNotFoundError as e:
        if e.name not in ('mixzoo', 'timm'):
            raise
    setup = ast.parse((ROOT / 'setup.py').read_text())
    folders = next(ast.literal_eval(n.value) for n in setup.body
                   if isinstance(n, ast.Assign) and getattr(n.targets[0], 'id', '') == 'PACKAGE_DIR')
    has_timm = importlib.util.find_spec('timm') is not None

    class Checkout(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name not in folders:
                return None
            folder = str(ROOT / folders[name])
            if name == 'mixzoo' and not has_timm:      # a bare package: its submodules only
                spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
                spec.submodule_search_locations = [folder]
                return spec
            return importlib.util.spec_from_file_location(name, os.path.join(folder, '__init__.py'),
                                                          submodule_search_locations=[folder])
    sys.meta_path.insert(0, Checkout())
    for name in [n for n in sys.modules if n == 'mixzoo' or n.startswith('mixzoo.')]:
        del sys.modules[name]
    import mixzoo
    return mixzoo


def _imports(dry_run: bool):
    """(torch, the zoo) with the interpreter set for a dry run (before triton's first import)."""
    if dry_run:
        os.environ['TRITON_INTERPRET'] = '1'
    import torch
    zoo = import_zoo()
    sys.path[:0] = [str(ROOT / 'tests'), str(ROOT / 'tools')]
    return torch, zoo


# ---- the report --------------------------------------------------------------------------------------------------

@dataclass
class Report:
    environment: Dict = field(default_factory=dict)
    missing: List[str] = field(default_factory=list)
    correctness: Dict = field(default_factory=dict)
    ops: List[Dict] = field(default_factory=list)
    training: List[Dict] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)     # (what, why)
    failures: List[str] = field(default_factory=list)
    seconds: Dict[str, float] = field(default_factory=dict)


class Clock:
    """What is left of the time limit; a section or item that would start past it is skipped with that reason."""

    def __init__(self, limit: float):
        self.t0, self.limit = time.perf_counter(), limit

    def left(self) -> float:
        return self.limit - (time.perf_counter() - self.t0)

    def allows(self, report: Report, what: str, need: float = 0.) -> bool:
        if self.left() > need:
            return True
        report.skipped.append((what, f'time limit ({self.limit:.0f} s) reached'))
        return False


# ---- 0. environment ----------------------------------------------------------------------------------------------

# dense bf16 tensor-core TFLOP/s and memory GB/s (vendor data sheets), matched against the device name
PEAKS = [('H200', 989., 4800.), ('H100 NVL', 835., 3900.), ('H100 PCIe', 756., 2000.), ('H100', 989., 3350.),
         ('A100-SXM4-80GB', 312., 2039.), ('A100 80GB PCIe', 312., 1935.), ('A100-PCIE-40GB', 312., 1555.),
         ('A100', 312., 1555.), ('L40S', 362., 864.), ('L4', 121., 300.), ('A10G', 70., 600.)]


def peaks(name: str) -> Optional[Tuple[float, float]]:
    return next(((tf, gbs) for key, tf, gbs in PEAKS if key.lower() in name.lower()), None)


def environment(torch, report: Report, dry_run: bool) -> str:
    """Versions and device into the report; the device to run on ('cuda', or 'cpu' for a dry run)."""
    env = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
               TRITON_INTERPRET=os.environ.get('TRITON_INTERPRET', ''))
    for name in ('triton', 'timm', 'numpy'):
        try:
            env[name] = __import__(name).__version__
        except Exception as e:       # reported, and the sections needing it skipped
            env[name] = None
            report.missing.append(f'{name} ({type(e).__name__}: {e})')
    major, minor = (int(x) for x in torch.__version__.split('.')[:2])
    if (major, minor) < (2, 8):
        report.missing.append(f'torch >= 2.8 (found {torch.__version__})')
    device = 'cpu' if dry_run else 'cuda'
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, capability=f'{p.major}.{p.minor}', sms=p.multi_processor_count,
                   memory_gb=round(p.total_memory / 2 ** 30, 1), peaks=peaks(p.name))
        if env['peaks'] is None:
            report.missing.append(f'peak figures for {p.name} (no share of peak reported)')
    elif not dry_run:
        report.missing.append('a CUDA device (torch.cuda.is_available() is False): use --dry-run')
        device = None
    report.environment = env
    return device


# ---- 1. correctness: the op registry's grid -----------------------------------------------------------------------

def _grid_ids(devices, dry_run: bool) -> List[str]:
    import op_cases
    params = list(op_cases.grid(devices))
    if dry_run:   # the first case of each op in float32 (interpreted Triton: seconds a case)
        params = [p for p in params if p.dtype.is_floating_point and str(p.dtype) == 'torch.float32'
                  and p.case.id == op_cases.CASES[p.op]()[0].id]
    return [p.id for p in params]


def run_grid_chunk(ids: List[str], devices: List[str], dry_run: bool) -> List[Dict]:
    """Check the grid cases ``ids`` (a worker process: imports the zoo itself)."""
    torch, _ = _imports(dry_run)
    import op_cases
    torch.manual_seed(0)
    wanted = set(ids)
    results = []
    for p in op_cases.grid(devices):
        if p.id not in wanted:
            continue
        for what, check in (('grad', op_cases.check), ('no_grad', op_cases.check_inference)):
            if what == 'no_grad' and p.backend == 'reference':
                continue
            t0 = time.perf_counter()
            try:
                check(p.op, p.backend, p.case, p.dtype, p.device)
                status, msg = 'passed', ''
            except op_cases.Unrunnable as e:
                status, msg = 'skipped', str(e)
            except Exception as e:      # a failure is a result: message and the last frames
                status, msg = 'failed', f'{type(e).__name__}: {e}\n' + ''.join(traceback.format_tb(e.__traceback__)[-2:])
            results.append(dict(id=f'{p.id}-{what}', op=p.op, backend=p.backend, dtype=str(p.dtype)[6:],
                                status=status, message=msg, seconds=round(time.perf_counter() - t0, 3)))
    return results


def correctness(device: str, report: Report, jobs: int, dry_run: bool) -> None:
    ids = _grid_ids([device], dry_run)
    chunks = [ids[i::jobs] for i in range(jobs)]
    if jobs > 1:
        with ProcessPoolExecutor(jobs, mp_context=get_context('spawn')) as pool:
            results = [r for rs in pool.map(run_grid_chunk, chunks, [[device]] * jobs, [dry_run] * jobs) for r in rs]
    else:
        results = run_grid_chunk(ids, [device], dry_run)
    counts = {s: sum(r['status'] == s for r in results) for s in ('passed', 'failed', 'skipped')}
    report.correctness = dict(device=device, jobs=jobs, **counts,
                              failed_cases=[r for r in results if r['status'] == 'failed'],
                              skipped_cases=[r for r in results if r['status'] == 'skipped'],
                              by_backend=_by_backend(results))
    report.failures += [f'correctness {r["id"]}: {r["message"].splitlines()[0]}' for r in results
                        if r['status'] == 'failed']


def _by_backend(results) -> Dict[str, Dict[str, int]]:
    out: Dict[str, Dict[str, int]] = {}
    for r in results:
        key = f'{r["op"]}/{r["backend"]}'
        out.setdefault(key, dict(passed=0, failed=0, skipped=0))[r['status']] += 1
    return out


# ---- 2. ops at their models' shapes --------------------------------------------------------------------------------

@dataclass
class OpShape:
    """An op at one model's shape: inputs, the implementations to time (name -> output), the op's forward FLOPs
    and the bytes a forward must move (inputs and output, once)."""
    op: str
    label: str
    make: Callable[[], Dict]                     # (device, dtype bound) -> inputs, leaves requiring grad
    impls: Dict[str, Callable[[Dict], object]]
    flops: float
    equivalent: Tuple[str, ...] = ('triton', 'flex')   # checked against 'torch' in fp32 first


def _leaves(torch, shapes: Dict[str, tuple], device, dtype, **extra):
    g = torch.Generator().manual_seed(0)
    out = {k: torch.randn(*s, generator=g).to(device, dtype).requires_grad_() for k, s in shapes.items()}
    return {**out, **extra}


def _flex(torch):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    compiled = torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention

    def run(q, k, v, score_mod=None, mask_mod=None, scale=None):
        if q.device.type == 'cpu':      # (FlexAttention has no backward on CPU: the dry run's forward)
            if torch.is_grad_enabled():
                raise NotImplementedError('FlexAttention has no backward on CPU')
            q, k, v = q.detach(), k.detach(), v.detach()
        block_mask = None if mask_mod is None else create_block_mask(mask_mod, None, None, q.shape[-2], k.shape[-2],
                                                                       device=str(q.device))
        return compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)
    return run


def _sdpa_all(torch, B, h, L, D):
    """Dense SDPA over all L tokens of the map (the attention the op avoids), on its own inputs."""
    import torch.nn.functional as F
    return lambda x: F.scaled_dot_product_attention(x['Q'], x['K'], x['V'])


def window_shapes(torch, ops, device, dtype, tiny) -> List[OpShape]:
    B = 1 if tiny else 32
    out = []
    for label, nw, h, bias in (('MaxViT-T s1 224 (7x7 windows, rel-pos bias)', 64, 2, True),
                               ('DaViT-T s1 224 (7x7 windows, no bias)', 64, 3, False)):
        nw, N, D = (2, 9, 8) if tiny else (nw, 49, 32)
        L = nw * N
        shapes = dict(q=(B * nw, h, N, D), k=(B * nw, h, N, D), v=(B * nw, h, N, D), Q=(B, h, L, D),
                      K=(B, h, L, D), V=(B, h, L, D))
        if bias:
            shapes['bias'] = (h, N, N)
        flex = _flex(torch)

        def make(shapes=shapes):
            return _leaves(torch, shapes, device, dtype)

        def flex_window(x):
            b = x.get('bias')
            return flex(x['q'], x['k'], x['v'], score_mod=(lambda s, bb, hh, qi, ki: s + b[hh, qi, ki]) if b is not None
                        else None)
        impls = {be: (lambda x, be=be: ops.window_attention(x['q'], x['k'], x['v'], x.get('bias'), backend=be))
                 for be in ('triton', 'torch')}
        impls.update(flex=flex_window, **{'sdpa (all tokens)': _sdpa_all(torch, B, h, L, D)})
        out.append(OpShape('window', label, make, impls, 4. * B * nw * h * N * N * D))
    return out


def _nbhd_mask(H, W, kernel, border):
    """The neighborhood of the op as a mask over flattened map positions (dilation 1)."""
    r = kernel // 2

    def inside(q, k, n, axis_len):
        if border == 'mask':
            return (k - q).abs() <= r
        start = (q - r).clamp(0, max(axis_len - kernel, 0))
        return (k >= start) & (k < start + kernel)

    def mask_mod(b, h, qi, ki):
        return inside(qi // W, ki // W, H, H) & inside(qi % W, ki % W, W, W)
    return mask_mod


def neighborhood_shapes(torch, ops, device, dtype, tiny) -> List[OpShape]:
    B = 1 if tiny else 32
    out = []
    for label, h, side, D, kernel, border, pooled in (
            ('NAT-Mini s1 224 (7x7 window, rel-pos bias)', 2, 56, 32, 7, 'shift', 0),
            ('TransNeXt-T s1 224 (3x3 window + 49 pooled keys, biases)', 3, 56, 24, 3, 'mask', 49)):
        side, D, kernel, pooled = (5, 8, 3, min(pooled, 4)) if tiny else (side, D, kernel, pooled)
        H = W = side
        L = H * W
        shapes = dict(q=(B, h, H, W, D), k=(B, h, H, W, D), v=(B, h, H, W, D), rpb=(h, 2 * kernel - 1, 2 * kernel - 1),
                      Q=(B, h, L, D), K=(B, h, L, D), V=(B, h, L, D))
        if pooled:
            shapes.update(ek=(B, h, pooled, D), ev=(B, h, pooled, D), eb=(1, h, H, W, pooled))
        flex = _flex(torch)
        window = _nbhd_mask(H, W, kernel, border)

        def make(shapes=shapes):
            return _leaves(torch, shapes, device, dtype)

        def op(x, be, kernel=kernel, border=border):
            return ops.neighborhood_attention(x['q'], x['k'], x['v'], kernel, rpb=x['rpb'], extra_k=x.get('ek'),
                                              extra_v=x.get('ev'), extra_bias=x.get('eb'), border=border, backend=be)

        def flex_nbhd(x, H=H, W=W, L=L, kernel=kernel, window=window, pooled=pooled):
            q, k, v = (x[n].flatten(2, 3) for n in 'qkv')
            rpb, r = x['rpb'], kernel - 1
            if pooled:
                k, v = torch.cat([k, x['ek']], 2), torch.cat([v, x['ev']], 2)
                eb = x['eb'].flatten(2, 3)                                          # (1, h, L, P)

            def score_mod(s, b, hh, qi, ki):
                kc = ki.clamp(max=L - 1)
                local = s + rpb[hh, (kc // W - qi // W + r).clamp(0, 2 * r), (kc % W - qi % W + r).clamp(0, 2 * r)]
                if not pooled:
                    return local
                return torch.where(ki < L, local, s + eb[0, hh, qi, (ki - L).clamp(min=0)])

            def mask_mod(b, hh, qi, ki):
                return (ki >= L) | window(b, hh, qi, ki.clamp(max=L - 1)) if pooled else window(b, hh, qi, ki)
            return flex(q, k, v, score_mod=score_mod, mask_mod=mask_mod).unflatten(2, (H, W))
        impls = {be: (lambda x, be=be, op=op: op(x, be)) for be in ('triton', 'torch')}
        impls.update(flex=flex_nbhd, **{'sdpa (all tokens)': _sdpa_all(torch, B, h, L, D)})
        out.append(OpShape('neighborhood', label, make, impls, 4. * B * h * L * (kernel ** 2 + pooled) * D))
    return out


def routing_shapes(torch, ops, device, dtype, tiny) -> List[OpShape]:
    out = []
    for label, B, side, topk in (('BiFormer-T s1 224 (49 regions of 8x8, top-1)', 32, 8, 1),
                                 ('BiFormer-T s1 1024 (49 regions of 37x37, top-1)', 1, 37, 1)):
        B, R, side = (1, 4, 2) if tiny else (B, 49, side)
        T, h, D = side * side, 2, 32
        L = R * T
        g = torch.Generator().manual_seed(1)
        idx = torch.rand(B, R, R, generator=g).argsort(-1)[..., :topk].to(device)
        routed = torch.zeros(B, R, R, dtype=torch.bool, device=device).scatter_(2, idx, True)
        shapes = dict(q=(B, h, R, T, D), k=(B, h, R, T, D), v=(B, h, R, T, D), Q=(B, h, L, D), K=(B, h, L, D),
                      V=(B, h, L, D))
        flex = _flex(torch)
        scale = (h * D) ** -0.5

        def make(shapes=shapes):
            return _leaves(torch, shapes, device, dtype)

        def flex_routed(x, T=T, routed=routed):
            def mask_mod(b, hh, qi, ki):
                return routed[b, qi // T, ki // T]
            return flex(*(x[n].flatten(2, 3) for n in 'qkv'), mask_mod=mask_mod, scale=scale).unflatten(2, (R, T))
        impls = {be: (lambda x, be=be, idx=idx: ops.routed_attention(x['q'], x['k'], x['v'], idx, scale, backend=be))
                 for be in ('triton', 'torch')}
        impls.update(flex=flex_routed, **{'sdpa (all tokens)': _sdpa_all(torch, B, h, L, D)})
        out.append(OpShape('routing', label, make, impls, 4. * B * h * L * topk * T * D))
    return out


def halo_shapes(torch, ops, device, dtype, tiny) -> List[OpShape]:
    """HaloNet26t stage 3 at 256 (16x16 map, 8 heads of 32, block 8, halo 2), border 'mask' (FlexAttention can mask
    the out-of-map keys, not include them as zeros as 'zero_pad' does), no relative-position term."""
    B, side, h, D, block, halo = (1, 8, 2, 8, 4, 1) if tiny else (32, 16, 8, 32, 8, 2)
    L = side * side
    shapes = dict(q=(B, h, D, side, side), k=(B, h, D, side, side), v=(B, h, D, side, side), Q=(B, h, L, D),
                  K=(B, h, L, D), V=(B, h, L, D))
    flex = _flex(torch)

    def make():
        return _leaves(torch, shapes, device, dtype)

    def inside(qc, kc):
        lo = qc // block * block - halo
        return (kc >= lo) & (kc < lo + block + 2 * halo)

    def flex_halo(x):
        def mask_mod(b, hh, qi, ki):
            return inside(qi // side, ki // side) & inside(qi % side, ki % side)
        q, k, v = (x[n].flatten(3).transpose(2, 3) for n in 'qkv')
        return flex(q, k, v, mask_mod=mask_mod).transpose(2, 3).unflatten(3, (side, side))
    impls = {be: (lambda x, be=be: ops.halo_attention(x['q'], x['k'], x['v'], block, halo, border='mask', backend=be))
             for be in ('triton', 'torch')}
    impls.update(flex=flex_halo, **{'sdpa (all tokens)': _sdpa_all(torch, B, h, L, D)})
    return [OpShape('halo', 'HaloNet26t s3 256 (16x16, block 8, halo 2, border mask)', make, impls,
                    4. * B * h * L * (block + 2 * halo) ** 2 * D)]


def linear_shapes(torch, ops, device, dtype, tiny) -> List[OpShape]:
    out = []
    for label, B, side in (('L2ViT-T s1 224 (56x56 tokens, 3 heads of 32)', 32, 56),
                           ('L2ViT-T s1 1024 (256x256 tokens)', 1, 256)):
        B, side = (1, 6) if tiny else (B, side)
        h, D, L = 3, 32, side * side
        shapes = dict(q=(B, h, L, D), k=(B, h, L, D), v=(B, h, L, D), Q=(B, h, L, D), K=(B, h, L, D),
                      V=(B, h, L, D))

        def make(shapes=shapes):
            return _leaves(torch, shapes, device, dtype)
        impls = {be: (lambda x, be=be: ops.linear_attention(x['q'].relu(), x['k'].relu(), x['v'], backend=be))
                 for be in ('triton', 'torch')}
        impls['sdpa (all tokens)'] = _sdpa_all(torch, B, h, L, D)
        out.append(OpShape('linear', label, make, impls, 4. * B * h * L * D * D, equivalent=('triton',)))
    return out


OP_SHAPES = (window_shapes, neighborhood_shapes, routing_shapes, halo_shapes, linear_shapes)


def _bytes(torch, x: Dict, impl: str, out) -> float:
    """The traffic an implementation cannot avoid: its inputs and its output, once."""
    dense = impl.startswith('sdpa')
    ins = sum(t.numel() * t.element_size() for k, t in x.items() if torch.is_tensor(t) and k.isupper() == dense)
    return ins + out.numel() * out.element_size()


def _equivalence(torch, shape_of: Callable, device, report: Report) -> Dict[str, float]:
    """Each equivalent implementation against ``torch`` in fp32: max |difference| / max |torch|."""
    shape = shape_of(torch.float32)
    x = shape.make()
    with torch.no_grad():
        want = shape.impls['torch'](x).float()
        errs = {}
        for name in shape.equivalent:
            got = shape.impls[name](x).float()
            errs[name] = ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
            if not errs[name] <= 2e-2:     # TF32 dots on the GPU: ~1e-3
                report.failures.append(f'{shape.op} {shape.label}: {name} differs from torch by {errs[name]:.3g} '
                                       f'(relative to max |output|)')
    return errs


def time_shape(torch, opbench, shape: OpShape, device, reps, report: Report, errs: Dict) -> None:
    x = shape.make()
    tensors = [t for t in x.values() if torch.is_tensor(t) and t.requires_grad]
    peak = report.environment.get('peaks')
    outs = {}
    for backward in (False, True):
        for name, impl in shape.impls.items():
            row = dict(op=shape.op, shape=shape.label, impl=name, mode='fwd+bwd' if backward else 'fwd',
                       rel_err=errs.get(name))
            try:
                if name not in outs:
                    with torch.no_grad():
                        outs[name] = impl(x)      # (the warm-up: compiles, autotunes)
                out = outs[name]
                fn = opbench._call(lambda impl=impl: impl(x), backward, *tensors)
                sec = opbench.best_time({name: fn}, reps, device, warmup=backward or reps > 1)[name]
                work = 3.5 if backward else 1.      # backward ~2.5x the forward's FLOPs (flash-attention's count)
                L = x['Q'].shape[-2] if name.startswith('sdpa') else None
                flops = (4. * x['Q'].shape[0] * x['Q'].shape[1] * L * L * x['Q'].shape[-1] if L else shape.flops) * work
                nbytes = _bytes(torch, x, name, out) * (3. if backward else 1.)
                row.update(ms=sec * 1e3, peak_mb=opbench.peak_mb(fn, device), tflops=flops / sec / 1e12,
                           gbs=nbytes / sec / 1e9)
                if peak:
                    row.update(tflops_pct=100 * row['tflops'] / peak[0], gbs_pct=100 * row['gbs'] / peak[1])
            except Exception as e:
                row['error'] = f'{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ""}'
                if name in ('triton', 'torch'):
                    report.failures.append(f'{shape.op} {shape.label} {name} {row["mode"]}: {row["error"]}')
            report.ops.append(row)


def op_benchmarks(torch, device, report: Report, clock: Clock, tiny: bool) -> None:
    import opbench
    from mixzoo import ops
    dtype = torch.bfloat16 if device == 'cuda' else torch.float32      # (the CPU interpreter has no bfloat16)
    reps = 1 if tiny else 10
    for shapes_of in OP_SHAPES:
        for i, shape in enumerate(shapes_of(torch, ops, device, dtype, tiny)):
            if not clock.allows(report, f'ops: {shape.op} {shape.label}', 30):
                continue
            skip = (f'ops: {shape.op} FlexAttention', 'not a softmax attention')
            if 'flex' not in shape.impls and skip not in report.skipped:
                report.skipped.append(skip)
            errs = _equivalence(torch, lambda dt, i=i: shapes_of(torch, ops, device, dt, tiny)[i], device, report)
            time_shape(torch, opbench, shape, device, reps, report, errs)


# ---- 3. training steps --------------------------------------------------------------------------------------------

def smallest_variants(registry) -> List:
    best = {}
    for m in registry.MODELS.values():
        if not m.build_only and (m.family not in best or (m.params_m or 1e9) < (best[m.family].params_m or 1e9)):
            best[m.family] = m
    return [best[f] for f in sorted(best)]


def train_rate(torch, timm, name, device, batch, img, steps, backend=None, dtype=None) -> Dict:
    """img/s of forward + backward + AdamW steps (after a warm-up step), peak memory, the last loss."""
    kw = dict(backend=backend) if backend else {}
    model = timm.create_model(name, **kw).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, img, img, generator=g).to(device)
    y = torch.randint(0, model.num_classes, (batch,), generator=g).to(device)

    def step():
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    step()
    if device == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    if device == 'cuda':
        torch.cuda.synchronize()
    sec = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device == 'cuda' else None
    return dict(img_s=batch * steps / sec, peak_mb=peak, loss=loss.item())


def _uses_triton(zoo, name) -> bool:
    from mixzoo.mixers.base import OpMixer
    import timm
    model = timm.create_model(name, device='meta')
    return any(isinstance(m, OpMixer) and any(b.name == 'triton' for b in zoo.ops.backends(m.op))
               for m in model.modules())


def training(torch, zoo, device, report: Report, clock: Clock, tiny: bool) -> None:
    import timm
    from mixzoo import _registry
    dtype = torch.bfloat16 if device == 'cuda' else None       # the dry run: fp32 (interpreted Triton: no bf16)
    batch, steps = (1, 1) if tiny else (32, 5)
    variants = smallest_variants(_registry)
    if tiny:   # one family with ops and a timm reference, at 64 px
        variants = [m for m in variants if m.reference_kind == 'timm' and _uses_triton(zoo, m.name)][:1]
    for m in variants:
        img = 64 if tiny else m.img_size
        runs = [('zoo', m.name, None)]
        if _uses_triton(zoo, m.name) and not tiny:     # (interpreted: minutes a model; the ops section covers it)
            runs.append(('zoo, triton forced', m.name, 'triton'))
        if m.reference_kind == 'timm':
            runs.append(('timm', m.reference_name, None))
        for label, name, backend in runs:
            if not clock.allows(report, f'training: {name} ({label})', 20):
                continue
            row = dict(family=m.family, model=name, run=label, batch=batch, img=img,
                       dtype='bf16 autocast' if dtype else 'fp32')
            try:
                row.update(train_rate(torch, timm, name, device, batch, img, steps, backend, dtype))
                if not math.isfinite(row['loss']):
                    report.failures.append(f'training {name} ({label}): loss {row["loss"]}')
            except Exception as e:
                row['error'] = f'{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ""}'
                if label != 'timm':
                    report.failures.append(f'training {name} ({label}): {row["error"]}')
            report.training.append(row)


# ---- the report files and the command -------------------------------------------------------------------------------

def _fmt(v, spec='.1f') -> str:
    return '-' if v is None else format(v, spec) if isinstance(v, float) else str(v)


def _table(head: List[str], rows: List[List]) -> List[str]:
    return ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)] + ['| ' + ' | '.join(map(str, r)) + ' |'
                                                                        for r in rows]


def markdown(report: Report, dry_run: bool) -> str:
    env = report.environment
    lines = [f'# GPU check{" (dry run, CPU)" if dry_run else ""}: {env.get("gpu", "no GPU")}', '',
             ', '.join(f'{k} {v}' for k, v in env.items() if k != 'peaks'), '']
    if env.get('peaks'):
        lines += [f'Device peaks used for the shares: {env["peaks"][0]:g} dense bf16 TFLOP/s, '
                  f'{env["peaks"][1]:g} GB/s.', '']
    lines += [f'Missing: {m}' for m in report.missing] + ([''] if report.missing else [])
    c = report.correctness
    if c:
        lines += [f'## Correctness: {c["passed"]} passed, {c["failed"]} failed, {c["skipped"]} skipped '
                  f'({c["device"]}, {c["jobs"]} processes)', '']
        lines += _table(['op/backend', 'passed', 'failed', 'skipped'],
                        [[k, v['passed'], v['failed'], v['skipped']] for k, v in sorted(c['by_backend'].items())])
        lines += [''] + [f'- FAILED {r["id"]}: {r["message"].splitlines()[0]}' for r in c['failed_cases']] + ['']
    if report.ops:
        lines += ['## Ops at their models\' shapes', '',
                  'Best of the repetitions; TFLOP/s of the op\'s useful work (SDPA over all tokens: its own), '
                  'backward counted 2.5x the forward; GB/s of inputs + output once (x3 with the backward); '
                  'rel. err: max |impl - torch| / max |torch| in fp32.', '']
        lines += _table(['op', 'shape', 'impl', 'mode', 'ms', 'peak MB', 'TFLOP/s', '% peak', 'GB/s', '% peak',
                         'rel. err'],
                        [[r['op'], r['shape'], r['impl'], r['mode'], _fmt(r.get('ms'), '.3f'),
                          _fmt(r.get('peak_mb')), _fmt(r.get('tflops'), '.2f'), _fmt(r.get('tflops_pct')),
                          _fmt(r.get('gbs')), _fmt(r.get('gbs_pct')),
                          _fmt(r.get('rel_err'), '.1e') if 'error' not in r else r['error']] for r in report.ops])
        lines.append('')
    if report.training:
        lines += ['## Training step (forward + backward + AdamW)', '']
        lines += _table(['family', 'model', 'run', 'batch x px', 'dtype', 'img/s', 'peak MB', 'loss'],
                        [[r['family'], r['model'], r['run'], f'{r["batch"]} x {r["img"]}', r['dtype'],
                          _fmt(r.get('img_s')), _fmt(r.get('peak_mb'), '.0f'),
                          _fmt(r.get('loss'), '.3f') if 'error' not in r else r['error']] for r in report.training])
        lines.append('')
    lines += ['## Skipped', ''] + [f'- {what}: {why}' for what, why in report.skipped] + ['']
    lines += ['## Failures', ''] + ([f'- {f}' for f in report.failures] or ['none']) + ['']
    lines += ['Seconds: ' + ', '.join(f'{k} {v:.0f}' for k, v in report.seconds.items())]
    return '\n'.join(lines) + '\n'


def _section(report: Report, name: str, fn, *args) -> None:
    t0 = time.perf_counter()
    try:
        fn(*args)
    except Exception as e:     # the check's own bug: reported, the other sections still run
        report.failures.append(f'{name} section crashed: {type(e).__name__}: {e}\n{traceback.format_exc()}')
    report.seconds[name] = time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('--out', required=True, help='folder for report.md and report.json')
    p.add_argument('--dry-run', action='store_true', help='CPU, tiny shapes, Triton interpreted (what CI runs)')
    p.add_argument('--time-limit', type=float, default=450., help='seconds; later items are skipped (default 450)')
    p.add_argument('--jobs', type=int, default=None, help='processes for the correctness grid (default: 8 on a GPU, '
                                                          '1 in a dry run)')
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    torch, zoo = _imports(a.dry_run)
    report, clock = Report(), Clock(a.time_limit)
    device = environment(torch, report, a.dry_run)
    has_timm = report.environment.get('timm') is not None
    if device is None:
        report.skipped.append(('every section', 'no CUDA device'))
    else:
        jobs = a.jobs or (1 if a.dry_run else min(8, os.cpu_count() or 1))
        _section(report, 'correctness', correctness, device, report, jobs, a.dry_run)
        if a.dry_run:
            report.skipped.append(('ops: shapes of the models, bf16, compiled FlexAttention',
                                   'CUDA only (the dry run: tiny shapes, fp32, FlexAttention eager)'))
        _section(report, 'ops', op_benchmarks, torch, device, report, clock, a.dry_run)
        if has_timm:
            if a.dry_run:
                report.skipped.append(('training: every family, bf16, batch 32, Triton forced', 'CUDA only (the dry '
                                       'run: one family, fp32, 64 px, batch 1, one step, dispatcher and timm)'))
            _section(report, 'training', training, torch, zoo, device, report, clock, a.dry_run)
        else:
            report.skipped.append(('training', 'timm is not installed'))
    report.seconds['total'] = time.perf_counter() - t0
    (out / 'report.json').write_text(json.dumps(report.__dict__, indent=1, default=str))
    (out / 'report.md').write_text(markdown(report, a.dry_run))
    print(markdown(report, a.dry_run))
    return 1 if report.failures else 0


if __name__ == '__main__':
    sys.exit(main())
