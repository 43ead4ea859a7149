"""Test setup: Triton kernels run under the interpreter when there is no GPU (must be decided
before triton is first imported), seeded RNG, and in CI no test may skip for a missing dependency."""
import os
import shutil
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')
os.environ.pop('MIXZOO_BACKEND', None)   # tests force backends explicitly
os.environ['MIXZOO_OFFLINE'] = '1'        # pretrained=True never reaches the network (test_download lifts it)
# ... nor the user's Hugging Face cache (read by huggingface_hub at import, so before timm is imported)
os.environ['HF_HUB_CACHE'] = tempfile.mkdtemp(prefix='mixzoo-tests-hf-')

import pytest  # noqa: E402

# pytest-xdist workers (the README/CI command runs `-n auto`) share the cores: threads = cores / workers, at most 2
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
_WORKERS = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
torch.set_num_threads(max(1, min(2, _CORES // _WORKERS)))

MISSING_DEP = 'missing dependency'   # skips for a missing package must start with this


@pytest.hookimpl(optionalhook=True)     # (pytest-xdist's hook: no error where xdist is absent)
def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core, at most 4 (each worker builds and holds its own models)."""
    return max(1, min(4, _CORES))


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty CPU-choice decision cache (file and memo, mixzoo.ops._cpu) and no MIXZOO_CPU."""
    from mixzoo.ops import _cpu
    monkeypatch.setenv('MIXZOO_CACHE', str(tmp_path))
    monkeypatch.delenv('MIXZOO_CPU', raising=False)
    monkeypatch.setattr(_cpu, '_DECIDED', {})
    return tmp_path / 'cpu-choices.json'


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _in_ci() -> bool:
    return os.environ.get('CI', '').lower() in ('1', 'true', 'yes')


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI a skip of an mm test, or any skip for a missing dependency, is a failure."""
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and _in_ci() and (item.get_closest_marker('mm') or MISSING_DEP in str(rep.longrepr)):
        rep.outcome = 'failed'
        rep.longrepr = f'CI must run this test, but it was skipped: {rep.longrepr}'


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """The same for a whole module skipped at import (pytest.importorskip at module level)."""
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and _in_ci() and MISSING_DEP in str(rep.longrepr):
        rep.outcome = 'failed'
        rep.longrepr = f'CI must run these tests, but the module was skipped: {rep.longrepr}'


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist the `slow` tests start first, so that no worker is left with a long test at the
    end while the other has nothing to do (with --dist worksteal the short ones fill the gaps)."""
    if _WORKERS > 1:
        items.sort(key=lambda item: item.get_closest_marker('slow') is None)


def _controller(config) -> bool:
    return not hasattr(config, 'workerinput')      # not a pytest-xdist worker


def pytest_configure(config):
    """A folder for the reports tests print at the end of the run (the Triton compile tables of
    test_gpu_compile.py); set before pytest-xdist starts its workers, which inherit it."""
    if _controller(config) and 'MIXZOO_TEST_REPORTS' not in os.environ:
        config._mixzoo_reports = os.environ['MIXZOO_TEST_REPORTS'] = tempfile.mkdtemp(prefix='mixzoo-reports-')


def pytest_terminal_summary(terminalreporter, config):
    folder = os.environ.get('MIXZOO_TEST_REPORTS')
    if not (_controller(config) and folder and os.path.isdir(folder)):
        return
    for name in sorted(os.listdir(folder)):
        terminalreporter.write_sep('-', name)
        with open(os.path.join(folder, name)) as f:
            terminalreporter.write(f.read())


def pytest_unconfigure(config):
    folder = getattr(config, '_mixzoo_reports', None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
        os.environ.pop('MIXZOO_TEST_REPORTS', None)
