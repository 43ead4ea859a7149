"""``python -m mixzoo.ops info``: every op x backend, what it supports, and whether it can run here; the CPU-specific
choices measured on this CPU (``ops._cpu``; ``--retune`` measures them again) and the state of the oneDNN linear
route (``ops._onednn``), the second switch of what a model runs. ``info --gpu-compile``: every
Triton kernel compiled ahead of time for sm_80 and sm_90 (``ops._aot``), a table per kernel."""
import argparse
import sys

import torch

from . import _cpu, _dispatch, _onednn


def cpu_choices(out=None) -> None:
    """Each CPU-specific choice: the option taken on this CPU, and why (measured timings, cache, or forced)."""
    out = out or sys.stdout
    print(f'CPU choices for {_cpu.signature()} ({_cpu.ENV}=<choice>:<option> forces one):', file=out)
    for name, c in sorted(_cpu.choices().items()):
        print(f'  {name:11s} -> {_cpu.choice(name):8s} {_cpu.explain(name)}', file=out)
        print(f'  {"":11s}    {c.doc} (options: {", ".join(c.options)})', file=out)


def info(out=None) -> None:
    out = out or sys.stdout   # (looked up per call: a default bound at import would outlive a redirection)
    probes = [('cpu', torch.float32)]
    if torch.cuda.is_available():
        probes += [('cuda', torch.float16)]
    print(f'torch {torch.__version__}; CUDA available: {torch.cuda.is_available()}; '
          f'TRITON_INTERPRET={int(_dispatch.triton_interpret())}; '
          f'MIXZOO_BACKEND={__import__("os").environ.get("MIXZOO_BACKEND", "") or "(unset)"}', file=out)
    cpu_choices(out)
    print(f'oneDNN linear (mixzoo.ops._onednn.linear): {_onednn.state()[1]}', file=out)
    for op in _dispatch.ops():
        print(f'\n[{op}]  priority: {" > ".join(b.name for b in _dispatch.backends(op))}', file=out)
        for b in _dispatch.backends(op):
            print(f'  {b.name:10s} {b.describe()}', file=out)
            if b.doc:
                print(f'  {"":10s} {b.doc}', file=out)
            for dev, dt in probes:
                call = _dispatch.Call(dev, dt)
                auto, forced = b.reasons(call), b.reasons(call, forced=True)
                if not auto:
                    state = 'usable (auto)'
                elif not forced:
                    state = 'usable when forced; not picked automatically: ' + '; '.join(auto)
                else:
                    state = 'NOT usable: ' + '; '.join(forced)
                print(f'  {"":10s} here, {dev}/{str(dt).replace("torch.", "")}: {state}', file=out)


def gpu_compile(ops, ptxas, json_path=None, out=None) -> int:
    """Every Triton kernel compiled ahead of time for sm_80 / sm_90 (``mixzoo.ops._aot``): its table per kernel;
    1 if a compile failed or a config a launch takes overflows shared memory."""
    import json
    import time
    from . import _aot
    out = out or sys.stdout
    t0 = time.perf_counter()
    rows = _aot.run_workers(ops or sorted(_aot.CASES), ptxas)
    print(_aot.table(rows), file=out)
    print(_aot.summary(rows, time.perf_counter() - t0), file=out)
    if json_path:
        with open(json_path, 'w') as f:
            json.dump(rows, f, indent=1)
    return int(any(r['status'] in _aot.FAILED for r in rows))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog='python -m mixzoo.ops')
    p.add_argument('command', choices=['info'], nargs='?', default='info')
    p.add_argument('--gpu-compile', action='store_true',
                   help='compile every Triton kernel (every autotune config, dtype) for sm_80 and sm_90 ahead of time, '
                        'no GPU needed: shared memory, registers, spills per kernel (minutes on a cold cache)')
    p.add_argument('--op', action='append', help='with --gpu-compile: only this op (repeatable)')
    p.add_argument('--ptxas', default='all', help="with --gpu-compile: the (dtype, arch) pairs compiled through ptxas "
                   "for registers / spills: 'all' (default), 'none', or e.g. bfloat16@sm_90,float16@sm_80")
    p.add_argument('--json', help='with --gpu-compile: write the rows here')
    p.add_argument('--retune', action='store_true', help='measure the CPU-specific choices again (and cache them)')
    a = p.parse_args(argv)
    if a.gpu_compile:
        return gpu_compile(a.op, [] if a.ptxas == 'none' else a.ptxas.split(','), a.json)
    if a.retune:
        _cpu.retune()
    info()
    return 0


if __name__ == '__main__':
    sys.exit(main())
