"""tools/benchmark.py's efficiency and training-step columns, its bf16 autocast mode, official references given
--official-repo, the peak-memory sweep and the plots (tools/benchplots.py), on tiny settings. Nothing here
asserts a speed: only that each figure is there, finite and consistent with the others."""
import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tools'))
import benchmark  # noqa: E402
import benchplots  # noqa: E402
from benchpage import cells  # noqa: E402

# one torch thread: two threads on a machine whose other core is busy wait on each other (10x slower here)
TINY = ['--batch-size', '2', '--reps', '1', '--img-size', '64', '--threads', '1']
PNG = b'\x89PNG\r\n\x1a\n'


@pytest.fixture(autouse=True)
def small_gemm(monkeypatch):
    """The GEMM rate's matmul at 256^3 (the figure is not asserted; 2048^3 takes seconds on a loaded machine),
    and the test session's torch threads back after a run with --threads."""
    monkeypatch.setattr(benchmark, 'GEMM_N', 256)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def table(out):
    """{model: {column: cell}} of the printed model table."""
    lines = [ln for ln in out.splitlines() if ln.startswith('| ') and not ln.startswith('| model ')
             and not set(ln) <= set('|-: ')]
    head = cells(next(ln for ln in out.splitlines() if ln.startswith('| model ')))
    return {c[0]: dict(zip(head, c)) for c in map(cells, lines) if c[0].startswith('mz_') and len(c) == len(head)}


def number(cell):
    x = float(cell)
    assert math.isfinite(x) and x > 0, cell
    return x


def test_gemm_rate_and_its_header_line(monkeypatch):
    """The GEMM rate is a positive GFLOP/s; bfloat16 is measured only where the CPU has native bf16 instructions
    (else the header says 'none' and names them)."""
    assert benchmark.gemm_rate('float32', 'cpu', n=128, reps=1) > 0
    monkeypatch.setattr(benchmark, 'GEMM_N', 128)
    monkeypatch.setattr(benchmark, 'gemm_rate', lambda dt, device, n: 2 * n ** 3 / 1e-3 / 1e9)   # 1 ms a matmul
    monkeypatch.setattr(benchmark, 'cpu_flags', lambda: {'avx2'})
    rates, line = benchmark.gemm_rates('cpu', 'float32')
    assert rates['float32'] == pytest.approx(4.194304) and rates['bfloat16'] is None
    assert line.startswith(f'GEMM rate (128^3 matmul, {torch.get_num_threads()} threads, best of 3): float32 ')
    assert 'bfloat16 none (no native bfloat16 GEMM: amx_bf16 / avx512_bf16 absent)' in line
    monkeypatch.setattr(benchmark, 'cpu_flags', lambda: {'avx512f', 'avx512_bf16'})
    rates, line = benchmark.gemm_rates('cpu', 'float32')
    assert rates['bfloat16'] > 0 and '(avx512_bf16)' in line


def test_efficiency_and_training_step_columns(capsys):
    """Per model: GFLOP/s = 2 * GMACs * img/s and its share of the GEMM rate, and the training step (forward +
    backward) beside the reference, with 3x the forward's FLOPs; --no-backward drops the training columns; a
    batch of 1 through BatchNorm leaves them '-' and says why."""
    row = {'GMACs': 2.0, 'img/s': 10.0, 'fb_img/s': 3.0}
    assert benchmark.efficiency(row, 200.0) == {'GFLOP/s': 40.0, 'gemm_%': 20.0, 'fb_GFLOP/s': 36.0, 'fb_gemm_%': 18.0}
    assert benchmark.efficiency(row, None) == {'GFLOP/s': 40.0, 'fb_GFLOP/s': 36.0}
    assert benchmark.main(['--model', 'mz_shvit_s1', *TINY, '--no-page']) == 0
    out = capsys.readouterr().out
    r = table(out)['mz_shvit_s1']
    # (their arithmetic is checked above: GMACs print to 3 decimals only)
    assert all(number(r[c]) for c in ('img/s', 'GFLOP/s', 'gemm_%', 'fb_GFLOP/s', 'fb_gemm_%', 'fb_ref_img/s'))
    fb = number(r['fb_img/s'])
    assert number(r['fb_ratio']) == pytest.approx(fb / number(r['fb_ref_img/s']), rel=0.02)
    assert '- `fb_GFLOP/s`: 3 * 2 * GMACs * fb_img/s' in out and '- `gemm_%`: ' in out
    assert 'x_fp32' not in out                     # (a float32 run has no "vs float32" column)
    assert benchmark.main(['--model', 'mz_shvit_s1', *TINY, '--speed', 'none', '--no-page', '--no-backward']) == 0
    out = capsys.readouterr().out
    assert 'gemm_%' in out and 'fb_img/s' not in out
    assert benchmark.main(['--model', 'mz_shvit_s1', *TINY, '--batch-size', '1', '--no-page']) == 0
    out, err = capsys.readouterr()
    r = table(out)['mz_shvit_s1']
    assert number(r['img/s']) and r['fb_img/s'] == r['fb_ratio'] == '-'
    assert 'mz_shvit_s1: training step not timed (Expected more than 1 value per channel' in err


