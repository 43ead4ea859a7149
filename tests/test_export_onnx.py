"""tools/export.py: ONNX export of every family, generated from the registry (each family's first variant
that is neither slow nor build-only, cut to two blocks a stage: every block kind still runs, the export
takes a third of the time). One dynamic export per family (H, W symbolic); onnxruntime must match
PyTorch (eval, fp32) at 224, at a size no window or stride divides (200x232) and at a small lopsided one from that
one export.
Families whose dynamic export is refused (tools/export.py: DYNAMIC_UNSUPPORTED): the refusal must name the
family and the reason, and one static export at each of the two sizes must match. onnx / onnxruntime missing is
a skip for a missing dependency, which fails in CI (conftest)."""
import os
import sys
import time

import pytest
import torch

from conftest import MISSING_DEP
from helpers import first_variants, rel_err
from test_robustness import _shallow_model

for _pkg in ('onnx', 'onnxscript', 'onnxruntime'):
    pytest.importorskip(_pkg, reason=f'{MISSING_DEP}: {_pkg} (pip install "mixzoo[deploy]")')

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools'))
import export as export_tool  # noqa: E402

from mixzoo import families  # noqa: E402

TOL = 1e-4       # max |ort - torch| / max |torch|
SIZES = ((224, 224), (200, 232))
# a dynamic export also at a small, lopsided size near the bottom of its range (97x301 where the last stage reduces
# 32x): every stage padded, last-stage maps smaller than a window / kernel span in one direction (a size branch
# specialised at 224 would give wrong numbers here)
SMALL_SIDE = 17      # above the range's minimum


FIRST = first_variants()
CASES = [pytest.param(n, id=n) for f, n in FIRST.items() if f not in export_tool.DYNAMIC_UNSUPPORTED]
STATIC = [pytest.param(n, id=n) for f, n in FIRST.items() if f in export_tool.DYNAMIC_UNSUPPORTED]


def test_every_family_is_covered():
    assert set(FIRST) == set(families())


def _report(line):
    folder = os.environ.get('MIXZOO_TEST_REPORTS')     # (printed at the end of the run by conftest)
    if folder:
        # one short append a line: the workers' lines interleave whole
        with open(os.path.join(folder, 'onnx.txt'), 'a') as f:
            f.write(line + '\n')


def _onnx(model, name, path, dynamic, size):
    t = time.perf_counter()
    ep = export_tool.export_program(model, dynamic=dynamic, size=size, name=name)
    export_tool.to_onnx(ep, path)
    secs = time.perf_counter() - t
    _report(f'{name} (two blocks a stage): {"dynamic" if dynamic else "static " + "x".join(map(str, size))} '
            f'export {secs:.1f} s')
    return export_tool.ort_session(path)


def _check(sess, m, name, hw, g):
    x = torch.randn(1, 3, *hw, generator=g)
    with torch.no_grad():
        ref = m(x)
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    assert got.shape == ref.shape
    err = rel_err(got, ref)
    _report(f'{name} at {hw[0]}x{hw[1]}: max |onnxruntime - torch| / max |torch| = {err:.1e}')
    assert err <= TOL, f'{name} at {hw[0]}x{hw[1]}'


@pytest.mark.parametrize('name', CASES)
def test_onnx_matches_torch(name, tmp_path):
    m = _shallow_model(name)
    sess = _onnx(m, name, str(tmp_path / 'dyn.onnx'), True, None)
    g = torch.Generator().manual_seed(1)
    lo, _ = export_tool.dynamic_range(m)
    for hw in SIZES + ((lo + SMALL_SIDE, 301),):
        _check(sess, m, name, hw, g)


@pytest.mark.parametrize('name', STATIC)
def test_static_onnx_matches_torch(name, tmp_path):
    """A family refused for dynamic sizes exports each size on its own; a graph is for its size only: another
    size is refused by onnxruntime (not silently computed with the traced size's padding)."""
    m = _shallow_model(name)
    g = torch.Generator().manual_seed(1)
    for i, hw in enumerate(SIZES):
        sess = _onnx(m, name, str(tmp_path / f's{i}.onnx'), False, hw)
        _check(sess, m, name, hw, g)
    with pytest.raises(Exception, match='[Ii]nvalid dimensions|[Ss]hape'):
        sess.run(None, {sess.get_inputs()[0].name: torch.randn(1, 3, *SIZES[0]).numpy()})


@pytest.mark.parametrize('family', sorted(export_tool.DYNAMIC_UNSUPPORTED) or [pytest.param('-', marks=pytest.mark.skip(
    reason='every family exports dynamic sizes'))])
def test_dynamic_refusal_names_family_and_reason(family, tmp_path):
    name = FIRST[family]
    with pytest.raises(export_tool.ExportError, match=rf'^{family}: dynamic input sizes cannot be exported: .+'
                                                      r'Export a static size instead'):
        export_tool.export(name, str(tmp_path / 'x.onnx'), dynamic=True)


def test_cli_exported_program_and_errors(tmp_path, capsys):
    """The command line: an ExportedProgram of PoolFormer that loads and runs at another size, a verified ONNX
    file; an unknown model and an unknown format are errors (exit 2 / argparse's), not tracebacks."""
    name = FIRST['poolformer']
    out = tmp_path / 'p.pt2'
    assert export_tool.main(['--model', name, '--format', 'exported-program', '--dynamic', '--out', str(out)]) == 0
    # --verify (onnxruntime beside PyTorch) on the smallest whole model
    assert export_tool.main(['--model', FIRST['shvit'], '--format', 'onnx', '--size', '64', '96', '--verify',
                             '--out', str(tmp_path / 's.onnx')]) == 0
    assert 'max |onnxruntime - torch| / max |torch|' in capsys.readouterr().out
    ep = torch.export.load(str(out))
    assert ep.module()(torch.randn(1, 3, 200, 232)).shape == (1, 1000)
    assert export_tool.main(['--model', 'mz_no_such_model', '--out', str(tmp_path / 'n.onnx')]) == 2
    assert 'mz_no_such_model' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export_tool.main(['--model', name, '--format', 'tflite', '--out', str(tmp_path / 'n')])
    with pytest.raises(export_tool.ExportError, match='no such file'):
        export_tool.export(name, str(tmp_path / 'c.onnx'), checkpoint=str(tmp_path / 'missing.pth'))
