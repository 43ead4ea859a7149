"""Every Triton kernel of every op compiled ahead of time for sm_80 and sm_90, without a GPU (mixzoo.ops._aot):
forward and backward kernels, every autotune config of the GPU list, every dtype the backend declares, at the
models' head dims and layouts and at the backend's largest declared head dim. Fails on a compile error, or on
shared memory over the per-block limit for a config a launch takes (configs that cannot fit are pruned:
ops._triton). Registers and spills come from ptxas for the pairs in PTXAS (``python -m mixzoo.ops info
--gpu-compile`` does every pair); the per-kernel tables are printed at the end of the pytest run.

Cost (2 cores): about 350 compiles to the shared-memory allocation (~0.25 s of CPU each) and ~35 through ptxas
(1-3 s each), one worker process per op; Triton's cache under ~/.cache/mixzoo/triton-aot makes a second run read
the results only."""
import os

import pytest
import torch

from mixzoo.ops import _aot, _dispatch, _triton

PTXAS = ('bfloat16@sm_90',)   # training dtype on the H100: registers / spills and the back end's own errors


def _report(op, rows):
    """The op's tables, for the end of the run (conftest's terminal summary prints the folder)."""
    folder = os.environ.get('MIXZOO_TEST_REPORTS')
    if folder:
        with open(os.path.join(folder, f'gpu-compile-{op}.txt'), 'w') as f:
            f.write(f'Triton kernels of {op!r} compiled for sm_80 / sm_90 (tests/test_gpu_compile.py)\n'
                    f'{_aot.table(rows)}\n{_aot.summary(rows)}\n')


def test_every_op_with_triton_kernels_has_compile_cases():
    with_triton = {op for op in _dispatch.ops() if any(b.name == 'triton' for b in _dispatch.backends(op))}
    assert with_triton == set(_aot.CASES)


@pytest.mark.slow
@pytest.mark.parametrize('op', sorted(_aot.CASES))
def test_every_kernel_compiles_for_sm80_and_sm90(op):
    rows = _aot.run_worker(op, PTXAS)
    _report(op, rows)
    assert {r['kernel'] for r in rows} == {f'{op}.{k}' for k in _aot.kernels(op)}, 'a kernel no case launches'
    declared = next(b for b in _dispatch.backends(op) if b.name == 'triton').dtypes
    assert {r['dtype'] for r in rows} == {str(d).replace('torch.', '') for d in declared}
    assert not PTXAS or any(r.get('regs') for r in rows), 'no compile went through ptxas'
    failed = [r for r in rows if r['status'] in _aot.FAILED]
    assert not failed, _aot.summary(rows)


def test_launch_tiles_shrink_with_the_head_dim(monkeypatch):
    """The tile rules the compile check verifies: the first tile that fits, the small ones past the bounds."""
    from mixzoo.ops.window import triton as window
    monkeypatch.setenv('TRITON_INTERPRET', '0')
    assert _triton.pick(window._BWD, 32, torch.float32) == dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3)
    assert _triton.pick(window._BWD, 256, torch.bfloat16)['BLOCK_M'] == 32
    assert _triton.pick(window._BWD, 256, torch.float32)['BLOCK_M'] == 16
    assert not window._FWD[0].fits(128, torch.float32) and window._FWD[0].fits(256, torch.float16)
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    assert _triton.pick(window._BWD, 256, torch.float32) == dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