def test_bf16_runs_both_models_under_autocast(capsys):
    """--dtype bf16: the zoo and its reference under torch.autocast (weights stay float32), their ratio, and the
    share of the bfloat16 GEMM rate where the CPU has one."""
    ns = benchmark.argparse.Namespace(dtype='bfloat16', device='cpu')
    lin = torch.nn.Linear(4, 4)
    with benchmark.precision(ns)():
        assert lin(torch.randn(2, 4)).dtype == torch.bfloat16
    assert lin.weight.dtype == torch.float32
    assert benchmark.main(['--model', 'mz_shvit_s1', *TINY, '--no-page', '--dtype', 'bf16']) == 0
    out = capsys.readouterr().out
    assert 'batch 2, bfloat16 autocast (float32 weights), best of 1' in out
    r = table(out)['mz_shvit_s1']
    assert number(r['ratio']) and number(r['fb_ratio']) and float(r['max_diff']) < 0.2 and number(r['x_fp32'])
    assert '- `x_fp32`: the zoo model\'s bfloat16 img/s over its own float32 img/s' in out
    native = benchmark.native_gemm('bfloat16', 'cpu')
    assert (r['gemm_%'] != '-') == bool(native)
    assert '- `gemm_%`: GFLOP/s as a share of this machine\'s bfloat16 GEMM rate' in out


@pytest.fixture
def fake_nat_repo(tmp_path, monkeypatch):
    """A stand-in for the authors' NAT checkout (classification/nat.py, as tools/official/nat.py imports it): its
    `nat_mini` is the zoo's model, whose state dict the zoo's converter passes through."""
    repo = tmp_path / 'Neighborhood-Attention-Transformer'
    (repo / 'classification').mkdir(parents=True)
    (repo / 'classification' / 'nat.py').write_text(
        'import timm\nimport mixzoo  # noqa: F401\n\n\ndef nat_mini():\n    return timm.create_model("mz_nat_mini")\n')
    monkeypatch.setattr(sys, 'path', list(sys.path))
    yield repo
    sys.modules.pop('nat', None)


def test_official_reference_memory_sweep_and_plots(fake_nat_repo, tmp_path, capsys):
    """--official-repo FAMILY=PATH times the official model beside the zoo's (forward and training step, same
    weights); --memory-sides measures one forward's peak memory of both at each side; the page gets the memory
    table and, with matplotlib, the two plots beside it (else a line naming the extra to install)."""
    page = tmp_path / 'BENCHMARKS.md'
    assert benchmark.main(['--model', 'mz_nat_mini', *TINY, '--official-repo', f'nat={fake_nat_repo}',
                           '--memory-sides', '64', '96', '--page', str(page)]) == 0
    out, err = capsys.readouterr()
    assert '; official code: nat' in out
    r = table(out)['mz_nat_mini']
    assert r['reference'].startswith('official:') and number(r['ref_img/s']) and number(r['fb_ref_img/s'])
    assert float(r['max_diff']) < 1e-5
    text = page.read_text()
    assert '### Peak memory against the input side' in text
    mem = {tuple(c[:2]): c[2:] for c in map(cells, text.splitlines()) if c[0] == 'mz_nat_mini' and len(c) == 4}
    assert set(mem) == {('mz_nat_mini', 'zoo'), ('mz_nat_mini', 'official')}
    assert all(number(v) for vals in mem.values() for v in vals)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert f'Plots: not drawn by this run (the plots need matplotlib: {benchplots.INSTALL})' in text
        return
    for kind in ('speed', 'memory'):
        links = [ln for ln in text.splitlines() if ln.startswith('![') and ln.endswith(f'-{kind}.png)')]
        assert len(links) == 1, text
        png = tmp_path / links[0].split('](')[1][:-1]
        assert png.read_bytes()[:8] == PNG and 'plots: wrote' in err


