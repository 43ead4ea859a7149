"""tools/gpu_check.py, the prepared GPU check, in its dry run (CPU, tiny shapes, Triton interpreted): the same
code paths the GPU run takes, every op and backend of the registry through the correctness grid, every op at
its model shapes, a training step; and a correctness failure makes it exit non-zero."""
import json
import os
import subprocess
import sys

import pytest

from mixzoo.ops import _dispatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tools'))


@pytest.mark.slow
def test_dry_run_covers_every_op_and_backend(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'gpu_check.py'), '--dry-run', '--out',
                        str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / 'report.json').read_text())
    assert (tmp_path / 'report.md').read_text().startswith('# GPU check (dry run, CPU)')
    assert not report['failures']
    c = report['correctness']
    assert c['passed'] > 0 and c['failed'] == 0
    registered = {f'{op}/{b.name}' for op in _dispatch.ops() for b in _dispatch.backends(op)}
    ran = {k for k, v in c['by_backend'].items() if v['passed']}
    assert ran == registered, f'backends the grid did not pass on: {sorted(registered - ran)}'
    timed = {(row['op'], row['impl']) for row in report['ops'] if row.get('ms') is not None}
    for op in _dispatch.ops():
        assert {(op, 'torch'), (op, 'triton')} <= timed, f'{op}: not timed at its model shapes'
    assert any(row['run'] == 'zoo' for row in report['training'])
    assert any('CUDA only' in why for _, why in report['skipped'])


def test_a_correctness_failure_fails_the_check(tmp_path, monkeypatch):
    import gpu_check
    import op_cases
    real = op_cases.check

    def broken(op, backend, *args):
        if op == 'routing' and backend == 'torch':
            raise AssertionError('routing/torch differs from reference')
        return real(op, backend, *args)
    monkeypatch.setattr(op_cases, 'check', broken)
    assert gpu_check.main(['--dry-run', '--out', str(tmp_path), '--time-limit', '0']) == 1
    report = json.loads((tmp_path / 'report.json').read_text())
    assert any('routing-torch' in f and 'differs from reference' in f for f in report['failures']), report['failures']
    assert '## Failures' in (tmp_path / 'report.md').read_text()
