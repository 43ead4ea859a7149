"""Op benchmarks (``python tools/benchmark.py --op window|halo|neighborhood|routing|linear``): time and
peak memory of every backend of an op that can run here, side by side in one run, on the shapes of the family that uses
it; for ``halo`` also timm's HaloAttn module beside the zoo's mixer (same weights, 1x1 projections
included), at halonet26t's stage-3 shape.

Peak memory: on CUDA torch.cuda.max_memory_allocated; on CPU the highest allocator total the profiler's
allocation events report during the call, less the total before it (memory alive beyond the inputs).
"""
import os
import statistics
import sys
from contextlib import contextmanager
from typing import Callable, Dict, Optional

import torch

from mixzoo.ops import _cpu, _dispatch


@contextmanager
def _quiet_stderr():
    """The CPU profiler's native layer logs start/stop lines on fd 2; keep the table readable."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_mb(fn: Callable, device: str) -> float:
    if device == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    with _quiet_stderr(), torch.profiler.profile(profile_memory=True) as prof:
        fn()
    # the allocator's running total at each allocation event (summing the ops' self usage instead counts a free
    # inside an autograd.Function or other enclosing event at that event's start, before the allocations)
    allocs = []
    todo = list(prof.profiler.kineto_results.experimental_event_tree())
    while todo:
        node = todo.pop()
        todo.extend(node.children)
        ef = node.extra_fields
        if isinstance(ef, torch._C._profiler._ExtraFields_Allocation) and ef.device.type == 'cpu':
            allocs.append((node.start_time_ns, ef.alloc_size, ef.total_allocated))
    if not allocs:
        return 0.
    allocs.sort()
    return (max(a[2] for a in allocs) - (allocs[0][2] - allocs[0][1])) / 2 ** 20


def best_time(fns: Dict[str, Callable], reps: int, device: str, warmup: bool = True,
              medians: Optional[Dict[str, float]] = None) -> Dict[str, float]:
    """Best seconds of each callable over ``reps`` interleaved rounds (one warm-up call each first; the zoo's
    own timing loop, ``ops._cpu.interleaved``, with the device synchronised around each call); the medians go into
    ``medians`` when given."""
    times = {k: [] for k in fns}
    best = _cpu.interleaved(fns, reps, warmup=warmup, sync=torch.cuda.synchronize if device == 'cuda' else None,
                            rounds=times)
    if medians is not None:
        medians.update({k: statistics.median(v) for k, v in times.items()})
    return best


def _runnable(op: str, call: _dispatch.Call):
    # not forced: a Triton kernel under the CPU interpreter (tests only) is no timing
    return [b.name for b in _dispatch.backends(op) if not b.reasons(call)]


def _report(title, fns, reps, device, backward):
    t = best_time(fns, reps, device)
    base = t.get('reference')
    print(f'\n{title}  ({"forward+backward" if backward else "forward"}, best of {reps})')
    print(f'  {"implementation":28s} {"ms":>9s} {"peak MB":>9s} {"speed vs reference":>19s}')
    for k, f in fns.items():
        ratio = f'{base / t[k]:.2f}x' if base else '-'
        print(f'  {k:28s} {t[k] * 1e3:9.2f} {peak_mb(f, device):9.1f} {ratio:>19s}')


def _call(fn, backward, *tensors):
    def run():
        if backward:
            fn().float().sum().backward()
            # cleared after the call: freed before it, the last call's gradients would count against the peak
            for t in tensors:
                t.grad = None
        else:
            with torch.no_grad():
                fn()
    return run


def window(args):
    from mixzoo.ops import window_attention
    dev, dt = args.device, getattr(torch, args.dtype)
    # MaxViT-T stage 1: 56x56 map, 7x7 windows, 2 heads of 32, batch 8 at 224
    B, H, N, D = args.batch_size * 64, 2, 49, 32
    q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=dt, requires_grad=args.backward) for _ in range(3))
    bias = torch.randn(H, N, N, device=dev, dtype=dt, requires_grad=args.backward)
    call = _dispatch.Call.of(q, head_dim=D, window_area=N)
    fns = {be: _call(lambda be=be: window_attention(q, k, v, bias, backend=be), args.backward, q, k, v, bias)
           for be in _runnable('window', call)}
    _report(f'window attention, MaxViT-T stage-1 shape ({B} windows x {H} heads x {N} tokens x {D})',
            fns, args.reps, dev, args.backward)


def halo(args):
    from timm.layers.halo_attn import HaloAttn

    from mixzoo.mixers import HaloAttention
    dev, dt = args.device, getattr(torch, args.dtype)
    for img in (256, 224):
        hw = img // 16
        zoo = HaloAttention(256, 256, num_heads=8, block_size=8, halo_size=2).to(dev, dt)
        x = torch.randn(args.batch_size, 256, hw, hw, device=dev, dtype=dt, requires_grad=args.backward)
        q = torch.randn(args.batch_size, 8, 32, hw, hw, device=dev, dtype=dt, requires_grad=args.backward)
        call = _dispatch.Call.of(q, head_dim=32, window_area=144)   # the backends that can run (autograd too)
        # the zoo's models run channels_last on CPU (and timm's NCHW): both layouts are timed
        xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(args.backward)
        fns = {}
        for be in _runnable('halo', call):
            fns[f'zoo mixer [{be}]'] = _call(lambda be=be: zoo(x, backend=be), args.backward, x)
            if dev == 'cpu':
                fns[f'zoo mixer [{be}] NHWC'] = _call(lambda be=be: zoo(xc, backend=be), args.backward, xc)
        if hw % 8 == 0:
            ref = HaloAttn(256, 256, num_heads=8, block_size=8, halo_size=2).to(dev, dt)
            ref.load_state_dict(zoo.state_dict())
            fns['timm HaloAttn'] = _call(lambda: ref(x), args.backward, x)
            base_key = 'timm HaloAttn'
        else:
            base_key = None
        med = {}
        t = best_time(fns, args.reps, dev, medians=med)
        print(f'\nhalo attention module, halonet26t stage-3 shape at {img} input: ({args.batch_size}, 256, {hw}, '
              f'{hw}), 8 heads, block 8, halo 2 ({"forward+backward" if args.backward else "forward"}, '
              f'best and median of {args.reps} interleaved)'
              + ('' if base_key else ' -- timm cannot run this size (needs multiples of 8)'))
        print(f'  {"implementation":28s} {"ms":>9s} {"median":>9s} {"peak MB":>9s} {"speed vs timm":>14s}')
        for k, f in fns.items():
            ratio = f'{t[base_key] / t[k]:.2f}x' if base_key else '-'
            print(f'  {k:28s} {t[k] * 1e3:9.2f} {med[k] * 1e3:9.2f} {peak_mb(f, dev):9.1f} {ratio:>14s}')


def neighborhood(args):
    from mixzoo.ops import neighborhood_attention
    dev, dt = args.device, getattr(torch, args.dtype)
    # TransNeXt-T stage 1: 3 heads of 24, 3x3 window + pooled keys (map / 8 per side), one image
    for img in (224, 1024):
        hw, pool = img // 4, (img // 32) ** 2
        q, k, v = (torch.randn(1, 3, hw, hw, 24, device=dev, dtype=dt, requires_grad=args.backward)
                   for _ in range(3))
        ek, ev = (torch.randn(1, 3, pool, 24, device=dev, dtype=dt, requires_grad=args.backward) for _ in range(2))
        eb = torch.randn(1, 3, hw, hw, pool, device=dev, dtype=dt)
        rpb = torch.randn(3, 5, 5, device=dev, dtype=dt)
        call = _dispatch.Call.of(q, head_dim=24, window_area=9)

        def run(be):
            return neighborhood_attention(q, k, v, 3, rpb=rpb, extra_k=ek, extra_v=ev, extra_bias=eb, backend=be)
        fns = {be: _call(lambda be=be: run(be), args.backward, q, k, v, ek, ev)
               for be in _runnable('neighborhood', call)}
        _report(f'neighborhood attention, TransNeXt-T stage-1 shape at {img} input (1 x 3 heads x {hw}x{hw} x 24, '
                f'3x3 window + {pool} pooled keys)', fns, args.reps, dev, args.backward)


def routing(args):
    from mixzoo.ops import routed_attention
    dev, dt = args.device, getattr(torch, args.dtype)
    # BiFormer-T stage 1: 2 heads of 32, n_win 7 (the map padded to a multiple of 7), topk 1, scale qk_dim^-0.5;
    # the 1024 input at batch 1 (a 37x37-token region's logits are 1369^2 per head: the reference needs GBs)
    for img, batch in ((224, args.batch_size), (1024, 1)):
        side = -(-(img // 4) // 7)
        R, T, h, D, topk = 49, side * side, 2, 32, 1
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(batch, h, R, T, D, generator=g).to(dev, dt).requires_grad_(args.backward)
                   for _ in range(3))
        idx = torch.rand(batch, R, R, generator=g).argsort(-1)[..., :topk].to(dev)
        call = _dispatch.Call.of(q, head_dim=D, tokens=T, keys=topk * T, topk=topk)
        fns = {be: _call(lambda be=be: routed_attention(q, k, v, idx, (h * D) ** -0.5, backend=be), args.backward,
                         q, k, v) for be in _runnable('routing', call)}
        _report(f'routed attention, BiFormer-T stage-1 shape at {img} input ({batch} x {h} heads x {R} regions x '
                f'{T} tokens x {D}, topk {topk})', fns, args.reps, dev, args.backward)



def linear(args):
    from mixzoo.ops import linear_attention
    dev, dt = args.device, getattr(torch, args.dtype)
    # L2ViT-T's linear-attention blocks: stage 1 (3 heads, 56x56 tokens) and stage 3 (12 heads, 14x14) at 224,
    # stage 1 at 1024 (256x256 tokens, batch 1; the reference's (N x N) similarities would need 50 GB there);
    # q, k, v as the mixer passes them: ReLU'd q, k and a view v of one (B, N, 3, heads, 32) projection
    for img, stage, batch in ((224, 1, args.batch_size), (224, 3, args.batch_size), (1024, 1, 1)):
        hw, h, D = img // 2 ** (stage + 1), 3 * 2 ** (stage - 1), 32
        g = torch.Generator().manual_seed(0)
        qkv = torch.randn(batch, hw * hw, 3, h, D, generator=g).to(dev, dt).requires_grad_(args.backward)
        t = torch.full((h, 1, 1), D ** -0.5, device=dev, dtype=dt, requires_grad=args.backward)

        def inputs():
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            return q.relu(), k.relu(), v

        def official_form():   # the official module's arithmetic: key sum, normaliser matvec, K^T V, q (K^T V)
            q, k, v = inputs()
            den = torch.clamp(q @ k.transpose(-2, -1).sum(dim=-1, keepdim=True), 1e2)
            return (q @ ((k.transpose(-2, -1) @ v) * t)) / den
        call = _dispatch.Call.of(qkv, head_dim=D, tokens=hw * hw, value_dim=D)
        fns = {be: _call(lambda be=be: linear_attention(*inputs(), t, backend=be), args.backward, qkv, t)
               for be in _runnable('linear', call) if not (be == 'reference' and hw * hw > 4096)}
        fns['L2ViT official form'] = _call(official_form, args.backward, qkv, t)
        _report(f'linear attention, L2ViT-T stage-{stage} shape at {img} input ({batch} x {h} heads x {hw * hw} '
                f'tokens x {D})', fns, args.reps, dev, args.backward)


OPS = {'window': window, 'halo': halo, 'neighborhood': neighborhood, 'routing': routing, 'linear': linear}