def test_official_reference_outside_its_cpu_dtypes_is_not_run(fake_nat_repo, capsys):
    """NATTEN's CPU kernels end the process on bf16 (a C++ exit, nothing to catch): in a bf16 run the official NAT
    is not built or timed (its columns show -, stderr says why) and the zoo model is still timed."""
    assert benchmark.main(['--model', 'mz_nat_mini', *TINY, '--no-backward', '--official-repo',
                           f'nat={fake_nat_repo}', '--no-page', '--dtype', 'bf16']) == 0
    out, err = capsys.readouterr()
    r = table(out)['mz_nat_mini']
    assert number(r['img/s']) and number(r['x_fp32']) and r['ref_img/s'] == '-' and r['ratio'] == '-'
    assert ('mz_nat_mini: the official model is not timed: its code runs in float32 / float64 only on CPU '
            '(tools/official/nat.py), not bfloat16') in err
    assert 'nat' not in sys.modules     # (the checkout was not imported)


def test_bad_official_repo_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        benchmark.main(['--model', 'mz_nat_mini', '--official-repo', f'nosuch={tmp_path}', '--no-page'])
    assert "no official-fixture recipe for 'nosuch'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark.main(['--model', 'mz_nat_mini', '--official-repo', str(tmp_path), '--no-page'])
    assert 'want FAMILY=PATH' in capsys.readouterr().err


def test_plot_data_and_the_notice_without_matplotlib(tmp_path, monkeypatch, capsys):
    """The plots' data from the table rows (no matplotlib needed); without matplotlib the page says which
    extra to install and no folder is made."""
    rows = [{'model': 'mz_a', 'GMACs': 1.0, 'img/s': 10.0, 'ref_img/s': 12.0},
            {'model': 'mz_b', 'GMACs': 2.0, 'img/s': 5.0},
            {'model': 'mz_c', 'GMACs': 3.0}]                          # not timed: no point
    assert benchplots.speed_points(rows, lambda n: 'F' if n != 'mz_b' else 'G') == \
        {'F': [('mz_a', 1.0, 10.0, 12.0)], 'G': [('mz_b', 2.0, 5.0, None)]}
    mem = [{'model': 'mz_a', 'implementation': 'zoo', 'MB@224': 10.0, 'MB@512': 40.0},
           {'model': 'mz_a', 'implementation': 'official', 'MB@224': 12.0, 'MB@512': None}]
    assert benchplots.memory_lines(mem, [224, 512]) == {('mz_a', 'zoo'): [(224, 10.0), (512, 40.0)],
                                                       ('mz_a', 'official'): [(224, 12.0)]}
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    monkeypatch.setitem(sys.modules, 'matplotlib.figure', None)
    with pytest.raises(benchplots.PlotsUnavailable, match=r'pip install "mixzoo\[plots\]"'):
        benchplots.draw(str(tmp_path / 'plots'), 'x', 't', {'F': [('mz_a', 1.0, 10.0, 12.0)]}, {}, 'img/s')
    assert not (tmp_path / 'plots').exists()
    page = tmp_path / 'BENCHMARKS.md'
    assert benchmark.main(['--model', 'mz_shvit_s1', *TINY, '--speed', 'none', '--page', str(page)]) == 0
    assert 'plots: not drawn (the plots need matplotlib: pip install "mixzoo[plots]")' in capsys.readouterr().err
    assert 'Plots: not drawn by this run' in page.read_text()
