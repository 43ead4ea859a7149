"""Ahead-of-time compile check of every Triton kernel of the ops for sm_80 and sm_90, on a machine without a GPU.

    python -m mixzoo.ops info --gpu-compile [--op OP ...] [--ptxas all|none] [--json PATH]

What is compiled. Each op's Triton backend is called, forward and backward, at the shapes of the models that use it
and in the layouts their mixers pass (:data:`CASES`), and at the backend's largest declared head dim; Triton's
launch is intercepted, so nothing runs. Each launch's arguments go through Triton's own binder for the target (the
specialisation a launch there makes: 16-byte aligned pointers, ints equal to 1 or divisible by 16 specialised), and
an autotuned kernel's launch is taken with every config of its GPU list. Each distinct (kernel, specialisation,
config) is compiled for sm_80 and sm_90 with ``triton.compile(ASTSource(...), target=GPUTarget('cuda', arch, 32))``,
for every dtype the backend declares.

Stages. Shared memory is known once the TritonGPU IR has its shared buffers allocated (the first passes of
Triton's LLVM lowering): every compile goes that far (``shared`` tier, ~0.2 s). Registers and spills are only
known from ptxas: the ``ptxas`` tier runs the whole pipeline to a cubin with ``ptxas -v`` (1-3 s at the models'
shapes, tens of seconds for the spilling head-dim-128 tiles), on the configs a launch keeps at the models' shapes,
for the (dtype, arch) pairs asked (default: all; CI: see tests/test_gpu_compile.py). Compiled results are kept
by Triton's cache under ``$MIXZOO_CACHE/triton-aot`` (default ~/.cache/mixzoo), keyed by the kernel's source, its
specialisation, the config, the target and the Triton/ptxas versions, so a second run only reads them.

What fails: a compile error, or shared memory over the arch's per-block limit (sm_80 163 KB, sm_90 227 KB) on a
config a launch takes (autotune configs that cannot fit are pruned by ``ops._triton.autotune``: reported as
``pruned``). Spills are reported, not failed.

The compiles run in worker processes with TRITON_INTERPRET=0 (under the interpreter ``triton.jit`` makes no
compilable kernels): :func:`run_workers` starts ``python -m mixzoo.ops._aot --op OP --json PATH``.
"""
import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

ARCHS = {80: 166912, 90: 232448}     # compute capability -> max shared memory per block (opt-in), bytes
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_VERSION = 'mixzoo-aot-1'            # part of the compile cache key: bump when the stage hooks change


# ---- the launches: each op's Triton backend at its models' shapes ------------------------------------------------

@dataclass
class Case:
    label: str
    run: Callable[[torch.dtype], torch.Tensor]   # forward through the op's Triton backend (inputs require grad)
    model: bool = True                           # a model's shape (the ptxas tier); else the declared maximum


def _t(*shape, dtype):
    return torch.randn(*shape).to(dtype).requires_grad_()


def _qkv(shape, perm, dtype):
    """q, k, v as views of one fused projection of ``shape`` permuted by ``perm``, as the mixers pass them."""
    qkv = torch.randn(*shape).to(dtype)
    return [t.detach().requires_grad_() for t in qkv.permute(*perm)]


def _window(Bw, H, N, D, bias, mask):
    def run(dtype):
        from .window import triton as kernels
        q, k, v = _qkv((Bw, N, 3, H, D), (2, 0, 3, 1, 4), dtype)       # PartitionAttention's (B', N, 3, h, D)
        key_mask = (torch.arange(N) < N - 3).expand(Bw, N).contiguous() if mask else None
        return kernels.window_attention(q, k, v, _t(H, N, N, dtype=dtype) if bias else None, key_mask, None)
    return run


def _routing(R, T, h, D, topk):
    def run(dtype):
        from .routing import triton as kernels
        qkv = torch.randn(1, R, T, 3 * h * D).to(dtype)                 # BiFormer's (B, R, T, [q | k | v]) split
        q, k, v = (t.unflatten(-1, (h, D)).permute(0, 3, 1, 2, 4).detach().requires_grad_()
                   for t in qkv.split([h * D] * 3, -1))
        idx = torch.rand(1, R, R).argsort(-1)[..., :topk]
        return kernels.routed_attention(q, k, v, idx, (h * D) ** -0.5)
    return run


