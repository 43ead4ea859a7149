#!/usr/bin/env python
"""Export a zoo model for deployment: ONNX (onnxruntime) or a torch.export ExportedProgram (.pt2).

    python tools/export.py --model mz_poolformer_s12 --format onnx --dynamic --out s12.onnx
    python tools/export.py --model mz_davit_tiny --checkpoint davit_tiny.pth --format onnx --out davit.onnx
    python tools/export.py --model mz_nat_mini --format onnx --size 320 320 --out nat320.onnx
    python tools/export.py --model mz_shvit_s1 --format exported-program --dynamic --out shvit.pt2

The model is built in eval mode (random weights, or ``--checkpoint``: any layout the family's loader
reads) and traced with ``torch.export`` (non-strict) under ``no_grad`` with every op on its plain-torch
backend (no C / Triton kernels, no oneDNN linears: tracing takes F.linear). ONNX is written from that
ExportedProgram by ``torch.onnx.export`` (dynamo exporter; needs ``pip install mixzoo[deploy]``).

``--dynamic``: H and W are symbolic (the batch is --batch, default 1), from the family's smallest well-defined size (see
``dynamic_range``) up to 4096. Input sizes the graph specialises on are an error, not a silent static
export: families whose code branches on the size are refused with the reason (static export works
for them: drop ``--dynamic``; ``--size H W`` picks the size). Without ``--dynamic`` the graph is for
the one input size (default: the variant's img_size, batch 1).
"""
import argparse
import contextlib
import os
import sys
import time
from typing import Dict, Optional, Sequence, Tuple

import torch

try:
    from _zoo import mixzoo  # noqa: F401  (tools/ on sys.path: run as a script)
except ImportError:  # imported from the tests (tools/ on sys.path too) or as a module
    import mixzoo  # noqa: F401

import timm  # noqa: E402

from mixzoo import MODELS, check_model_name  # noqa: E402
from mixzoo.ops import forcing  # noqa: E402

FORMATS = ('onnx', 'exported-program')
MAX_SIDE = 4096

# Families whose dynamic-size export is refused, with the reason (measured with torch 2.14.1); static export works for
# them (tests: onnxruntime equals PyTorch at 224 and 200x232). Every other family exports with symbolic H and W:
# torch.export turns a size computed in Python into a guard on the input size (a pad of 0 or not, a window count of
# 1 or not, a chunk count), so the zoo's pads and crops (ops.window.pad_to_multiple / crop, layers.pad_same, the
# neighborhood mixer's span pad), window reshapes and op tilings take branch-free paths under symbolic sizes.
DYNAMIC_UNSUPPORTED: Dict[str, str] = {
    'halonet': 'the halo op lays out its query blocks and key spans from the map size in Python (ops/halo: '
               '_query_blocks, _spans), which torch.export specialises to the traced size (a guard on the number '
               'of blocks; "Cannot create Dim with inconsistent min=1, max=1")',
}


class ExportError(RuntimeError):
    """The export cannot be done as asked; the message says why and what works instead."""


def build(name: str, checkpoint: Optional[str] = None, **kwargs) -> torch.nn.Module:
    check_model_name(name)
    if checkpoint:
        if not os.path.isfile(checkpoint):
            raise ExportError(f'--checkpoint {checkpoint}: no such file')
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=os.path.abspath(checkpoint)))
    return timm.create_model(name, **kwargs).eval()