def _neighborhood(h, H, W, D, kernel, dilation, border, pooled=0):
    def run(dtype):
        from .neighborhood import triton as kernels
        q, k, v = (_t(1, h, H, W, D, dtype=dtype) for _ in range(3))
        extra = dict(extra_k=_t(1, h, pooled, D, dtype=dtype), extra_v=_t(1, h, pooled, D, dtype=dtype),
                     extra_bias=_t(1, h, H, W, pooled, dtype=dtype)) if pooled else {}
        return kernels.neighborhood_attention(q, k, v, kernel, dilation, border=border,
                                              rpb=_t(h, 2 * kernel - 1, 2 * kernel - 1, dtype=dtype), **extra)
    return run


def _halo(h, D, Dv, H, stride, halo, block=8):
    def run(dtype):
        from .halo import triton as kernels
        win = block + 2 * halo
        q = _t(1, h, D, -(-H // stride), -(-H // stride), dtype=dtype)
        kv = _t(1, h * (D + Dv), H, H, dtype=dtype).view(1, h, D + Dv, H, H)   # HaloAttention's [k | v] channels
        rel = [_t(2 * win - 1, D, dtype=dtype) for _ in range(2)]
        return kernels.halo_attention(q, kv[:, :, :D], kv[:, :, D:], block, halo, *rel)
    return run


def _linear(h, N, D):
    def run(dtype):
        from .linear import triton as kernels
        q, k, v = _qkv((1, N, 3, h, D), (2, 0, 3, 1, 4), dtype)
        return kernels.linear_attention(q.relu(), k.relu(), v, torch.ones(h, requires_grad=True))
    return run


# Model shapes (224 input unless said; batch 1: the batch is a runtime int and does not change a compile), every
# option the op takes switched on where the models use it; then the backend's largest declared head dim.
CASES: Dict[str, List[Case]] = {
    'window': [Case('MaxViT-T s1 7x7 windows, d32, bias + padding mask', _window(64, 2, 49, 32, True, True)),
               Case('BiFormer-T s4 global attention, 8 heads of 64', _window(1, 8, 49, 64, False, False)),
               Case('declared max head dim 256', _window(2, 2, 64, 256, True, True), model=False)],
    'routing': [Case('BiFormer-T s1 (49 regions of 8x8, top-1, d32)', _routing(49, 64, 2, 32, 1)),
                Case('declared max head dim 128', _routing(4, 64, 2, 128, 2), model=False)],
    'neighborhood': [Case('TransNeXt-T s1 (3x3 window + 49 pooled keys, d24)',
                          _neighborhood(3, 56, 56, 24, 3, 1, 'mask', pooled=49)),
                     Case('NAT-Mini / DiNAT s1 (7x7 window, dilation 2, d32)', _neighborhood(2, 56, 56, 32, 7, 2, 'shift')),
                     Case('declared max head dim 128', _neighborhood(2, 8, 8, 128, 3, 1, 'mask', pooled=4),
                          model=False)],
    'halo': [Case('HaloNet26t s3 (block 8, halo 2, d32)', _halo(8, 32, 32, 32, 1, 2)),
             Case('HaloNet26t s3 strided (block 8, halo 2, d32)', _halo(8, 32, 32, 32, 2, 2)),
             Case('HaloNet26t s4 (block 8, halo 2, d64)', _halo(8, 64, 64, 16, 1, 2)),
             Case('declared max head dim 128', _halo(2, 128, 128, 16, 1, 3), model=False)],
    'linear': [Case('L2ViT-T s1 (56x56 tokens, d32)', _linear(3, 3136, 32)),
               Case('declared max head dim 128', _linear(2, 256, 128), model=False)],
}


@dataclass
class Launch:
    kernel: object                 # the JITFunction
    args: tuple
    kwargs: dict
    tuner: object = None           # its Autotuner, for an autotuned kernel


@contextlib.contextmanager
def capturing(sink: List[Launch]):
    """Triton launches appended to ``sink`` instead of compiled and run."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction
    saved = JITFunction.run, Autotuner.run

    def jit_run(self, *args, grid=None, warmup=False, **kwargs):
        sink.append(Launch(self, args, kwargs))

    def tuned_run(self, *args, grid=None, warmup=False, **kwargs):
        sink.append(Launch(self.fn, args, kwargs, self))
    JITFunction.run, Autotuner.run = jit_run, tuned_run
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = saved


def launches(case: Case, dtype: torch.dtype) -> List[Launch]:
    """The launches of the case's forward and backward."""
    sink: List[Launch] = []
    with capturing(sink):
        case.run(dtype).float().sum().backward()
    return sink


def kernels(op: str) -> List[str]:
    """The op's kernels: the module's Triton functions launched from Python (not called by another kernel)."""
    import importlib
    import inspect
    mod = importlib.import_module(f'mixzoo.ops.{op}.triton')
    jitted = {n: o for n, o in vars(mod).items() if type(o).__name__ in ('JITFunction', 'Autotuner',
                                                                          'InterpretedFunction')}
    src = inspect.getsource(mod)
    return sorted(n for n in jitted if re.search(rf'\b{n}\[', src))


# ---- compiling ---------------------------------------------------------------------------------------------------

def _spec(launch: Launch, arch: int, config=None):
    """(target, ASTSource, options) of ``launch`` (with ``config``'s keywords) as Triton's launcher builds them."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    target = GPUTarget('cuda', arch, 32)
    backend = make_backend(target)
    fn = launch.kernel
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs, **(config.all_kwargs() if config is not None else {}))
    kwargs['debug'] = kwargs.get('debug', fn.debug) or knobs.runtime.debug
    kwargs['instrumentation_mode'] = knobs.compilation.instrumentation_mode
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return target, ASTSource(fn, signature, constexprs, attrs), options


def _stop_at_shared(backend, stages, options, capability):
    """The pipeline cut after shared-memory allocation: 'llir' runs the passes of Triton's make_llir up to it and
    records metadata['shared']; 'ptx' / 'cubin' produce nothing."""
    from triton._C.libtriton import ir, nvidia, passes
    from triton.backends.nvidia.compiler import get_ptx_version_from_options

    def llir(mod, metadata):
        pm = ir.pass_manager(mod.context)
        passes.ttgpuir.add_combine_tensor_select_and_if(pm)
        passes.ttgpuir.add_allocate_warp_groups(pm, False)
        passes.convert.add_scf_to_cf(pm)
        passes.gluon.add_inliner(pm)
        nvidia.passes.ttgpuir.add_allocate_shared_memory_nv(pm, capability,
                                                            get_ptx_version_from_options(options, capability))
        pm.run(mod, 'mixzoo_shared')
        metadata['shared'] = mod.get_int_attr('ttg.shared')
        return str(mod)

    def ptx(src, metadata):
        metadata['name'] = metadata.get('name') or 'kernel'
        return ''
    stages.update(llir=llir, ptx=ptx, cubin=lambda src, metadata: b'')


def _ptxas_verbose(backend, stages, options, capability):
    """The cubin stage with ``ptxas -v``'s registers and spills kept in metadata['mixzoo_ptxas']."""
    from triton import knobs
    make_cubin = stages['cubin']

    def cubin(src, metadata):
        out = io.StringIO()
        with knobs.nvidia.scope(), contextlib.redirect_stdout(out):
            knobs.nvidia.dump_ptxas_log = True
            binary = make_cubin(src, metadata)
        log = out.getvalue()
        regs = re.search(r'Used (\d+) registers', log)
        spill = re.search(r'(\d+) bytes spill stores, (\d+) bytes spill loads', log)
        metadata['mixzoo_ptxas'] = dict(regs=int(regs.group(1)) if regs else None,
                                        spills=int(spill.group(1)) + int(spill.group(2)) if spill else None)
        return binary
    stages['cubin'] = cubin


def _hook(stop_at_shared: bool):
    tag = f'{_VERSION}-{"shared" if stop_at_shared else "ptxas"}'

    def hook(backend=None, stages=None, options=None, language=None, capability=None):
        if backend is None:           # Triton asks for the hook's cache key
            return tag, tag
        (_stop_at_shared if stop_at_shared else _ptxas_verbose)(backend, stages, options, capability)
    return hook


def compile_launch(launch: Launch, arch: int, config=None, ptxas: bool = False) -> dict:
    """Compile ``launch`` for ``arch``: {'shared', 'regs', 'spills', 'secs', 'cached'} or {'error': message}."""
    import triton
    from triton import knobs
    hits = []
    t0 = time.perf_counter()
    try:
        target, src, options = _spec(launch, arch, config)
        with knobs.runtime.scope(), knobs.compilation.scope():
            knobs.runtime.add_stages_inspection_hook = _hook(not ptxas)
            knobs.compilation.listener = lambda **kw: hits.append(kw['cache_hit'])
            md = triton.compile(src, target=target, options=options.__dict__).metadata
    except Exception as e:     # a compile error is a result
        return dict(error=f'{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ""}'[:300],
                    secs=time.perf_counter() - t0)
    return dict(shared=md.shared, secs=time.perf_counter() - t0, cached=bool(hits and hits[0]),
                **getattr(md, 'mixzoo_ptxas', {}))


# ---- the check of one op -------------------------------------------------------------------------------------------

def _dtype_name(dtype) -> str:
    return str(dtype).replace('torch.', '')


def _config_label(launch: Launch, config) -> str:
    kw = dict(launch.kwargs, **(config.all_kwargs() if config is not None else {}))
    blocks = ' '.join(f'{k}={v}' for k, v in kw.items() if k.isupper() and k.startswith(('B', 'bq')) and
                      isinstance(v, int) and not isinstance(v, bool))
    return f'{blocks} w{kw.get("num_warps", 4)} s{kw.get("num_stages", 3)}'


def _pruned(launch: Launch) -> list:
    """The autotune configs the launch's prune drops (none for a plain launch)."""
    tuner = launch.tuner
    if tuner is None or not tuner.early_config_prune:
        return []
    named = dict(zip(tuner.arg_names, launch.args))
    kept = tuner.early_config_prune(tuner.configs, named, **launch.kwargs)
    return [c for c in tuner.configs if c not in kept]


def check_op(op: str, ptxas: Sequence[str] = ('all',)) -> List[dict]:
    """One row per (kernel, config, dtype, arch) compiled for ``op`` (identical compiles of several cases merged).
    ``ptxas``: '<dtype>@sm_<arch>' pairs to run through ptxas (model shapes, kept configs), 'all' or nothing."""
    from . import _dispatch
    rows: Dict[tuple, dict] = {}
    declared = next(b for b in _dispatch.backends(op) if b.name == 'triton').dtypes
    for dtype in (d for d in DTYPES if d in declared):
        for case in CASES[op]:
            for launch in launches(case, dtype):
                pruned = _pruned(launch)
                for config in (launch.tuner.configs if launch.tuner else [None]):
                    for arch, limit in ARCHS.items():
                        target, src, options = _spec(launch, arch, config)
                        key = (launch.kernel.__name__, src.hash(), repr(options), arch)
                        if key in rows:
                            rows[key]['cases'].append(case.label)
                            continue
                        full = (case.model and config not in pruned and
                                ('all' in ptxas or f'{_dtype_name(dtype)}@sm_{arch}' in ptxas))
                        res = compile_launch(launch, arch, config, ptxas=full)
                        rows[key] = dict(op=op, kernel=f'{op}.{launch.kernel.__name__}',
                                         autotuned=launch.tuner is not None, config=_config_label(launch, config),
                                         dtype=_dtype_name(dtype), arch=arch, limit=limit, cases=[case.label],
                                         pruned=config in pruned, **res)
    for row in rows.values():
        row['status'] = status(row)
    return list(rows.values())


def status(row: dict) -> str:
    if 'error' in row:
        return 'ERROR'
    over = row['shared'] > row['limit']
    if row['pruned']:
        return 'pruned' + (' (would overflow)' if over else '')
    if over:
        return 'OVER'
    return 'spills' if row.get('spills') else 'ok'


FAILED = ('ERROR', 'OVER')


# ---- running the workers and the report --------------------------------------------------------------------------

def cache_dir() -> str:
    return os.path.join(os.environ.get('MIXZOO_CACHE') or os.path.expanduser('~/.cache/mixzoo'), 'triton-aot')


def worker_env() -> dict:
    """A worker's environment: compiled Triton (not the interpreter), its cache in ours, binaries only."""
    return dict(os.environ, TRITON_INTERPRET='0', TRITON_CACHE_DIR=cache_dir(), TRITON_STORE_BINARY_ONLY='1')


# A worker imports mixzoo.ops alone: the package `mixzoo` (the model zoo: timm, every family; 6-8 s of CPU) stands in
# as a bare package over its folder, so `mixzoo.ops` runs its own __init__ only.
_WORKER = """import importlib.util, sys, types
zoo, ops = sys.argv[1:3]
sys.modules['mixzoo'] = types.ModuleType('mixzoo')
sys.modules['mixzoo'].__path__ = [zoo]
spec = importlib.util.spec_from_file_location('mixzoo.ops', ops + '/__init__.py', submodule_search_locations=[ops])
sys.modules['mixzoo.ops'] = module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
from mixzoo.ops import _aot
sys.exit(_aot.main(sys.argv[3:]))
"""


def run_worker(op: str, ptxas: Sequence[str] = ('all',)) -> List[dict]:
    """check_op(op) in a worker process (compiled Triton, whatever this process runs under)."""
    zoo = sys.modules['mixzoo'].__path__[0] if 'mixzoo' in sys.modules else os.path.dirname(os.path.dirname(__file__))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f'{op}.json')
        proc = subprocess.run([sys.executable, '-c', _WORKER, zoo, os.path.dirname(os.path.abspath(__file__)),
                               '--op', op, '--ptxas', ','.join(ptxas) or 'none', '--json', path],
                              env=worker_env(), capture_output=True, text=True)
        if proc.returncode or not os.path.exists(path):
            raise RuntimeError(f'compile-check worker for {op} failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
        with open(path) as f:
            return json.load(f)


def run_workers(ops: Sequence[str], ptxas: Sequence[str] = ('all',), jobs: Optional[int] = None) -> List[dict]:
    jobs = jobs or max(1, min(len(ops), len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else 2))
    with ThreadPoolExecutor(jobs) as pool:
        return [row for rows in pool.map(lambda op: run_worker(op, ptxas), ops) for row in rows]


def _kb(n) -> str:
    return '-' if n is None else f'{n / 1024:.1f}K'


def table(rows: List[dict]) -> str:
    """One table per kernel: a line per (config, dtype) with each arch's shared memory / limit, registers, spill
    bytes (loads + stores) and status, and the cases it was compiled for."""
    out = []
    archs = sorted(ARCHS)
    for kernel in sorted({r['kernel'] for r in rows}):
        mine = [r for r in rows if r['kernel'] == kernel]
        tuned = ' (autotuned: every config)' if mine[0]['autotuned'] else ''
        out.append(f'{kernel}{tuned}')
        w = max(len(r['config']) for r in mine)
        head = f'  {"config":{w}s} {"dtype":9s}' + ''.join(
            f' | sm_{a}: {"shared":>7s} {"regs":>4s} {"spill":>5s} {"status":23s}' for a in archs) + ' | cases'
        out.append(head)
        groups: Dict[tuple, Dict[int, dict]] = {}
        for r in mine:
            groups.setdefault((r['config'], r['dtype'], tuple(r['cases'])), {})[r['arch']] = r
        for (config, dtype, cases), by_arch in groups.items():
            cells = ''
            for a in archs:
                r = by_arch.get(a)
                if r is None:
                    cells += f' | {"":6s} {"":>7s} {"":>4s} {"":>5s} {"":23s}'
                    continue
                regs = '-' if r.get('regs') is None else str(r['regs'])
                spill = '-' if r.get('spills') is None else str(r['spills'])
                cells += f' | {"":6s} {_kb(r.get("shared")):>7s} {regs:>4s} {spill:>5s} {r["status"]:23s}'
            out.append(f'  {config:{w}s} {dtype:9s}{cells} | {"; ".join(cases)}')
        errors = [r for r in mine if 'error' in r]
        out += [f'  ERROR sm_{r["arch"]} {r["config"]} {r["dtype"]}: {r["error"]}' for r in errors]
    return '\n'.join(out)


def summary(rows: List[dict], seconds: Optional[float] = None) -> str:
    failed = [r for r in rows if r['status'] in FAILED]
    pruned = sorted({f'{r["kernel"]} {r["config"]} {r["dtype"]}' for r in rows if r['pruned']})
    n_ptxas = sum(r.get('regs') is not None for r in rows)
    cached = sum(bool(r.get('cached')) for r in rows)
    lines = [f'{len(rows)} compiles ({n_ptxas} through ptxas, {cached} from the cache at {cache_dir()})'
             + (f' in {seconds:.0f} s' if seconds is not None else '') + f'; {len(failed)} failed'
             + f'; limits: ' + ', '.join(f'sm_{a} {v} B' for a, v in ARCHS.items())]
    lines += [f'pruned for shared memory: {p}' for p in pruned]
    lines += [f'FAILED {r["kernel"]} {r["config"]} {r["dtype"]} sm_{r["arch"]}: '
              + (r.get('error') or f'shared {r["shared"]} > {r["limit"]}') for r in failed]
    return '\n'.join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog='python -m mixzoo.ops._aot', description='compile-check worker (one op)')
    p.add_argument('--op', required=True, choices=sorted(CASES))
    p.add_argument('--ptxas', default='all', help="'all', 'none' or <dtype>@sm_<arch>[,...]")
    p.add_argument('--json', required=True)
    a = p.parse_args(argv)
    from . import _dispatch
    if _dispatch.triton_interpret():
        raise SystemExit('the compile check needs TRITON_INTERPRET unset (or 0): run it through run_worker()')
    rows = check_op(a.op, [] if a.ptxas == 'none' else a.ptxas.split(','))
    with open(a.json, 'w') as f:
        json.dump(rows, f)
    return 0


if __name__ == '__main__':
    sys.exit(main())