def dynamic_range(model: torch.nn.Module) -> Tuple[int, int]:
    """(min, max) of a symbolic side. The minimum keeps every stage map above one token (the model takes
    smaller inputs eagerly, but a map of size 1 is a special case for torch's shape reasoning: a graph for
    maps of one token and more would be specialised at 1): 2.5x the last stage's reduction, and at least
    the family's own minimum."""
    red = max(int(f['reduction']) for f in model.feature_info)
    lo = max(max(model.min_input_size), red * 5 // 2)
    return lo, MAX_SIDE


@contextlib.contextmanager
def _plain_torch():
    """Every op on its 'torch' backend, the traceable one (the C / Triton kernels step aside under tracing
    anyway; forcing makes it explicit and independent of MIXZOO_BACKEND). SDPA traced on its math kernel:
    CPU flash attention returns a (B, N, heads, D)-strided output, so a following transpose + reshape is
    recorded as a view; the ONNX exporter re-runs the graph with SDPA decomposed (contiguous output), where
    that view is invalid (MaxViT: "Cannot view a tensor with shape [64, 49, 2, 32] ...")."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with forcing('torch'), sdpa_kernel(SDPBackend.MATH):
        yield


def _family(model: torch.nn.Module, name: Optional[str]) -> str:
    name = name or (getattr(model, 'pretrained_cfg', None) or {}).get('architecture')
    return MODELS[name].family if name in MODELS else type(model).__name__


def export_program(model: torch.nn.Module, dynamic: bool = False, size: Optional[Sequence[int]] = None,
                   batch: int = 1, name: Optional[str] = None) -> torch.export.ExportedProgram:
    """The model traced by torch.export (non-strict, eval, no_grad, plain-torch ops). ``dynamic``: symbolic
    H, W (an :class:`ExportError` naming the family and the reason where it cannot be)."""
    family = _family(model, name)
    size = size or default_size(name)
    x = torch.randn(batch, model.in_chans, *size)
    shapes = None
    if dynamic:
        if family in DYNAMIC_UNSUPPORTED:
            raise ExportError(f'{family}: dynamic input sizes cannot be exported: {DYNAMIC_UNSUPPORTED[family]}. '
                              'Export a static size instead (drop --dynamic; --size H W picks it)')
        lo, hi = dynamic_range(model)
        if not (lo <= size[0] <= hi and lo <= size[1] <= hi):
            raise ExportError(f'{family}: the example size {size[0]}x{size[1]} must lie in the dynamic range '
                              f'{lo}..{hi}')
        d = torch.export.Dim
        # H and W symbolic; the batch stays the example's (a symbolic batch traced at 1 is specialised to 1,
        # traced at 2 it is guarded >= 2 in the ExportedProgram)
        shapes = {'x': {2: d('height', min=lo, max=hi), 3: d('width', min=lo, max=hi)}}
    import torch.fx.experimental._config as fx_config
    model.eval()
    try:
        # size-oblivious reasoning: broadcasting / contiguity checks do not specialise sizes of 0 or 1. Guards
        # stay guards (a guard deferred to a runtime assertion is dropped by the ONNX exporter: a size branch
        # taken at the example size would then run silently at every size)
        with torch.no_grad(), _plain_torch(), fx_config.patch(backed_size_oblivious=dynamic):
            return torch.export.export(model, (x,), dynamic_shapes=shapes, strict=False)
    except Exception as e:
        if dynamic and not isinstance(e, ExportError):
            lines = str(e).split('\n')
            why = ' '.join(lines[1:3] if len(lines) > 2 else lines).strip() or type(e).__name__
            raise ExportError(f'{family}: dynamic input sizes cannot be exported: the traced graph specialises '
                              f'the input size ({why[:400]}). Export a static size instead (drop --dynamic; '
                              '--size H W picks it)') from e
        raise


def default_size(name: Optional[str]) -> Tuple[int, int]:
    """The example / static size when none is given: the variant's img_size (224 for a model not registered)."""
    s = MODELS[name].img_size if name in MODELS else 224
    return s, s


def ort_session(path: str):
    """An onnxruntime CPU session on ``path`` with torch's thread count (so that latencies compare)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ExportError(f'running the ONNX file needs onnxruntime ({e}): pip install "mixzoo[deploy]"') from e
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(path, so, providers=['CPUExecutionProvider'])


def _onnx_deps():
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ExportError(f'ONNX export needs onnx and onnxscript ({e}): pip install "mixzoo[deploy]"') from e


def to_onnx(ep: torch.export.ExportedProgram, out: str, opset: Optional[int] = None) -> None:
    _onnx_deps()
    with _plain_torch():
        prog = torch.onnx.export(ep, (), opset_version=opset, dynamo=True, external_data=False,
                                 input_names=['image'], output_names=['logits'])
    prog.save(out, external_data=False)


def export(name: str, out: str, fmt: str = 'onnx', dynamic: bool = False, checkpoint: Optional[str] = None,
           opset: Optional[int] = None, size: Optional[Sequence[int]] = None, batch: int = 1,
           **model_kwargs) -> Tuple[torch.nn.Module, float]:
    """Build ``name``, export it to ``out``; returns the model and the seconds the export took (tracing +
    conversion)."""
    if fmt not in FORMATS:
        raise ExportError(f'unknown format {fmt!r}; choose from {", ".join(FORMATS)}')
    if fmt == 'onnx':
        _onnx_deps()
    model = build(name, checkpoint, **model_kwargs)
    t = time.perf_counter()
    ep = export_program(model, dynamic=dynamic, size=size, batch=batch, name=name)
    if fmt == 'onnx':
        to_onnx(ep, out, opset)
    else:
        torch.export.save(ep, out)
    return model, time.perf_counter() - t


def verify(model: torch.nn.Module, out: str, size: Sequence[int], batch: int = 1, reps: int = 5) -> Dict[str, float]:
    """onnxruntime on ``out`` beside the PyTorch model (eval, its default backends) on one random batch of the
    given size: max |ort - torch| / max |torch|, and each one's latency (best of ``reps``, ms) at the torch
    thread count."""
    sess = ort_session(out)
    x = torch.randn(batch, model.in_chans, *size)
    feed = {sess.get_inputs()[0].name: x.numpy()}

    def best(fn):
        fn()      # warm-up
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return 1e3 * min(times)
    with torch.no_grad():
        ref = model(x)
        got = torch.from_numpy(sess.run(None, feed)[0])
        return dict(rel_diff=((got - ref).abs().max() / ref.abs().max()).item(),
                    torch_ms=best(lambda: model(x)), ort_ms=best(lambda: sess.run(None, feed)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', required=True, help='zoo model name (mz_*)')
    p.add_argument('--checkpoint', help='weights to load (any layout the family reads); default: random')
    p.add_argument('--format', choices=FORMATS, default='onnx')
    p.add_argument('--dynamic', action='store_true', help='symbolic height and width')
    p.add_argument('--batch', type=int, default=1)
    p.add_argument('--opset', type=int, default=None, help='ONNX opset (default: the exporter\'s)')
    p.add_argument('--size', type=int, nargs=2, metavar=('H', 'W'), help='example / static input size')
    p.add_argument('--out', required=True)
    p.add_argument('--verify', action='store_true', help='onnx: run the file in onnxruntime beside PyTorch at the '
                   'export size (relative difference, latency of each); exit 1 above 1e-4 of the logit scale')
    a = p.parse_args(argv)
    try:
        model, secs = export(a.model, a.out, a.format, a.dynamic, a.checkpoint, a.opset, a.size, a.batch)
        print(f'{a.model}: {a.format} {"dynamic" if a.dynamic else "static"} -> {a.out} ({secs:.1f} s)')
        if a.verify and a.format == 'onnx':
            size = a.size or default_size(a.model)
            r = verify(model, a.out, size, a.batch)
            print(f'{a.model} at {size[0]}x{size[1]}, batch {a.batch}, {torch.get_num_threads()} threads: '
                  f'max |onnxruntime - torch| / max |torch| = {r["rel_diff"]:.2e}; latency torch {r["torch_ms"]:.1f} '
                  f'ms, onnxruntime {r["ort_ms"]:.1f} ms')
            if r['rel_diff'] > 1e-4:
                print('export: onnxruntime differs from PyTorch by more than 1e-4 of the logit scale', file=sys.stderr)
                return 1
        elif a.verify:
            raise ExportError('--verify runs onnxruntime: only with --format onnx')
    except (ExportError, KeyError, ValueError) as e:
        print(f'export: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
